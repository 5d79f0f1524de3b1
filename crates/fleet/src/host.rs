//! A host acting on its assignments: it watches only its own prefix,
//! `assign/<host-id>/`, applies what is there to its local agent, and reports how each
//! group runs under `reports/<host-id>/` ([`crate::report`]).
//!
//! **The watch** starts from the revision of a first read of the prefix; after an error it
//! resumes from the last revision it saw (nothing is missed, nothing read twice), and when
//! etcd has compacted that revision away it reads the prefix again. A watch that hears
//! nothing (not even the progress it asks for every third of the lease) for a whole
//! lease is taken for lost.
//! **Losing etcd** changes nothing on the host: the agent keeps running the groups it
//! was last given, and nothing is applied until etcd answers again; assignments that
//! changed meanwhile are then applied at once.
//! **The agent** is behind [`LocalHost`], so this crate does not know it: the daemon
//! glues the two, and tests can put a fake in its place.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, PutOptions, Txn, TxnOp, WatchOptions};

use crate::controller::ASSIGN;
use crate::endpoints::Endpoints;
use crate::error::{Error, Result};
use crate::plan::Assignment;
use crate::record::HostId;
use crate::report::{self, LocalGroup, REPORTS, Report, ReportWrite, report_key};
use crate::spec::GroupName;
use crate::store::{Connections, Store};

/// A group that could not be applied is tried again this often (its image may have been
/// built or pushed since).
const RETRY_FAILED: Duration = Duration::from_secs(5);

/// How often the agent's groups are read for the reports.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The start of the name a host runs a fleet group under (the agent's `FLEET_PREFIX`):
/// the fleet's `web` is the host's `fleet-web`, so it never meets the operator's groups.
pub const LOCAL_PREFIX: &str = "fleet-";

/// The name a host runs `group` under.
pub fn local_name(group: &GroupName) -> String {
    format!("{LOCAL_PREFIX}{group}")
}

/// The fleet group a host's group runs, if it is one.
pub fn fleet_name(local: &str) -> Option<GroupName> {
    local.strip_prefix(LOCAL_PREFIX)?.parse().ok()
}

/// What a host's agent does for the fleet. Both calls may block (an apply pulls images).
pub trait LocalHost: Send + Sync + 'static {
    /// Makes this host's fleet groups exactly `assignments`, creating, changing and
    /// deleting only fleet groups. A group that cannot be applied is left as it was and
    /// returned with why; the others are applied.
    fn apply(
        &self,
        assignments: &BTreeMap<GroupName, Assignment>,
    ) -> Result<BTreeMap<GroupName, String>>;

    /// The fleet groups on this host now, by their fleet name.
    fn groups(&self) -> Result<BTreeMap<GroupName, LocalGroup>>;
}

/// What a host's work reports as it goes, for the daemon's log.
#[derive(Debug)]
pub enum Event {
    /// The assignments were applied: `groups` assigned, `failed` not applied (with why).
    Applied {
        groups: usize,
        failed: BTreeMap<GroupName, String>,
    },
    /// `writes` reports written or deleted.
    Reported { writes: usize },
    /// An assignment record that cannot be read: ignored.
    Malformed { error: Error },
    /// The revision the watch was to resume from is compacted: the prefix is read again.
    Compacted { revision: i64 },
    /// etcd lost: the groups keep running as they are; trying again after `retry`.
    Lost { error: Error, retry: Duration },
}

/// A host's work in the fleet; [`HostWork::run`] does it until dropped.
pub struct HostWork<L: LocalHost> {
    pub endpoints: Endpoints,
    pub host: HostId,
    pub ttl: Duration,
    pub local: Arc<L>,
    /// The host's lease now (`None` while it has none), as its registration has it:
    /// reports are written under it.
    pub lease: tokio::sync::watch::Receiver<Option<i64>>,
}

/// This host's assignments as last read, and the etcd revision they are as of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assigned {
    pub groups: BTreeMap<GroupName, Assignment>,
    pub revision: i64,
}

/// Reports by group, each with the lease it is held under.
type Held = BTreeMap<GroupName, (Report, i64)>;

/// What outlives a session (one connection to etcd).
#[derive(Default)]
struct Progress {
    /// `None` until first read, and again after a compaction.
    known: Option<Assigned>,
    /// What was last handed to the agent.
    applied_to: Option<BTreeMap<GroupName, Assignment>>,
    /// The assignment revision each group was last applied at.
    applied: BTreeMap<GroupName, String>,
    failed: BTreeMap<GroupName, String>,
    tried: Option<tokio::time::Instant>,
    /// The reports as written, and the lease they were written under.
    written: Option<(i64, Held)>,
    last_read: Option<tokio::time::Instant>,
}

/// How a watch ended.
enum Ended {
    Compacted(i64),
    Lost(Error),
}

impl<L: LocalHost> HostWork<L> {
    fn beat(&self) -> Duration {
        self.ttl / 3
    }

    /// The prefix this host watches: its own assignments only.
    fn prefix(&self) -> String {
        format!("{ASSIGN}{}/", self.host)
    }

    /// Runs until the task running it is dropped.
    pub async fn run(self, report: impl FnMut(Event) + Send) {
        self.run_on(None, report).await
    }

    /// [`HostWork::run`], on `shared` connections when given (many hosts in one process,
    /// see [`Connections`]) instead of connections of its own per session.
    pub async fn run_on(self, shared: Option<Connections>, mut report: impl FnMut(Event) + Send) {
        let first_retry = Duration::from_millis(500);
        let mut retry = first_retry;
        let mut p = Progress::default();
        loop {
            let mut heard = false;
            let error = self
                .session(shared.as_ref(), &mut p, &mut report, &mut heard)
                .await;
            if heard {
                retry = first_retry;
            }
            report(Event::Lost { error, retry });
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(self.ttl);
        }
    }

    /// One connection: watches until it is lost, reading the prefix again after a
    /// compaction. Returns why it was lost.
    async fn session(
        &self,
        shared: Option<&Connections>,
        p: &mut Progress,
        report: &mut (impl FnMut(Event) + Send),
        heard: &mut bool,
    ) -> Error {
        let (store, streaming) = match shared {
            Some(c) => c.pick(),
            None => {
                let store = match Store::connect(&self.endpoints, self.beat()).await {
                    Ok(s) => s,
                    Err(e) => return e,
                };
                // The watch's stream lives as long as it may: no per-call deadline on it.
                match Store::connect_streaming(&self.endpoints, self.beat()).await {
                    Ok(s) => (store, s),
                    Err(e) => return e,
                }
            }
        };
        loop {
            if p.known.is_none() {
                match store.assigned(&self.host).await {
                    Ok((known, malformed)) => {
                        for error in malformed {
                            report(Event::Malformed { error });
                        }
                        p.known = Some(known);
                    }
                    Err(e) => return e,
                }
            }
            *heard = true;
            match self.watch(&store, &streaming, p, report).await {
                Ended::Compacted(revision) => {
                    report(Event::Compacted { revision });
                    p.known = None;
                }
                Ended::Lost(e) => return e,
            }
        }
    }

    /// Follows the prefix from the revision after the last one seen.
    async fn watch(
        &self,
        store: &Store,
        streaming: &Store,
        p: &mut Progress,
        report: &mut (impl FnMut(Event) + Send),
    ) -> Ended {
        let from = p.known.as_ref().map_or(0, |k| k.revision) + 1;
        let mut client = streaming.client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let (mut asker, mut stream) = match store
            .call(
                "the watch on this host's assignments",
                client.watch(self.prefix(), Some(options)),
            )
            .await
        {
            Ok(s) => s.split(),
            Err(e) => return Ended::Lost(e),
        };
        let mut heard_at = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(REPORT_EVERY.min(self.beat()));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut asked_at = tokio::time::Instant::now();
        loop {
            if let Err(e) = self.converge(store, p, report).await {
                return Ended::Lost(e);
            }
            tokio::select! {
                message = stream.message() => {
                    let answer = match message {
                        Ok(Some(a)) => a,
                        Ok(None) => return Ended::Lost(store.unreachable("etcd closed the watch".into())),
                        Err(e) => return Ended::Lost(store.error("the watch on this host's assignments", e)),
                    };
                    heard_at = tokio::time::Instant::now();
                    if answer.compact_revision() > 0 {
                        return Ended::Compacted(answer.compact_revision());
                    }
                    if answer.canceled() {
                        return Ended::Lost(store.unreachable(format!(
                            "etcd cancelled the watch ({})",
                            answer.cancel_reason()
                        )));
                    }
                    let Some(known) = p.known.as_mut() else {
                        return Ended::Compacted(0);
                    };
                    if answer.events().is_empty() {
                        // A progress notice: every event up to its revision was sent.
                        if !answer.created()
                            && let Some(h) = answer.header()
                        {
                            known.revision = known.revision.max(h.revision());
                        }
                        continue;
                    }
                    for event in answer.events() {
                        let Some(kv) = event.kv() else { continue };
                        known.revision = known.revision.max(kv.mod_revision());
                        let group = match self.group_of(kv.key()) {
                            Ok(g) => g,
                            Err(error) => {
                                report(Event::Malformed { error });
                                continue;
                            }
                        };
                        match event.event_type() {
                            EventType::Delete => {
                                known.groups.remove(&group);
                            }
                            EventType::Put => match decode_assignment(kv.key(), kv.value()) {
                                Ok(a) => {
                                    known.groups.insert(group, a);
                                }
                                Err(error) => report(Event::Malformed { error }),
                            },
                        }
                    }
                }
                _ = tick.tick() => {
                    if heard_at.elapsed() >= self.ttl {
                        return Ended::Lost(store.unreachable(format!(
                            "the watch heard nothing for {} s",
                            self.ttl.as_secs()
                        )));
                    }
                    if asked_at.elapsed() >= self.beat() {
                        asked_at = tokio::time::Instant::now();
                        if let Err(e) = asker.request_progress().await {
                            return Ended::Lost(store.error("the watch's progress", e));
                        }
                    }
                }
            }
        }
    }

    /// The group a key under this host's prefix names.
    fn group_of(&self, key: &[u8]) -> Result<GroupName> {
        let key = String::from_utf8_lossy(key);
        key.strip_prefix(&self.prefix())
            .ok_or_else(|| "the key is not under this host's prefix".to_owned())
            .and_then(|g| g.parse::<GroupName>())
            .map_err(|reason| Error::Record {
                key: key.clone().into_owned(),
                reason,
            })
    }

    /// Applies the assignments if they changed since last applied (or a group failed a
    /// while ago), then writes the reports that changed.
    async fn converge(
        &self,
        store: &Store,
        p: &mut Progress,
        report: &mut (impl FnMut(Event) + Send),
    ) -> Result<()> {
        let Some(known) = &p.known else {
            return Ok(());
        };
        let retry_failed =
            !p.failed.is_empty() && p.tried.is_none_or(|t| t.elapsed() >= RETRY_FAILED);
        if p.applied_to.as_ref() != Some(&known.groups) || retry_failed {
            let groups = known.groups.clone();
            let local = self.local.clone();
            let given = groups.clone();
            let failed = tokio::task::spawn_blocking(move || local.apply(&given))
                .await
                .map_err(|e| Error::Host {
                    reason: format!("the apply stopped: {e}"),
                })
                .and_then(|r| r);
            let failed = match failed {
                Ok(f) => f,
                // The agent itself failed: every group is tried again later.
                Err(e) => groups.keys().map(|g| (g.clone(), e.to_string())).collect(),
            };
            p.applied.retain(|g, _| groups.contains_key(g));
            for (g, a) in &groups {
                if !failed.contains_key(g) {
                    p.applied.insert(g.clone(), a.revision.clone());
                }
            }
            report(Event::Applied {
                groups: groups.len(),
                failed: failed.clone(),
            });
            p.failed = failed;
            p.applied_to = Some(groups);
            p.tried = Some(tokio::time::Instant::now());
        }
        if p.last_read.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            return Ok(());
        }
        p.last_read = Some(tokio::time::Instant::now());
        let Some(lease) = *self.lease.borrow() else {
            return Ok(());
        };
        let local = self.local.clone();
        let here = tokio::task::spawn_blocking(move || local.groups())
            .await
            .map_err(|e| Error::Host {
                reason: format!("reading the groups stopped: {e}"),
            })??;
        let Some(known) = &p.known else {
            return Ok(());
        };
        // A group applied here that the agent no longer has (deleted by hand) is made
        // again at the next round: the fleet owns its groups.
        if known
            .groups
            .keys()
            .any(|g| p.applied.contains_key(g) && !here.contains_key(g))
        {
            p.applied_to = None;
        }
        let want = report::reports(&known.groups, &p.applied, &p.failed, &here, now_ms());
        let have = match &p.written {
            Some((l, have)) if *l == lease => have.clone(),
            _ => store.reports_of(&self.host).await?,
        };
        let writes = report::diff(&have, &want, lease);
        if !writes.is_empty() {
            let n = writes.len();
            store.write_reports(&self.host, lease, writes).await?;
            report(Event::Reported { writes: n });
        }
        let mut written = have;
        written.retain(|g, _| want.contains_key(g));
        for (g, r) in want {
            let keep = written
                .get(&g)
                .is_some_and(|(old, held)| *held == lease && old.says_the_same(&r));
            if !keep {
                written.insert(g, (r, lease));
            }
        }
        p.written = Some((lease, written));
        Ok(())
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn decode_assignment(key: &[u8], value: &[u8]) -> Result<Assignment> {
    serde_json::from_slice(value).map_err(|e| Error::Record {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("its value is not an assignment: {e}"),
    })
}

/// Every host's reports, by host and group, and the records that could not be read.
#[derive(Debug, Default)]
pub struct Reports {
    pub hosts: BTreeMap<HostId, BTreeMap<GroupName, Report>>,
    pub malformed: Vec<Error>,
}

impl Store {
    /// `host`'s assignments and the revision they are as of; records that cannot be read
    /// are returned apart, as errors naming their keys.
    pub async fn assigned(&self, host: &HostId) -> Result<(Assigned, Vec<Error>)> {
        let prefix = format!("{ASSIGN}{host}/");
        let (kvs, revision) = self.get_prefix("this host's assignments", &prefix).await?;
        let mut known = Assigned {
            groups: BTreeMap::new(),
            revision,
        };
        let mut malformed = Vec::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let group = key
                .strip_prefix(&prefix)
                .unwrap_or("")
                .parse::<GroupName>()
                .map_err(|reason| Error::Record {
                    key: key.clone(),
                    reason,
                });
            match group.and_then(|g| Ok((g, decode_assignment(kv.key(), kv.value())?))) {
                Ok((g, a)) => {
                    known.groups.insert(g, a);
                }
                Err(e) => malformed.push(e),
            }
        }
        Ok((known, malformed))
    }

    /// `host`'s reports as stored, each with the lease it is held under. Records that
    /// cannot be read count as absent, so they are written over.
    pub(crate) async fn reports_of(&self, host: &HostId) -> Result<Held> {
        let prefix = format!("{REPORTS}{host}/");
        let (kvs, _) = self.get_prefix("this host's reports", &prefix).await?;
        let mut out = BTreeMap::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Ok(group) = key.strip_prefix(&prefix).unwrap_or("").parse::<GroupName>() else {
                continue;
            };
            if let Ok(r) = serde_json::from_slice::<Report>(kv.value()) {
                out.insert(group, (r, kv.lease()));
            }
        }
        Ok(out)
    }

    /// Writes `host`'s reports under `lease`, at most 100 writes per transaction.
    pub(crate) async fn write_reports(
        &self,
        host: &HostId,
        lease: i64,
        writes: Vec<ReportWrite>,
    ) -> Result<()> {
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|w| match w {
                ReportWrite::Put(g, r) => TxnOp::put(
                    report_key(host, &g),
                    // A report is strings and numbers: this cannot fail.
                    serde_json::to_vec(&r).unwrap_or_default(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                ReportWrite::Delete(g) => TxnOp::delete(report_key(host, &g), None),
            })
            .collect();
        for chunk in ops.chunks(100) {
            let mut client = self.client();
            self.call_as(
                "this host's reports",
                Some(format!("write {REPORTS}{host}/")),
                client.txn(Txn::new().and_then(chunk.to_vec())),
            )
            .await?;
        }
        Ok(())
    }

    /// Every host's reports.
    pub async fn reports(&self) -> Result<Reports> {
        let (kvs, _) = self.get_prefix("the hosts' reports", REPORTS).await?;
        let mut out = Reports::default();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let bad = |reason: String| Error::Record {
                key: key.clone(),
                reason,
            };
            let parsed = key
                .strip_prefix(REPORTS)
                .and_then(|rest| rest.split_once('/'))
                .ok_or_else(|| bad("the key is not reports/<host>/<group>".into()))
                .and_then(|(h, g)| {
                    let h: HostId = h.parse().map_err(|e: Error| bad(e.to_string()))?;
                    let g: GroupName = g.parse().map_err(bad)?;
                    let r: Report = serde_json::from_slice(kv.value())
                        .map_err(|e| bad(format!("its value is not a report: {e}")))?;
                    Ok((h, g, r))
                });
            match parsed {
                Ok((h, g, r)) => {
                    out.hosts.entry(h).or_default().insert(g, r);
                }
                Err(e) => out.malformed.push(e),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_names_the_groups_under_its_own_prefix_only() {
        let (tx, rx) = tokio::sync::watch::channel(None);
        drop(tx);
        struct Nothing;
        impl LocalHost for Nothing {
            fn apply(
                &self,
                _: &BTreeMap<GroupName, Assignment>,
            ) -> Result<BTreeMap<GroupName, String>> {
                Ok(BTreeMap::new())
            }
            fn groups(&self) -> Result<BTreeMap<GroupName, LocalGroup>> {
                Ok(BTreeMap::new())
            }
        }
        let w = HostWork {
            endpoints: "http://127.0.0.1:2379".parse().unwrap(),
            host: "h1".parse().unwrap(),
            ttl: Duration::from_secs(3),
            local: Arc::new(Nothing),
            lease: rx,
        };
        assert_eq!(w.prefix(), "/juice/v1/assign/h1/");
        assert_eq!(
            w.group_of(b"/juice/v1/assign/h1/web").unwrap().as_str(),
            "web"
        );
        for bad in [&b"/juice/v1/assign/h10/web"[..], b"/juice/v1/assign/h1/Web"] {
            let e = w.group_of(bad).unwrap_err().to_string();
            assert!(e.starts_with("fleet record /juice/v1/assign/h1"), "{e}");
        }
    }
}
