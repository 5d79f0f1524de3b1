//! The rollout rules as a pure function: a group's record, a summary of its live
//! instances, the instances that ended since the last pass and the time in; the
//! new record and the steps to take out. No I/O and no clock: the reconciler
//! ([`crate::agent`]) reads the world, calls [`plan`], and carries the steps out in
//! order. The fleet's hollow hosts run the same rules without processes.
//!
//! A start can fail (a backend that cannot be made, an image that cannot be
//! unpacked), and a failure changes what comes next: it backs off, and during a
//! rollout it fails the rollout. [`plan`] therefore plans every start as if it
//! succeeded, and leaves the record's start counter as it was; the executor
//! reports each start to [`start_succeeded`] or, at the first failure, to
//! [`start_failed`] (which returns the steps the failure calls for) and skips the
//! starts left. Nothing in a plan comes after its starts but a rollout's
//! completion, and a rollout completes only when nothing is to be started, so a
//! failed start never contradicts a step already planned.
//!
//! ```
//! use juice_agent::planner::{Input, Step, plan};
//! use juice_agent::state::GroupRecord;
//!
//! /// How many instances a group with nothing running would start now.
//! fn starts(group: &GroupRecord, now_ms: u64) -> usize {
//!     let out = plan(&Input { group, instances: &[], ended: &[], disk_revisions: &[], now_ms });
//!     out.steps.iter().filter(|s| matches!(s, Step::Start { .. })).count()
//! }
//! ```

use std::time::Duration;

use crate::site::OnFailure;
use crate::state::{GroupRecord, Rollout};

/// What the rules need to know of one live instance of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSummary {
    pub name: String,
    pub revision: u64,
    /// When this daemon started or adopted it, in milliseconds on the planner's clock.
    /// Scaling down stops the newest first; starts in one millisecond go in name order.
    pub started_ms: u64,
    pub health: HealthSummary,
}

/// What its health checks have shown so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthSummary {
    pub healthy: bool,
    /// Since when it has been healthy without a break, on the planner's clock.
    pub healthy_since_ms: Option<u64>,
    pub ever_healthy: bool,
    /// The check failed its `retries` in a row.
    pub failed: bool,
    pub last_error: Option<String>,
}

impl HealthSummary {
    /// An instance without a check: healthy from `since_ms`.
    pub fn assumed(since_ms: u64) -> HealthSummary {
        HealthSummary {
            healthy: true,
            healthy_since_ms: Some(since_ms),
            ever_healthy: true,
            ..HealthSummary::default()
        }
    }

    /// Healthy for at least `gate_ms` at `now_ms`, without a break.
    pub fn passed_gate(&self, gate_ms: u64, now_ms: u64) -> bool {
        self.healthy
            && self
                .healthy_since_ms
                .is_some_and(|t| now_ms.saturating_sub(t) >= gate_ms)
    }
}

/// An instance that ended on its own since the last pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub revision: u64,
    pub why: String,
}

/// One pass's view of a group.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub group: &'a GroupRecord,
    /// The group's live instances, in name order (the order stops are planned in).
    pub instances: &'a [InstanceSummary],
    pub ended: &'a [Ended],
    /// The group's revisions that run as microVMs with volume disks: a disk is held
    /// by one VM at a time, so such a revision replaces without a surge.
    pub disk_revisions: &'a [u64],
    pub now_ms: u64,
}

/// Why an instance is stopped; the text is what the event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Paused,
    FailedCheck,
    ScaledDown,
    Replaced,
    RevisionFailed,
    GroupDeleted,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Paused => "the rollout is paused",
            StopReason::FailedCheck => "it failed its health check",
            StopReason::ScaledDown => "scaled down",
            StopReason::Replaced => "replaced by the current revision",
            StopReason::RevisionFailed => "its revision failed",
            StopReason::GroupDeleted => "its group was deleted",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a rollout ended, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutEnd {
    Complete,
    RolledBack,
    Paused,
}

impl RolloutEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutEnd::Complete => "complete",
            RolloutEnd::RolledBack => "rolled_back",
            RolloutEnd::Paused => "paused",
        }
    }
}

/// One thing the reconciler does, in the order planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Stop {
        name: String,
        why: StopReason,
    },
    Start {
        revision: u64,
    },
    /// A line in the group's events.
    Event(String),
    /// An ended instance counted as a restart (a metric).
    Restarted,
    /// A rollout ended (a metric).
    RolloutEnded(RolloutEnd),
}

/// The new record and the steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub group: GroupRecord,
    pub steps: Vec<Step>,
}

/// The crash-loop back-off: the first failure is replaced at once, then 250 ms,
/// doubling up to 30 s; it resets once a replacement passes the health gate.
pub fn backoff_ms(failures: u32) -> u64 {
    match failures {
        0 | 1 => 0,
        n => (250u64 << (n - 2).min(7)).min(30_000),
    }
}

/// One group's step toward its declared state.
pub fn plan(input: &Input<'_>) -> Plan {
    let mut pass = Pass {
        g: input.group.clone(),
        live: input.instances.to_vec(),
        steps: Vec::new(),
    };
    pass.converge(input);
    Plan {
        group: pass.g,
        steps: pass.steps,
    }
}

/// A planned start ran.
pub fn start_succeeded(g: &mut GroupRecord) {
    g.start_failures = 0;
}

/// A planned start failed for `reason` at `now_ms` (the time the plan was made
/// with): it backs off like a crash, and during a rollout fails it. `instances` are
/// the group's live instances now, with those this pass started. The starts left
/// in the plan are skipped.
pub fn start_failed(
    g: &mut GroupRecord,
    reason: &str,
    instances: &[InstanceSummary],
    now_ms: u64,
) -> Vec<Step> {
    let mut pass = Pass {
        g: g.clone(),
        live: instances.to_vec(),
        steps: Vec::new(),
    };
    let g2 = &mut pass.g;
    g2.start_failures += 1;
    let backoff = backoff_ms(g2.start_failures + 1);
    g2.backoff_until_ms = g2.backoff_until_ms.max(now_ms + backoff);
    pass.steps.push(Step::Event(format!(
        "{reason} (failed start {} in a row; next try in {})",
        g2.start_failures,
        humantime::format_duration(Duration::from_millis(backoff))
    )));
    if let Rollout::Progressing {
        to, from: Some(_), ..
    } = g2.rollout
        && to == g2.current
    {
        pass.fail_rollout(reason);
    }
    *g = pass.g;
    pass.steps
}

/// The record and instances as the pass changes them.
struct Pass {
    g: GroupRecord,
    /// The instances not yet planned to stop.
    live: Vec<InstanceSummary>,
    steps: Vec<Step>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Pass {
    fn event(&mut self, message: String) {
        self.steps.push(Step::Event(message));
    }

    fn stop(&mut self, name: &str, why: StopReason) {
        if let Some(i) = self.live.iter().position(|l| l.name == name) {
            self.live.remove(i);
            self.steps.push(Step::Stop {
                name: name.to_owned(),
                why,
            });
        }
    }

    fn instance(&self, name: &str) -> Option<&InstanceSummary> {
        self.live.iter().find(|l| l.name == name)
    }

    fn converge(&mut self, input: &Input<'_>) {
        let gate = self.g.update.health_gate;
        let gate_ms = millis(gate);
        let now = input.now_ms;

        // Anything that ended on its own counts toward the crash-loop back-off.
        for e in input.ended {
            self.g.restarts += 1;
            self.steps.push(Step::Restarted);
            if e.revision == self.g.current {
                self.g.failures += 1;
                let backoff = backoff_ms(self.g.failures);
                self.g.backoff_until_ms = now + backoff;
                if self.g.failures >= 3 {
                    let failures = self.g.failures;
                    self.event(format!(
                        "crash loop: {failures} failures in a row, next start in {backoff} ms"
                    ));
                }
            }
            // A new revision that dies during its rollout has failed it.
            // (A first deployment has nothing to go back to: it heals with back-off instead.)
            if let Rollout::Progressing {
                to, from: Some(_), ..
            } = self.g.rollout
                && e.revision == to
            {
                self.fail_rollout(&format!("an instance of revision {to} ended: {}", e.why));
            }
        }

        let current = self.g.current;
        let new: Vec<String> = self
            .live
            .iter()
            .filter(|l| l.revision == current)
            .map(|l| l.name.clone())
            .collect();
        let old: Vec<String> = self
            .live
            .iter()
            .filter(|l| l.revision != current)
            .map(|l| l.name.clone())
            .collect();

        // A new instance whose health check failed, or that never became ready, fails the rollout.
        if let Rollout::Progressing {
            to, from: Some(_), ..
        } = self.g.rollout
        {
            for n in &new {
                let Some(l) = self.instance(n) else { continue };
                let h = &l.health;
                let deadline = gate + Duration::from_secs(30);
                let reason = if h.failed {
                    Some(format!(
                        "instance {n} of revision {to} failed its health check: {}",
                        h.last_error.clone().unwrap_or_default()
                    ))
                } else if !h.ever_healthy && now.saturating_sub(l.started_ms) > millis(deadline) {
                    Some(format!(
                        "instance {n} of revision {to} did not become healthy within {}",
                        humantime::format_duration(deadline)
                    ))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    self.fail_rollout(&reason);
                    return;
                }
            }
        }
        if matches!(self.g.rollout, Rollout::Paused { .. }) {
            // Paused: stop the failed revision's instances, keep everything else as it is.
            for n in &new {
                self.stop(n, StopReason::Paused);
            }
            return;
        }

        // Instances of the current revision that failed their check outside a rollout: replace them.
        for n in &new {
            if self.instance(n).is_some_and(|l| l.health.failed) {
                self.stop(n, StopReason::FailedCheck);
                self.g.failures += 1;
                self.g.backoff_until_ms = now + backoff_ms(self.g.failures);
            }
        }
        let new: Vec<InstanceSummary> = new
            .iter()
            .filter_map(|n| self.instance(n).cloned())
            .collect();
        let gated = new
            .iter()
            .filter(|l| l.health.passed_gate(gate_ms, now))
            .count();
        if gated > 0 && self.g.failures > 0 && input.ended.is_empty() {
            self.g.failures = 0;
        }

        let size = self.g.size as usize;
        // Scale down: extra instances of the current revision go, newest first.
        if new.len() > size {
            let mut extra: Vec<&InstanceSummary> = new.iter().collect();
            extra.sort_by_key(|l| std::cmp::Reverse(l.started_ms));
            let extra: Vec<String> = extra
                .into_iter()
                .take(new.len() - size)
                .map(|l| l.name.clone())
                .collect();
            for n in extra {
                self.stop(&n, StopReason::ScaledDown);
            }
        }
        let new_count = new.len().min(size);
        // A microVM's volume is a disk one VM holds at a time: no surge, the old one goes first.
        let exclusive = !old.is_empty() && input.disk_revisions.contains(&self.g.current);
        let ungated = new_count - gated.min(new_count);
        let max_unavailable = self.g.update.max_unavailable as usize;
        let mut make_room = if exclusive && ungated == 0 && now >= self.g.backoff_until_ms {
            max_unavailable.min(size.saturating_sub(new_count))
        } else {
            0
        };
        // Old instances go once enough new ones have passed the gate (or if there are too many).
        let mut old_left = old.len();
        for n in &old {
            let replaced = gated + old_left > size;
            if replaced || make_room > 0 {
                self.stop(n, StopReason::Replaced);
                old_left -= 1;
                if !replaced {
                    make_room -= 1;
                }
            }
        }
        // Start new ones: up to the size, with at most max_unavailable extra while old ones serve.
        let surge = if exclusive { 0 } else { max_unavailable };
        let budget = size + surge;
        let running = new_count + old_left;
        let mut to_start = size.saturating_sub(new_count);
        if old_left > 0 {
            // During a rollout, one batch at a time: wait for the started ones to pass the gate.
            to_start = to_start.min(max_unavailable.saturating_sub(ungated));
        }
        if now < self.g.backoff_until_ms {
            to_start = 0;
        }
        let starts = to_start.min(budget.max(size).saturating_sub(running));
        for _ in 0..starts {
            self.steps.push(Step::Start { revision: current });
        }

        // Done? (Never with a start planned: all `size` have passed the gate.)
        if let Rollout::Progressing { to, from, .. } = self.g.rollout
            && old_left == 0
            && gated >= size
        {
            self.g.last_good = Some(to);
            self.g.rollout = Rollout::Stable;
            self.steps.push(Step::RolloutEnded(RolloutEnd::Complete));
            self.event(match from {
                Some(f) => format!("rollout from revision {f} to {to} complete"),
                None => format!("revision {to} is up"),
            });
        }
    }

    fn fail_rollout(&mut self, reason: &str) {
        let Rollout::Progressing { from, to, .. } = self.g.rollout else {
            return;
        };
        let back_to = from
            .or(self.g.last_good)
            .filter(|f| *f != to && self.g.revision(*f).is_some());
        match (self.g.update.on_failure, back_to) {
            (OnFailure::Rollback, Some(back)) => {
                self.event(format!(
                    "rollout of revision {to} failed: {reason}; rolling back to revision {back}"
                ));
                self.g.current = back;
                self.steps.push(Step::RolloutEnded(RolloutEnd::RolledBack));
                self.g.rollout = Rollout::RolledBack {
                    failed: to,
                    to: back,
                    reason: reason.to_owned(),
                };
                self.g.failures = 0;
                self.g.start_failures = 0;
                self.g.backoff_until_ms = 0;
                // The failed revision's instances go now; the old ones never stopped serving.
                let failed: Vec<String> = self
                    .live
                    .iter()
                    .filter(|l| l.revision == to)
                    .map(|l| l.name.clone())
                    .collect();
                for n in failed {
                    self.stop(&n, StopReason::RevisionFailed);
                }
            }
            _ => {
                self.event(format!("rollout of revision {to} failed: {reason}; paused"));
                self.g.rollout = Rollout::Paused {
                    at: to,
                    reason: reason.to_owned(),
                };
                self.steps.push(Step::RolloutEnded(RolloutEnd::Paused));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::{GroupName, Isolation, UpdatePolicy};
    use crate::state::{Revision, Template};

    const NOW: u64 = 1_000_000;
    const GATE: u64 = 10_000;

    /// A group at `current` of revisions 1 to 3, `size` instances, a 10 s gate and
    /// batches of one.
    fn group(size: u32, current: u64, rollout: Rollout) -> GroupRecord {
        let revision = |number| Revision {
            number,
            template: Template {
                image: format!("app:{number}"),
                digest: format!("sha256:{number}"),
                isolation: Isolation::Sandbox,
                publish: Vec::new(),
                links: Vec::new(),
                resources: None,
            },
            created_ms: 0,
        };
        GroupRecord {
            name: GroupName::try_from("web".to_owned()).unwrap(),
            size,
            update: UpdatePolicy {
                health_gate: Duration::from_millis(GATE),
                ..UpdatePolicy::default()
            },
            revisions: vec![revision(1), revision(2), revision(3)],
            current,
            last_good: Some(1),
            rollout,
            restarts: 0,
            failures: 0,
            backoff_until_ms: 0,
            start_failures: 0,
            critical: false,
        }
    }

    fn rolling(from: Option<u64>, to: u64) -> Rollout {
        Rollout::Progressing {
            from,
            to,
            since_ms: 0,
        }
    }

    fn instance(name: &str, revision: u64, health: HealthSummary) -> InstanceSummary {
        InstanceSummary {
            name: name.to_owned(),
            revision,
            started_ms: NOW - 1_000,
            health,
        }
    }

    /// Healthy for `ms`.
    fn healthy_for(ms: u64) -> HealthSummary {
        HealthSummary::assumed(NOW - ms)
    }

    fn gated() -> HealthSummary {
        healthy_for(GATE)
    }

    fn starting() -> HealthSummary {
        HealthSummary::default()
    }

    fn failed(error: &str) -> HealthSummary {
        HealthSummary {
            failed: true,
            last_error: Some(error.to_owned()),
            ..HealthSummary::default()
        }
    }

    fn stop(name: &str, why: StopReason) -> Step {
        Step::Stop {
            name: name.to_owned(),
            why,
        }
    }

    fn event(text: &str) -> Step {
        Step::Event(text.to_owned())
    }

    fn ended(revision: u64, why: &str) -> Ended {
        Ended {
            revision,
            why: why.to_owned(),
        }
    }

    /// One pass: the group, its instances, what ended, the revisions with volume
    /// disks; the steps planned and how the record changes.
    struct Row {
        story: &'static str,
        group: GroupRecord,
        instances: Vec<InstanceSummary>,
        ended: Vec<Ended>,
        disks: Vec<u64>,
        steps: Vec<Step>,
        record: fn(&mut GroupRecord),
    }

    fn row(story: &'static str, group: GroupRecord) -> Row {
        Row {
            story,
            group,
            instances: Vec::new(),
            ended: Vec::new(),
            disks: Vec::new(),
            steps: Vec::new(),
            record: |_| {},
        }
    }

    impl Row {
        fn instances(mut self, i: Vec<InstanceSummary>) -> Row {
            self.instances = i;
            self
        }
        fn ended(mut self, e: Vec<Ended>) -> Row {
            self.ended = e;
            self
        }
        fn disks(mut self, d: Vec<u64>) -> Row {
            self.disks = d;
            self
        }
        fn steps(mut self, s: Vec<Step>) -> Row {
            self.steps = s;
            self
        }
        fn record(mut self, r: fn(&mut GroupRecord)) -> Row {
            self.record = r;
            self
        }
    }

    /// What a failed rollout of revision 2 plans: back to 1, stopping `stopped`.
    fn rolls_back(reason: &str, stopped: &[&str]) -> Vec<Step> {
        let mut steps = vec![
            event(&format!(
                "rollout of revision 2 failed: {reason}; rolling back to revision 1"
            )),
            Step::RolloutEnded(RolloutEnd::RolledBack),
        ];
        steps.extend(stopped.iter().map(|n| stop(n, StopReason::RevisionFailed)));
        steps
    }

    /// What the rollout from revision 1 to 2 plans when it is done.
    fn completes_2() -> Vec<Step> {
        vec![
            Step::RolloutEnded(RolloutEnd::Complete),
            event("rollout from revision 1 to 2 complete"),
        ]
    }

    /// The record after it.
    fn completed_2(g: &mut GroupRecord) {
        g.last_good = Some(2);
        g.rollout = Rollout::Stable;
    }

    /// The record after a failed rollout of revision 2 went back to 1.
    fn rolled_back(g: &mut GroupRecord, reason: &str) {
        g.current = 1;
        g.rollout = Rollout::RolledBack {
            failed: 2,
            to: 1,
            reason: reason.to_owned(),
        };
    }

    fn with<F: FnOnce(&mut GroupRecord)>(mut g: GroupRecord, f: F) -> GroupRecord {
        f(&mut g);
        g
    }

    #[test]
    fn the_rollout_rules() {
        let pause = |g: &mut GroupRecord| g.update.on_failure = OnFailure::Pause;
        // Two old instances serve; the new one failed its check.
        let failing_check = || {
            vec![
                instance("a", 1, gated()),
                instance("b", 1, gated()),
                instance("c", 2, failed("connect refused")),
            ]
        };
        let rows = vec![
            row("a first deployment starts its size", group(2, 1, rolling(None, 1)))
                .steps(vec![Step::Start { revision: 1 }, Step::Start { revision: 1 }]),
            row("a first deployment whose instances passed the gate is up", group(2, 1, rolling(None, 1)))
                .instances(vec![instance("a", 1, gated()), instance("b", 1, gated())])
                .steps(vec![Step::RolloutEnded(RolloutEnd::Complete), event("revision 1 is up")])
                .record(|g| {
                    g.last_good = Some(1);
                    g.rollout = Rollout::Stable;
                }),
            row("a gate not yet passed completes nothing", group(1, 1, rolling(None, 1)))
                .instances(vec![instance("a", 1, healthy_for(GATE - 1))]),
            row("scaling up starts the difference at once", group(3, 1, Rollout::Stable))
                .instances(vec![instance("a", 1, gated())])
                .steps(vec![Step::Start { revision: 1 }, Step::Start { revision: 1 }]),
            row("scaling down stops the newest first", group(1, 1, Rollout::Stable))
                .instances(vec![
                    InstanceSummary { started_ms: 3, ..instance("a", 1, gated()) },
                    InstanceSummary { started_ms: 1, ..instance("b", 1, gated()) },
                    InstanceSummary { started_ms: 2, ..instance("c", 1, gated()) },
                ])
                .steps(vec![stop("a", StopReason::ScaledDown), stop("c", StopReason::ScaledDown)]),
            row("a rollout surges by max_unavailable while the old serve", group(2, 2, rolling(Some(1), 2)))
                .instances(vec![instance("a", 1, gated()), instance("b", 1, gated())])
                .steps(vec![Step::Start { revision: 2 }]),
            row("a wider max_unavailable surges a wider batch", with(group(3, 2, rolling(Some(1), 2)), |g| g.update.max_unavailable = 2))
                .instances(vec![instance("a", 1, gated()), instance("b", 1, gated()), instance("c", 1, gated())])
                .steps(vec![Step::Start { revision: 2 }, Step::Start { revision: 2 }]),
            row("an old instance stays until the new one passed the gate", group(2, 2, rolling(Some(1), 2)))
                .instances(vec![
                    instance("a", 1, gated()),
                    instance("b", 1, gated()),
                    instance("c", 2, healthy_for(GATE - 1)),
                ]),
            row("a passed gate stops one old instance and starts the next batch", group(2, 2, rolling(Some(1), 2)))
                .instances(vec![instance("a", 1, gated()), instance("b", 1, gated()), instance("c", 2, gated())])
                .steps(vec![stop("a", StopReason::Replaced), Step::Start { revision: 2 }]),
            row("the last old instance goes, and the rollout is done, when the size has passed", group(2, 2, rolling(Some(1), 2)))
                .instances(vec![instance("b", 1, gated()), instance("c", 2, gated()), instance("d", 2, gated())])
                .steps([vec![stop("b", StopReason::Replaced)], completes_2()].concat())
                .record(completed_2),
            row("a rollout is done when only passed instances of the new revision run", group(2, 2, rolling(Some(1), 2)))
                .instances(vec![instance("c", 2, gated()), instance("d", 2, gated())])
                .steps(completes_2())
                .record(completed_2),
            row("a failed health check during a rollout rolls back", group(2, 2, rolling(Some(1), 2)))
                .instances(failing_check())
                .steps(rolls_back("instance c of revision 2 failed its health check: connect refused", &["c"]))
                .record(|g| rolled_back(g, "instance c of revision 2 failed its health check: connect refused")),
            row("a failed health check during a rollout pauses it if the policy says so", with(group(2, 2, rolling(Some(1), 2)), pause))
                .instances(failing_check())
                .steps(vec![
                    event("rollout of revision 2 failed: instance c of revision 2 failed its health check: connect refused; paused"),
                    Step::RolloutEnded(RolloutEnd::Paused),
                ])
                .record(|g| {
                    g.rollout = Rollout::Paused {
                        at: 2,
                        reason: "instance c of revision 2 failed its health check: connect refused".into(),
                    };
                }),
            row("a paused group stops the new revision and keeps the old", group(2, 2, Rollout::Paused { at: 2, reason: "r".into() }))
                .instances(vec![instance("a", 1, gated()), instance("b", 1, gated()), instance("c", 2, starting())])
                .steps(vec![stop("c", StopReason::Paused)]),
            row("an instance never healthy within the gate and 30 s fails the rollout", group(1, 2, rolling(Some(1), 2)))
                .instances(vec![
                    instance("a", 1, gated()),
                    InstanceSummary { started_ms: NOW - GATE - 30_001, ..instance("c", 2, starting()) },
                ])
                .steps(rolls_back("instance c of revision 2 did not become healthy within 40s", &["c"]))
                .record(|g| rolled_back(g, "instance c of revision 2 did not become healthy within 40s")),
            row("...but not a millisecond sooner", group(1, 2, rolling(Some(1), 2)))
                .instances(vec![
                    instance("a", 1, gated()),
                    InstanceSummary { started_ms: NOW - GATE - 30_000, ..instance("c", 2, starting()) },
                ]),
            row("an instance of the new revision that ends fails the rollout", group(2, 2, rolling(Some(1), 2)))
                .instances(vec![instance("a", 1, gated()), instance("b", 1, gated())])
                .ended(vec![ended(2, "exit status 1")])
                .steps(vec![
                    Step::Restarted,
                    event("rollout of revision 2 failed: an instance of revision 2 ended: exit status 1; rolling back to revision 1"),
                    Step::RolloutEnded(RolloutEnd::RolledBack),
                ])
                .record(|g| {
                    g.restarts = 1;
                    g.current = 1;
                    g.rollout = Rollout::RolledBack {
                        failed: 2,
                        to: 1,
                        reason: "an instance of revision 2 ended: exit status 1".into(),
                    };
                }),
            row("a first deployment that crashes heals instead of failing", group(1, 1, rolling(None, 1)))
                .ended(vec![ended(1, "exit status 1")])
                .steps(vec![Step::Restarted, Step::Start { revision: 1 }])
                .record(|g| {
                    g.restarts = 1;
                    g.failures = 1;
                    g.backoff_until_ms = NOW;
                }),
            row("an old revision's end counts as a restart, not a failure", group(1, 1, Rollout::Stable))
                .instances(vec![instance("a", 1, gated())])
                .ended(vec![ended(3, "killed")])
                .steps(vec![Step::Restarted])
                .record(|g| g.restarts = 1),
            row("nothing starts during a back-off", with(group(1, 1, Rollout::Stable), |g| g.backoff_until_ms = NOW + 1)),
            row("a start failure's back-off holds starts too", with(group(1, 1, Rollout::Stable), |g| {
                g.start_failures = 2;
                g.backoff_until_ms = NOW + 1;
            })),
            row("a replacement that passed the gate ends the crash loop", with(group(1, 1, Rollout::Stable), |g| g.failures = 4))
                .instances(vec![instance("a", 1, gated())])
                .record(|g| g.failures = 0),
            row("an instance that failed its check outside a rollout is replaced", group(1, 1, Rollout::Stable))
                .instances(vec![instance("a", 1, failed("GET /: 500"))])
                .steps(vec![stop("a", StopReason::FailedCheck), Step::Start { revision: 1 }])
                .record(|g| {
                    g.failures = 1;
                    g.backoff_until_ms = NOW;
                }),
            row("a microVM with a volume disk stops the old one before the new starts", group(1, 2, rolling(Some(1), 2)))
                .instances(vec![instance("a", 1, gated())])
                .disks(vec![2])
                .steps(vec![stop("a", StopReason::Replaced), Step::Start { revision: 2 }]),
            row("...and waits for it to pass the gate before the next", group(2, 2, rolling(Some(1), 2)))
                .instances(vec![instance("b", 1, gated()), instance("c", 2, healthy_for(1))])
                .disks(vec![2]),
            row("without a disk the same group surges", group(1, 2, rolling(Some(1), 2)))
                .instances(vec![instance("a", 1, gated())])
                .disks(vec![1])
                .steps(vec![Step::Start { revision: 2 }]),
        ];
        for r in rows {
            let want = with(r.group.clone(), r.record);
            let got = plan(&Input {
                group: &r.group,
                instances: &r.instances,
                ended: &r.ended,
                disk_revisions: &r.disks,
                now_ms: NOW,
            });
            assert_eq!(got.steps, r.steps, "{}", r.story);
            assert_eq!(got.group, want, "{}", r.story);
        }
    }

    /// A pass at `NOW` over a sandbox group.
    fn pass(g: &GroupRecord, instances: &[InstanceSummary], ended: &[Ended]) -> Plan {
        plan(&Input {
            group: g,
            instances,
            ended,
            disk_revisions: &[],
            now_ms: NOW,
        })
    }

    #[test]
    fn each_crash_in_a_row_waits_longer_up_to_30_s() {
        // Failures before the crash, and the wait after it.
        for (before, wait) in [
            (0, 0),
            (1, 250),
            (2, 500),
            (3, 1_000),
            (9, 30_000),
            (20, 30_000),
        ] {
            let g = with(group(1, 1, Rollout::Stable), |g| g.failures = before);
            let out = pass(&g, &[], &[ended(1, "killed")]);
            let failures = before + 1;
            let mut steps = vec![Step::Restarted];
            if failures >= 3 {
                steps.push(event(&format!(
                    "crash loop: {failures} failures in a row, next start in {wait} ms"
                )));
            }
            if wait == 0 {
                steps.push(Step::Start { revision: 1 });
            }
            assert_eq!(out.steps, steps, "after {before} failures");
            let g = out.group;
            assert_eq!(
                (g.restarts, g.failures, g.backoff_until_ms),
                (1, failures, NOW + wait)
            );
        }
    }

    #[test]
    fn a_failed_start_backs_off_from_250_ms_and_doubles() {
        let mut g = group(1, 1, Rollout::Stable);
        let steps = start_failed(&mut g, "no nft", &[], NOW);
        assert_eq!(
            steps,
            vec![event("no nft (failed start 1 in a row; next try in 250ms)")]
        );
        assert_eq!((g.start_failures, g.backoff_until_ms), (1, NOW + 250));
        let steps = start_failed(&mut g, "no nft", &[], NOW + 250);
        assert_eq!(
            steps,
            vec![event("no nft (failed start 2 in a row; next try in 500ms)")]
        );
        assert_eq!((g.start_failures, g.backoff_until_ms), (2, NOW + 750));
        start_succeeded(&mut g);
        assert_eq!(g.start_failures, 0);
    }

    #[test]
    fn a_failed_start_of_a_new_revision_fails_its_rollout() {
        let mut g = group(2, 2, rolling(Some(1), 2));
        let live = [instance("a", 1, gated()), instance("c", 2, starting())];
        let steps = start_failed(&mut g, "no kernel", &live, NOW);
        assert_eq!(
            steps,
            vec![
                event("no kernel (failed start 1 in a row; next try in 250ms)"),
                event("rollout of revision 2 failed: no kernel; rolling back to revision 1"),
                Step::RolloutEnded(RolloutEnd::RolledBack),
                stop("c", StopReason::RevisionFailed),
            ]
        );
        assert_eq!((g.current, g.start_failures, g.backoff_until_ms), (1, 0, 0));
    }

    #[test]
    fn a_rollout_with_nothing_to_go_back_to_pauses() {
        // Revision 1 is no longer kept: even the rollback policy can only pause.
        let mut g = group(1, 2, rolling(Some(1), 2));
        g.revisions.retain(|r| r.number != 1);
        g.last_good = None;
        let out = pass(&g, &[instance("c", 2, failed("refused"))], &[]);
        assert!(
            matches!(out.group.rollout, Rollout::Paused { at: 2, .. }),
            "{out:?}"
        );
        assert_eq!(out.group.current, 2);
    }
}
