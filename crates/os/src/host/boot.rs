//! Bringing the host up: the root out of the initramfs, the kernel's filesystems,
//! modules, and the partitions.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};

use crate::Failed;

/// How long the partitions and the network interface get to appear after their driver loads.
pub const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// Mounts `fs` of type `kind` on `target` (made first), with `flags` and `data`.
pub fn mount_fs(
    fs: &str,
    target: &str,
    kind: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Failed> {
    let _ = std::fs::create_dir_all(target);
    mount(Some(fs), target, Some(kind), flags, data)
        .map_err(|e| Failed(format!("mount {kind} on {target}: {e}")))
}

/// Our standard streams: the kernel console.
pub fn console() {
    if let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard streams, which no Rust object owns here;
            // `console` stays open for the duration of the call.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

/// Mounts `/proc` and `/dev` (the console) if they are not, then says whether `/`
/// is still the initial ramfs.
pub fn on_initramfs_after_mounting() -> Result<bool, Failed> {
    if !Path::new("/proc/self").exists() {
        mount_fs("proc", "/proc", "proc", MsFlags::MS_NOSUID, None)?;
    }
    if !Path::new("/dev/null").exists() {
        mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    }
    console();
    Ok(on_initramfs())
}

/// Whether `/` is still the initial ramfs ("rootfs" in `/proc/self/mounts`).
pub fn on_initramfs() -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .rev()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let _dev = w.next()?;
            let target = w.next()?;
            let kind = w.next()?;
            (target == "/").then_some(kind)
        })
        .next()
        .is_some_and(|kind| kind == "rootfs")
}

/// Moves the root from the initial ramfs into a tmpfs and execs `/init` again there.
///
/// The kernel refuses `pivot_root` from the initial ramfs, and juice-init pivots every
/// sandbox's root: so the host's root must be a real mount. Each file is removed from
/// the ramfs once copied, so the root is never held twice in memory.
pub fn switch_root() -> Result<std::convert::Infallible, Failed> {
    mount_fs(
        "tmpfs",
        "/newroot",
        "tmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    let mounted = ["newroot", "dev", "proc", "sys"];
    let entries = std::fs::read_dir("/").map_err(|e| Failed(format!("read /: {e}")))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let target = Path::new("/newroot").join(&name);
        if mounted.iter().any(|m| name == *m) {
            let _ = std::fs::create_dir_all(&target);
            continue;
        }
        move_tree(&e.path(), &target)?;
    }
    for m in ["dev", "proc"] {
        let (from, to) = (format!("/{m}"), format!("/newroot/{m}"));
        mount(
            Some(from.as_str()),
            to.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| Failed(format!("move {from} to {to}: {e}")))?;
    }
    nix::unistd::chdir("/newroot").map_err(|e| Failed(format!("chdir /newroot: {e}")))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| Failed(format!("move the new root onto /: {e}")))?;
    nix::unistd::chroot(".").map_err(|e| Failed(format!("chroot: {e}")))?;
    nix::unistd::chdir("/").map_err(|e| Failed(format!("chdir /: {e}")))?;
    let init = c"/init";
    nix::unistd::execv(init, &[init]).map_err(|e| Failed(format!("exec /init again: {e}")))
}

/// Copies `from` to `to` (a file, directory or symlink), removing each source once copied.
fn move_tree(from: &Path, to: &Path) -> Result<(), Failed> {
    let fail = |what: &str, e: std::io::Error| Failed(format!("{what} {}: {e}", from.display()));
    let meta = std::fs::symlink_metadata(from).map_err(|e| fail("stat", e))?;
    if meta.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| fail("create", e))?;
        std::fs::set_permissions(to, meta.permissions()).map_err(|e| fail("chmod", e))?;
        for e in std::fs::read_dir(from)
            .map_err(|e| fail("read", e))?
            .flatten()
        {
            move_tree(&e.path(), &to.join(e.file_name()))?;
        }
        let _ = std::fs::remove_dir(from);
    } else if meta.is_symlink() {
        let link = std::fs::read_link(from).map_err(|e| fail("readlink", e))?;
        std::os::unix::fs::symlink(link, to).map_err(|e| fail("symlink", e))?;
        let _ = std::fs::remove_file(from);
    } else if meta.is_file() {
        std::fs::copy(from, to).map_err(|e| fail("copy", e))?;
        let _ = std::fs::remove_file(from);
    }
    Ok(())
}

/// The kernel's filesystems, after the switch to the tmpfs root.
pub fn mount_kernel_filesystems() -> Result<(), Failed> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !Path::new("/proc/self").exists() {
        mount_fs("proc", "/proc", "proc", nosuid_nodev_noexec, None)?;
    }
    if !Path::new("/dev/null").exists() {
        mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    }
    mount_fs("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None)?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    )?;
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "run",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmp",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    // cgroup v2: the sandbox supports it, and one tree is simpler for a host we own.
    mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev_noexec,
        Some("nsdelegate"),
    )?;
    Ok(())
}

/// Loads the modules in `/lib/modules/order` (dependencies first, as the build wrote
/// them). A module that fails is logged by name; what it would have served fails later
/// with its own message.
pub fn load_modules(log: &impl Fn(&str)) -> Vec<String> {
    let mut failed = Vec::new();
    let order = match std::fs::read_to_string("/lib/modules/order") {
        Ok(o) => o,
        Err(e) => {
            log(&format!("no kernel modules: /lib/modules/order: {e}"));
            return failed;
        }
    };
    let mut loaded = 0;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{name}.ko");
        let result = std::fs::File::open(&path).and_then(|file| {
            // SAFETY: finit_module with an open module file, a NUL-terminated (empty)
            // parameter string and no flags; the kernel reads both during the call.
            let rc =
                unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
            match rc {
                0 => Ok(()),
                _ => match std::io::Error::last_os_error() {
                    e if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                    e => Err(e),
                },
            }
        });
        match result {
            Ok(()) => loaded += 1,
            Err(e) => {
                log(&format!("module {name} not loaded: {e}"));
                failed.push(name.to_owned());
            }
        }
    }
    log(&format!("{loaded} kernel modules loaded"));
    failed
}

/// The device node of the partition whose GPT name is `name`, waiting for it up to `wait`.
pub fn find_partition(name: &str, wait: Duration) -> Option<PathBuf> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(p) = partition_now(name) {
            return Some(p);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn partition_now(name: &str) -> Option<PathBuf> {
    let mut found: Vec<String> = std::fs::read_dir("/sys/class/block")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let uevent = std::fs::read_to_string(e.path().join("uevent")).ok()?;
            partition_named(&uevent, name)
        })
        .collect();
    // Two disks with the same partition names: the first in kernel order, the same every boot.
    found.sort();
    found
        .into_iter()
        .next()
        .map(|dev| Path::new("/dev").join(dev))
        .filter(|p| p.exists())
}

/// `DEVNAME` of a block device's `uevent` text when its `PARTNAME` is `name`.
pub fn partition_named(uevent: &str, name: &str) -> Option<String> {
    let field = |key: &str| {
        uevent
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    };
    (field("PARTNAME")? == name).then(|| field("DEVNAME").map(str::to_owned))?
}

/// Waits for a network interface to appear (its driver probes it after the module loads).
pub fn wait_for_interface(name: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while !juice_init::net::exists(name) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_found_by_gpt_name() {
        let uevent = "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nDISKSEQ=9\nPARTN=2\nPARTNAME=juice-data\n";
        assert_eq!(
            partition_named(uevent, "juice-data").as_deref(),
            Some("vda2")
        );
        assert_eq!(partition_named(uevent, "juice-boot"), None);
        assert_eq!(
            partition_named("DEVNAME=vda\nDEVTYPE=disk\n", "juice-data"),
            None
        );
    }
}
