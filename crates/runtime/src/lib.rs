//! What Juice's isolation backends share: the instance spec, the exit report,
//! the backend and instance traits with their typed errors, the supervised
//! process handle, the seccomp allow-list, and the mapping from an
//! appliance's manifest to a spec.
//!
//! - [`spec`]: [`InstanceSpec`] and [`InstanceSpec::for_appliance`], within
//!   the host's [`limits`].
//! - [`Backend`] and [`Handle`]: how the agent and `juice run` start, find and
//!   end instances without knowing whether a sandbox (`juice-sandbox`) or a
//!   microVM (`juice-microvm`) runs them.
//! - [`process`]: a pidfd-held [`process::Process`], the per-instance
//!   records, the name rule.
//! - [`seccomp`]: the syscall allow-list for sandboxes and for QEMU.
//! - [`usage`]: what an instance uses right now (CPU, memory, pids, network),
//!   read through a [`Meter`] its handle gives out.
//!
//! Written for Juice: these are Juice's own rules (what an instance is and
//! how its end is observed); syscalls come from `rustix` and `nix`, seccomp
//! compilation from `seccompiler`.

pub mod limits;
pub mod process;
pub mod seccomp;
pub mod spec;
pub mod usage;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use juice_net::trace;
pub use juice_net::{NetworkSpec, PortMapping};
pub use limits::HostLimits;
pub use process::Process;
pub use spec::{IdMap, InstanceSpec, Limits, Program, VolumeMount};
pub use usage::{Meter, NetBytes, Usage};

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The kernel's OOM killer fired in the instance's cgroup.
    pub oom_killed: bool,
}

impl ExitReport {
    /// An end nothing is known of (a process found dead, a guest that said nothing).
    pub const UNKNOWN: ExitReport = ExitReport {
        code: None,
        signal: None,
        oom_killed: false,
    };
}

impl std::fmt::Display for ExitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal, self.oom_killed) {
            (_, _, true) => write!(f, "killed by the OOM killer (memory limit)"),
            (Some(c), _, _) => write!(f, "exited with code {c}"),
            (None, Some(s), _) => write!(f, "killed by signal {s}"),
            (None, None, _) => write!(f, "ended without a status"),
        }
    }
}

/// An instance's health as its prober (or the instance itself) has seen it.
#[derive(Debug, Clone)]
pub struct Health {
    pub healthy: bool,
    /// Since when the instance has been healthy without a break, on the agent's clock.
    pub healthy_since_ms: Option<u64>,
    pub ever_healthy: bool,
    /// Consecutive failed probes past the start period.
    pub failures: u32,
    /// The check has failed `retries` times in a row.
    pub failed: bool,
    pub last_error: Option<String>,
}

impl Health {
    /// Not yet probed.
    pub fn starting() -> Health {
        Health {
            healthy: false,
            healthy_since_ms: None,
            ever_healthy: false,
            failures: 0,
            failed: false,
            last_error: None,
        }
    }

    /// An instance without a check is healthy from the start (`now_ms`).
    pub fn assumed(now_ms: u64) -> Health {
        Health {
            healthy: true,
            healthy_since_ms: Some(now_ms),
            ever_healthy: true,
            ..Health::starting()
        }
    }
}

/// Why a backend could not start, find or discard an instance. The kinds a
/// caller acts on are variants; the rest keep the backend's own error.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0:?} is not a valid instance name (lowercase letters, digits and '-', at most 48)")]
    BadName(String),
    #[error("instance {0:?} already exists and is running")]
    Exists(String),
    #[error("no instance {0:?}")]
    NotFound(String),
    /// What was asked cannot be done to this instance as it is (a debug session
    /// into one that has ended, say).
    #[error(transparent)]
    Refused(Box<dyn std::error::Error + Send + Sync>),
    /// The backend cannot run anything on this host (a missing program, kernel or privilege).
    #[error(transparent)]
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// A debug session asked of a backend: a toolbox program beside a running
/// instance (see `juice_init::session`).
#[derive(Debug, Clone)]
pub struct DebugSpec {
    /// The toolbox image, unpacked on the host.
    pub toolbox: PathBuf,
    /// What to run in it, as whom, with which capabilities (the policy's grant).
    pub program: Program,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    /// The session's own limits (a sibling of the instance's cgroup, where there is one).
    pub limits: Limits,
}

/// A debug session that has begun: `conn` speaks `juice_init::session`'s frames
/// after the request (already sent). `finish` waits for the session's end and
/// removes what it used; call it once the connection is done.
pub struct DebugSession {
    pub conn: std::os::fd::OwnedFd,
    pub finish: Box<dyn FnOnce() + Send>,
}

/// Starts and finds instances.
pub trait Backend: Send + Sync {
    /// Starts a debug session beside the running instance `name`.
    fn debug(&self, name: &str, _spec: &DebugSpec) -> Result<DebugSession, BackendError> {
        Err(BackendError::Failed(
            format!("debug sessions are not available for instance {name:?}'s backend").into(),
        ))
    }
    /// Starts an instance as `spec` describes.
    fn spawn(&self, spec: &InstanceSpec) -> Result<Box<dyn Handle>, BackendError>;
    /// Finds an instance an earlier process started, by name.
    fn adopt(&self, name: &str) -> Result<Box<dyn Handle>, BackendError>;
    /// The instances with a record on this host.
    fn list(&self) -> Vec<String>;
    /// Where the instance's output is.
    fn log_path(&self, name: &str) -> PathBuf;
    /// Removes what an instance left that [`Handle::abandon`] cannot reach: what a
    /// start cut short by a killed supervisor made before its record (cgroups,
    /// an address), and its directory. Only for an instance that is not running.
    fn forget(&self, name: &str);

    /// Removes everything an instance that is not running left, found by name.
    /// A running instance is left alone.
    fn discard(&self, name: &str) -> Result<(), BackendError> {
        if !process::valid_name(name) {
            return Err(BackendError::BadName(name.to_owned()));
        }
        if let Ok(mut h) = self.adopt(name) {
            if h.is_running() {
                return Err(BackendError::Exists(name.to_owned()));
            }
            h.abandon();
        }
        self.forget(name);
        Ok(())
    }

    /// Removes what dead instances left behind (after a crash of whoever started
    /// them), and what [`Backend::sweep`] finds; the number of instances cleaned.
    fn cleanup_stale(&self) -> usize {
        let mut n = 0;
        for name in self.list() {
            if let Ok(mut h) = self.adopt(&name)
                && !h.is_running()
            {
                h.abandon();
                n += 1;
            }
        }
        self.sweep();
        n
    }

    /// Removes what a killed supervisor left that belongs to no instance (a debug
    /// session's cgroup, say).
    fn sweep(&self) {}
}

/// One running (or ended) instance. A backend says how its exit is collected,
/// what it frees and how it is stopped; waiting, reaping and releasing are
/// the same for every backend and provided here.
pub trait Handle: Send {
    /// The process the instance lives in.
    fn process(&self) -> &Process;
    fn process_mut(&mut self) -> &mut Process;
    /// How it ended, read once it has: `status` is its wait status if we are its parent.
    fn collect(&mut self, status: Option<nix::sys::wait::WaitStatus>) -> ExitReport;
    /// Frees what the ended instance held (cgroups, address, records); called once.
    fn free(&mut self);
    /// Asks it to end, then forces it after `grace`.
    fn stop(&mut self, grace: Duration) -> ExitReport;
    fn address(&self) -> Option<Ipv4Addr>;
    fn started_unix_ms(&self) -> u64;
    /// Waits until the appliance process runs (a microVM boots first); why not, if it failed.
    fn wait_started(&mut self, _timeout: Duration) -> Result<(), BackendError> {
        Ok(())
    }
    /// Periodic upkeep (a microVM's log rotation; a sandbox's init rotates its own).
    fn maintain(&mut self) {}
    /// The instance's health as it reports it, instead of being probed (an
    /// in-memory instance has no address to probe).
    fn health(&self) -> Option<Arc<Mutex<Health>>> {
        None
    }
    /// Where the instance's resource use is read from (its cgroups, its QEMU's
    /// pid, its host-side interface), to be read without holding the handle:
    /// the agent takes it when the instance starts, and queries read it while
    /// the reconciler goes on. `None` if there is nothing to read.
    fn meter(&self) -> Option<Arc<dyn Meter>> {
        None
    }
    /// One reading of its resource use.
    fn usage(&self) -> Option<Usage> {
        self.meter().map(|m| m.read())
    }

    fn pid(&self) -> i32 {
        self.process().pid()
    }
    /// Readable when the instance has ended.
    fn wait_fd(&self) -> RawFd {
        self.process().fd().as_raw_fd()
    }
    fn is_running(&self) -> bool {
        self.process().is_running()
    }
    fn signal(&self, sig: i32) {
        self.process().signal(sig)
    }
    /// Its exit if it ends within `timeout` (forever if `None`), keeping what it
    /// holds until [`Handle::release`].
    fn reap_timeout(&mut self, timeout: Option<Duration>) -> Option<ExitReport> {
        if let Some(r) = self.process().reaped() {
            return Some(r);
        }
        if !self.process().ended_within(timeout) {
            return None;
        }
        let status = self.process().child_status();
        let report = self.collect(status);
        self.process_mut().reaped = Some(report);
        Some(report)
    }
    /// Waits for the end like [`Handle::wait`], but keeps the instance's cgroups and
    /// address until [`Handle::release`], so that a replacement can start first.
    fn reap(&mut self) -> ExitReport {
        loop {
            if let Some(r) = self.reap_timeout(None) {
                return r;
            }
        }
    }
    /// Frees what an ended instance held (after it was reaped; once).
    fn release(&mut self) {
        let p = self.process_mut();
        if p.reaped.is_none() || p.released {
            return;
        }
        p.released = true;
        self.free();
    }
    /// Waits up to `timeout` for the end; then releases.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitReport> {
        let report = self.reap_timeout(Some(timeout))?;
        self.release();
        Some(report)
    }
    /// Waits for the end; then releases.
    fn wait(&mut self) -> ExitReport {
        let report = self.reap();
        self.release();
        report
    }
    /// For an instance found dead: removes what it left.
    fn abandon(&mut self) {
        if self.process().reaped().is_none() {
            self.process_mut().reaped = Some(ExitReport::UNKNOWN);
        }
        self.release();
    }
}
