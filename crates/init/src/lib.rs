//! The contract between a Juice runtime and `juice-init`, the PID 1 of a sandbox.
//!
//! The runtime clones a process into new namespaces that immediately execs
//! `juice-init` with four file descriptors in place:
//!
//! | fd | direction | content |
//! |---|---|---|
//! | [`CONFIG_FD`] | runtime -> init | [`InitConfig`] as one line of JSON; later the byte [`GO`] once the cgroup and network are ready, then EOF |
//! | [`STATUS_FD`] | init -> runtime | one line: `started <pid>` or `failed <reason>` |
//! | [`LOG_DIR_FD`] | directory | where init writes `app.log` and its rotations |
//! | [`STATE_DIR_FD`] | directory | where init writes [`EXIT_FILE`] when the appliance ends |
//!
//! Init is a separate small binary, not a fork of the runtime: a fork of a
//! long-running daemon would pin a copy of the daemon's heap per instance,
//! and code after `fork` in a multi-threaded process must not allocate.

use std::path::PathBuf;

pub mod exec;
pub mod net;
pub mod root;
pub mod session;
pub mod view;

use serde::{Deserialize, Serialize};

pub const CONFIG_FD: i32 = 3;
pub const STATUS_FD: i32 = 4;
pub const LOG_DIR_FD: i32 = 5;
pub const STATE_DIR_FD: i32 = 6;

/// Sent on [`CONFIG_FD`] after the config: the instance may start. Init builds
/// the root while it waits, so that work overlaps the runtime's network setup.
pub const GO: u8 = b'g';

/// Written by init into the state directory when the appliance exits.
pub const EXIT_FILE: &str = "exit.json";
/// The appliance's merged stdout and stderr, in the log directory.
pub const LOG_FILE: &str = "app.log";

/// The appliance's program and whom it runs as: what every backend starts, the
/// same in a sandbox's init and in a microVM's guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// `argv`; `argv[0]` is the absolute program path inside the image.
    pub argv: Vec<String>,
    /// `KEY=VALUE` strings.
    pub env: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    pub workdir: PathBuf,
    /// Capability names (`CAP_NET_BIND_SERVICE`) the appliance keeps; all others are dropped.
    pub capabilities: Vec<String>,
}

impl Program {
    /// `argv` as root in `/`, with the default `PATH` and no capabilities.
    pub fn new(argv: Vec<String>) -> Program {
        Program {
            argv,
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            uid: 0,
            gid: 0,
            workdir: PathBuf::from("/"),
            capabilities: Vec::new(),
        }
    }
}

/// Everything init needs to set up the sandbox and start the appliance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// The unpacked image on the host; mounted read-only as `/`.
    pub rootfs: PathBuf,
    pub hostname: String,
    pub program: Program,
    /// Compiled seccomp filters, installed in order; empty means none.
    pub seccomp: Vec<Vec<SockFilter>>,
    /// Extra mounts: volumes (read-write) and generated files like `/etc/hosts` (read-only).
    pub binds: Vec<Bind>,
    /// Running in a user namespace: device nodes are bind-mounted, not created.
    pub user_namespace: bool,
    /// Unshare the cgroup namespace once placed in the instance's cgroup.
    pub cgroup_namespace: bool,
    /// Rotate `app.log` past this size, keeping this many old files.
    pub log_max_bytes: u64,
    pub log_keep: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    pub source: PathBuf,
    /// Absolute path inside the root; it must exist in the image.
    pub target: PathBuf,
    pub read_only: bool,
}

/// One classic BPF instruction, as `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// How the appliance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// The serial number of the microVM's root disk (the image as erofs).
pub const GUEST_ROOT_SERIAL: &str = "juice-root";
/// The serial number of the disk that holds the [`GuestConfig`] as JSON.
pub const GUEST_CONFIG_SERIAL: &str = "juice-config";
/// The virtio-serial port the appliance's stdout and stderr go to.
pub const GUEST_LOG_PORT: &str = "juice.log";
/// The virtio-serial port for status lines: `started <pid>`, `exit <ExitRecord>`, `failed <reason>`.
pub const GUEST_STATUS_PORT: &str = "juice.status";
/// What `juice-guest` prints on the console and then powers off, when the
/// kernel command line has `juice.probe`: the host's check that a guest boots.
pub const GUEST_PROBE_OK: &str = "juice-guest: probe ok";
/// The virtio-serial port the host sends `term` or `kill` on.
pub const GUEST_CONTROL_PORT: &str = "juice.ctl";
/// The virtio-serial port debug sessions come in on (`session`'s frames).
pub const GUEST_DEBUG_PORT: &str = "juice.debug";
/// The serial number of the toolbox disk a microVM may carry for debug sessions (erofs).
pub const GUEST_TOOLBOX_SERIAL: &str = "juice-toolbox";

/// What `juice-guest`, PID 1 of a microVM, needs beyond what its initramfs holds.
/// The host writes it as JSON (padded with NUL bytes) to the disk with serial
/// [`GUEST_CONFIG_SERIAL`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// The appliance process, as a sandbox would start it (`rootfs`, `binds` and
    /// the namespace fields are not used in a guest).
    pub app: InitConfig,
    /// Data disks by serial number, mounted (ext4) at their targets.
    pub volumes: Vec<GuestVolume>,
    pub network: Option<GuestNetwork>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestVolume {
    pub serial: String,
    pub target: PathBuf,
}

/// `eth0`'s address and the default route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestNetwork {
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
}
