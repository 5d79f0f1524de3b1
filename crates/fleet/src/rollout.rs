//! Rollouts in waves: how a group that already runs somewhere moves to a new revision, one
//! wave of hosts at a time, each wave gated on the hosts' health reports, and every touched
//! host rolled back at once when one of them fails.
//!
//! [`decide`] is the whole decision, pure: from the group's spec, its plan, the stored
//! assignments and rollout record, the hosts' reports, the time and the operator's request,
//! it says what each host is assigned and what the record becomes. The controller runs it
//! for every group on every round and writes what changed, the record and the assignments it
//! describes in the same fenced transaction, so a new leader continues where the old one
//! stopped. The only state outside etcd is how long the current wave has been healthy
//! ([`Decision::healthy_since`]): a new leader starts that timer again, which only delays.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::plan::{Assignment, revision};
use crate::record::HostId;
use crate::report::{CANNOT_APPLY, Report};
use crate::spec::{GroupName, GroupSpec, Wave};
use crate::store::Store;

/// `rollouts/<group>`: a group's rollout, written only by the leader, fenced.
pub const ROLLOUTS: &str = "/juice/v1/rollouts/";
/// `requests/<group>`: the operator's request (pause, resume, undo), deleted by the leader
/// in the transaction that acts on it.
pub const REQUESTS: &str = "/juice/v1/requests/";

/// The key of `group`'s rollout record.
pub fn rollout_key(group: &GroupName) -> String {
    format!("{ROLLOUTS}{group}")
}

/// The key of the operator's request on `group`.
pub fn request_key(group: &GroupName) -> String {
    format!("{REQUESTS}{group}")
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waves are given the new revision as the previous ones pass their gate.
    Rolling,
    /// The operator paused it: the touched hosts keep the new revision, no wave starts.
    Paused,
    /// A touched host failed (or a wave missed its deadline): every host is back on the old
    /// revision, until the operator resumes or a new revision is applied.
    Failed,
    /// Every host runs the new revision.
    Done,
    /// The operator undid it: every host is back on the old revision.
    Undone,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Rolling => "rolling",
            State::Paused => "paused",
            State::Failed => "failed",
            State::Done => "done",
            State::Undone => "undone",
        })
    }
}

/// What the operator asks of a group's rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Stop after the current wave; the touched hosts stay on the new revision.
    Pause,
    /// Go on with a paused rollout; start a failed or undone one again from its first wave.
    Resume,
    /// Every host of the group back to the old revision at once (a finished rollout too).
    Undo,
}

/// The value of `requests/<group>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub action: Action,
    pub written_ms: u64,
}

/// The value of `rollouts/<group>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// The old revision's assignment (its `size` unused): what untouched hosts run, and what
    /// every host gets back on a failure or an undo.
    pub from: Assignment,
    /// The new revision's assignment (its `size` unused).
    pub to: Assignment,
    /// The current wave, an index into the group's `rollout.waves`.
    pub wave: usize,
    /// The hosts given the new revision, in the order they were given it.
    pub touched: Vec<HostId>,
    pub state: State,
    /// Why it failed, was paused or undone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it started (again, after a resume of a failed one), when the current wave
    /// started, and when the record last changed; ms since 1970, the leader's clock.
    pub started_ms: u64,
    pub wave_started_ms: u64,
    pub updated_ms: u64,
}

impl RolloutRecord {
    /// Whether the rollout still moves hosts (or may: a paused one).
    pub fn active(&self) -> bool {
        matches!(self.state, State::Rolling | State::Paused)
    }
}

/// The cumulative number of hosts each wave reaches, over a group placed on `hosts` hosts:
/// `"N"` is N hosts, `"P%"` the ceiling of P% of them; each at least one host (with any
/// host at all), at most all of them, and never fewer than the wave before.
pub fn targets(waves: &[Wave], hosts: usize) -> Vec<usize> {
    let mut floor = 0;
    waves
        .iter()
        .map(|w| {
            let n = match *w {
                Wave::Hosts(k) => usize::try_from(k).unwrap_or(usize::MAX),
                Wave::Percent(p) => (usize::from(p) * hosts).div_ceil(100),
            };
            floor = n.max(1).min(hosts).max(floor);
            floor
        })
        .collect()
}

/// Everything [`decide`] looks at, for one group.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub spec: &'a GroupSpec,
    /// The group's plan from the spec: every placed host with the spec's revision.
    pub planned: &'a BTreeMap<HostId, Assignment>,
    /// The group's assignments stored now.
    pub previous: &'a BTreeMap<HostId, Assignment>,
    pub record: Option<&'a RolloutRecord>,
    /// The hosts' reports on the group (read only while a rollout is active).
    pub reports: &'a BTreeMap<HostId, Report>,
    /// Host names, for the reasons written.
    pub hostnames: &'a BTreeMap<HostId, String>,
    pub request: Option<Action>,
    pub now_ms: u64,
    /// Since when the current wave has been healthy, as the last decision said.
    pub healthy_since: Option<u64>,
}

/// What [`decide`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What every placed host of the group is to be assigned.
    pub assignments: BTreeMap<HostId, Assignment>,
    /// The rollout record to store (`None`: the group has none, and needs none).
    pub record: Option<RolloutRecord>,
    pub healthy_since: Option<u64>,
}

/// The assignment `template` with `size` instances.
fn sized(template: &Assignment, size: u32) -> Assignment {
    Assignment {
        size,
        ..template.clone()
    }
}

/// The revision most of `previous` run (ties: the smaller revision), with one of its
/// assignments.
fn running(previous: &BTreeMap<HostId, Assignment>) -> Option<&Assignment> {
    let mut count: BTreeMap<&str, (usize, &Assignment)> = BTreeMap::new();
    for a in previous.values() {
        count.entry(&a.revision).or_insert((0, a)).0 += 1;
    }
    let most = count.values().map(|(n, _)| *n).max()?;
    count
        .into_values()
        .find(|(n, _)| *n == most)
        .map(|(_, a)| a)
}

fn named(host: &HostId, names: &BTreeMap<HostId, String>) -> String {
    match names.get(host) {
        Some(n) => format!("host {host} ({n})"),
        None => format!("host {host}"),
    }
}

/// A report saying the host failed the new revision: the reason to record.
fn failure(
    host: &HostId,
    r: &Report,
    to: &str,
    names: &BTreeMap<HostId, String>,
) -> Option<String> {
    let failed = ["crash-loop", "cannot-start", "rolled-back"]
        .iter()
        .any(|s| r.status.starts_with(s))
        && r.revision == to;
    // A host that cannot apply its assignment (the new one: it is touched) keeps running
    // the old revision, and reports that one with the error.
    if r.status == CANNOT_APPLY {
        let error = r.error.as_deref().unwrap_or("no error given");
        return Some(format!(
            "{}: cannot-apply revision {to}: {error}",
            named(host, names)
        ));
    }
    failed.then(|| format!("{}: {} at revision {to}", named(host, names), r.status))
}

/// Why the touched hosts are not (yet) all healthy on the new revision, or the group as a
/// whole below its count; `None` when the wave is healthy.
fn unhealthy(rec: &RolloutRecord, i: &Input) -> Option<String> {
    for h in &rec.touched {
        let want = i.planned.get(h).map_or(0, |a| a.size);
        let Some(r) = i.reports.get(h) else {
            return Some(format!("{} has not reported", named(h, i.hostnames)));
        };
        if r.revision != rec.to.revision || r.status != "ok" || r.size != want || r.ready < want {
            return Some(format!(
                "{} reports revision {}, {}/{} ready, {}",
                named(h, i.hostnames),
                r.revision,
                r.ready,
                want,
                r.status
            ));
        }
    }
    let desired: u64 = i.planned.values().map(|a| u64::from(a.size)).sum();
    let ready: u64 = i
        .planned
        .keys()
        .filter_map(|h| i.reports.get(h))
        .map(|r| u64::from(r.ready.min(r.size)))
        .sum();
    (ready < desired).then(|| format!("the group has {ready} of {desired} instances ready"))
}

/// Gives the new revision to untouched hosts, in host id order, until `target` are touched.
fn touch(rec: &mut RolloutRecord, hosts: &[&HostId], target: usize) {
    for h in hosts {
        if rec.touched.len() >= target {
            break;
        }
        if !rec.touched.contains(h) {
            rec.touched.push((*h).clone());
        }
    }
}

/// The rollout decision for one group; see the module's documentation.
///
/// - A group with no stored assignments, or whose stored assignments already run the
///   spec's revision (a change of count, constraints or rollout policy), gets the plan at
///   once; a group with no record gets none.
/// - A new revision of a group that runs another starts a rollout from the revision the
///   group runs as a whole (the old rollout's new one if it was done, its old one
///   otherwise, or the revision most hosts run when there is no record) and gives its
///   first wave the new revision at once.
/// - A rolling or paused rollout fails when a touched host reports the new revision with a
///   failure (`crash-loop`, `cannot-start`, `rolled-back`) or cannot apply it, and a
///   rolling one when its wave is not healthy within `rollout.deadline`: every host gets
///   the old revision back.
/// - A rolling wave that stays healthy for `rollout.health_gate` starts the next wave.
pub fn decide(i: &Input) -> Decision {
    let to_revision = revision(i.spec);
    let Some(first) = i.planned.values().next() else {
        // Placed nowhere: nothing to roll.
        return Decision {
            assignments: BTreeMap::new(),
            record: i.record.cloned(),
            healthy_since: None,
        };
    };
    let to = sized(first, 0);
    let mut healthy_since = i.healthy_since;
    let mut rec = match i.record {
        Some(r) if r.to.revision == to_revision => r.clone(),
        other => {
            let base = match other {
                Some(r) if r.state == State::Done => Some(r.to.clone()),
                Some(r) => Some(r.from.clone()),
                None => running(i.previous).cloned(),
            };
            match base {
                Some(from) if from.revision != to_revision => {
                    healthy_since = None;
                    RolloutRecord {
                        from: sized(&from, 0),
                        to: to.clone(),
                        wave: 0,
                        touched: Vec::new(),
                        state: State::Rolling,
                        reason: None,
                        started_ms: i.now_ms,
                        wave_started_ms: i.now_ms,
                        updated_ms: i.now_ms,
                    }
                }
                _ => {
                    // The spec's revision everywhere at once. A rollout going on when the
                    // spec went back to its old revision ends there.
                    let record = match other {
                        Some(r) if r.active() => Some(RolloutRecord {
                            state: State::Undone,
                            reason: Some(format!("the spec went back to revision {to_revision}")),
                            updated_ms: i.now_ms,
                            ..r.clone()
                        }),
                        other => other.cloned(),
                    };
                    return Decision {
                        assignments: i.planned.clone(),
                        record,
                        healthy_since: None,
                    };
                }
            }
        }
    };
    let before = rec.clone();
    // The same revision with another rollout policy (a health gate): the new one.
    rec.to = to;

    let hosts: Vec<&HostId> = i.planned.keys().collect();
    let targets = targets(&i.spec.rollout.waves, hosts.len());
    let last = targets.len().saturating_sub(1);
    rec.wave = rec.wave.min(last);
    rec.touched.retain(|h| i.planned.contains_key(h));

    match (i.request, rec.state) {
        (Some(Action::Pause), State::Rolling) => {
            rec.state = State::Paused;
            rec.reason = Some("paused by the operator".into());
        }
        (Some(Action::Resume), State::Paused) => {
            rec.state = State::Rolling;
            rec.reason = None;
            rec.wave_started_ms = i.now_ms;
            healthy_since = None;
        }
        (Some(Action::Resume), State::Failed | State::Undone) => {
            rec.state = State::Rolling;
            rec.reason = None;
            rec.wave = 0;
            rec.touched.clear();
            rec.started_ms = i.now_ms;
            rec.wave_started_ms = i.now_ms;
            healthy_since = None;
        }
        (Some(Action::Undo), _) => {
            rec.state = State::Undone;
            rec.reason = Some("undone by the operator".into());
        }
        _ => {}
    }

    if rec.active()
        && let Some(reason) = rec.touched.iter().find_map(|h| {
            let r = i.reports.get(h)?;
            failure(h, r, &rec.to.revision, i.hostnames)
        })
    {
        rec.state = State::Failed;
        rec.reason = Some(reason);
    }

    if rec.state == State::Rolling {
        let target = targets[rec.wave];
        touch(&mut rec, &hosts, target);
        match unhealthy(&rec, i) {
            None => {
                let since = *healthy_since.get_or_insert(i.now_ms);
                let gate =
                    u64::try_from(i.spec.rollout.health_gate.as_millis()).unwrap_or(u64::MAX);
                if i.now_ms.saturating_sub(since) >= gate {
                    healthy_since = None;
                    if rec.touched.len() >= hosts.len() {
                        rec.state = State::Done;
                        rec.wave = last;
                    } else {
                        let next = (rec.wave + 1..=last)
                            .find(|&k| targets[k] > rec.touched.len())
                            .unwrap_or(last);
                        rec.wave = next;
                        rec.wave_started_ms = i.now_ms;
                        touch(&mut rec, &hosts, targets[next]);
                    }
                }
            }
            Some(why) => {
                healthy_since = None;
                let deadline =
                    u64::try_from(i.spec.rollout.deadline.as_millis()).unwrap_or(u64::MAX);
                if i.now_ms.saturating_sub(rec.wave_started_ms) >= deadline {
                    rec.state = State::Failed;
                    rec.reason = Some(format!(
                        "wave {} of {} (\"{}\") not healthy within {}: {why}",
                        rec.wave + 1,
                        targets.len(),
                        i.spec.rollout.waves[rec.wave],
                        humantime::format_duration(i.spec.rollout.deadline)
                    ));
                }
            }
        }
    }
    if !rec.active() {
        healthy_since = None;
    }

    let on_new = |h: &HostId| match rec.state {
        State::Done => true,
        State::Rolling | State::Paused => rec.touched.contains(h),
        State::Failed | State::Undone => false,
    };
    let assignments = i
        .planned
        .iter()
        .map(|(h, a)| {
            let a = if on_new(h) {
                a.clone()
            } else {
                sized(&rec.from, a.size)
            };
            (h.clone(), a)
        })
        .collect();
    if rec != before {
        rec.updated_ms = i.now_ms;
    }
    Decision {
        assignments,
        record: Some(rec),
        healthy_since,
    }
}

impl Store {
    /// Every rollout record, by group; a record that does not parse is an error naming its
    /// key (the leader then does nothing rather than guess).
    pub async fn rollouts(&self) -> Result<BTreeMap<GroupName, RolloutRecord>> {
        self.by_group(ROLLOUTS, "the rollouts").await
    }

    /// The operator's requests waiting for the leader, by group.
    pub async fn requests(&self) -> Result<BTreeMap<GroupName, Request>> {
        self.by_group(REQUESTS, "the rollout requests").await
    }

    /// Asks the leader to `action` the rollout of `group` (the leader acts on it and deletes
    /// it; a later request replaces one not acted on yet).
    pub async fn request(&self, group: &GroupName, action: Action, now_ms: u64) -> Result<()> {
        let value = serde_json::to_vec(&Request {
            action,
            written_ms: now_ms,
        })
        .unwrap_or_default();
        let mut client = self.client();
        self.call(
            "the rollout request",
            client.put(request_key(group), value, None),
        )
        .await
        .map(drop)
    }

    async fn by_group<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
        what: &'static str,
    ) -> Result<BTreeMap<GroupName, T>> {
        let (kvs, _) = self.get_prefix(what, prefix).await?;
        let mut out = BTreeMap::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let bad = |reason: String| Error::Record {
                key: key.clone(),
                reason,
            };
            let group: GroupName = key
                .strip_prefix(prefix)
                .unwrap_or_default()
                .parse()
                .map_err(bad)?;
            let value = serde_json::from_slice(kv.value()).map_err(|e| bad(e.to_string()))?;
            out.insert(group, value);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FleetSpec;
    use proptest::prelude::*;
    use std::path::Path;

    fn spec(image: &str, waves: &str, count: u32) -> GroupSpec {
        let text = format!(
            "[group.web]\nimage = \"{image}\"\ncount = {count}\n\
             rollout = {{ waves = {waves}, health_gate = \"2s\", deadline = \"60s\" }}\n"
        );
        let mut s = FleetSpec::parse(&text, Path::new("fleet.toml")).unwrap();
        s.group.remove(&"web".parse().unwrap()).unwrap()
    }

    fn host(n: usize) -> HostId {
        format!("h{n}").parse().unwrap()
    }

    fn planned(g: &GroupSpec, hosts: usize) -> BTreeMap<HostId, Assignment> {
        (0..hosts)
            .map(|n| {
                let a = Assignment {
                    revision: revision(g),
                    image: g.image.clone(),
                    isolation: g.isolation,
                    size: 1,
                    millicpus: g.resources.millicpus(),
                    memory_bytes: g.resources.memory.0,
                    ports: g.publish.clone(),
                    health_gate_ms: Some(2000),
                };
                (host(n), a)
            })
            .collect()
    }

    fn report(revision: &str, ready: u32, status: &str) -> Report {
        Report {
            revision: revision.into(),
            size: 1,
            ready,
            status: status.into(),
            restarts: 0,
            error: (status == CANNOT_APPLY).then(|| "no such image".into()),
            written_ms: 0,
        }
    }

    /// A group and the fleet around it, moved round by round as the controller would.
    struct World {
        spec: GroupSpec,
        stored: BTreeMap<HostId, Assignment>,
        record: Option<RolloutRecord>,
        reports: BTreeMap<HostId, Report>,
        since: Option<u64>,
        now: u64,
    }

    impl World {
        fn new(hosts: usize, waves: &str) -> World {
            let spec = spec("w:1", waves, u32::try_from(hosts).unwrap());
            let stored = planned(&spec, hosts);
            let reports = stored
                .iter()
                .map(|(h, a)| (h.clone(), report(&a.revision, 1, "ok")))
                .collect();
            World {
                spec,
                stored,
                record: None,
                reports,
                since: None,
                now: 1_000,
            }
        }
        fn round(&mut self, request: Option<Action>) -> Decision {
            let plan = planned(&self.spec, self.stored.len());
            let d = decide(&Input {
                spec: &self.spec,
                planned: &plan,
                previous: &self.stored,
                record: self.record.as_ref(),
                reports: &self.reports,
                hostnames: &BTreeMap::new(),
                request,
                now_ms: self.now,
                healthy_since: self.since,
            });
            self.stored = d.assignments.clone();
            self.record = d.record.clone();
            self.since = d.healthy_since;
            d
        }
        /// Every host reports its assignment healthy.
        fn all_healthy(&mut self) {
            for (h, a) in &self.stored {
                self.reports.insert(h.clone(), report(&a.revision, 1, "ok"));
            }
        }
        fn on(&self, rev: &str) -> Vec<String> {
            self.stored
                .iter()
                .filter(|(_, a)| a.revision == rev)
                .map(|(h, _)| h.to_string())
                .collect()
        }
        fn state(&self) -> State {
            self.record.as_ref().unwrap().state
        }
    }

    #[test]
    fn targets_are_cumulative_at_least_one_host_and_at_most_all() {
        let w = |s: &[&str]| -> Vec<Wave> {
            s.iter()
                .map(|x| Wave::try_from((*x).to_owned()).unwrap())
                .collect()
        };
        assert_eq!(targets(&w(&["1", "5%", "25%", "100%"]), 40), [1, 2, 10, 40]);
        assert_eq!(targets(&w(&["1", "5%", "25%", "100%"]), 3), [1, 1, 1, 3]);
        assert_eq!(targets(&w(&["10", "50%", "100%"]), 4), [4, 4, 4]);
        assert_eq!(targets(&w(&["1", "100%"]), 1), [1, 1]);
        assert_eq!(targets(&w(&["1", "100%"]), 0), [0, 0]);
        assert_eq!(targets(&w(&["34%", "100%"]), 3), [2, 3]);
    }

    #[test]
    fn a_new_group_and_a_change_of_count_are_placed_at_once() {
        let w = World::new(3, r#"["1", "100%"]"#);
        let plan = planned(&w.spec, 3);
        let d = decide(&Input {
            spec: &w.spec,
            planned: &plan,
            previous: &BTreeMap::new(),
            record: None,
            reports: &BTreeMap::new(),
            hostnames: &BTreeMap::new(),
            request: None,
            now_ms: w.now,
            healthy_since: None,
        });
        assert_eq!((d.record, d.assignments), (None, plan));
        let mut w = w;
        // Count 3 -> 4 is not a new revision.
        let before = revision(&w.spec);
        w.spec.count = Some(4);
        assert_eq!(revision(&w.spec), before);
        let plan = planned(&w.spec, 4);
        let d = decide(&Input {
            spec: &w.spec,
            planned: &plan,
            previous: &w.stored,
            record: None,
            reports: &w.reports,
            hostnames: &BTreeMap::new(),
            request: None,
            now_ms: w.now,
            healthy_since: None,
        });
        assert_eq!((d.record, d.assignments), (None, plan));
    }

    #[test]
    fn a_new_revision_goes_wave_by_wave_each_after_its_gate() {
        let mut w = World::new(4, r#"["1", "50%", "100%"]"#);
        let old = revision(&w.spec);
        w.spec.image = "w:2".into();
        let new = revision(&w.spec);
        assert_ne!(old, new);
        w.round(None);
        assert_eq!(w.on(&new), ["h0"]);
        assert_eq!(w.state(), State::Rolling);
        // Not reported yet: no progress, however long (short of the deadline).
        w.now += 30_000;
        w.round(None);
        assert_eq!(w.on(&new), ["h0"]);
        // Healthy: the gate starts; 1.9 s later still wave 1, at 2 s wave 2.
        w.all_healthy();
        w.round(None);
        w.now += 1_900;
        w.round(None);
        assert_eq!(w.on(&new), ["h0"]);
        w.now += 100;
        w.round(None);
        assert_eq!(w.on(&new), ["h0", "h1"]);
        assert_eq!(w.record.as_ref().unwrap().wave, 1);
        // A blip resets the gate.
        w.all_healthy();
        w.round(None);
        w.now += 1_500;
        w.reports.get_mut(&host(1)).unwrap().ready = 0;
        w.round(None);
        w.all_healthy();
        w.now += 1_000;
        w.round(None);
        assert_eq!(w.on(&new).len(), 2);
        w.now += 2_000;
        w.round(None);
        assert_eq!(w.on(&new).len(), 4);
        w.all_healthy();
        w.round(None);
        w.now += 2_000;
        w.round(None);
        assert_eq!(w.state(), State::Done);
        assert_eq!(w.record.as_ref().unwrap().touched.len(), 4);
        // Done: the next round changes nothing.
        let r = w.record.clone();
        w.now += 10_000;
        w.round(None);
        assert_eq!(w.record, r);
    }

    #[test]
    fn a_failure_on_a_later_wave_puts_every_touched_host_back_and_says_who() {
        let mut w = World::new(3, r#"["1", "2", "100%"]"#);
        let old = revision(&w.spec);
        w.spec.image = "w:2".into();
        let new = revision(&w.spec);
        w.round(None);
        for _ in 0..2 {
            w.all_healthy();
            w.round(None);
            w.now += 2_000;
            w.round(None);
        }
        assert_eq!(w.on(&new).len(), 3);
        w.all_healthy();
        w.reports.insert(host(2), report(&old, 1, CANNOT_APPLY));
        w.round(None);
        assert_eq!(w.state(), State::Failed);
        assert_eq!(w.on(&old).len(), 3);
        let reason = w.record.as_ref().unwrap().reason.clone().unwrap();
        assert_eq!(
            reason,
            format!("host h2: cannot-apply revision {new}: no such image")
        );
        // It stays failed (the spec still says the new revision).
        w.all_healthy();
        w.now += 60_000;
        w.round(None);
        assert_eq!((w.state(), w.on(&old).len()), (State::Failed, 3));
        // A crash loop at the new revision fails too; a crash loop at the old one is not the
        // new revision's fault.
        w.round(Some(Action::Resume));
        assert_eq!((w.state(), w.on(&new)), (State::Rolling, vec!["h0".into()]));
        w.reports
            .insert(host(0), report(&old, 0, "crash-loop (3 failures)"));
        w.round(None);
        assert_eq!(w.state(), State::Rolling);
        w.reports
            .insert(host(0), report(&new, 0, "crash-loop (3 failures)"));
        w.round(None);
        assert_eq!(w.state(), State::Failed);
        assert_eq!(
            w.record.as_ref().unwrap().reason.as_deref(),
            Some(format!("host h0: crash-loop (3 failures) at revision {new}").as_str())
        );
    }

    #[test]
    fn a_wave_not_healthy_by_its_deadline_fails() {
        let mut w = World::new(2, r#"["1", "100%"]"#);
        w.spec.image = "w:2".into();
        w.round(None);
        w.now += 59_000;
        w.round(None);
        assert_eq!(w.state(), State::Rolling);
        w.now += 1_000;
        w.round(None);
        assert_eq!(w.state(), State::Failed);
        let reason = w.record.as_ref().unwrap().reason.clone().unwrap();
        assert!(
            reason
                .starts_with("wave 1 of 2 (\"1\") not healthy within 1m: host h0 reports revision"),
            "{reason}"
        );
    }

    #[test]
    fn pause_resume_and_undo() {
        let mut w = World::new(3, r#"["1", "100%"]"#);
        let old = revision(&w.spec);
        w.spec.image = "w:2".into();
        let new = revision(&w.spec);
        w.round(None);
        w.all_healthy();
        w.round(Some(Action::Pause));
        assert_eq!(w.state(), State::Paused);
        w.now += 10_000;
        w.round(None);
        assert_eq!((w.state(), w.on(&new).len()), (State::Paused, 1));
        w.round(Some(Action::Resume));
        assert_eq!(w.state(), State::Rolling);
        w.now += 2_000;
        w.round(None);
        assert_eq!(w.on(&new).len(), 3);
        w.all_healthy();
        w.round(None);
        w.now += 2_000;
        w.round(None);
        assert_eq!(w.state(), State::Done);
        // Undo of a finished rollout: everything back at once.
        w.round(Some(Action::Undo));
        assert_eq!((w.state(), w.on(&old).len()), (State::Undone, 3));
        // A pause of an undone rollout changes nothing; a resume starts it again.
        w.round(Some(Action::Pause));
        assert_eq!(w.state(), State::Undone);
        w.round(Some(Action::Resume));
        assert_eq!((w.state(), w.on(&new).len()), (State::Rolling, 1));
        // The spec going back to the old revision ends the rollout there.
        w.spec.image = "w:1".into();
        w.round(None);
        assert_eq!((w.state(), w.on(&old).len()), (State::Undone, 3));
        // And a third revision rolls from the one the group runs.
        w.spec.image = "w:3".into();
        w.round(None);
        let r = w.record.clone().unwrap();
        assert_eq!((r.from.revision, r.touched.len()), (old, 1));
    }

    proptest! {
        /// Random reports and requests: the touched set grows only wave by wave, never
        /// past the current wave's target; the hosts on the new revision are exactly the
        /// touched ones while it rolls, none after a failure or an undo, all when done.
        #[test]
        fn waves_only_grow_and_a_failure_puts_everyone_back(
            hosts in 1usize..12,
            steps in proptest::collection::vec((0u8..10, 0u64..3_000, 0u8..20), 1..80),
        ) {
            let mut w = World::new(hosts, r#"["1", "25%", "50%", "100%"]"#);
            w.spec.image = "w:2".into();
            let new = revision(&w.spec);
            let tg = targets(&w.spec.rollout.waves, hosts);
            let mut last: Option<RolloutRecord> = None;
            for (outcome, dt, req) in steps {
                // Hosts report their assignment: mostly healthy, sometimes not yet, rarely failing.
                for (h, a) in w.stored.clone() {
                    let r = match outcome {
                        0 => report(&a.revision, 0, "crash-loop (3 failures)"),
                        1..=2 => report(&a.revision, 0, "rolling-out"),
                        _ => report(&a.revision, 1, "ok"),
                    };
                    w.reports.insert(h, r);
                }
                let request = match req {
                    0 => Some(Action::Pause),
                    1 => Some(Action::Resume),
                    2 => Some(Action::Undo),
                    _ => None,
                };
                w.now += dt;
                w.round(request);
                let r = w.record.clone().unwrap();
                prop_assert!(r.touched.len() <= tg[r.wave], "{r:?}");
                let on_new: Vec<&HostId> = w.stored.iter().filter(|(_, a)| a.revision == new).map(|(h, _)| h).collect();
                match r.state {
                    State::Rolling | State::Paused => {
                        let mut t: Vec<&HostId> = r.touched.iter().collect();
                        t.sort();
                        prop_assert_eq!(on_new, t);
                    }
                    State::Done => prop_assert_eq!(on_new.len(), hosts),
                    State::Failed | State::Undone => prop_assert!(on_new.is_empty()),
                }
                if let Some(p) = &last
                    && p.active() && r.active() && request != Some(Action::Resume)
                {
                    // The same run of the rollout: the touched only grow, in order, and
                    // the wave never goes back.
                    prop_assert!(r.touched.starts_with(&p.touched), "{p:?} then {r:?}");
                    prop_assert!(r.wave >= p.wave);
                    // Hosts are touched in id order.
                    let mut sorted = r.touched.clone();
                    sorted.sort();
                    prop_assert_eq!(&sorted, &r.touched);
                }
                last = Some(r);
            }
        }
    }
}
