//! The daemon's side of Juice OS: judging a trial boot by what the API answers.
//!
//! The rule is [`juice_os::trial`]'s; this module only takes the samples. Each one is a
//! real request to the daemon's own socket, so "the API answers" means what it says,
//! and the groups come from that same answer.

use std::path::Path;
use std::time::{Duration, Instant};

use juice_os::trial::{GroupSample, Sample, Trial, Verdict};

use crate::agent::{GroupStatus, GroupView};
use crate::client::Client;

/// Whether a group counts as healthy for a trial, and if not, why.
fn group_sample(g: &GroupView) -> GroupSample {
    let size = usize::try_from(g.size).unwrap_or(usize::MAX);
    let stuck = matches!(
        g.status,
        GroupStatus::CrashLoop { .. } | GroupStatus::CannotStart { .. }
    );
    let healthy = g.ready >= size && !stuck;
    GroupSample {
        name: g.name.clone(),
        critical: g.critical,
        healthy,
        detail: if healthy {
            String::new()
        } else {
            format!("{} of {} ready, {}", g.ready, g.size, g.status)
        },
        restarts: g.restarts,
    }
}

/// One sample: a request to the API at `socket`, `at` after the trial began.
pub fn sample(socket: &Path, at: Duration) -> Sample {
    let groups = Client::unix(socket).and_then(|c| c.groups());
    match groups {
        Ok(groups) => Sample {
            at,
            api: true,
            groups: groups.iter().map(group_sample).collect(),
        },
        Err(_) => Sample {
            at,
            api: false,
            groups: Vec::new(),
        },
    }
}

/// Samples every `interval` until the trial has a verdict. `began` is when the trial's
/// clock started (the boot, for a real host), so time before the daemon ran counts.
pub fn judge(socket: &Path, mut trial: Trial, began: Instant, interval: Duration) -> Verdict {
    loop {
        let s = sample(socket, began.elapsed());
        match trial.observe(&s) {
            Verdict::Pending => std::thread::sleep(interval),
            verdict => return verdict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Rollout;

    fn view(ready: usize, size: u32, status: GroupStatus) -> GroupView {
        GroupView {
            name: "web".into(),
            size,
            running: ready,
            ready,
            revision: 1,
            image: "hello-web".into(),
            rollout: Rollout::Stable,
            restarts: 2,
            status,
            critical: true,
        }
    }

    #[test]
    fn a_group_is_healthy_for_a_trial_when_all_are_ready_and_it_is_not_stuck() {
        assert!(group_sample(&view(2, 2, GroupStatus::Ok)).healthy);
        assert!(group_sample(&view(2, 2, GroupStatus::RolledBack { failed: 2 })).healthy);
        let short = group_sample(&view(1, 2, GroupStatus::RollingOut));
        assert!(!short.healthy);
        assert_eq!(short.detail, "1 of 2 ready, rolling-out");
        let stuck = group_sample(&view(2, 2, GroupStatus::CrashLoop { failures: 3 }));
        assert!(!stuck.healthy, "{stuck:?}");
        assert_eq!(stuck.restarts, 2);
    }

    #[test]
    fn a_socket_nobody_answers_is_a_silent_api() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample(&dir.path().join("juice.sock"), Duration::from_secs(3));
        assert!(!s.api);
        assert_eq!(s.at, Duration::from_secs(3));
    }
}
