//! Starting the appliance process: shared by `juice-init` (sandbox) and
//! `juice-guest` (microVM), so both give it the same user, capabilities,
//! no_new_privs and seccomp filter.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::signal::SigSet;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid, chdir, setgid, setgroups, setsid, setuid};

use crate::InitConfig;

/// A failed step and why; reported to the runtime as one line.
pub struct Failure(pub String);

pub trait Step<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, Failure>;
}

impl<T> Step<T> for nix::Result<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, Failure> {
        self.map_err(|e| Failure(format!("{}: {}", what(), e.desc())))
    }
}

impl<T> Step<T> for std::io::Result<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, Failure> {
        self.map_err(|e| Failure(format!("{}: {e}", what())))
    }
}

/// The program's standard streams.
pub enum Streams<'a> {
    /// An appliance: stdin from /dev/null, stdout and stderr into the log pipe.
    Log(&'a OwnedFd),
    /// A debug session's: the three given; with `tty`, they are one terminal that
    /// becomes the program's controlling terminal.
    Given {
        stdin: &'a OwnedFd,
        stdout: &'a OwnedFd,
        stderr: &'a OwnedFd,
        tty: bool,
    },
}

pub fn prepare_and_exec(
    config: &InitConfig,
    streams: Streams<'_>,
) -> Result<std::convert::Infallible, Failure> {
    SigSet::empty()
        .thread_set_mask()
        .step(|| "unblock signals".into())?;
    setsid().step(|| "setsid".into())?;
    let null;
    let (stdin, stdout, stderr, tty) = match streams {
        Streams::Log(log_w) => {
            null = std::fs::OpenOptions::new()
                .read(true)
                .open("/dev/null")
                .step(|| "open /dev/null".into())?;
            (
                null.as_raw_fd(),
                log_w.as_raw_fd(),
                log_w.as_raw_fd(),
                false,
            )
        }
        Streams::Given {
            stdin,
            stdout,
            stderr,
            tty,
        } => (
            stdin.as_raw_fd(),
            stdout.as_raw_fd(),
            stderr.as_raw_fd(),
            tty,
        ),
    };
    // SAFETY: dup2 onto 0, 1 and 2 replaces the standard streams with fds we own; no Rust object owns 0-2 here.
    unsafe {
        if libc::dup2(stdin, 0) < 0 || libc::dup2(stdout, 1) < 0 || libc::dup2(stderr, 2) < 0 {
            return Err(Failure(format!(
                "redirect the standard streams: {}",
                Errno::last().desc()
            )));
        }
    }
    if tty {
        // SAFETY: TIOCSCTTY on our stdin (a terminal), as the new session's leader.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(Failure(format!(
                "take the terminal: {}",
                Errno::last().desc()
            )));
        }
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    // Init runs with oom_score_adj -1000 so the OOM killer picks the appliance, not init.
    let _ = std::fs::write("/proc/self/oom_score_adj", "0");
    chdir(&config.program.workdir)
        .step(|| format!("chdir {}", config.program.workdir.display()))?;

    let keep = parse_caps(&config.program.capabilities)?;
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, caps::CapSet::Bounding, cap)
                .map_err(|e| Failure(format!("drop {cap} from the bounding set: {e}")))?;
        }
    }
    if config.program.uid != 0 && !keep.is_empty() {
        // Keep the permitted set across setuid so the declared capabilities survive it.
        nix::sys::prctl::set_keepcaps(true).step(|| "prctl(PR_SET_KEEPCAPS)".into())?;
    }
    match setgroups(&[]) {
        // An unprivileged (rootless) user namespace has setgroups disabled: nothing to drop.
        Err(Errno::EPERM) if config.user_namespace => {}
        other => other.step(|| "setgroups".into())?,
    }
    setgid(Gid::from_raw(config.program.gid)).step(|| format!("setgid {}", config.program.gid))?;
    setuid(Uid::from_raw(config.program.uid)).step(|| format!("setuid {}", config.program.uid))?;
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
    ] {
        caps::set(None, set, &keep)
            .map_err(|e| Failure(format!("set the {set:?} capabilities: {e}")))?;
    }
    if config.program.uid != 0 {
        for cap in &keep {
            caps::raise(None, caps::CapSet::Ambient, *cap)
                .map_err(|e| Failure(format!("raise ambient {cap}: {e}")))?;
        }
    }
    nix::sys::prctl::set_no_new_privs().step(|| "prctl(PR_SET_NO_NEW_PRIVS)".into())?;

    let cstrings = |v: &[String]| v.iter().map(|a| cstring(a)).collect::<Result<Vec<_>, _>>();
    let argv = cstrings(&config.program.argv)?;
    let env = cstrings(&config.program.env)?;
    let first = config
        .program
        .argv
        .first()
        .ok_or_else(|| Failure("the command is empty".into()))?;
    // A bare name (a debug session's `ps`) is looked up in the program's own PATH,
    // inside its root, as a shell would.
    let program = if first.contains('/') {
        cstring(first)?
    } else {
        let path = config
            .program
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/bin:/usr/bin:/bin");
        let found = path
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| std::path::Path::new(d).join(first))
            .find(|p| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .ok_or_else(|| Failure(format!("exec {first}: not found in PATH {path}")))?;
        cstring(&found.to_string_lossy())?
    };
    let program = &program;

    // SAFETY: close_range only changes fd flags; every fd above 2 becomes close-on-exec, so the
    // appliance inherits nothing but its standard streams, while our error pipe stays usable until exec.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
    // Last, so nothing above runs under the filters.
    for filter in &config.seccomp {
        let program: seccompiler::BpfProgram = filter
            .iter()
            .map(|f| seccompiler::sock_filter {
                code: f.code,
                jt: f.jt,
                jf: f.jf,
                k: f.k,
            })
            .collect();
        seccompiler::apply_filter(&program)
            .map_err(|e| Failure(format!("install the seccomp filter: {e}")))?;
    }
    let Err(e) = nix::unistd::execve(program, &argv, &env);
    Err(Failure(format!(
        "exec {}: {}",
        config.program.argv[0],
        e.desc()
    )))
}

pub fn cstring(s: &str) -> Result<CString, Failure> {
    CString::new(s).map_err(|_| Failure(format!("{s:?} contains a NUL byte")))
}

pub fn parse_caps(names: &[String]) -> Result<caps::CapsHashSet, Failure> {
    names
        .iter()
        .map(|n| {
            n.parse::<caps::Capability>()
                .map_err(|_| Failure(format!("unknown capability {n}")))
        })
        .collect()
}
