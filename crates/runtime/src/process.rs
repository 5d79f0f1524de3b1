//! The supervised process under every instance (a sandbox's init, a microVM's
//! QEMU), held by a pidfd that never names a recycled pid; the instance-name
//! rule; the records each backend keeps per instance; and finding the host
//! programs the backends run.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ExitReport;

/// The first executable file named `program` in the directories of `path` (a
/// `PATH` value; `None` finds nothing), as `execvp` would pick it.
pub fn find_program(program: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Instance names: lowercase letters, digits and '-', starting with a letter or digit, at most 48.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A pidfd for `pid`.
pub fn pidfd(pid: i32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

/// A pidfd-like fd that is always readable: an eventfd already signalled.
pub fn dead_pidfd() -> io::Result<OwnedFd> {
    Ok(eventfd(1, EventfdFlags::CLOEXEC)?)
}

/// For a process found again by pid and start time: its pidfd if it is still that
/// process, else a [`dead_pidfd`] (so waiting on it returns at once).
pub fn pidfd_of(pid: i32, started: u64) -> io::Result<OwnedFd> {
    match pidfd(pid) {
        // Opened first, checked second: a pid recycled in between fails the check.
        Ok(fd) if start_time(pid) == Some(started) => Ok(fd),
        _ => dead_pidfd(),
    }
}

/// Waits up to `timeout` (forever if `None`) for `fd` to become readable.
pub fn poll_readable(fd: impl AsFd, timeout: Option<Duration>) -> bool {
    let timeout = timeout.map(|t| Timespec {
        tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    loop {
        match poll(&mut fds, timeout.as_ref()) {
            Err(rustix::io::Errno::INTR) => continue,
            Ok(n) => return n > 0,
            Err(_) => return false,
        }
    }
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past its last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The process an instance lives in, and where its ending stands: running,
/// reaped (its exit collected), released (what it held freed). A backend's
/// instance handle owns one and says how to collect the exit and what to free
/// (see [`crate::Handle`]).
pub struct Process {
    pid: i32,
    fd: OwnedFd,
    /// We are its parent and must reap it.
    is_child: bool,
    pub(crate) reaped: Option<ExitReport>,
    pub(crate) released: bool,
}

impl Process {
    /// A child this process started, with the pidfd from its clone.
    pub fn child(pid: i32, pidfd: OwnedFd) -> Process {
        Process::with_fd(pid, pidfd, true)
    }

    /// A process an earlier supervisor started, found by pid and start time; it
    /// counts as ended if that pid is now another process.
    pub fn found(pid: i32, start_time: u64) -> io::Result<Process> {
        Ok(Process::with_fd(pid, pidfd_of(pid, start_time)?, false))
    }

    /// A stand-in whose end is `fd` becoming readable (an in-memory instance).
    pub fn with_fd(pid: i32, fd: OwnedFd, is_child: bool) -> Process {
        Process {
            pid,
            fd,
            is_child,
            reaped: None,
            released: false,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Readable once the process has ended.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn is_running(&self) -> bool {
        self.reaped.is_none() && !poll_readable(&self.fd, Some(Duration::ZERO))
    }

    /// Whether it ended within `timeout` (forever if `None`).
    pub fn ended_within(&self, timeout: Option<Duration>) -> bool {
        self.reaped.is_some() || poll_readable(&self.fd, timeout)
    }

    /// Its wait status, once it has ended, if we are its parent (reaps the zombie).
    pub fn child_status(&self) -> Option<nix::sys::wait::WaitStatus> {
        self.is_child
            .then(|| nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None).ok())
            .flatten()
    }

    /// Its exit, once collected.
    pub fn reaped(&self) -> Option<ExitReport> {
        self.reaped
    }

    /// Sends `sig` through the pidfd (never to a recycled pid). Best effort: a
    /// process that has ended, or a stand-in, takes no signal.
    pub fn signal(&self, sig: i32) {
        if let Some(sig) = Signal::from_named_raw(sig) {
            let _ = pidfd_send_signal(&self.fd, sig);
        }
    }
}

/// Where a backend keeps one directory per instance, each with a `state.json`
/// record while the instance holds anything.
pub mod record {
    use super::*;

    pub const STATE_FILE: &str = "state.json";

    #[derive(Debug, thiserror::Error)]
    pub enum RecordError {
        #[error("no record {0}")]
        NotFound(PathBuf),
        #[error(transparent)]
        Io(#[from] juice_image::PathError),
        #[error("{path} is damaged: {reason}")]
        Damaged { path: PathBuf, reason: String },
    }

    /// The names of the instance directories under `root` that hold a record.
    pub fn list(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join(STATE_FILE).exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The record in `dir`.
    pub fn read<T: DeserializeOwned>(dir: &Path) -> Result<T, RecordError> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => RecordError::NotFound(path.clone()),
            _ => RecordError::Io(juice_image::PathError {
                action: "read",
                path: path.clone(),
                source,
            }),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| RecordError::Damaged {
            path,
            reason: e.to_string(),
        })
    }

    /// Writes the record in `dir` through a temporary file and a rename, so a
    /// reader (or a crash) never sees half of it.
    pub fn write<T: Serialize>(dir: &Path, value: &T) -> Result<(), RecordError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join("state.json.tmp");
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| {
                RecordError::Io(juice_image::PathError {
                    action,
                    path,
                    source,
                })
            }
        };
        let json =
            serde_json::to_vec(value).map_err(|e| io("encode", &path)(io::Error::other(e)))?;
        std::fs::write(&tmp, json).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &path))
    }

    /// Removes the record (the instance holds nothing any more).
    pub fn remove(dir: &Path) {
        let _ = std::fs::remove_file(dir.join(STATE_FILE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["web", "web-1", "0a"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Web", "a/b", "../x", "a_b", &"x".repeat(49)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn start_time_reads_our_own() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(start_time(me).is_some_and(|t| t > 0));
        assert_eq!(start_time(me), start_time(me));
        assert!(start_time(i32::MAX).is_none());
    }

    #[test]
    fn a_found_process_that_is_gone_counts_as_ended() {
        let me = i32::try_from(std::process::id()).unwrap();
        let alive = Process::found(me, start_time(me).unwrap()).unwrap();
        assert!(alive.is_running());
        // The same pid with another start time is a recycled pid: not ours.
        let recycled = Process::found(me, start_time(me).unwrap() + 1).unwrap();
        assert!(!recycled.is_running());
        assert!(recycled.ended_within(None));
    }

    #[test]
    fn records_round_trip_and_damage_is_named() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("web-1");
        std::fs::create_dir(&dir).unwrap();
        assert!(matches!(
            record::read::<Vec<u32>>(&dir),
            Err(record::RecordError::NotFound(_))
        ));
        record::write(&dir, &vec![1u32, 2]).unwrap();
        assert_eq!(record::read::<Vec<u32>>(&dir).unwrap(), vec![1, 2]);
        assert_eq!(record::list(t.path()), vec!["web-1".to_owned()]);
        std::fs::write(dir.join(record::STATE_FILE), "{").unwrap();
        let e = record::read::<Vec<u32>>(&dir).unwrap_err().to_string();
        assert!(e.contains("state.json is damaged"), "{e}");
        record::remove(&dir);
        assert!(record::list(t.path()).is_empty());
    }
}
