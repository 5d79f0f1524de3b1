//! The appliance's view of the kernel, the same in a sandbox and in a microVM
//! guest: a `nodev` `/dev` holding only the usual nodes (bound from a `/dev`
//! the PID 1 can see: the host's, or the guest kernel's devtmpfs) and a
//! private devpts, and a `/proc` whose host-facing files are masked or
//! read-only. A uid-0 appliance in a microVM is root of its guest kernel, so
//! the guest gets this view too rather than a full devtmpfs and a writable
//! `/proc/sys`.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use crate::exec::{Failure, Step};

/// The device nodes an appliance gets. The sandbox's device policy (the
/// devices cgroup) allows exactly these and the ptys.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Mounts a `nodev` tmpfs at `dev` (a path that names the appliance's `/dev`)
/// and fills it: [`DEVICES`] bound from `from`, devpts, shm and the usual links.
/// `reopen` names the new tmpfs once it is mounted (a descriptor kept alive
/// while the path is used, and its path).
pub fn populate_dev(
    dev: &Path,
    from: &Path,
    reopen: impl FnOnce() -> Result<(OwnedFd, PathBuf), Failure>,
) -> Result<(), Failure> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // nodev: a node the appliance makes (with a granted CAP_MKNOD) opens nothing.
    // The usual nodes are bind mounts, which keep working on their own mounts.
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        nosuid | MsFlags::MS_NOEXEC,
        Some("mode=755,size=1m"),
    )
    .step(|| "mount tmpfs on /dev".into())?;
    let (_keep, dev_path) = reopen()?;
    for name in DEVICES {
        let node = dev_path.join(name);
        std::fs::File::create(&node).step(|| format!("create /dev/{name}"))?;
        mount(
            Some(&from.join(name)),
            &node,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .step(|| format!("bind /dev/{name}"))?;
    }
    for dir in ["pts", "shm"] {
        std::fs::create_dir(dev_path.join(dir)).step(|| format!("mkdir /dev/{dir}"))?;
    }
    mount(
        Some("devpts"),
        &dev_path.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .step(|| "mount devpts".into())?;
    mount(
        Some("tmpfs"),
        &dev_path.join("shm"),
        Some("tmpfs"),
        nosuid | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=64m"),
    )
    .step(|| "mount /dev/shm".into())?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev_path.join(link))
            .step(|| format!("symlink /dev/{link}"))?;
    }
    Ok(())
}

/// Hides /proc and /sys files that leak host information or allow host changes.
pub fn mask_kernel_interfaces() -> Result<(), Failure> {
    for p in [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/proc/latency_stats",
        "/proc/sysrq-trigger",
    ] {
        if Path::new(p).exists() {
            mount(
                Some("/dev/null"),
                p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .step(|| format!("mask {p}"))?;
        }
    }
    for p in ["/proc/acpi", "/proc/scsi"] {
        if Path::new(p).is_dir() {
            mount(
                Some("tmpfs"),
                p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                Some("size=0"),
            )
            .step(|| format!("mask {p}"))?;
        }
    }
    for p in ["/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs"] {
        if Path::new(p).exists() {
            mount(
                Some(p),
                p,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .step(|| format!("bind {p}"))?;
            let flags = MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC;
            mount(None::<&str>, p, None::<&str>, flags, None::<&str>)
                .step(|| format!("make {p} read-only"))?;
        }
    }
    Ok(())
}
