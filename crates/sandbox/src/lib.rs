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
//! `seccompiler`, `rtnetlink`, `caps` and `nix`. What the sandbox shares with
//! the microVM backend (the spec, the process handle, seccomp) is in
//! `juice-runtime`; networking is `juice-net`.
//!
//! ```no_run
//! use juice_runtime::{Handle, InstanceSpec};
//! use juice_sandbox::Runtime;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = Runtime::new("/var/lib/juice".as_ref())?;
//! let spec = InstanceSpec::new("hello", "/var/lib/juice/rootfs/abc".as_ref(), vec!["/usr/bin/hello".into()]);
//! let mut instance = runtime.spawn(&spec)?;
//! println!("{}", instance.wait());
//! # Ok(()) }
//! ```

pub mod cgroup;
mod debug;
pub mod instance;

pub use instance::{Instance, InstanceState, Runtime, SandboxError, find_init};
