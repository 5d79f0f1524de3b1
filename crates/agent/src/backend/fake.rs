//! An in-memory backend: an instance is an entry in a table that the test (or a
//! fleet's hollow host) holds, and it ends when told to. The reconciler runs
//! against it without root, processes or sleeps.
//!
//! The table outlives the agents that use it, as real instances outlive a
//! daemon: a second agent over the same home adopts what the first started.
//!
//! Health: by default an instance is unchecked (healthy from its start, as one
//! whose manifest has no check); [`Fake::with_health_checks`] makes instances
//! start unprobed, and the test says when each is healthy or fails its check.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use juice_runtime::{BackendError, ExitReport, InstanceSpec, Meter, Process, Usage};
use rustix::event::{EventfdFlags, eventfd};

use super::{Backend, Handle};
use crate::health::Health;

/// The backend; clones share one table.
#[derive(Clone, Default)]
pub struct Fake {
    table: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    instances: BTreeMap<String, Entry>,
    spawns: usize,
    /// Why every spawn fails, while set.
    failing: Option<String>,
    /// Instances report their health (set by the test) instead of being unchecked.
    checked: bool,
}

struct Entry {
    pid: i32,
    started_unix_ms: u64,
    ended: Option<ExitReport>,
    /// Readable once the instance has ended, as a pidfd is.
    ended_fd: OwnedFd,
    /// What the agent sees of its health, if it is checked.
    health: Option<Arc<Mutex<Health>>>,
    /// The limits it was started with.
    limits: juice_runtime::Limits,
}

impl Entry {
    fn end(&mut self, report: ExitReport) -> ExitReport {
        if self.ended.is_none() {
            self.ended = Some(report);
            let _ = rustix::io::write(&self.ended_fd, &1u64.to_ne_bytes());
        }
        self.ended.unwrap_or(report)
    }
}

impl Fake {
    pub fn new() -> Fake {
        Fake::default()
    }

    /// The limits instance `name` was started with.
    pub fn limits(&self, name: &str) -> Option<juice_runtime::Limits> {
        self.table().instances.get(name).map(|e| e.limits)
    }

    /// Instances start unprobed; [`Fake::healthy`] and [`Fake::fail_check`] change that.
    pub fn with_health_checks() -> Fake {
        let fake = Fake::default();
        fake.table().checked = true;
        fake
    }

    /// `name` passes its check from `since_ms` (on the agent's clock); false if unchecked.
    pub fn healthy(&self, name: &str, since_ms: u64) -> bool {
        self.set_health(name, Health::assumed(since_ms))
    }

    /// `name` fails its check with `error`; false if unchecked.
    pub fn fail_check(&self, name: &str, error: &str) -> bool {
        self.set_health(
            name,
            Health {
                failed: true,
                last_error: Some(error.to_owned()),
                ..Health::starting()
            },
        )
    }

    fn set_health(&self, name: &str, to: Health) -> bool {
        let t = self.table();
        let Some(health) = t.instances.get(name).and_then(|e| e.health.as_ref()) else {
            return false;
        };
        *health.lock().unwrap_or_else(|e| e.into_inner()) = to;
        true
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instances that run, by name.
    pub fn running(&self) -> Vec<String> {
        self.table()
            .instances
            .iter()
            .filter(|(_, e)| e.ended.is_none())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// How many spawns were asked for (including those that failed).
    pub fn spawns(&self) -> usize {
        self.table().spawns
    }

    /// Ends `name` on its own with `code` (a crash); false if it is not running.
    pub fn exit(&self, name: &str, code: i32) -> bool {
        let mut t = self.table();
        match t.instances.get_mut(name) {
            Some(e) if e.ended.is_none() => {
                e.end(ExitReport {
                    code: Some(code),
                    signal: None,
                    oom_killed: false,
                });
                true
            }
            _ => false,
        }
    }

    /// Every spawn fails with `why` until `None`.
    pub fn fail_spawns(&self, why: Option<&str>) {
        self.table().failing = why.map(str::to_owned);
    }

    fn handle(&self, name: &str) -> Result<Box<dyn Handle>, BackendError> {
        let t = self.table();
        let e = t
            .instances
            .get(name)
            .ok_or_else(|| BackendError::NotFound(name.to_owned()))?;
        let ended_fd = e
            .ended_fd
            .try_clone()
            .map_err(|e| BackendError::Failed(Box::new(e)))?;
        Ok(Box::new(FakeHandle {
            name: name.to_owned(),
            process: Process::with_fd(e.pid, ended_fd, false),
            started_unix_ms: e.started_unix_ms,
            health: e.health.clone(),
            fake: self.clone(),
        }))
    }
}

impl Backend for Fake {
    fn spawn(&self, spec: &InstanceSpec) -> Result<Box<dyn Handle>, BackendError> {
        {
            let mut t = self.table();
            t.spawns += 1;
            if let Some(why) = &t.failing {
                return Err(BackendError::Failed(why.clone().into()));
            }
            let ended_fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(|e| BackendError::Failed(Box::new(std::io::Error::from(e))))?;
            let pid = i32::try_from(t.spawns).unwrap_or(i32::MAX);
            let health = t.checked.then(|| Arc::new(Mutex::new(Health::starting())));
            t.instances.insert(
                spec.name.clone(),
                Entry {
                    pid,
                    started_unix_ms: crate::state::now_ms(),
                    ended: None,
                    ended_fd,
                    health,
                    limits: spec.limits,
                },
            );
        }
        self.handle(&spec.name)
    }

    fn adopt(&self, name: &str) -> Result<Box<dyn Handle>, BackendError> {
        self.handle(name)
    }

    fn list(&self) -> Vec<String> {
        self.table().instances.keys().cloned().collect()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        PathBuf::from("/nonexistent").join(name)
    }

    fn forget(&self, name: &str) {
        if let Some(mut e) = self.table().instances.remove(name) {
            e.end(GONE);
        }
    }
}

/// One instance in the table.
struct FakeHandle {
    name: String,
    /// Its "pid" is the spawn count; its descriptor the entry's end.
    process: Process,
    started_unix_ms: u64,
    health: Option<Arc<Mutex<Health>>>,
    fake: Fake,
}

impl FakeHandle {
    fn ended(&self) -> Option<ExitReport> {
        self.fake
            .table()
            .instances
            .get(&self.name)
            .map_or(Some(GONE), |e| e.ended)
    }
}

/// What an instance discarded from the table reports.
const GONE: ExitReport = ExitReport::UNKNOWN;

impl Handle for FakeHandle {
    fn process(&self) -> &Process {
        &self.process
    }
    fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }
    fn collect(&mut self, _status: Option<nix::sys::wait::WaitStatus>) -> ExitReport {
        self.ended().unwrap_or(GONE)
    }
    fn free(&mut self) {}
    fn is_running(&self) -> bool {
        self.ended().is_none()
    }
    /// Never blocks: an instance that runs is ended now (a test asks only after an end).
    fn wait(&mut self) -> ExitReport {
        self.stop(Duration::ZERO)
    }
    fn stop(&mut self, _grace: Duration) -> ExitReport {
        let term = ExitReport {
            code: None,
            signal: Some(libc::SIGTERM),
            oom_killed: false,
        };
        let report = match self.fake.table().instances.get_mut(&self.name) {
            Some(e) => e.end(term),
            None => GONE,
        };
        self.reap_timeout(Some(Duration::ZERO)).unwrap_or(report)
    }
    fn address(&self) -> Option<Ipv4Addr> {
        None
    }
    fn started_unix_ms(&self) -> u64 {
        self.started_unix_ms
    }
    fn health(&self) -> Option<Arc<Mutex<Health>>> {
        self.health.clone()
    }
    /// Fixed figures: [`FAKE_USAGE`].
    fn meter(&self) -> Option<Arc<dyn Meter>> {
        Some(Arc::new(FixedMeter))
    }
}

/// What every fake instance uses, whenever it is read.
pub const FAKE_USAGE: Usage = Usage {
    cpu_ns: Some(1_000_000),
    memory_bytes: Some(1 << 20),
    memory_limit_bytes: None,
    pids: Some(1),
    pids_limit: None,
    net: None,
};

struct FixedMeter;

impl Meter for FixedMeter {
    fn read(&self) -> Usage {
        FAKE_USAGE
    }
}
