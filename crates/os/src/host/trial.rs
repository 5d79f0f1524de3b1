//! The trial of a new OS version: a verdict from the daemon by the deadline, or a reboot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the daemon writes its verdict on a trial boot.
pub const VERDICT: &str = "/run/juice/os/verdict";
/// Under the data home: one JSON line per failed trial.
pub const FAILURES: &str = "os/failures.jsonl";

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

    /// Appends why the trial failed to `home`/[`FAILURES`]; returns the reason.
    pub fn record_failure(&self, home: &Path) -> String {
        let reason = format!("no verdict within {} s", self.deadline.as_secs());
        let record = serde_json::json!({
            "slot": self.slot,
            "reason": reason,
            "at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        });
        let path = home.join(FAILURES);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                writeln!(f, "{record}")?;
                f.sync_all()
            });
        if let Err(e) = written {
            crate::log(&format!(
                "cannot record the failure in {}: {e}",
                path.display()
            ));
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
    fn a_failure_is_one_json_line_appended() {
        let dir = tempfile::tempdir().unwrap();
        let t = Trial::from_cmdline(
            "juice.os.trial=1 juice.os.slot=a juice.os.deadline=5",
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(t.record_failure(dir.path()), "no verdict within 5 s");
        t.record_failure(dir.path());
        let text = std::fs::read_to_string(dir.path().join(FAILURES)).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["slot"], "a");
        assert_eq!(lines[0]["reason"], "no verdict within 5 s");
        assert!(lines[0]["at"].as_str().unwrap().ends_with('Z'));
    }
}
