//! The verdict on a trial boot, decided from what the daemon sees, purely.
//!
//! A trial is committed once, for one whole stability window without a break: the API
//! answers, every group marked critical is healthy, and no group restarts an instance.
//! It fails when the deadline comes first, with the reason the last sample gave (a host
//! that never got healthy says why). Samples are fed by the daemon; time is whatever
//! clock the caller passes, so the rule is tested without sleeping.

use std::time::Duration;

/// One group as the daemon sees it at a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSample {
    pub name: String,
    pub critical: bool,
    pub healthy: bool,
    /// Why it is not healthy, in the daemon's words (empty when healthy).
    pub detail: String,
    /// Instance restarts so far, summed over the group.
    pub restarts: u64,
}

/// What the daemon saw at `at` (time since the trial began).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub at: Duration,
    /// Whether a request to the daemon's own API was answered.
    pub api: bool,
    pub groups: Vec<GroupSample>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not yet: keep sampling.
    Pending,
    /// Healthy for the whole window: commit the trial.
    Commit,
    /// The deadline passed first; the reason is the last problem seen.
    Fail(String),
}

/// The trial's rule and what it has seen so far.
#[derive(Debug, Clone)]
pub struct Trial {
    stability: Duration,
    deadline: Duration,
    /// When the current unbroken healthy run began.
    healthy_since: Option<Duration>,
    /// Each group's restart count at the previous sample: any rise is a break.
    restarts: Vec<(String, u64)>,
    last_problem: String,
}

impl Trial {
    pub fn new(stability: Duration, deadline: Duration) -> Trial {
        Trial {
            stability,
            deadline,
            healthy_since: None,
            restarts: Vec::new(),
            last_problem: "no sample was taken".into(),
        }
    }

    /// What the host lacks at this sample, if anything.
    fn problem(&self, s: &Sample) -> Option<String> {
        if !s.api {
            return Some("the daemon's API did not answer".into());
        }
        let unhealthy: Vec<String> = s
            .groups
            .iter()
            .filter(|g| g.critical && !g.healthy)
            .map(|g| {
                if g.detail.is_empty() {
                    format!("critical group {} is not healthy", g.name)
                } else {
                    format!("critical group {} is not healthy ({})", g.name, g.detail)
                }
            })
            .collect();
        if !unhealthy.is_empty() {
            return Some(unhealthy.join("; "));
        }
        for g in &s.groups {
            let was = self
                .restarts
                .iter()
                .find(|(n, _)| n == &g.name)
                .map_or(g.restarts, |(_, r)| *r);
            if g.restarts > was {
                return Some(format!(
                    "group {} restarted {} time(s) since the last look",
                    g.name,
                    g.restarts - was
                ));
            }
        }
        None
    }

    /// Takes one sample and says what to do.
    pub fn observe(&mut self, s: &Sample) -> Verdict {
        let problem = self.problem(s);
        self.restarts = s
            .groups
            .iter()
            .map(|g| (g.name.clone(), g.restarts))
            .collect();
        match problem {
            Some(problem) => {
                self.healthy_since = None;
                self.last_problem = problem;
            }
            None => {
                let since = *self.healthy_since.get_or_insert(s.at);
                if s.at.saturating_sub(since) >= self.stability {
                    return Verdict::Commit;
                }
            }
        }
        if s.at >= self.deadline {
            let why = match &self.healthy_since {
                Some(since) => format!(
                    "healthy for only {} of the {} stability window when the deadline of {} \
                     came (the last problem: {})",
                    humantime::format_duration(s.at.saturating_sub(*since)),
                    humantime::format_duration(self.stability),
                    humantime::format_duration(self.deadline),
                    self.last_problem
                ),
                None => format!(
                    "not healthy within the deadline of {}: {}",
                    humantime::format_duration(self.deadline),
                    self.last_problem
                ),
            };
            return Verdict::Fail(why);
        }
        Verdict::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(name: &str, critical: bool, healthy: bool, restarts: u64) -> GroupSample {
        GroupSample {
            name: name.into(),
            critical,
            healthy,
            detail: if healthy {
                String::new()
            } else {
                "0 of 1 healthy".into()
            },
            restarts,
        }
    }

    fn s(secs: u64, api: bool, groups: Vec<GroupSample>) -> Sample {
        Sample {
            at: Duration::from_secs(secs),
            api,
            groups,
        }
    }

    fn run(samples: &[Sample]) -> Vec<Verdict> {
        let mut t = Trial::new(Duration::from_secs(10), Duration::from_secs(60));
        samples.iter().map(|x| t.observe(x)).collect()
    }

    #[test]
    fn a_host_healthy_for_the_whole_window_commits() {
        let v = run(&[
            s(0, true, vec![g("web", true, true, 0)]),
            s(5, true, vec![g("web", true, true, 0)]),
            s(10, true, vec![g("web", true, true, 0)]),
        ]);
        assert_eq!(v, [Verdict::Pending, Verdict::Pending, Verdict::Commit]);
    }

    #[test]
    fn a_break_restarts_the_window() {
        let v = run(&[
            s(0, true, vec![g("web", true, true, 0)]),
            s(5, false, vec![g("web", true, true, 0)]),
            s(10, true, vec![g("web", true, true, 0)]),
            s(19, true, vec![g("web", true, true, 0)]),
            s(20, true, vec![g("web", true, true, 0)]),
        ]);
        assert_eq!(v[3], Verdict::Pending);
        assert_eq!(v[4], Verdict::Commit);
    }

    #[test]
    fn an_unhealthy_critical_group_fails_at_the_deadline_and_says_which() {
        let v = run(&[
            s(
                0,
                true,
                vec![g("web", true, false, 0), g("batch", false, false, 0)],
            ),
            s(
                60,
                true,
                vec![g("web", true, false, 0), g("batch", false, false, 0)],
            ),
        ]);
        assert_eq!(v[0], Verdict::Pending);
        let Verdict::Fail(why) = &v[1] else {
            panic!("{v:?}")
        };
        assert!(
            why.contains("critical group web is not healthy (0 of 1 healthy)"),
            "{why}"
        );
        assert!(!why.contains("batch"), "{why}");
    }

    #[test]
    fn a_group_that_keeps_restarting_never_commits() {
        let mut samples = Vec::new();
        for i in 0..=12 {
            samples.push(s(i * 5, true, vec![g("web", true, true, i)]));
        }
        let v = run(&samples);
        assert!(!v.contains(&Verdict::Commit), "{v:?}");
        let Some(Verdict::Fail(why)) = v.last() else {
            panic!("{v:?}")
        };
        assert!(
            why.contains("group web restarted 1 time(s) since the last look"),
            "{why}"
        );
    }

    #[test]
    fn a_silent_api_is_the_reason() {
        let v = run(&[s(61, false, vec![])]);
        assert_eq!(
            v[0],
            Verdict::Fail(
                "not healthy within the deadline of 1m: the daemon's API did not answer".into()
            )
        );
    }

    #[test]
    fn with_no_groups_an_answering_api_is_enough() {
        let v = run(&[s(0, true, vec![]), s(10, true, vec![])]);
        assert_eq!(v, [Verdict::Pending, Verdict::Commit]);
    }
}
