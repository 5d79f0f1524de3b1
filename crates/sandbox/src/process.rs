//! Process handles shared by Juice's runtimes (the sandbox here, the microVM
//! driver in `juice-microvm`): pidfds that never name a recycled pid, the
//! instance-name rule, and finding the host programs they run.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::instance::start_time;

/// The first executable file named `program` in the directories of `path` (a
/// `PATH` value; `None` finds nothing), as `execvp` would pick it.
pub fn find_program(program: &str, path: Option<&std::ffi::OsStr>) -> Option<std::path::PathBuf> {
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

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from pidfd_open that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A pidfd-like fd that is always readable: an eventfd already signalled.
pub fn dead_pidfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd with an initial count of 1 returns a new fd or -1.
    let fd = unsafe { libc::eventfd(1, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// For a process found again by pid and start time: its pidfd if it is still that
/// process, else a [`dead_pidfd`] (so waiting on it returns at once).
pub fn pidfd_of(pid: i32, started: u64) -> io::Result<OwnedFd> {
    match pidfd_open(pid) {
        // Opened first, checked second: a pid recycled in between fails the check.
        Ok(fd) if start_time(pid) == Some(started) => Ok(fd),
        _ => dead_pidfd(),
    }
}

/// Waits up to `timeout_ms` (-1: forever) for `fd` to become readable.
pub fn poll_readable(fd: &OwnedFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return r > 0;
    }
}
