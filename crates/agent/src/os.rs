//! The daemon's side of Juice OS: the kept versions behind `/v1/os` ([`OsControl`]), and
//! judging a trial boot by what the API answers.
//!
//! The trial's rule is [`juice_os::trial`]'s; this module only takes the samples. Each
//! one is a real request to the daemon's own socket, so "the API answers" means what it
//! says, and the groups come from that same answer.
//!
//! An OS update must be signed by a key this host's trust policy names: unlike an
//! appliance, which a policy-less host may run unsigned, the OS replaces everything.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use juice_image::store::Store;
use juice_os::slots::{Booted, OsStatus, Slots, SlotsError};
use juice_os::trial::{GroupSample, Sample, Trial, Verdict};
use juice_os::version::OsVersion;
use juice_registry::policy::Verdict as Trust;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agent::{GroupStatus, GroupView};
use crate::client::Client;

pub use juice_os::slots::VERDICT;

#[derive(Debug, thiserror::Error)]
pub enum OsError {
    #[error(
        "this host does not run Juice OS (it was not booted with juice.os.slot= by Juice's GRUB)"
    )]
    NotJuiceOs,
    #[error(transparent)]
    Slots(#[from] SlotsError),
    #[error("OS version {reference} refused: {reason}")]
    Refused { reference: String, reason: String },
    #[error(
        "this boot is a trial: say whether the reboot commits it (--commit) or abandons it (--abort)"
    )]
    TrialNeedsChoice,
    #[error("cannot ask PID 1 to reboot: {0}")]
    Reboot(String),
}

/// How an operator's reboot ends a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TrialEnd {
    Commit,
    Abort,
}

/// What an update wrote.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Installed {
    pub slot: String,
    pub version: String,
    pub digest: String,
    /// Who signed it, as the policy saw it.
    pub signed_by: Vec<String>,
}

/// What an OS update asks of others before it writes anything: a fleet host takes a slot
/// of the fleet's update semaphore (docs/fleet.md, "Host updates"); a host alone has none.
pub trait UpdateGate: Send + Sync {
    /// Called before version `version` is written as the next boot's trial; an error
    /// refuses the update (nothing is written) and says why.
    fn before(&self, version: &str) -> Result<(), String>;
    /// Called when what `before` took can be given back: the update failed before its
    /// reboot, or this boot's trial has its verdict.
    fn after(&self);
}

/// The OS versions of the host this daemon runs on, when it runs on Juice OS.
pub struct OsControl {
    /// Asked before every update, told after its end (see [`UpdateGate`]).
    gate: Mutex<Option<std::sync::Arc<dyn UpdateGate>>>,
    slots: Slots,
    home: PathBuf,
    /// Where the verdict on a trial goes ([`VERDICT`] on a real host).
    verdict: PathBuf,
    /// One change at a time: updates, rollbacks and verdicts each read and write grubenv.
    lock: Mutex<()>,
}

impl OsControl {
    /// The host's OS, if it was booted by Juice OS (its GRUB put `juice.os.slot=` on the
    /// kernel command line, and its boot partition is at `/boot`).
    pub fn detect(home: &Path) -> Option<OsControl> {
        let booted = Booted::current()?;
        let boot = Path::new("/boot");
        if !boot.join("grub/grubenv").is_file() {
            return None;
        }
        Some(OsControl {
            gate: Mutex::new(None),
            slots: Slots::new(boot, &home.join("os"), Some(booted)),
            home: home.to_owned(),
            verdict: PathBuf::from(VERDICT),
            lock: Mutex::new(()),
        })
    }

    /// The OS versions of a host whose boot partition is at `boot`, its trial's verdict
    /// kept at `verdict` (for tests; a real daemon uses [`OsControl::detect`]).
    pub fn new(home: &Path, boot: &Path, booted: Booted, verdict: &Path) -> OsControl {
        OsControl {
            gate: Mutex::new(None),
            slots: Slots::new(boot, &home.join("os"), Some(booted)),
            home: home.to_owned(),
            verdict: verdict.to_owned(),
            lock: Mutex::new(()),
        }
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets what every later update asks first (a fleet host's update slot).
    pub fn set_gate(&self, gate: std::sync::Arc<dyn UpdateGate>) {
        *self
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(gate);
    }

    fn gate(&self) -> Option<std::sync::Arc<dyn UpdateGate>> {
        self.gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn booted(&self) -> Option<&Booted> {
        self.slots.booted.as_ref()
    }

    pub fn status(&self) -> Result<OsStatus, OsError> {
        let _l = self.locked();
        Ok(self.slots.status()?)
    }

    /// Pulls (for a registry reference), checks the signature against the policy, and
    /// writes the version beside the kept ones as the next boot's trial. Nothing is
    /// written on the boot partition before the version passed every check.
    pub fn update(&self, reference: &str, keep: usize) -> Result<Installed, OsError> {
        let refused = |reason: String| OsError::Refused {
            reference: reference.to_owned(),
            reason,
        };
        let store = Store::open(&self.home).map_err(|e| refused(e.to_string()))?;
        if juice_registry::reference::looks_remote(reference) {
            juice_registry::remote::RemoteOptions::from_env(&self.home)
                .and_then(|o| juice_registry::remote::Remote::new(&o))
                .and_then(|r| r.pull(&store, reference))
                .map_err(|e| refused(format!("pulling it: {e}")))?;
        }
        let admitted =
            juice_registry::policy::admit(&store, reference).map_err(|e| refused(e.to_string()))?;
        let signed_by = match admitted.verdict {
            Trust::SignedBy(keys) => keys,
            Trust::NoPolicy => {
                return Err(refused(format!(
                    "an OS version must be signed by a key this host trusts, and there is no {}",
                    juice_registry::policy::policy_path(&self.home).display()
                )));
            }
            Trust::Unsigned => {
                return Err(refused(format!(
                    "it is not signed, and an OS version must be signed by a key {} trusts",
                    juice_registry::policy::policy_path(&self.home).display()
                )));
            }
        };
        let version = OsVersion::open(&store, &admitted.digest.to_string())
            .map_err(|e| refused(e.to_string()))?;
        let gate = self.gate();
        if let Some(g) = &gate {
            g.before(&version.config.version).map_err(refused)?;
        }
        let _l = self.locked();
        let work = self.home.join("tmp");
        let installed = std::fs::create_dir_all(&work)
            .map_err(|e| refused(format!("{}: {e}", work.display())))
            .and_then(|()| Ok(self.slots.install(&store, &version, keep, &work)?));
        let slot = match installed {
            Ok(slot) => slot,
            Err(e) => {
                if let Some(g) = &gate {
                    g.after();
                }
                return Err(e);
            }
        };
        Ok(Installed {
            slot,
            version: version.config.version.clone(),
            digest: admitted.digest.to_string(),
            signed_by,
        })
    }

    /// Makes a kept committed version the next boot's (default: the one before).
    pub fn rollback(&self, to: Option<&str>) -> Result<String, OsError> {
        let _l = self.locked();
        Ok(self.slots.rollback(to)?)
    }

    /// Trials that fell back before a verdict, now marked bad (see [`Slots::settle_unjudged`]).
    pub fn settle_unjudged(&self) -> Result<Vec<String>, OsError> {
        let _l = self.locked();
        Ok(self.slots.settle_unjudged()?)
    }

    /// Whether this boot's trial already has a verdict (or is no trial).
    pub fn decided(&self) -> bool {
        !self.booted().is_some_and(|b| b.trial) || self.verdict.exists()
    }

    /// Records a verdict on the trial: in grubenv and the history, then for PID 1.
    pub fn verdict(&self, verdict: &Verdict) -> Result<(), OsError> {
        let _l = self.locked();
        let line = match verdict {
            Verdict::Pending => return Ok(()),
            Verdict::Commit => {
                self.slots.commit()?;
                "committed\n".to_owned()
            }
            Verdict::Fail(reason) => {
                self.slots.fail(reason)?;
                format!("failed: {reason}\n")
            }
        };
        if let Some(g) = self.gate() {
            g.after();
        }
        let path = self.verdict.as_path();
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, line).map_err(|e| OsError::Reboot(format!("{}: {e}", path.display())))
    }

    /// Readies an operator's reboot: during an undecided trial it must say how the trial
    /// ends, and that verdict is recorded now. The caller then asks PID 1
    /// ([`request_reboot`]), once its answer has left: PID 1 stops the daemon first.
    pub fn prepare_reboot(&self, trial: Option<TrialEnd>) -> Result<(), OsError> {
        if !self.decided() {
            match trial {
                None => return Err(OsError::TrialNeedsChoice),
                Some(TrialEnd::Commit) => self.verdict(&Verdict::Commit)?,
                Some(TrialEnd::Abort) => {
                    self.verdict(&Verdict::Fail("abandoned by an operator's reboot".into()))?
                }
            }
        }
        Ok(())
    }
}

/// Asks PID 1 (`juice-host`) to reboot: SIGUSR1 is its reboot request.
pub fn request_reboot() -> Result<(), OsError> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(1),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .map_err(|e| OsError::Reboot(e.to_string()))
}

/// Judges this boot's trial in a thread of its own, then records the verdict, and on a
/// failure asks PID 1 to reboot (GRUB then boots the committed version). The clock starts
/// at the kernel's boot; the daemon's deadline comes `margin` before PID 1's own.
pub fn spawn_trial_judge(
    os: std::sync::Arc<OsControl>,
    socket: PathBuf,
    stability: Duration,
    deadline: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("os-trial".into())
        .spawn(move || {
            let uptime = std::fs::read_to_string("/proc/uptime")
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(Duration::ZERO, Duration::from_secs_f64);
            let began = Instant::now().checked_sub(uptime).unwrap_or_else(Instant::now);
            let verdict = judge(
                &socket,
                Trial::new(stability, deadline),
                began,
                Duration::from_secs(1),
            );
            let (line, failed) = match &verdict {
                Verdict::Fail(reason) => (format!("trial failed: {reason}"), true),
                _ => ("trial committed".to_owned(), false),
            };
            eprintln!("{}", serde_json::json!({"level": "info", "msg": line}));
            if let Err(e) = os.verdict(&verdict) {
                eprintln!("{}", serde_json::json!({"level": "error", "msg": format!("cannot record the trial's verdict: {e}")}));
            }
            if failed && let Err(e) = request_reboot() {
                eprintln!("{}", serde_json::json!({"level": "error", "msg": e.to_string()}));
            }
        })
}

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
    fn a_reboot_during_an_undecided_trial_must_say_commit_or_abort() {
        let dir = tempfile::tempdir().unwrap();
        let verdict = dir.path().join("verdict");
        let os = OsControl::new(
            dir.path(),
            &dir.path().join("boot"),
            Booted {
                slot: "s2".into(),
                trial: true,
            },
            &verdict,
        );
        assert!(!os.decided());
        // Refused before anything is written or any signal is sent.
        assert!(matches!(
            os.prepare_reboot(None),
            Err(OsError::TrialNeedsChoice)
        ));
        assert!(!verdict.exists());
        std::fs::write(&verdict, "committed\n").unwrap();
        assert!(os.decided(), "a verdict was given: a plain reboot is fine");
        let committed = OsControl::new(
            dir.path(),
            &dir.path().join("boot"),
            Booted {
                slot: "s1".into(),
                trial: false,
            },
            &dir.path().join("none"),
        );
        assert!(committed.decided(), "no trial: nothing to decide");
    }

    #[test]
    fn a_socket_nobody_answers_is_a_silent_api() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample(&dir.path().join("juice.sock"), Duration::from_secs(3));
        assert!(!s.api);
        assert_eq!(s.at, Duration::from_secs(3));
    }
}
