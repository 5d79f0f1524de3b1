//! Resource limits through cgroups, v1 and v2 behind one interface.
//!
//! Each instance gets a cgroup named after it under `<our own cgroup>/juice/`,
//! in every hierarchy we use, so Juice nests wherever it is started (a
//! systemd service, a container, a CI job's cgroup). Which version is in use
//! is read from `/proc/self/mountinfo`; supporting a new layout means adding
//! a module here, not `if`s elsewhere.

mod v1;
mod v2;

use std::io;
use std::path::{Path, PathBuf};

pub use v1::V1;
pub use v2::V2;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(transparent)]
    Io(#[from] juice_image::PathError),
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
}

pub(crate) fn io_err(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> CgroupError + use<> {
    let at = juice_image::PathError::at(action, path);
    move |source| CgroupError::Io(at(source))
}

pub use juice_runtime::Limits;

/// The period a CPU quota is measured over.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The CPU quota per [`CPU_PERIOD_US`] for `cpus` CPUs, at least 1 ms (the kernel's minimum).
fn cpu_quota_us(cpus: f64) -> u64 {
    // `cpus` is validated positive and finite, and rounded here; were it not, `as` saturates
    // (NaN to 0), and the minimum applies.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let quota = (cpus * CPU_PERIOD_US as f64).round() as u64;
    quota.max(1000)
}

/// What a cgroup's processes use now; `None` where the file is missing or unreadable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// CPU time, in nanoseconds: v1 `cpuacct.usage`, v2 `cpu.stat`'s `usage_usec`.
    pub cpu_ns: Option<u64>,
    /// The memory charged to the cgroup, the figure its limit is enforced against
    /// (page cache included): v1 `memory.usage_in_bytes`, v2 `memory.current`.
    pub memory_bytes: Option<u64>,
    /// Tasks in the cgroup: `pids.current` in both.
    pub pids: Option<u64>,
}

/// One cgroup layout (v1 or v2).
pub trait Hierarchy: Send + Sync {
    /// "v1" or "v2", for reports.
    fn version(&self) -> &'static str;
    /// Creates the instance's cgroup(s) and writes the limits; returns the directories.
    fn create(&self, name: &str, limits: &Limits) -> Result<Vec<PathBuf>, CgroupError>;
    /// Moves a process into the instance's cgroup(s).
    fn attach(&self, dirs: &[PathBuf], pid: i32) -> Result<(), CgroupError>;
    /// How many times the kernel's OOM killer fired in the cgroup.
    fn oom_kills(&self, dirs: &[PathBuf]) -> u64;
    /// The limits as the kernel holds them (for `juice run` and the tests).
    fn read_limits(&self, dirs: &[PathBuf]) -> Limits;
    /// What the instance's processes use now (`juice top`).
    fn usage(&self, dirs: &[PathBuf]) -> CgroupUsage;
    /// Kills whatever is left and removes the directories.
    fn remove(&self, dirs: &[PathBuf]) -> Result<(), CgroupError>;
    /// Where `create` makes an instance's cgroup(s), whether or not they exist.
    fn dirs(&self, name: &str) -> Vec<PathBuf>;
}

/// The host's hierarchy, detected from `/proc/self/mountinfo` and `/proc/self/cgroup`.
pub fn detect() -> Result<Box<dyn Hierarchy>, CgroupError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(io_err("read", Path::new("/proc/self/cgroup")))?;
    detect_from(&mountinfo, &own)
}

/// The hierarchy `mountinfo` and `own` (the texts of `/proc/self/mountinfo` and
/// `/proc/self/cgroup`) describe: v1 when its controllers are mounted, else v2.
pub fn detect_from(mountinfo: &str, own: &str) -> Result<Box<dyn Hierarchy>, CgroupError> {
    let v1 = V1::from_proc(mountinfo, own);
    if v1.has_controllers() {
        return Ok(Box::new(v1));
    }
    if let Some(v2) = V2::from_proc(mountinfo, own) {
        return Ok(Box::new(v2));
    }
    Err(CgroupError::Unavailable(
        "neither cgroup v1 controllers (cpu, memory, pids) nor a cgroup2 mount with them".into(),
    ))
}

/// Creates a cgroup directory, retrying once if a concurrent removal of an empty parent got in between.
pub(crate) fn create_dir(dir: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(dir)
        .or_else(|_| std::fs::create_dir_all(dir))
        .map_err(io_err("create", dir))
}

/// Writes a control file, naming it in the error.
pub(crate) fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io_err("write", &path))
}

pub(crate) fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The value of `key` in a flat-keyed file such as `memory.events`.
pub(crate) fn keyed(dir: &Path, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    parse_keyed(&text, key)
}

/// The value of `key` in the text of a flat-keyed file ("KEY VALUE" lines).
pub(crate) fn parse_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A file holding one number, such as `memory.current` or `pids.current`.
pub(crate) fn number(dir: &Path, file: &str) -> Option<u64> {
    read(dir, file)?.parse().ok()
}

/// Kills every process in a cgroup directory and removes it, retrying while the kernel
/// finishes tearing down exiting tasks.
pub(crate) fn kill_and_remove(dir: &Path) -> Result<(), CgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    for attempt in 0..200 {
        if let Some(procs) = read(dir, "cgroup.procs") {
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        match std::fs::remove_dir(dir) {
            // The shared `juice/` parent stays: making a memory cgroup costs milliseconds.
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if attempt == 199 => return Err(io_err("remove", dir)(e)),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(if attempt < 20 {
                1
            } else {
                10
            })),
        }
    }
    Ok(())
}
