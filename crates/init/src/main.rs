//! `juice-init`: PID 1 of a Juice sandbox. See the library docs for the fd contract.
//!
//! Sequence: read the config (which doubles as the "go" from the runtime),
//! unshare the cgroup namespace, build the root (read-only image, private
//! /proc, /dev, /tmp, /run, volumes; no /sys, which appliances do not need
//! and which shows much of the host), pivot into it, start the appliance with
//! its user, capabilities, no_new_privs and seccomp filter, then stay as PID 1:
//! reap every zombie, forward signals, copy the appliance's output into a
//! rotating log, and record how it ended.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use juice_init::exec::{Failure, Step, Streams, prepare_and_exec};
use juice_init::{
    CONFIG_FD, EXIT_FILE, ExitRecord, GO, InitConfig, LOG_DIR_FD, LOG_FILE, STATE_DIR_FD, STATUS_FD,
};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, sethostname};

fn borrowed(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the runtime opens these fds for us before exec (see the crate docs) and
    // init never closes them while a borrow is alive.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

fn report(line: &str) {
    let _ = nix::unistd::write(borrowed(STATUS_FD), format!("{line}\n").as_bytes());
}

/// PID 1 holds only the contract's descriptors: whatever else the runtime's caller
/// left open (its terminal, its log file, a pipe) would be one `/proc/1/fd/N`
/// away from an appliance granted CAP_SYS_PTRACE.
fn close_inherited() {
    // SAFETY: close_range closes descriptors above the contract's (3 to 6), none of which Rust owns.
    unsafe { libc::syscall(libc::SYS_close_range, STATE_DIR_FD + 1, u32::MAX, 0) };
    if let Ok(null) = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        for fd in 0..3 {
            // SAFETY: dup2 onto 0-2 replaces the standard streams; no Rust object owns them.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == "debug") {
        debug_main();
    }
    close_inherited();
    let (config, after_config) = match read_config() {
        Ok(c) => c,
        Err(Failure(e)) => {
            report(&format!("failed {e}"));
            std::process::exit(125);
        }
    };
    match run(&config, &after_config) {
        Ok(code) => std::process::exit(code),
        Err(Failure(e)) => {
            report(&format!("failed {e}"));
            std::process::exit(125);
        }
    }
}

/// `juice-init debug`: a debug session beside a running instance. fd 3 is the
/// session's connection (see `juice_init::session`), fd 4 a pidfd of the
/// instance's init. The session joins the instance's pid, network, ipc and uts
/// namespaces; it and its program get a mount namespace of their own, with the
/// toolbox as its root and the appliance's root read-only at `/app`. The
/// runtime has already placed this process in the session's cgroup.
fn debug_main() -> ! {
    // SAFETY: close_range closes what the runtime did not mean to pass (above fd 4).
    unsafe { libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0) };
    // SAFETY: fds 3 and 4 are this mode's contract; nothing else owns them.
    let (conn, pidfd) = unsafe { (OwnedFd::from_raw_fd(3), OwnedFd::from_raw_fd(4)) };
    let mut stream = std::fs::File::from(conn);
    let fail = |stream: &mut std::fs::File, why: &str| -> ! {
        let _ = juice_init::session::write_frame(
            stream,
            juice_init::session::Kind::Error,
            why.as_bytes(),
        );
        std::process::exit(125)
    };
    let request: juice_init::session::Request = match juice_init::session::read_frame(&mut stream) {
        Ok(Some((juice_init::session::Kind::Request, body))) => {
            match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => fail(
                    &mut stream,
                    &format!("the session request is not valid: {e}"),
                ),
            }
        }
        _ => fail(&mut stream, "the session did not begin with a request"),
    };
    let conn = OwnedFd::from(stream);
    let outcome = juice_init::session::serve(
        conn,
        &request,
        Path::new("/dev/ptmx"),
        |config| {
            // Not ptrace-able by uid alone, and the root is built (the host's
            // detached) before anything joins the instance's namespaces: what the
            // appliance can see of the session never reaches the host's mounts.
            nix::sys::prctl::set_dumpable(false).step(|| "prctl(PR_SET_DUMPABLE)".into())?;
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .step(|| "unshare the mount namespace".into())?;
            juice_init::root::build_without_proc(config)?;
            let flags = nix::sched::CloneFlags::CLONE_NEWPID
                | nix::sched::CloneFlags::CLONE_NEWNET
                | nix::sched::CloneFlags::CLONE_NEWIPC
                | nix::sched::CloneFlags::CLONE_NEWUTS;
            nix::sched::setns(&pidfd, flags).step(|| "join the instance's namespaces".into())
        },
        |_| juice_init::root::finish_in_pid_namespace(),
    );
    std::process::exit(if outcome.is_ok() { 0 } else { 125 })
}

/// Reads the config: one line of JSON. Returns it and whatever followed the line
/// (the "go" may already be there). The pipe stays open for the "go".
fn read_config() -> Result<(InitConfig, Vec<u8>), Failure> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16384];
    let end = loop {
        if let Some(i) = bytes.iter().position(|b| *b == b'\n') {
            break i;
        }
        match nix::unistd::read(borrowed(CONFIG_FD), &mut buf) {
            Ok(0) => return Err(Failure("the runtime closed the config pipe early".into())),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Failure(format!("read the config: {}", e.desc()))),
        }
    };
    let rest = bytes.split_off(end + 1);
    let config = serde_json::from_slice(&bytes)
        .map_err(|e| Failure(format!("the config is not valid: {e}")))?;
    Ok((config, rest))
}

/// Waits for the runtime's "go" (cgroup and network are ready): the byte [`GO`].
/// EOF without it means the runtime gave up, and so do we.
fn wait_for_go(already: &[u8]) -> Result<(), Failure> {
    // SAFETY: CONFIG_FD is ours alone; taking ownership closes it after this.
    let fd = unsafe { OwnedFd::from_raw_fd(CONFIG_FD) };
    if let Some(b) = already.first() {
        return if *b == GO {
            Ok(())
        } else {
            Err(Failure("the runtime sent garbage after the config".into()))
        };
    }
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(&fd, &mut b) {
            Ok(1) if b[0] == GO => return Ok(()),
            Ok(_) => {
                return Err(Failure(
                    "the runtime gave up before the instance started".into(),
                ));
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Failure(format!("wait for the runtime: {}", e.desc()))),
        }
    }
}

fn run(config: &InitConfig, after_config: &[u8]) -> Result<i32, Failure> {
    // The appliance must not ptrace or read PID 1's memory, even as root.
    nix::sys::prctl::set_dumpable(false).step(|| "prctl(PR_SET_DUMPABLE)".into())?;
    nix::sys::stat::umask(Mode::empty());
    // The root is built while the runtime sets up the cgroup and the network.
    juice_init::root::build(config)?;
    sethostname(&config.hostname).step(|| "sethostname".into())?;
    wait_for_go(after_config)?;
    if config.cgroup_namespace {
        // Now that we are in the instance's cgroup, it becomes the namespace's root.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
            .step(|| "unshare the cgroup namespace".into())?;
    }

    let signals = handled_signals();
    signals.thread_block().step(|| "block signals".into())?;
    let (log_r, log_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).step(|| "pipe".into())?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).step(|| "pipe".into())?;

    // SAFETY: init is single-threaded (a fresh exec), so the child may run any code.
    let app = match unsafe { fork() }.step(|| "fork the appliance".into())? {
        ForkResult::Child => {
            drop(log_r);
            drop(err_r);
            let Failure(e) = exec_app(config, &log_w);
            let _ = nix::unistd::write(&err_w, e.as_bytes());
            // SAFETY: _exit is always safe; it skips destructors that belong to the parent.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(log_w);
    drop(err_w);

    // The error pipe closes on a successful exec (O_CLOEXEC); anything in it is the reason it failed.
    let mut why = [0u8; 1024];
    let n = nix::unistd::read(&err_r, &mut why).unwrap_or(0);
    if n > 0 {
        let _ = waitpid(app, None);
        return Err(Failure(String::from_utf8_lossy(&why[..n]).into_owned()));
    }
    report(&format!("started {app}"));
    let _ = nix::unistd::close(STATUS_FD);
    Ok(supervise(config, app, log_r, &signals))
}

fn handled_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        s.add(sig);
    }
    s
}

/// In the forked child: become the appliance. Returns only on failure.
fn exec_app(config: &InitConfig, log_w: &OwnedFd) -> Failure {
    match prepare_and_exec(config, Streams::Log(log_w)) {
        Ok(never) => match never {},
        Err(f) => f,
    }
}

/// PID 1's loop: reap, forward signals, copy output to the log; returns the exit code to use.
fn supervise(config: &InitConfig, app: Pid, log_r: OwnedFd, signals: &SigSet) -> i32 {
    let mut log = Log::open(config.log_max_bytes, config.log_keep);
    let sfd = match SignalFd::with_flags(signals, SfdFlags::SFD_CLOEXEC) {
        Ok(s) => s,
        Err(e) => {
            log.write(format!("juice-init: signalfd: {}\n", e.desc()).as_bytes());
            // Without a signalfd we can still wait for the appliance.
            return exit_code(waitpid(app, None).ok());
        }
    };
    let mut status = None;
    let mut log_open = true;
    let mut buf = vec![0u8; 64 * 1024];
    while status.is_none() {
        let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        if log_open {
            fds.push(PollFd::new(log_r.as_fd(), PollFlags::POLLIN));
        }
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let log_ready = log_open
            && fds
                .get(1)
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty());
        let sig_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        if log_ready {
            match nix::unistd::read(&log_r, &mut buf) {
                Ok(0) | Err(_) => log_open = false,
                Ok(n) => log.write(&buf[..n]),
            }
        }
        // A signal number that does not fit an i32 is no signal we know: it is ignored.
        if sig_ready
            && let Ok(Some(info)) = sfd.read_signal()
            && let Ok(sig) = i32::try_from(info.ssi_signo)
        {
            if sig == libc::SIGCHLD {
                status = reap(app).or(status);
            } else if let Ok(s) = Signal::try_from(sig) {
                let _ = kill(app, s);
            }
        }
    }
    // Output still in the pipe (or held by leftover processes) for a short while.
    if log_open {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < deadline {
            let mut fds = [PollFd::new(log_r.as_fd(), PollFlags::POLLIN)];
            if !matches!(poll(&mut fds, PollTimeout::from(50u8)), Ok(n) if n > 0) {
                break;
            }
            match nix::unistd::read(&log_r, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => log.write(&buf[..n]),
            }
        }
    }
    let record = match status {
        Some(WaitStatus::Exited(_, code)) => ExitRecord {
            code: Some(code),
            signal: None,
        },
        Some(WaitStatus::Signaled(_, sig, _)) => ExitRecord {
            code: None,
            signal: Some(sig as i32),
        },
        _ => ExitRecord {
            code: None,
            signal: None,
        },
    };
    write_exit(&record);
    exit_code(status)
}

/// Reaps every exited child; returns the appliance's status if it was among them.
fn reap(app: Pid) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(s)
                if s.pid() == Some(app)
                    && matches!(s, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =>
            {
                found = Some(s)
            }
            Ok(_) => {}
        }
    }
}

fn exit_code(status: Option<WaitStatus>) -> i32 {
    match status {
        Some(WaitStatus::Exited(_, code)) => code,
        Some(WaitStatus::Signaled(_, sig, _)) => 128 + sig as i32,
        _ => 125,
    }
}

fn write_exit(record: &ExitRecord) {
    let Ok(json) = serde_json::to_vec(record) else {
        return;
    };
    let dir = borrowed(STATE_DIR_FD);
    let tmp = format!("{EXIT_FILE}.tmp");
    let flags = nix::fcntl::OFlag::O_WRONLY
        | nix::fcntl::OFlag::O_CREAT
        | nix::fcntl::OFlag::O_TRUNC
        | nix::fcntl::OFlag::O_CLOEXEC;
    if let Ok(fd) = nix::fcntl::openat(dir, tmp.as_str(), flags, Mode::from_bits_truncate(0o644)) {
        // No fsync: the record matters to a runtime that outlives us, not across a host crash.
        let _ = nix::unistd::write(&fd, &json);
        let _ = nix::fcntl::renameat(dir, tmp.as_str(), dir, EXIT_FILE);
    }
}

/// `app.log` in the log directory, rotated by size.
struct Log {
    file: Option<OwnedFd>,
    size: u64,
    max: u64,
    keep: u32,
}

impl Log {
    fn open(max: u64, keep: u32) -> Log {
        let mut log = Log {
            file: None,
            size: 0,
            max: max.max(4096),
            keep,
        };
        log.reopen();
        log
    }

    fn reopen(&mut self) {
        let flags = nix::fcntl::OFlag::O_WRONLY
            | nix::fcntl::OFlag::O_CREAT
            | nix::fcntl::OFlag::O_APPEND
            | nix::fcntl::OFlag::O_CLOEXEC;
        self.file = nix::fcntl::openat(
            borrowed(LOG_DIR_FD),
            LOG_FILE,
            flags,
            Mode::from_bits_truncate(0o640),
        )
        .ok();
        self.size = self
            .file
            .as_ref()
            .and_then(|f| nix::sys::stat::fstat(f).ok())
            .and_then(|s| u64::try_from(s.st_size).ok())
            .unwrap_or(0);
    }

    /// Appends, rotating so that no file grows past the limit; splits at a line end where it can.
    fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // Saturating: room beyond the address space is more than any buffer, so the
            // same as unlimited.
            let mut room =
                usize::try_from(self.max.saturating_sub(self.size)).unwrap_or(usize::MAX);
            if room == 0 {
                self.rotate();
                room = usize::try_from(self.max).unwrap_or(usize::MAX);
            }
            let take = if bytes.len() <= room {
                bytes.len()
            } else {
                bytes[..room]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(room, |i| i + 1)
            };
            let (now, later) = bytes.split_at(take);
            if let Some(f) = &self.file {
                let mut rest = now;
                while !rest.is_empty() {
                    match nix::unistd::write(f, rest) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => rest = &rest[n..],
                    }
                }
            }
            self.size += take as u64;
            bytes = later;
            if !bytes.is_empty() {
                self.rotate();
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let dir = borrowed(LOG_DIR_FD);
        let name = |i: u32| {
            if i == 0 {
                OsStr::new(LOG_FILE).to_owned()
            } else {
                format!("{LOG_FILE}.{i}").into()
            }
        };
        if self.keep == 0 {
            let _ = nix::unistd::unlinkat(
                dir,
                name(0).as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        for i in (0..self.keep).rev() {
            let _ = nix::fcntl::renameat(dir, name(i).as_os_str(), dir, name(i + 1).as_os_str());
        }
        self.reopen();
    }
}
