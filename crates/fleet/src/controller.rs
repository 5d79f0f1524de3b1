//! The fleet controller: one leader among the daemons started with `--fleet-controller`,
//! elected through etcd, and the only writer of `assign/<host>/<group>`.
//!
//! **Election**: a candidate grants itself a lease and, in one transaction, creates
//! `controller/leader` under it if the key does not exist. The key's `create_revision`
//! names this leadership: a later leader's key is a new key with a larger one.
//! **Fencing**: every write of the leader is a transaction that first compares the key's
//! `create_revision` with its own, so a leader that was deposed (its lease expired while
//! it was paused or cut off, and another took over) has its writes refused, never applied.
//! **Work**: the leader reads `spec`, plans it on the registered hosts from the stored
//! assignments ([`crate::plan_from`], so instances stay where they are)
//! whenever the spec's revision or the registered hosts change (and once when it is
//! elected), and writes only the assignments that differ, deleting the ones no longer
//! planned. A missing host's assignments stay until its groups' delay has passed, unless
//! the brake holds ([`crate::liveness`]).

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::endpoints::Endpoints;
use crate::error::{Error, Result};
use crate::liveness::{BrakeRecord, LeaderState, missing_for};
use crate::plan::{Assignment, HostCapacity, Plan, PlanError, plan_pinned};
use crate::record::HostId;
use crate::report::Report;
use crate::rollout::{self, RolloutRecord};
use crate::spec::{FleetSpec, GroupName};
use crate::store::Store;

/// The leader's key, held under the leader's lease.
pub const LEADER: &str = "/juice/v1/controller/leader";
/// The fleet's declared state, as JSON of a [`FleetSpec`]; written by `juice fleet apply`.
pub const SPEC: &str = "/juice/v1/spec";
/// Assignments: `assign/<host>/<group>`, written only by the leader.
pub const ASSIGN: &str = "/juice/v1/assign/";

/// etcd refuses a transaction of more than 128 operations; one is the leadership's compare.
const OPS_PER_TXN: usize = 100;

/// The value of the leader's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub host: HostId,
}

/// A leadership held: the lease it is held under and the leader key's `create_revision`,
/// which fences every write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub lease: i64,
    pub revision: i64,
}

/// Who leads now, as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    pub host: HostId,
    /// The leader key's create_revision: a new leader has a larger one.
    pub revision: i64,
    pub lease: i64,
}

/// The stored spec and the etcd revision it was written at.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSpec {
    pub spec: FleetSpec,
    pub revision: i64,
}

/// The key of the assignment of `group` to `host`.
pub fn assign_key(host: &HostId, group: &GroupName) -> String {
    format!("{ASSIGN}{host}/{group}")
}

impl Store {
    /// One attempt to lead under `lease`: the leadership if this candidate holds it (now or
    /// already), `None` if another does.
    pub async fn campaign(&self, me: &HostId, lease: i64) -> Result<Option<Leadership>> {
        let value = serde_json::to_vec(&LeaderRecord { host: me.clone() }).unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::create_revision(LEADER, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                LEADER,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut client = self.client();
        let answer = self
            .call("the controller election", client.txn(txn))
            .await?;
        if answer.succeeded() {
            let revision = answer.header().map_or(0, |h| h.revision());
            return Ok(Some(Leadership { lease, revision }));
        }
        // Held already: by this candidate under this lease (it won before), or by another.
        Ok(self
            .leader()
            .await?
            .filter(|l| l.lease == lease && &l.host == me)
            .map(|l| Leadership {
                lease,
                revision: l.revision,
            }))
    }

    /// The leader now, if any.
    pub async fn leader(&self) -> Result<Option<Leader>> {
        let mut client = self.client();
        let answer = self
            .call("the controller's key", client.get(LEADER, None))
            .await?;
        let Some(kv) = answer.kvs().first() else {
            return Ok(None);
        };
        let record: LeaderRecord =
            serde_json::from_slice(kv.value()).map_err(|e| Error::Record {
                key: LEADER.into(),
                reason: e.to_string(),
            })?;
        Ok(Some(Leader {
            host: record.host,
            revision: kv.create_revision(),
            lease: kv.lease(),
        }))
    }

    /// Applies `ops` only if `leadership` still holds; [`Error::Deposed`] if it does not
    /// (and then nothing of `ops` is applied). Large batches go in several transactions,
    /// each fenced.
    pub async fn fenced(&self, leadership: Leadership, ops: Vec<TxnOp>) -> Result<()> {
        let mut ops = ops;
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(OPS_PER_TXN));
            let txn = Txn::new()
                .when([Compare::create_revision(
                    LEADER,
                    CompareOp::Equal,
                    leadership.revision,
                )])
                .and_then(ops);
            let mut client = self.client();
            let answer = self.call("a fenced write", client.txn(txn)).await?;
            if !answer.succeeded() {
                return Err(Error::Deposed {
                    revision: leadership.revision,
                });
            }
            ops = rest;
        }
        Ok(())
    }

    /// The stored spec, if one was applied.
    pub async fn spec(&self) -> Result<Option<StoredSpec>> {
        let mut client = self.client();
        let answer = self
            .call("the fleet's spec", client.get(SPEC, None))
            .await?;
        let Some(kv) = answer.kvs().first() else {
            return Ok(None);
        };
        let spec = serde_json::from_slice(kv.value()).map_err(|e| Error::Record {
            key: SPEC.into(),
            reason: e.to_string(),
        })?;
        Ok(Some(StoredSpec {
            spec,
            revision: kv.mod_revision(),
        }))
    }

    /// Stores `spec` as the fleet's declared state, whatever is stored now, in one write;
    /// returns its revision. (For programs that own the fleet, such as the benchmark; the
    /// CLI uses [`Store::replace_spec`].)
    pub async fn apply_spec(&self, spec: &FleetSpec) -> Result<i64> {
        // A spec is strings, numbers, lists and maps with string keys: this cannot fail.
        let value = serde_json::to_vec(spec).unwrap_or_default();
        let mut client = self.client();
        let answer = self
            .call_as(
                "the fleet's spec",
                Some(format!("write {SPEC}")),
                client.txn(Txn::new().and_then([TxnOp::put(SPEC, value, None)])),
            )
            .await?;
        Ok(answer.header().map_or(0, |h| h.revision()))
    }

    /// Stores `spec` as the fleet's declared state, in one write, and returns its revision;
    /// only if the stored spec is still the one of etcd revision `replaces` (its
    /// `mod_revision`; 0: there is none), in one transaction: an apply that raced another
    /// is refused ([`Error::StaleSpec`]) and stores nothing.
    pub async fn replace_spec(&self, spec: &FleetSpec, replaces: i64) -> Result<i64> {
        // A spec is strings, numbers, lists and maps with string keys: this cannot fail.
        let value = serde_json::to_vec(spec).unwrap_or_default();
        let mut client = self.client();
        let answer = self
            .call_as(
                "the fleet's spec",
                Some(format!("write {SPEC}")),
                client.txn(
                    Txn::new()
                        .when([Compare::mod_revision(SPEC, CompareOp::Equal, replaces)])
                        .and_then([TxnOp::put(SPEC, value, None)])
                        .or_else([TxnOp::get(SPEC, None)]),
                ),
            )
            .await?;
        if !answer.succeeded() {
            let actual = answer
                .op_responses()
                .into_iter()
                .find_map(|r| match r {
                    etcd_client::TxnOpResponse::Get(g) => Some(
                        g.kvs()
                            .first()
                            .map_or(0, etcd_client::KeyValue::mod_revision),
                    ),
                    _ => None,
                })
                .unwrap_or(0);
            return Err(Error::StaleSpec {
                expected: replaces,
                actual,
            });
        }
        Ok(answer.header().map_or(0, |h| h.revision()))
    }

    /// Every assignment stored, by host and group. Records that do not parse are errors
    /// naming their key.
    pub async fn assignments(&self) -> Result<Plan> {
        let (kvs, _) = self.get_prefix("the assignments", ASSIGN).await?;
        let mut plan = Plan::default();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let bad = |reason: String| Error::Record {
                key: key.clone(),
                reason,
            };
            let rest = key.strip_prefix(ASSIGN).unwrap_or("");
            let (host, group) = rest
                .split_once('/')
                .ok_or_else(|| bad("the key is not assign/<host>/<group>".into()))?;
            let host: HostId = host.parse().map_err(|e: Error| bad(e.to_string()))?;
            let group: GroupName = group.parse().map_err(bad)?;
            let a: Assignment =
                serde_json::from_slice(kv.value()).map_err(|e| bad(e.to_string()))?;
            plan.hosts.entry(host).or_default().insert(group, a);
        }
        Ok(plan)
    }

    /// The plan of `spec` on the hosts registered now, keeping the instances the stored
    /// assignments place where they still fit, and those on missing hosts where they are
    /// ([`plan_pinned`]) unless their group's `reschedule_after` is 0: what `juice fleet
    /// plan|apply` show, and what the controller writes until a missing host's delay runs out.
    pub async fn plan(&self, spec: &FleetSpec) -> Result<std::result::Result<Plan, PlanError>> {
        let hosts: Vec<HostCapacity> = self
            .hosts()
            .await?
            .hosts
            .iter()
            .map(HostCapacity::from_record)
            .collect();
        let previous = self.assignments().await?;
        // As the controller would on first seeing the missing hosts: pinned, unless their
        // group's delay is 0 and the brake does not hold.
        let registered = hosts.iter().map(|h| h.id.clone()).collect();
        let verdict = crate::liveness::Liveness::default().observe(
            &registered,
            &previous,
            spec,
            std::time::Instant::now(),
            0,
        );
        Ok(plan_pinned(&hosts, spec, &previous, &verdict.pinned))
    }

    /// Makes the stored assignments those of `want`, with writes fenced on `leadership`;
    /// returns how many records were written or deleted.
    pub async fn write_plan(&self, leadership: Leadership, want: &Plan) -> Result<usize> {
        let have = self.assignments().await?;
        self.write_plan_with(leadership, want, &have, Vec::new())
            .await
    }

    /// Makes the assignments `have` (as read) those of `want`, after `first` (records that
    /// go in the same transaction as the first assignment changes), all fenced on
    /// `leadership`; returns how many writes were made.
    pub async fn write_plan_with(
        &self,
        leadership: Leadership,
        want: &Plan,
        have: &Plan,
        first: Vec<TxnOp>,
    ) -> Result<usize> {
        let flat = |p: &Plan| -> BTreeMap<String, Assignment> {
            p.hosts
                .iter()
                .flat_map(|(h, groups)| {
                    groups
                        .iter()
                        .map(move |(g, a)| (assign_key(h, g), a.clone()))
                })
                .collect()
        };
        let (have, want) = (flat(have), flat(want));
        let mut ops = first;
        for (key, a) in &want {
            if have.get(key) != Some(a) {
                let value = serde_json::to_vec(a).unwrap_or_default();
                ops.push(TxnOp::put(key.as_str(), value, None));
            }
        }
        for key in have.keys().filter(|k| !want.contains_key(*k)) {
            ops.push(TxnOp::delete(key.as_str(), None));
        }
        let n = ops.len();
        self.fenced(leadership, ops).await?;
        Ok(n)
    }
}

/// What a controller reports as it goes, for the daemon's log.
#[derive(Debug)]
pub enum Event {
    /// This daemon leads the fleet now.
    Elected { revision: i64 },
    /// The spec of `revision` was placed: `writes` assignments written or deleted.
    Placed { revision: i64, writes: usize },
    /// The spec of `revision` cannot be placed; the assignments stay as they were.
    Unplaceable { revision: i64, error: PlanError },
    /// `host` has been missing for `after`: its `groups` were placed elsewhere.
    Moved {
        host: HostId,
        groups: Vec<GroupName>,
        after: Duration,
    },
    /// Too many hosts are missing: nothing moves (`Some`), or no longer (`None`).
    Brake(Option<BrakeRecord>),
    /// A group's rollout moved: a wave started, it was paused, failed, finished or undone.
    Rollout {
        group: GroupName,
        record: Box<RolloutRecord>,
    },
    /// Leadership lost, or etcd lost: campaigning again after `retry`.
    Lost { error: Error, retry: Duration },
}

/// A candidate controller; [`Controller::run`] campaigns, leads, and campaigns again.
pub struct Controller {
    pub endpoints: Endpoints,
    pub host: HostId,
    pub ttl: Duration,
}

impl Controller {
    fn beat(&self) -> Duration {
        self.ttl / 3
    }

    /// Runs until the task running it is dropped.
    pub async fn run(self, mut report: impl FnMut(Event) + Send) {
        let retry = Duration::from_millis(500);
        loop {
            let mut held = None;
            let error = self.session(&mut report, &mut held).await;
            // Give the lease back at once (when etcd answers), so a leadership this
            // candidate gave up does not block the next election until the lease runs out.
            if let Some((store, lease)) = held {
                let mut client = store.client();
                let _ = store
                    .call("the lease's revocation", client.lease_revoke(lease))
                    .await;
            }
            report(Event::Lost { error, retry });
            tokio::time::sleep(retry).await;
        }
    }

    /// One lease: campaigns every tick until elected, then leads until something fails.
    /// `held` is the lease while it exists, for [`Controller::run`] to revoke.
    async fn session(
        &self,
        report: &mut impl FnMut(Event),
        held: &mut Option<(Store, i64)>,
    ) -> Error {
        let store = match Store::connect(&self.endpoints, self.beat()).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let mut client = store.client();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = match store.call("a lease", client.lease_grant(ttl, None)).await {
            Ok(l) => l.id(),
            Err(e) => return e,
        };
        *held = Some((store.clone(), lease));
        let (mut keeper, mut answers) = match store
            .call("the lease's renewal", client.lease_keep_alive(lease))
            .await
        {
            Ok(k) => k,
            Err(e) => return e,
        };
        // The lease is renewed by a task of its own, every beat, so that a leader round
        // longer than the lease (placing 90,000 assignments at 10,000 hosts) does not lose
        // the leadership halfway and start over; the round's writes stay fenced on it.
        let (lost_tx, mut lost) = tokio::sync::oneshot::channel::<Error>();
        let renewing = {
            let store = store.clone();
            let beat = self.beat();
            tokio::spawn(async move {
                let error = loop {
                    tokio::time::sleep(beat).await;
                    if let Err(e) = store.call("the lease's renewal", keeper.keep_alive()).await {
                        break e;
                    }
                    match store.call("the lease's renewal", answers.message()).await {
                        Ok(Some(a)) if a.ttl() > 0 => {}
                        Ok(Some(_)) => break Error::LeaseExpired { lease },
                        Ok(None) => {
                            break store
                                .unreachable("etcd closed the lease's renewal stream".into());
                        }
                        Err(e) => break e,
                    }
                };
                let _ = lost_tx.send(error);
            })
        };
        let _renewing = AbortOnDrop(renewing);
        // A standby polls the leader key this often: a dead leader's successor is elected
        // within the lease plus this.
        let tick = Duration::from_millis(250).min(self.beat());
        let mut leading: Option<Leadership> = None;
        let mut state = LeaderState::default();
        loop {
            match lost.try_recv() {
                Ok(e) => return e,
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    return Error::LeaseExpired { lease };
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
            match leading {
                None => match store.campaign(&self.host, lease).await {
                    Ok(Some(l)) => {
                        report(Event::Elected {
                            revision: l.revision,
                        });
                        leading = Some(l);
                        state = LeaderState::default();
                    }
                    Ok(None) => {}
                    Err(e) => return e,
                },
                Some(l) => {
                    if let Err(e) = self.lead(&store, l, &mut state, report).await {
                        return e;
                    }
                }
            }
            tokio::time::sleep(tick).await;
        }
    }

    /// One round of the leader's work: place the spec if it changed since it was placed,
    /// or the registered hosts did, or a missing host's delay ran out; move the groups
    /// that roll out ([`rollout::decide`]), and act on the operator's requests. The hosts'
    /// reports are read (once, for every group) only while a rollout is active.
    async fn lead(
        &self,
        store: &Store,
        leadership: Leadership,
        state: &mut LeaderState,
        report: &mut impl FnMut(Event),
    ) -> Result<()> {
        let Some(stored) = store.spec().await? else {
            return Ok(());
        };
        let records = store.rollouts().await?;
        let requests = store.requests().await?;
        let active = records.values().any(RolloutRecord::active);
        let fingerprint = store.hosts_fingerprint().await?;
        let now = std::time::Instant::now();
        if !state.due(stored.revision, fingerprint, now) && !active && requests.is_empty() {
            return Ok(());
        }
        let listing = store.hosts().await?;
        let capacities: Vec<HostCapacity> = listing
            .hosts
            .iter()
            .map(HostCapacity::from_record)
            .collect();
        let registered = capacities.iter().map(|h| h.id.clone()).collect();
        let previous = store.assignments().await?;
        let verdict = state.liveness.observe(
            &registered,
            &previous,
            &stored.spec,
            now,
            crate::host::now_ms(),
        );
        if verdict.brake != state.brake {
            store
                .write_brake(leadership, verdict.brake.as_ref())
                .await?;
            if verdict.brake.is_some() != state.brake.is_some() {
                report(Event::Brake(verdict.brake.clone()));
            }
            state.brake.clone_from(&verdict.brake);
        }
        let want = match plan_pinned(&capacities, &stored.spec, &previous, &verdict.pinned) {
            Ok(want) => want,
            Err(error) => {
                if state.placed != Some(stored.revision) || !verdict.moving.is_empty() {
                    report(Event::Unplaceable {
                        revision: stored.revision,
                        error,
                    });
                }
                state.done(stored.revision, fingerprint, verdict.next);
                return Ok(());
            }
        };
        let reports = if active {
            store.reports().await?.hosts
        } else {
            BTreeMap::new()
        };
        let hostnames: BTreeMap<HostId, String> = listing
            .hosts
            .iter()
            .map(|h| (h.id.clone(), h.hostname.clone()))
            .collect();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let of = |plan: &Plan, group: &GroupName| -> BTreeMap<HostId, Assignment> {
            plan.hosts
                .iter()
                .filter_map(|(h, g)| Some((h.clone(), g.get(group)?.clone())))
                .collect()
        };
        let mut out = Plan::default();
        // The records and requests first: they go in the first transaction, with the
        // assignments they describe (all of them unless more than 99 change at once).
        let mut ops = Vec::new();
        let mut changed = Vec::new();
        for (group, spec) in &stored.spec.group {
            let group_reports: BTreeMap<HostId, Report> = reports
                .iter()
                .filter_map(|(h, g)| Some((h.clone(), g.get(group)?.clone())))
                .collect();
            let d = rollout::decide(&rollout::Input {
                spec,
                planned: &of(&want, group),
                previous: &of(&previous, group),
                record: records.get(group),
                reports: &group_reports,
                hostnames: &hostnames,
                request: requests.get(group).map(|r| r.action),
                now_ms,
                healthy_since: state.healthy.get(group).copied(),
            });
            match d.healthy_since {
                Some(t) => state.healthy.insert(group.clone(), t),
                None => state.healthy.remove(group),
            };
            for (h, a) in d.assignments {
                out.hosts.entry(h).or_default().insert(group.clone(), a);
            }
            if let Some(r) = d.record
                && records.get(group) != Some(&r)
            {
                let value = serde_json::to_vec(&r).unwrap_or_default();
                ops.push(TxnOp::put(rollout::rollout_key(group), value, None));
                let was = records.get(group);
                if was.is_none_or(|w| {
                    (w.state, w.wave, w.touched.len()) != (r.state, r.wave, r.touched.len())
                }) {
                    changed.push((group.clone(), r));
                }
            }
        }
        for group in requests.keys() {
            ops.push(TxnOp::delete(rollout::request_key(group), None));
        }
        // A group gone from the spec takes its rollout with it.
        for group in records
            .keys()
            .filter(|g| !stored.spec.group.contains_key(*g))
        {
            ops.push(TxnOp::delete(rollout::rollout_key(group), None));
        }
        let writes = store
            .write_plan_with(leadership, &out, &previous, ops)
            .await?;
        for (group, r) in changed {
            report(Event::Rollout {
                group,
                record: Box::new(r),
            });
        }
        for (host, groups) in verdict.moving {
            let after = missing_for(&state.liveness, &host, now);
            report(Event::Moved {
                host,
                groups,
                after,
            });
        }
        if state.placed != Some(stored.revision) || writes > 0 {
            report(Event::Placed {
                revision: stored.revision,
                writes,
            });
        }
        state.done(stored.revision, fingerprint, verdict.next);
        Ok(())
    }
}

/// Aborts a task when dropped (the controller's lease renewal, when its session ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
