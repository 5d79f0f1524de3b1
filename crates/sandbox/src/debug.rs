//! Debug sessions beside a sandboxed instance: `juice-init debug` joins the
//! instance's pid, network, ipc and uts namespaces through a pidfd of its
//! init, and starts the toolbox program in a mount namespace of its own (the
//! toolbox image as its root, the appliance's root read-only at `/app`).
//!
//! The session runs in a cgroup of its own beside the instance's, with the
//! toolbox's limits: its processes neither count against the appliance's pids
//! and memory (a `ps` must not be what pushes the appliance into its OOM
//! killer) nor go unbounded, and removing that cgroup at the end kills
//! whatever the session left running.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use juice_init::Bind;
use juice_init::session::{APP_MOUNT, Kind, Request, write_frame};
use juice_runtime::{DebugSession, DebugSpec, Handle};

use crate::instance::{Runtime, SandboxError};

/// A session's cgroup is named `<instance>.debug.<daemon pid>.<n>`: instance
/// names have no dots, so no instance's cgroup can be taken for a session's.
const DEBUG_MARK: &str = ".debug.";

/// Removes the cgroups of sessions whose daemon has gone (it was killed before
/// it could remove them; the session itself ended when its connection closed).
pub(crate) fn sweep(runtime: &Runtime) {
    sweep_in(runtime, |pid| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
    });
}

/// The session cgroups `names` holds whose daemon `alive` says has gone.
fn stale_sessions<'a>(
    names: impl Iterator<Item = &'a str>,
    alive: impl Fn(i32) -> bool,
) -> Vec<&'a str> {
    names
        .filter(|name| {
            name.rsplit_once(DEBUG_MARK)
                .and_then(|(_, tail)| tail.split('.').next())
                .and_then(|p| p.parse::<i32>().ok())
                .is_some_and(|daemon| !alive(daemon))
        })
        .collect()
}

fn sweep_in(runtime: &Runtime, alive: impl Fn(i32) -> bool) {
    let Some(h) = runtime.cgroups() else {
        return;
    };
    // Every hierarchy keeps the sessions beside the instances, under the same parent.
    let parents: Vec<PathBuf> = h
        .dirs("x")
        .iter()
        .filter_map(|d| d.parent().map(PathBuf::from))
        .collect();
    let Some(first) = parents.first() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(first) else {
        return;
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in stale_sessions(names.iter().map(String::as_str), alive) {
        let _ = h.remove(&h.dirs(name));
    }
}

impl Runtime {
    /// Starts a debug session beside the running instance `name`.
    pub fn debug(&self, name: &str, spec: &DebugSpec) -> Result<DebugSession, SandboxError> {
        let instance = self.adopt(name)?;
        let refuse = |reason: &str| SandboxError::Debug {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        if !instance.is_running() {
            return Err(refuse("it is not running"));
        }
        let user_ns = |pid: String| std::fs::read_link(format!("/proc/{pid}/ns/user")).ok();
        if user_ns(instance.pid().to_string()) != user_ns("self".into()) {
            return Err(refuse(
                "it runs in a user namespace of its own, which a session does not join",
            ));
        }
        let pidfd = instance
            .process()
            .fd()
            .try_clone()
            .map_err(|e| SandboxError::Syscall(format!("dup the instance's pidfd: {e}")))?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| SandboxError::Syscall(format!("socketpair: {e}")))?;
        let (ours, theirs) = (OwnedFd::from(ours), OwnedFd::from(theirs));

        static SESSIONS: AtomicU64 = AtomicU64::new(0);
        let cgroup_name = format!(
            "{name}{DEBUG_MARK}{}.{}",
            std::process::id(),
            SESSIONS.fetch_add(1, Ordering::Relaxed)
        );
        let hierarchy = self.cgroups_arc();
        let dirs = match &hierarchy {
            Some(h) => h.create(&cgroup_name, &spec.limits)?,
            None => Vec::new(),
        };
        let remove_cgroup = {
            let (h, dirs) = (hierarchy.clone(), dirs.clone());
            move || {
                if let Some(h) = h {
                    let _ = h.remove(&dirs);
                }
            }
        };

        // Above any number the child's dup2 writes to, so neither source is overwritten first.
        let high = |fd: &OwnedFd| -> Result<OwnedFd, SandboxError> {
            let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
                .map_err(|e| SandboxError::Syscall(format!("dup: {e}")))?;
            // SAFETY: fcntl just returned this fd and nothing else owns it.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        };
        let (conn_fd, pid_fd) = match (high(&theirs), high(&pidfd)) {
            (Ok(c), Ok(p)) => (c, p),
            (Err(e), _) | (_, Err(e)) => {
                remove_cgroup();
                return Err(e);
            }
        };
        let (c, p) = (conn_fd.as_raw_fd(), pid_fd.as_raw_fd());
        let mut command =
            std::process::Command::new(std::ffi::OsStr::from_bytes(self.init_path().to_bytes()));
        command
            .arg("debug")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: between fork and exec the closure only calls dup2, which is
        // async-signal-safe; the fds it reads stay open in the parent until spawn returns.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(c, 3) < 0 || libc::dup2(p, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = command.spawn();
        drop((conn_fd, pid_fd, theirs, pidfd));
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                remove_cgroup();
                return Err(SandboxError::Syscall(format!(
                    "start juice-init debug: {e}"
                )));
            }
        };
        // In its cgroup before it reads the request, so everything it starts is there too.
        if let Some(h) = &hierarchy
            && let Err(e) = i32::try_from(child.id())
                .map_err(|_| SandboxError::Syscall("a pid out of range".into()))
                .and_then(|pid| Ok(h.attach(&dirs, pid)?))
        {
            let _ = child.kill();
            let _ = child.wait();
            remove_cgroup();
            return Err(e);
        }
        let request = Request::toolbox(
            spec.toolbox.clone(),
            name,
            spec.program.clone(),
            vec![Bind {
                source: instance.state().rootfs.clone(),
                target: PathBuf::from(APP_MOUNT),
                read_only: true,
            }],
            spec.tty.then_some((spec.rows, spec.cols)),
        );
        let sent = serde_json::to_vec(&request)
            .map_err(std::io::Error::other)
            .and_then(|json| {
                let mut w = std::fs::File::from(ours.try_clone()?);
                write_frame(&mut w, Kind::Request, &json)
            });
        if let Err(e) = sent {
            let _ = child.kill();
            let _ = child.wait();
            remove_cgroup();
            return Err(SandboxError::Syscall(format!(
                "send the session request: {e}"
            )));
        }
        Ok(DebugSession {
            conn: ours,
            finish: Box::new(move || {
                // The connection is closed by now: the session kills its toolbox and ends.
                let _ = child.wait();
                remove_cgroup();
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sessions_of_gone_daemons_are_stale_never_an_instance() {
        let names = [
            "web-r1-3fa2",
            // A group may be called anything with dashes: its instances are never sessions.
            "web-debug-5-r1-0a0a",
            "web-r1-3fa2.debug.5.0",
            "web-r1-3fa2.debug.77.1",
            "web-r1-3fa2.debug.x.1",
        ];
        let alive = |pid: i32| pid == 77;
        assert_eq!(
            stale_sessions(names.iter().copied(), alive),
            vec!["web-r1-3fa2.debug.5.0"]
        );
    }
}
