//! The trial of a new OS version: a verdict from the daemon by the deadline, or a reboot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use juice_os::slots::{Booted, Slots, VERDICT};

/// A trial boot (`juice.os.trial=1` on the kernel command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trial {
    /// `juice.os.slot=` (else `juice.os.version=`) of the command line.
    pub slot: String,
    pub deadline: Duration,
    started: Instant,
    verdict: PathBuf,
}

impl Trial {
    /// The trial `cmdline` asks for, if any; `juice.os.deadline=<secs>` overrides `default`.
    pub fn from_cmdline(cmdline: &str, default: Duration) -> Option<Trial> {
        let word = |key: &str| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        if word("juice.os.trial") != Some("1") {
            return None;
        }
        let _ = std::fs::create_dir_all("/run/juice/os");
        Some(Trial {
            slot: word("juice.os.slot")
                .or_else(|| word("juice.os.version"))
                .unwrap_or("unknown")
                .to_owned(),
            deadline: word("juice.os.deadline")
                .and_then(|s| s.parse().ok())
                .map_or(default, Duration::from_secs),
            started: Instant::now(),
            verdict: PathBuf::from(VERDICT),
        })
    }

    pub fn verdict_given(&self) -> bool {
        self.verdict.exists()
    }

    pub fn verdict(&self) -> String {
        std::fs::read_to_string(&self.verdict)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    pub fn expired(&self) -> bool {
        self.started.elapsed() >= self.deadline
    }

    /// Marks the trial's slot bad in grubenv (on the boot partition at `boot`) and records
    /// why in the host's OS history under `home`; returns the reason. GRUB would skip the
    /// tried, uncommitted slot anyway: this makes `juice os status` say why.
    pub fn record_failure(&self, boot: &Path, home: &Path) -> String {
        let reason = format!(
            "no verdict within {} s of the boot (PID 1's deadline)",
            self.deadline.as_secs()
        );
        let slots = Slots::new(
            boot,
            &home.join("os"),
            Some(Booted {
                slot: self.slot.clone(),
                trial: true,
            }),
        );
        if let Err(e) = slots.fail(&reason) {
            crate::log(&format!("cannot mark slot {} bad: {e}", self.slot));
            slots.record("failed", &self.slot, None, Some(&reason));
        }
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trial_comes_from_the_command_line() {
        let d = Duration::from_secs(300);
        assert_eq!(Trial::from_cmdline("console=ttyS0 quiet", d), None);
        let t = Trial::from_cmdline("juice.os.trial=1 juice.os.slot=b juice.os.deadline=20", d)
            .unwrap();
        assert_eq!((t.slot.as_str(), t.deadline.as_secs()), ("b", 20));
        let t = Trial::from_cmdline("juice.os.trial=1 juice.os.version=1.2.0", d).unwrap();
        assert_eq!((t.slot.as_str(), t.deadline), ("1.2.0", d));
    }

    #[test]
    fn a_failure_marks_the_slot_bad_and_is_kept_in_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(boot.join("grub")).unwrap();
        let mut state = juice_os::select::BootState::default();
        state.install("s1").unwrap();
        state.commit("s1").unwrap();
        state.install("s2").unwrap();
        state.begin();
        let mut env = juice_os::grubenv::Env::default();
        state.write_to(&mut env).unwrap();
        std::fs::write(boot.join("grub/grubenv"), env.to_block().unwrap()).unwrap();
        let t = Trial::from_cmdline(
            "juice.os.trial=1 juice.os.slot=s2 juice.os.deadline=5",
            Duration::ZERO,
        )
        .unwrap();
        let home = dir.path().join("home");
        assert_eq!(
            t.record_failure(&boot, &home),
            "no verdict within 5 s of the boot (PID 1's deadline)"
        );
        let slots = Slots::new(&boot, &home.join("os"), None);
        let status = slots.status().unwrap();
        let s2 = status.versions.iter().find(|v| v.slot == "s2").unwrap();
        assert!(!s2.ok, "{status:?}");
        let last = status.last_failure.unwrap();
        assert_eq!(last.slot, "s2");
        assert!(last.reason.unwrap().contains("PID 1's deadline"));
    }
}
