//! Juice's sandbox runtime: an appliance isolated under the host kernel.
//!
//! One process per instance runs on the host side of the sandbox: its
//! `juice-init` (PID 1 inside). The caller keeps a pidfd and state on disk,
//! never a per-instance shim. Isolation: new mount, pid, uts, ipc, net and
//! cgroup namespaces (optionally user), a read-only root, no_new_privs, a
//! capability allow-list and seccomp filters (a syscall allow-list); limits
//! through cgroup v1 or v2; networking through a bridge, veths and nftables.
//!
//! This part is written for Juice rather than taken from runc/crun because
//! the point is start latency and one supervisor per host; the commodity
//! pieces (seccomp compilation, netlink, capabilities, syscalls) come from
//! `seccompiler`, `rtnetlink`, `caps` and `nix`.
//!
//! ```no_run
//! use juice_sandbox::{Runtime, SandboxSpec};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = Runtime::new("/var/lib/juice".as_ref())?;
//! let spec = SandboxSpec::new("hello", "/var/lib/juice/rootfs/abc".as_ref(), vec!["/usr/bin/hello".into()]);
//! let mut instance = runtime.spawn(&spec)?;
//! println!("{}", instance.wait());
//! # Ok(()) }
//! ```

pub mod cgroup;
pub mod instance;
pub mod network;
pub mod process;
pub mod seccomp;

pub use instance::{
    ExitReport, IdMap, Instance, InstanceState, Runtime, SandboxError, SandboxSpec, VolumeMount,
};
pub use network::{NetworkSpec, PortMapping};

/// Phase timings on stderr when `JUICE_TRACE` is set: where a start spends its time.
pub mod trace {
    use std::sync::OnceLock;
    use std::time::Instant;

    fn start() -> Option<&'static Instant> {
        static START: OnceLock<Option<Instant>> = OnceLock::new();
        START
            .get_or_init(|| std::env::var_os("JUICE_TRACE").map(|_| Instant::now()))
            .as_ref()
    }

    /// Prints `phase` with the microseconds since the first call in this process.
    pub fn mark(phase: &str) {
        if let Some(t) = start() {
            eprintln!("juice-trace {:>8} us  {phase}", t.elapsed().as_micros());
        }
    }
}
