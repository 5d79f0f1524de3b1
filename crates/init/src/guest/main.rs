//! `juice-guest`: PID 1 of a Juice microVM.
//!
//! It runs from the initramfs Juice generates (this binary, the kernel
//! modules the guest needs, nothing else: no shell, no busybox) and:
//!
//! 1. mounts /dev, /proc and /sys, and loads the modules listed in
//!    `/lib/modules/order`, with any `module.param=value` from the kernel
//!    command line (there is no modprobe to do that);
//! 2. finds its disks by serial number: the root (erofs, mounted read-only),
//!    the config disk (a [`GuestConfig`] as JSON) and one ext4 disk per volume;
//! 3. configures `lo` and `eth0` over netlink, sets the hostname, and moves
//!    the appliance's root over `/`;
//! 4. starts the appliance exactly as a sandbox would (same user,
//!    capabilities, no_new_privs and seccomp filter), with its output on the
//!    `juice.log` virtio-serial port;
//! 5. reaps every zombie, passes `term`/`kill` from the `juice.ctl` port on
//!    as signals, reports `started`, `exit` or `failed` on `juice.status`,
//!    syncs, and powers the VM off when the appliance ends.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use juice_init::exec::{Failure, Step, Streams, prepare_and_exec};
use juice_init::net;
use juice_init::{
    Bind, ExitRecord, GUEST_CONFIG_SERIAL, GUEST_CONTROL_PORT, GUEST_DEBUG_PORT, GUEST_LOG_PORT,
    GUEST_ROOT_SERIAL, GUEST_STATUS_PORT, GUEST_TOOLBOX_SERIAL, GuestConfig,
};
use nix::mount::{MsFlags, mount};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, chdir, chroot, fork, sethostname};

/// Where the appliance's root is mounted before it moves over `/`.
const NEW_ROOT: &str = "/newroot";
/// How long devices may take to appear after their driver loads.
const DEVICE_WAIT: Duration = Duration::from_secs(20);

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == "debug") {
        debug_main();
    }
    let mut status: Option<std::fs::File> = None;
    let outcome = run(&mut status);
    let line = match outcome {
        Ok(record) => match serde_json::to_string(&record) {
            Ok(json) => format!("exit {json}"),
            Err(e) => format!("failed encode the exit record: {e}"),
        },
        Err(Failure(reason)) => {
            eprintln!("juice-guest: {reason}");
            format!("failed {reason}")
        }
    };
    if let Some(s) = status.as_mut() {
        let _ = writeln!(s, "{line}");
        let _ = s.sync_all();
    }
    nix::unistd::sync();
    // SAFETY: reboot(2) with a valid command; as PID 1 this ends the VM (QEMU exits).
    unsafe {
        libc::reboot(libc::RB_POWER_OFF);
        libc::reboot(libc::RB_AUTOBOOT);
    }
}

/// With `juice.trace` on the kernel command line: a phase and the guest's uptime on the console.
fn mark(phase: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| {
        std::fs::read_to_string("/proc/cmdline")
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "juice.trace"))
    });
    if on {
        let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        eprintln!(
            "juice-guest {:>8}s  {phase}",
            up.split_whitespace().next().unwrap_or("?")
        );
    }
}

fn run(status: &mut Option<std::fs::File>) -> Result<ExitRecord, Failure> {
    // The appliance must not ptrace or read PID 1's memory (or its ports), even as root.
    nix::sys::prctl::set_dumpable(false).step(|| "prctl(PR_SET_DUMPABLE)".into())?;
    mount_basics()?;
    mark("basics mounted");
    if std::fs::read_to_string("/proc/cmdline")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "juice.probe"))
    {
        // The host asks whether a guest boots with this accelerator at all.
        println!("{}", juice_init::GUEST_PROBE_OK);
        return Ok(ExitRecord {
            code: Some(0),
            signal: None,
        });
    }
    load_modules()?;
    mark("modules loaded");
    let ports = find_ports(&[
        GUEST_LOG_PORT,
        GUEST_STATUS_PORT,
        GUEST_CONTROL_PORT,
        GUEST_DEBUG_PORT,
    ])?;
    let open = |i: usize, write: bool| {
        std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .open(&ports[i])
            .step(|| format!("open {}", ports[i].display()))
    };
    *status = Some(open(1, true)?);
    let log: OwnedFd = open(0, true)?.into();
    let control = open(2, false)?;
    // Opened now: after the root moves, /dev is the appliance's, without the ports.
    let debug = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ports[3])
        .step(|| format!("open {}", ports[3].display()))?;
    mark("ports found");

    let disks = find_disks(&[GUEST_ROOT_SERIAL, GUEST_CONFIG_SERIAL])?;
    let config = read_config(&disks[1])?;
    mark("disks found, config read");
    mount_root(&disks[0], &config)?;
    mark("root mounted");
    if let Some(n) = &config.network {
        net::configure(n).map_err(Failure)?;
    } else {
        net::loopback_only().map_err(Failure)?;
    }
    mark("network configured");
    sethostname(&config.app.hostname).step(|| "sethostname".into())?;
    enter_root()?;
    // The appliance may be root of this kernel: /proc/sys and friends read-only, as in a sandbox.
    juice_init::view::mask_kernel_interfaces()?;

    // The exec error (if any) comes back through this pipe; it closes on a successful exec.
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).step(|| "pipe".into())?;
    // SAFETY: fork in a single-threaded process; the child only prepares and execs.
    let app = match unsafe { fork() }.step(|| "fork".into())? {
        ForkResult::Child => {
            drop(err_r);
            let Err(Failure(reason)) = prepare_and_exec(&config.app, Streams::Log(&log));
            let _ = nix::unistd::write(&err_w, reason.as_bytes());
            // SAFETY: _exit in the forked child, never returning into the parent's state.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(err_w);
    let mut reason = String::new();
    let _ = std::io::Read::read_to_string(&mut std::fs::File::from(err_r), &mut reason);
    if !reason.is_empty() {
        let _ = waitpid(app, None);
        return Err(Failure(reason));
    }
    if let Some(s) = status.as_mut() {
        let _ = writeln!(s, "started {app}");
    }
    mark("appliance started");
    listen_for_control(control, app);
    listen_for_debug(debug);
    Ok(supervise(app))
}

fn mount_basics() -> Result<(), Failure> {
    for (fs, target) in [("devtmpfs", "/dev"), ("proc", "/proc"), ("sysfs", "/sys")] {
        let _ = std::fs::create_dir_all(target);
        mount(Some(fs), target, Some(fs), MsFlags::MS_NOSUID, None::<&str>)
            .step(|| format!("mount {fs} on {target}"))?;
    }
    // Our standard streams: the kernel console (the initramfs has no /dev/console node).
    if let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard streams, which no Rust object owns here.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
    Ok(())
}

/// Loads the modules in `/lib/modules/order` (dependencies first, as the host wrote it).
fn load_modules() -> Result<(), Failure> {
    let order =
        std::fs::read_to_string("/lib/modules/order").step(|| "read /lib/modules/order".into())?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{name}.ko");
        let file = std::fs::File::open(&path).step(|| format!("open {path}"))?;
        let params = module_params(&cmdline, name);
        let params = std::ffi::CString::new(params)
            .map_err(|_| Failure(format!("parameters of {name} contain a NUL byte")))?;
        // SAFETY: finit_module with an open module file, a NUL-terminated parameter string
        // and no flags.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(Failure(format!("load module {name}: {e}")));
            }
        }
        // The initramfs is memory: drop each module once it is loaded.
        let _ = std::fs::remove_file(&path);
        mark(&format!("module {name}"));
    }
    Ok(())
}

/// `module.param=value` words of the kernel command line for `module`, as `param=value ...`.
fn module_params(cmdline: &str, module: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    let module = norm(module);
    cmdline
        .split_whitespace()
        .filter_map(|w| {
            let (key, _) = w.split_once('=')?;
            let (m, _) = key.split_once('.')?;
            (norm(m) == module).then(|| w[m.len() + 1..].to_owned())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits for `what` to find everything, polling sysfs.
fn wait_for<T>(what: &str, mut find: impl FnMut() -> Option<T>) -> Result<T, Failure> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if let Some(t) = find() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            return Err(Failure(format!("{what} did not appear")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Entries of a sysfs class directory whose `attr` file reads as one of `wanted`, in that order.
fn by_attribute(class: &str, attr: &str, wanted: &[&str]) -> Option<Vec<String>> {
    let mut found = vec![None; wanted.len()];
    for entry in std::fs::read_dir(class).ok()?.flatten() {
        let value = std::fs::read_to_string(entry.path().join(attr)).unwrap_or_default();
        if let Some(i) = wanted.iter().position(|w| *w == value.trim()) {
            found[i] = Some(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found.into_iter().collect()
}

fn find_ports(names: &[&str]) -> Result<Vec<PathBuf>, Failure> {
    let found = wait_for(&format!("the virtio-serial ports {names:?}"), || {
        by_attribute("/sys/class/virtio-ports", "name", names)
    })?;
    Ok(found.iter().map(|n| Path::new("/dev").join(n)).collect())
}

/// Block devices by serial number, as `/dev/vdX` paths.
fn find_disks(serials: &[&str]) -> Result<Vec<PathBuf>, Failure> {
    let found = wait_for(&format!("the disks {serials:?}"), || {
        by_attribute("/sys/block", "serial", serials)
    })?;
    Ok(found.iter().map(|n| Path::new("/dev").join(n)).collect())
}

fn read_config(disk: &Path) -> Result<GuestConfig, Failure> {
    let bytes = std::fs::read(disk).step(|| format!("read the config disk {}", disk.display()))?;
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    serde_json::from_slice(&bytes[..end]).map_err(|e| Failure(format!("the config disk: {e}")))
}

/// The image read-only at [`NEW_ROOT`], with /proc, /dev, /tmp, /run and the volumes.
fn mount_root(disk: &Path, config: &GuestConfig) -> Result<(), Failure> {
    std::fs::create_dir_all(NEW_ROOT).step(|| format!("create {NEW_ROOT}"))?;
    mount(
        Some(disk),
        NEW_ROOT,
        Some("erofs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .step(|| format!("mount the root {} (erofs)", disk.display()))?;
    let under = |p: &Path| Path::new(NEW_ROOT).join(p.strip_prefix("/").unwrap_or(p));
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for (fs, target, flags, data) in [
        ("proc", "/proc", nosuid | MsFlags::MS_NOEXEC, None),
        ("tmpfs", "/tmp", nosuid, Some("mode=1777")),
        ("tmpfs", "/run", nosuid, Some("mode=755")),
    ] {
        mount(Some(fs), &under(Path::new(target)), Some(fs), flags, data)
            .step(|| format!("mount {fs} on {target}"))?;
    }
    // Not the guest kernel's whole devtmpfs: the sandbox's /dev, bound from it.
    let dev = under(Path::new("/dev"));
    juice_init::view::populate_dev(&dev, Path::new("/dev"), || {
        let fd = std::fs::File::open(&dev).step(|| format!("open {}", dev.display()))?;
        Ok((fd.into(), dev.clone()))
    })?;
    if !config.volumes.is_empty() {
        let serials: Vec<&str> = config.volumes.iter().map(|v| v.serial.as_str()).collect();
        let disks = find_disks(&serials)?;
        for (v, disk) in config.volumes.iter().zip(disks) {
            let target = under(&v.target);
            if !target.is_dir() {
                return Err(Failure(format!(
                    "volume mount point {} is not a directory in the image",
                    v.target.display()
                )));
            }
            mount(Some(&disk), &target, Some("ext4"), nosuid, None::<&str>).step(|| {
                format!(
                    "mount volume {} ({}) on {}",
                    v.serial,
                    disk.display(),
                    v.target.display()
                )
            })?;
        }
    }
    Ok(())
}

/// Moves [`NEW_ROOT`] over `/` (the initramfs stays underneath, emptied).
fn enter_root() -> Result<(), Failure> {
    let _ = std::fs::remove_file("/init");
    let _ = std::fs::remove_dir_all("/lib/modules");
    chdir(NEW_ROOT).step(|| format!("chdir {NEW_ROOT}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .step(|| "move the root over /".into())?;
    chroot(".").step(|| "chroot".into())?;
    chdir("/").step(|| "chdir /".into())
}

/// A thread that turns `term` and `kill` lines from the host into signals for the appliance.
fn listen_for_control(control: std::fs::File, app: Pid) {
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(control);
        let mut line = String::new();
        loop {
            line.clear();
            match lines.read_line(&mut line) {
                // No host on the other end: wait for one.
                Ok(0) => std::thread::sleep(Duration::from_millis(100)),
                Ok(_) => {
                    let sig = match line.trim() {
                        "term" => Signal::SIGTERM,
                        "kill" => Signal::SIGKILL,
                        _ => continue,
                    };
                    let _ = kill(app, sig);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
}

/// A thread that waits for debug sessions on the `juice.debug` port: each
/// request starts `juice-guest debug` (this program, from memory: the
/// initramfs is gone) with the port as fd 3 and the request on fd 4, and the
/// next waits until that session has ended.
fn listen_for_debug(mut conn: std::fs::File) {
    use juice_init::session::{Kind, read_frame};
    use std::os::unix::process::CommandExt;
    std::thread::spawn(move || {
        loop {
            let body = match read_frame(&mut conn) {
                Ok(Some((Kind::Request, body))) => body,
                // No host on the other end (reads see nothing), or a torn frame: wait.
                Ok(_) | Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let Ok((req_r, req_w)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
                continue;
            };
            // A request is far smaller than a pipe's buffer.
            let _ = nix::unistd::write(&req_w, &body);
            drop(req_w);
            let (c, r) = (conn.as_raw_fd(), req_r.as_raw_fd());
            let mut command = std::process::Command::new("/proc/self/exe");
            command.arg0("juice-guest").arg("debug");
            // SAFETY: between fork and exec the closure calls only dup2, which is
            // async-signal-safe; both fds stay open in this thread until spawn returns.
            unsafe {
                command.pre_exec(move || {
                    if libc::dup2(c, 3) < 0 || libc::dup2(r, 4) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            match command.spawn() {
                // PID 1's own loop may reap it first; then this returns at once.
                Ok(mut child) => {
                    let _ = child.wait();
                }
                Err(e) => eprintln!("juice-guest: cannot start a debug session: {e}"),
            }
            drop(req_r);
        }
    });
}

/// `juice-guest debug`: one debug session (fd 3 its connection, fd 4 its
/// request). In a mount namespace of its own it mounts the toolbox disk, and
/// runs the program there with the appliance's root (this guest's `/`)
/// read-only at `/app`; nothing it mounts is seen by the appliance.
fn debug_main() -> ! {
    use juice_init::session::{Kind, Request, serve, write_frame};
    use std::os::fd::FromRawFd;
    // SAFETY: fds 3 and 4 are this mode's contract; nothing else owns them.
    let (conn, req) = unsafe { (OwnedFd::from_raw_fd(3), OwnedFd::from_raw_fd(4)) };
    let mut report =
        std::fs::File::from(conn.try_clone().unwrap_or_else(|_| std::process::exit(125)));
    let outcome = (|| -> Result<(), Failure> {
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(req), &mut body)
            .step(|| "read the session request".into())?;
        let mut request: Request = serde_json::from_slice(&body)
            .map_err(|e| Failure(format!("the session request is not valid: {e}")))?;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .step(|| "unshare the mount namespace".into())?;
        juice_init::root::make_private()?;
        // The session's own /tmp holds what it mounts: the appliance sees none of it.
        let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(
            Some("tmpfs"),
            "/tmp",
            Some("tmpfs"),
            nosuid,
            Some("mode=755"),
        )
        .step(|| "mount the session's /tmp".into())?;
        for (fs, at) in [("sysfs", "/tmp/sys"), ("devtmpfs", "/tmp/dev")] {
            std::fs::create_dir(at).step(|| format!("create {at}"))?;
            mount(Some(fs), at, Some(fs), MsFlags::MS_NOSUID, None::<&str>)
                .step(|| format!("mount {fs}"))?;
        }
        let disk = by_attribute("/tmp/sys/block", "serial", &[GUEST_TOOLBOX_SERIAL])
            .and_then(|d| d.into_iter().next())
            .ok_or_else(|| Failure("this microVM carries no toolbox disk".into()))?;
        std::fs::create_dir("/tmp/toolbox").step(|| "create /tmp/toolbox".into())?;
        mount(
            Some(Path::new("/tmp/dev").join(&disk).as_path()),
            "/tmp/toolbox",
            Some("erofs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .step(|| format!("mount the toolbox disk {disk}"))?;
        for at in ["/tmp/sys", "/tmp/dev"] {
            nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH)
                .step(|| format!("unmount {at}"))?;
        }
        // Terminals from a devpts of the session's own.
        std::fs::create_dir("/tmp/pts").step(|| "create /tmp/pts".into())?;
        mount(
            Some("devpts"),
            "/tmp/pts",
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
        .step(|| "mount devpts".into())?;
        request.config.rootfs = PathBuf::from("/tmp/toolbox");
        request.config.binds = vec![Bind {
            source: PathBuf::from("/"),
            target: PathBuf::from(juice_init::session::APP_MOUNT),
            read_only: true,
        }];
        // serve tells the other end of its own failures: an empty reason here.
        serve(
            conn,
            &request,
            Path::new("/tmp/pts/ptmx"),
            juice_init::root::build_without_proc,
            |_| juice_init::root::finish_in_pid_namespace(),
        )
        .map_err(|_| Failure(String::new()))
    })();
    if let Err(Failure(why)) = &outcome
        && !why.is_empty()
    {
        let _ = write_frame(&mut report, Kind::Error, why.as_bytes());
    }
    std::process::exit(if outcome.is_ok() { 0 } else { 125 })
}

/// Reaps every child until the appliance ends; then ends whatever it left.
fn supervise(app: Pid) -> ExitRecord {
    let record = loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == app => {
                break ExitRecord {
                    code: Some(code),
                    signal: None,
                };
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == app => {
                break ExitRecord {
                    code: None,
                    signal: Some(sig as i32),
                };
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => {
                break ExitRecord {
                    code: None,
                    signal: None,
                };
            }
        }
    };
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while waitpid(Pid::from_raw(-1), None).is_ok() {}
    record
}

#[cfg(test)]
mod tests {
    use super::module_params;

    #[test]
    fn module_parameters_come_from_the_command_line() {
        let cmdline = "console=ttyS0 virtio_mmio.device=512@0xfeb00000:12 virtio-mmio.device=1K@0x1:5 quiet erofs.x=1";
        assert_eq!(
            module_params(cmdline, "virtio_mmio"),
            "device=512@0xfeb00000:12 device=1K@0x1:5"
        );
        assert_eq!(module_params(cmdline, "erofs"), "x=1");
        assert_eq!(module_params(cmdline, "virtio_blk"), "");
    }
}
