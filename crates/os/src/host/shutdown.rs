//! Signals, the watchdog, and an orderly reboot or power-off.

use std::io::Write;
use std::time::{Duration, Instant};

use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::daemon::Supervisor;
use crate::{Failed, log};

/// How the host goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    Reboot,
    PowerOff,
}

impl Halt {
    /// SIGINT (the kernel's Ctrl-Alt-Del) and SIGUSR1 reboot; SIGTERM and SIGUSR2 power off.
    pub fn for_signal(s: Signal) -> Option<Halt> {
        match s {
            Signal::SIGINT | Signal::SIGUSR1 => Some(Halt::Reboot),
            Signal::SIGTERM | Signal::SIGUSR2 => Some(Halt::PowerOff),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Halt::Reboot => "rebooting",
            Halt::PowerOff => "powering off",
        }
    }
}

/// How long the daemon, then everything else, gets to stop after SIGTERM.
const DAEMON_GRACE: Duration = Duration::from_secs(10);
const ALL_GRACE: Duration = Duration::from_secs(5);

/// Blocks the signals PID 1 acts on, so [`wait_signal`] receives them.
pub fn block_signals() -> Result<SigSet, Failed> {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| Failed(format!("block signals: {e}")))?;
    Ok(set)
}

/// The next pending signal of `set`, waiting up to `timeout`.
pub fn wait_signal(set: &SigSet, timeout: Duration) -> Option<Signal> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().try_into().unwrap_or(1),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: sigtimedwait reads the signal set and the timeout, both valid for the
    // call; a null siginfo pointer is allowed.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    if n <= 0 {
        return None;
    }
    Signal::try_from(n).ok()
}

/// `/dev/watchdog` from `softdog`: petted while PID 1 runs, closed with the magic
/// `V` on a clean shutdown so the kernel does not reset a host that is going down anyway.
pub struct Watchdog(Option<std::fs::File>);

impl Watchdog {
    pub fn open(log: &impl Fn(&str)) -> Watchdog {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/watchdog")
            {
                Ok(f) => {
                    log("watchdog /dev/watchdog armed");
                    return Watchdog(Some(f));
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    log(&format!("no watchdog: /dev/watchdog: {e}"));
                    return Watchdog(None);
                }
            }
        }
    }

    pub fn pet(&mut self) {
        if let Some(f) = &mut self.0 {
            let _ = f.write_all(b"\0");
        }
    }

    /// Disarms the watchdog with the magic close.
    pub fn disarm(&mut self) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(b"V");
            log("watchdog disarmed");
        }
    }
}

/// Stops the daemon, then everything else, leaves the disks clean, and halts.
pub fn shutdown(halt: Halt, supervisor: &mut Supervisor, watchdog: &mut Watchdog) -> ! {
    supervisor.stop_restarting();
    if let Some(pid) = supervisor.pid {
        log(&format!("stopping the daemon (pid {pid})"));
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let stopped = wait_until(DAEMON_GRACE, |reaped| reaped.contains(&pid));
        if stopped {
            log("the daemon stopped");
        } else {
            log(&format!(
                "the daemon did not stop within {} s",
                DAEMON_GRACE.as_secs()
            ));
        }
    }
    log("sending SIGTERM to every process");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    if wait_until(ALL_GRACE, |_| false) {
        log("every process ended");
    } else {
        log("sending SIGKILL to what is left");
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        wait_until(Duration::from_secs(2), |_| false);
    }
    log("syncing disks");
    nix::unistd::sync();
    for target in [juice_os::settings::HOME, "/boot"] {
        unmount(target);
    }
    watchdog.disarm();
    halt_now(halt)
}

/// Reaps children until `done` says so (given the pids reaped so far) or none is left;
/// true unless the time ran out.
fn wait_until(limit: Duration, done: impl Fn(&[i32]) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    let mut reaped = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)) => {
                reaped.push(pid.as_raw());
                if done(&reaped) {
                    return true;
                }
                continue;
            }
            Err(nix::errno::Errno::ECHILD) => return true,
            _ => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Unmounts `target`, or at least makes it read-only so the filesystem is clean.
fn unmount(target: &str) {
    if !is_mounted(target) {
        return;
    }
    match nix::mount::umount(target) {
        Ok(()) => log(&format!("unmounted {target}")),
        Err(e) => {
            let ro = nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
                None::<&str>,
            );
            match ro {
                Ok(()) => log(&format!("{target} is busy ({e}): remounted read-only")),
                Err(e2) => log(&format!(
                    "cannot unmount {target} ({e}) nor make it read-only ({e2})"
                )),
            }
        }
    }
}

fn is_mounted(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target))
}

/// The reboot(2) itself.
pub fn halt_now(halt: Halt) -> ! {
    log(halt.describe());
    nix::unistd::sync();
    let mode = match halt {
        Halt::Reboot => RebootMode::RB_AUTOBOOT,
        Halt::PowerOff => RebootMode::RB_POWER_OFF,
    };
    let e = reboot(mode).err();
    // reboot(2) returns only on failure; PID 1 must not exit, so wait for a reset.
    log(&format!("reboot failed: {e:?}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
