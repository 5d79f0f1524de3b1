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
//! # fn group() -> juice_agent::state::GroupRecord { unimplemented!() }
//! # if false {
//! let out = plan(&Input { group: &group(), instances: &[], ended: &[], disk_revisions: &[], now_ms: 0 });
//! for step in &out.steps {
//!     if let Step::Start { revision } = step { println!("start an instance of revision {revision}") }
//! }
//! # }
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
