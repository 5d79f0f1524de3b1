//! The isolation backends the agent runs instances with, behind one interface.
//!
//! `sandbox` is `juice_sandbox::Runtime`, `microvm` is `juice_microvm::Runtime`;
//! the reconciler never knows which one an instance runs under.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use juice_sandbox::{ExitReport, Instance, Runtime, SandboxSpec};

/// An in-memory backend for tests and the fleet's hollow hosts.
#[cfg(any(test, feature = "fake"))]
pub mod fake;

/// Starts and finds instances.
pub trait Backend: Send + Sync {
    /// Starts an instance as `spec` describes.
    fn spawn(&self, spec: &SandboxSpec) -> Result<Box<dyn Handle>, String>;
    /// Finds an instance an earlier process started, by name.
    fn adopt(&self, name: &str) -> Result<Box<dyn Handle>, String>;
    /// Where the instance's output is.
    fn log_path(&self, name: &str) -> PathBuf;
    /// Removes what an instance that is not running left (one whose start was
    /// cut short by a killed daemon has no state record to adopt).
    fn discard(&self, name: &str) -> Result<(), String>;
}

/// One running (or ended) instance.
pub trait Handle: Send {
    fn pid(&self) -> i32;
    /// Readable when the instance has ended (a pidfd for a sandbox).
    fn wait_fd(&self) -> RawFd;
    fn is_running(&self) -> bool;
    fn wait(&mut self) -> ExitReport;
    /// Waits for the end like `wait`, but keeps the instance's cgroups and address
    /// until `release`, so that a replacement can start first.
    fn reap(&mut self) -> ExitReport {
        self.wait()
    }
    /// Frees what an ended instance held (after `reap`; once).
    fn release(&mut self) {}
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitReport>;
    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) -> ExitReport;
    fn address(&self) -> Option<Ipv4Addr>;
    fn started_unix_ms(&self) -> u64;
    /// Waits until the appliance process runs (a microVM boots first); why not, if it failed.
    fn wait_started(&mut self, _timeout: Duration) -> Result<(), String> {
        Ok(())
    }
    /// Periodic upkeep (a microVM's log rotation; a sandbox's init rotates its own).
    fn maintain(&mut self) {}
    /// The instance's health as it reports it, instead of the agent probing it
    /// (an in-memory instance has no address to probe).
    fn health(&self) -> Option<std::sync::Arc<std::sync::Mutex<crate::health::Health>>> {
        None
    }
}

impl Backend for Runtime {
    fn spawn(&self, spec: &SandboxSpec) -> Result<Box<dyn Handle>, String> {
        Runtime::spawn(self, spec)
            .map(|i| Box::new(i) as Box<dyn Handle>)
            .map_err(|e| e.to_string())
    }
    fn adopt(&self, name: &str) -> Result<Box<dyn Handle>, String> {
        Runtime::adopt(self, name)
            .map(|i| Box::new(i) as Box<dyn Handle>)
            .map_err(|e| e.to_string())
    }
    fn log_path(&self, name: &str) -> PathBuf {
        Runtime::log_path(self, name)
    }
    fn discard(&self, name: &str) -> Result<(), String> {
        Runtime::discard(self, name).map_err(|e| e.to_string())
    }
}

impl Handle for Instance {
    fn pid(&self) -> i32 {
        Instance::pid(self)
    }
    fn wait_fd(&self) -> RawFd {
        self.pidfd().as_raw_fd()
    }
    fn is_running(&self) -> bool {
        Instance::is_running(self)
    }
    fn wait(&mut self) -> ExitReport {
        Instance::wait(self)
    }
    fn reap(&mut self) -> ExitReport {
        Instance::reap(self)
    }
    fn release(&mut self) {
        Instance::release(self)
    }
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitReport> {
        Instance::wait_timeout(self, Some(timeout))
    }
    fn stop(&mut self, grace: Duration) -> ExitReport {
        Instance::stop(self, grace)
    }
    fn address(&self) -> Option<Ipv4Addr> {
        self.state().network.as_ref().map(|a| a.address)
    }
    fn started_unix_ms(&self) -> u64 {
        self.state().started_unix_ms
    }
}

impl Backend for juice_microvm::Runtime {
    fn spawn(&self, spec: &SandboxSpec) -> Result<Box<dyn Handle>, String> {
        juice_microvm::Runtime::spawn(self, spec)
            .map(|i| Box::new(i) as Box<dyn Handle>)
            .map_err(|e| e.to_string())
    }
    fn adopt(&self, name: &str) -> Result<Box<dyn Handle>, String> {
        juice_microvm::Runtime::adopt(self, name)
            .map(|i| Box::new(i) as Box<dyn Handle>)
            .map_err(|e| e.to_string())
    }
    fn log_path(&self, name: &str) -> PathBuf {
        juice_microvm::Runtime::log_path(self, name)
    }
    fn discard(&self, name: &str) -> Result<(), String> {
        juice_microvm::Runtime::discard(self, name).map_err(|e| e.to_string())
    }
}

impl Handle for juice_microvm::Vm {
    fn pid(&self) -> i32 {
        juice_microvm::Vm::pid(self)
    }
    fn wait_fd(&self) -> RawFd {
        self.pidfd().as_raw_fd()
    }
    fn is_running(&self) -> bool {
        juice_microvm::Vm::is_running(self)
    }
    fn wait(&mut self) -> ExitReport {
        juice_microvm::Vm::wait(self)
    }
    fn reap(&mut self) -> ExitReport {
        juice_microvm::Vm::reap(self)
    }
    fn release(&mut self) {
        juice_microvm::Vm::release(self)
    }
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitReport> {
        juice_microvm::Vm::wait_timeout(self, Some(timeout))
    }
    fn stop(&mut self, grace: Duration) -> ExitReport {
        juice_microvm::Vm::stop(self, grace)
    }
    fn address(&self) -> Option<Ipv4Addr> {
        juice_microvm::Vm::address(self)
    }
    fn started_unix_ms(&self) -> u64 {
        self.state().started_unix_ms
    }
    fn wait_started(&mut self, timeout: Duration) -> Result<(), String> {
        juice_microvm::Vm::wait_started(self, timeout).map_err(|e| e.to_string())
    }
    fn maintain(&mut self) {
        juice_microvm::Vm::maintain(self)
    }
}
