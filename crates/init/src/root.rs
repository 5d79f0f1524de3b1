//! The root a sandbox's program sees, built in its own mount namespace: the
//! image (or a toolbox) bound read-only, private /proc, /dev, /tmp and /run,
//! the binds (volumes, generated files, a debug session's /app), then
//! `pivot_root` into it. Shared by `juice-init` (an appliance, a debug
//! session beside one) and `juice-guest` (a debug session in a microVM).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::unistd::{chdir, pivot_root};

use crate::InitConfig;
use crate::exec::{Failure, Step};

/// An O_PATH descriptor for `rel` resolved *inside* `root`: symlinks in the
/// image cannot point a mount at a host path.
fn open_in_root(root: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, Failure> {
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| Failure(format!("{} has a NUL byte", rel.display())))?;
    // struct open_how { u64 flags; u64 mode; u64 resolve; }
    let how: [u64; 3] = [
        (libc::O_PATH | libc::O_CLOEXEC) as u64,
        0,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    ];
    // SAFETY: openat2 reads `how` (valid for its size) and the NUL-terminated path; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            how.as_ptr(),
            std::mem::size_of_val(&how),
        )
    };
    if fd < 0 {
        return Err(Failure(format!(
            "/{} is not in the image: {}",
            rel.display(),
            Errno::last().desc()
        )));
    }
    let fd = RawFd::try_from(fd).map_err(|_| {
        Failure(format!(
            "openat2 returned {fd}, which is not a file descriptor"
        ))
    })?;
    // SAFETY: the syscall just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn mount_fs(fstype: &str, target: &Path, flags: MsFlags, data: &str) -> Result<(), Failure> {
    mount(Some(fstype), target, Some(fstype), flags, Some(data)).step(|| format!("mount {fstype}"))
}

/// Makes every mount below `/` private: nothing mounted here propagates out.
pub fn make_private() -> Result<(), Failure> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .step(|| {
        "make / private (/ must be a mount point: a chroot needs its directory bind-mounted on itself)"
            .into()
    })?;
    Ok(())
}

/// Builds `config.rootfs` into the root and pivots into it.
pub fn build(config: &InitConfig) -> Result<(), Failure> {
    build_with(config, true)
}

/// As [`build`], but without /proc: for a debug session, whose program mounts
/// it once it is in the instance's pid namespace ([`finish_in_pid_namespace`]).
/// The session builds its root first, so that the program is never visible to
/// the appliance while it can still reach the host's mounts.
pub fn build_without_proc(config: &InitConfig) -> Result<(), Failure> {
    build_with(config, false)
}

/// The rest of [`build_without_proc`], in the pid namespace /proc is to show.
pub fn finish_in_pid_namespace() -> Result<(), Failure> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs("proc", Path::new("/proc"), nosuid | MsFlags::MS_NOEXEC, "")?;
    crate::view::mask_kernel_interfaces()
}

fn build_with(config: &InitConfig, with_proc: bool) -> Result<(), Failure> {
    let root = &config.rootfs;
    // Nothing we mount may propagate back to the host.
    make_private()?;
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .step(|| format!("bind {}", root.display()))?;
    let root_dir = std::fs::File::open(root).step(|| format!("open {}", root.display()))?;
    let root_fd = root_dir.as_fd();
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;

    let proc_ = open_in_root(root_fd, Path::new("proc"))?;
    if with_proc {
        mount_fs("proc", &fd_path(&proc_), nosuid | MsFlags::MS_NOEXEC, "")?;
    }
    let dev = open_in_root(root_fd, Path::new("dev"))?;
    crate::view::populate_dev(&fd_path(&dev), Path::new("/dev"), || {
        // The new tmpfs is now what `root/dev` resolves to.
        open_in_root(root_fd, Path::new("dev")).map(|fd| {
            let path = fd_path(&fd);
            (fd, path)
        })
    })?;

    let tmp = open_in_root(root_fd, Path::new("tmp"))?;
    mount_fs("tmpfs", &fd_path(&tmp), nosuid, "mode=1777,size=64m")?;
    let run = open_in_root(root_fd, Path::new("run"))?;
    mount_fs(
        "tmpfs",
        &fd_path(&run),
        nosuid | MsFlags::MS_NOEXEC,
        "mode=755,size=16m",
    )?;

    for b in &config.binds {
        let target = open_in_root(root_fd, &b.target)?;
        let at = fd_path(&target);
        mount(
            Some(&b.source),
            &at,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .step(|| format!("bind {} on {}", b.source.display(), b.target.display()))?;
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | nosuid;
        if b.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        // A fresh O_PATH fd: the old one names the directory under the new mount.
        let target = open_in_root(root_fd, &b.target)?;
        mount(
            None::<&str>,
            &fd_path(&target),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .step(|| format!("remount {}", b.target.display()))?;
    }
    drop((proc_, dev, tmp, run));

    // The image itself is read-only; the mounts above stay as they are.
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid,
        None::<&str>,
    )
    .step(|| "remount the root read-only".into())?;
    drop(root_dir);

    chdir(root).step(|| "chdir to the root".into())?;
    pivot_root(".", ".").step(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).step(|| "detach the host root".into())?;
    chdir("/").step(|| "chdir /".into())?;
    if with_proc {
        crate::view::mask_kernel_interfaces()
    } else {
        Ok(())
    }
}
