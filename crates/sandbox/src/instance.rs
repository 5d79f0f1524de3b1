//! Starting, finding, stopping and waiting for sandboxed instances.
//!
//! There is no shim: the runtime clones a process into new namespaces that
//! execs `juice-init`, which becomes PID 1 of the instance. The caller keeps
//! only a pidfd. Everything needed to find the instance again after the
//! caller restarts is in `$JUICE_HOME/instances/<name>/state.json`: the init
//! pid and its start time (so a recycled pid is never mistaken for it), the
//! cgroup directories and the network attachment. Init writes the
//! appliance's exit status to `exit.json` in the same directory.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use juice_init::{Bind, EXIT_FILE, ExitRecord, InitConfig, LOG_FILE};
use serde::{Deserialize, Serialize};

use crate::cgroup::{self, CgroupError, Hierarchy, Limits};
use crate::network::{self, Attachment, NetworkError, NetworkSpec};
use crate::process::{pidfd_of, poll_readable};
use crate::seccomp::{self, SeccompError};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Syscall(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("instance {name:?} could not start: {reason}")]
    Start { name: String, reason: String },
    #[error("instance {0:?} already exists and is running")]
    Exists(String),
    #[error("no instance {0:?}")]
    NotFound(String),
    #[error("{0:?} is not a valid instance name (lowercase letters, digits and '-', at most 48)")]
    BadName(String),
    #[error("cannot find juice-init (looked at {0}); build the workspace or set JUICE_INIT")]
    NoInit(PathBuf),
    #[error("the state of instance {name:?} is damaged: {reason}")]
    Damaged { name: String, reason: String },
}

fn io_err(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> SandboxError + use<> {
    let path = path.to_owned();
    move |source| SandboxError::Io {
        action,
        path,
        source,
    }
}

fn errno(what: &str) -> SandboxError {
    SandboxError::Syscall(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// A volume to mount read-write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub source: PathBuf,
    pub target: PathBuf,
}

/// What to run and how to confine it.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Instance name; also the hostname.
    pub name: String,
    /// The unpacked image (see `juice_image::unpack::materialise`).
    pub rootfs: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    pub workdir: PathBuf,
    pub capabilities: Vec<String>,
    pub limits: Limits,
    /// Create a cgroup even without limits (to count and kill the instance's processes).
    pub cgroup: bool,
    pub volumes: Vec<VolumeMount>,
    /// `None`: a network namespace with loopback only.
    pub network: Option<NetworkSpec>,
    /// Map root in the sandbox to an unprivileged host uid range.
    pub user_namespace: Option<IdMap>,
    pub seccomp: bool,
    /// Kill the instance if the process that started it dies (`juice run` in the foreground).
    pub die_with_parent: bool,
    pub log_max_bytes: u64,
    pub log_keep: u32,
}

impl SandboxSpec {
    /// A spec with Juice's defaults: cgroup, seccomp, no network, 10 MiB x 3 logs.
    pub fn new(name: &str, rootfs: &Path, argv: Vec<String>) -> SandboxSpec {
        SandboxSpec {
            name: name.to_owned(),
            rootfs: rootfs.to_owned(),
            argv,
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            uid: 0,
            gid: 0,
            workdir: PathBuf::from("/"),
            capabilities: Vec::new(),
            limits: Limits::default(),
            cgroup: true,
            volumes: Vec::new(),
            network: None,
            user_namespace: None,
            seccomp: true,
            die_with_parent: false,
            log_max_bytes: 10 << 20,
            log_keep: 3,
        }
    }
}

/// Root in the sandbox is `host_uid`/`host_gid` on the host, for `size` ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub host_uid: u32,
    pub host_gid: u32,
    pub size: u32,
}

impl IdMap {
    /// 65536 ids from `host_id` (uid and gid), for a runtime running as root.
    pub fn range(host_id: u32) -> IdMap {
        IdMap {
            host_uid: host_id,
            host_gid: host_id,
            size: 65536,
        }
    }

    /// Rootless: the caller's own uid and gid, the only ids an unprivileged process may map.
    pub fn caller() -> IdMap {
        IdMap {
            host_uid: nix::unistd::geteuid().as_raw(),
            host_gid: nix::unistd::getegid().as_raw(),
            size: 1,
        }
    }

    /// Whether supplementary groups are disabled in the namespace (they must be for an
    /// unprivileged map).
    pub fn denies_setgroups(&self) -> bool {
        !nix::unistd::geteuid().is_root()
    }
}

/// What is on disk about a running instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceState {
    pub name: String,
    /// Host pid of the instance's init.
    pub pid: i32,
    /// Its start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
    /// The appliance's pid inside the instance.
    pub app_pid: i32,
    pub rootfs: PathBuf,
    pub cgroup_version: Option<String>,
    pub cgroups: Vec<PathBuf>,
    pub network: Option<Attachment>,
    pub started_unix_ms: u64,
}

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The kernel's OOM killer fired in the instance's cgroup.
    pub oom_killed: bool,
}

impl std::fmt::Display for ExitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal, self.oom_killed) {
            (_, _, true) => write!(f, "killed by the OOM killer (memory limit)"),
            (Some(c), _, _) => write!(f, "exited with code {c}"),
            (None, Some(s), _) => write!(f, "killed by signal {s}"),
            (None, None, _) => write!(f, "ended without a status"),
        }
    }
}

/// `juice-init`: `JUICE_INIT`, else next to this program.
pub fn find_init() -> Result<PathBuf, SandboxError> {
    let init = match std::env::var_os("JUICE_INIT") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .map_err(io_err("find", Path::new("/proc/self/exe")))?
            .with_file_name("juice-init"),
    };
    if !init.is_file() {
        return Err(SandboxError::NoInit(init));
    }
    Ok(init)
}

/// The runtime: where state lives, which init to run, which cgroup layout to use.
pub struct Runtime {
    home: PathBuf,
    init: CString,
    cgroups: Option<Arc<dyn Hierarchy>>,
}

impl Runtime {
    /// A runtime keeping state under `home` (`$JUICE_HOME`).
    pub fn new(home: &Path) -> Result<Runtime, SandboxError> {
        let init = find_init()?;
        let dir = home.join("instances");
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        Ok(Runtime {
            home: home.to_owned(),
            init: CString::new(init.as_os_str().as_bytes())
                .map_err(|_| SandboxError::NoInit(init.clone()))?,
            cgroups: cgroup::detect().ok().map(Arc::from),
        })
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.home.join("instances").join(name)
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.instance_dir(name).join("logs").join(LOG_FILE)
    }

    pub fn cgroups(&self) -> Option<&dyn Hierarchy> {
        self.cgroups.as_deref()
    }

    /// Starts an instance. On any failure everything created so far is removed again.
    pub fn spawn(&self, spec: &SandboxSpec) -> Result<Instance, SandboxError> {
        check_name(&spec.name)?;
        let dir = self.instance_dir(&spec.name);
        if let Ok(existing) = self.adopt(&spec.name) {
            if existing.is_running() {
                return Err(SandboxError::Exists(spec.name.clone()));
            }
            existing.cleanup();
        }
        // Logs of an earlier instance of the same name continue; its status does not.
        for stale in ["state.json", EXIT_FILE] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let _ = std::fs::remove_dir_all(dir.join(EXIT_DIR));
        // A start that fails leaves no directory behind (unless an earlier instance
        // of the name left its logs there).
        let fresh = !dir.exists();
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(io_err("create", &logs))?;
        let exit_dir = dir.join(EXIT_DIR);
        std::fs::create_dir_all(&exit_dir).map_err(io_err("create", &exit_dir))?;
        if let Some(map) = &spec.user_namespace {
            // Init writes logs and the exit record as the namespace's root, a plain host uid.
            for d in [&dir, &logs, &exit_dir] {
                std::os::unix::fs::chown(d, Some(map.host_uid), Some(map.host_gid))
                    .map_err(io_err("chown", d))?;
            }
        }
        let mut undo = Undo::default();
        match self.start(spec, &dir, &mut undo) {
            Ok(instance) => Ok(instance),
            Err(e) => {
                undo.run(self);
                if fresh {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(e)
            }
        }
    }

    fn start(
        &self,
        spec: &SandboxSpec,
        dir: &Path,
        undo: &mut Undo,
    ) -> Result<Instance, SandboxError> {
        // Files the instance sees as /etc/hosts and /etc/resolv.conf.
        let network = match &spec.network {
            Some(net) => {
                let a = network::allocate(&self.home, &spec.name, net)?;
                undo.network = Some(a.clone());
                Some(a)
            }
            None => None,
        };
        let hosts = dir.join("hosts");
        let address = network.as_ref().map(|a| a.address.to_string());
        let mut hosts_text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
        if let Some(a) = &address {
            hosts_text.push_str(&format!("{a}\t{}\n", spec.name));
        } else {
            hosts_text.push_str(&format!("127.0.1.1\t{}\n", spec.name));
        }
        std::fs::write(&hosts, hosts_text).map_err(io_err("write", &hosts))?;
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            "# Juice appliances have no resolver unless one is declared.\n",
        )
        .map_err(io_err("write", &resolv))?;

        let mut binds = vec![
            Bind {
                source: hosts,
                target: "/etc/hosts".into(),
                read_only: true,
            },
            Bind {
                source: resolv,
                target: "/etc/resolv.conf".into(),
                read_only: true,
            },
        ];
        for v in &spec.volumes {
            binds.push(Bind {
                source: v.source.clone(),
                target: v.target.clone(),
                read_only: false,
            });
        }

        crate::trace::mark("files written");
        let hierarchy = match (&self.cgroups, spec.cgroup) {
            (Some(h), true) => Some(h.clone()),
            (None, true) if spec.limits != Limits::default() => {
                return Err(SandboxError::Cgroup(CgroupError::Unavailable(
                    "limits were asked for but no cgroup hierarchy is usable".into(),
                )));
            }
            _ => None,
        };

        let config = InitConfig {
            rootfs: spec.rootfs.clone(),
            hostname: spec.name.clone(),
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            uid: spec.uid,
            gid: spec.gid,
            workdir: spec.workdir.clone(),
            capabilities: spec.capabilities.clone(),
            seccomp: if spec.seccomp {
                seccomp::default_filters()?
            } else {
                Vec::new()
            },
            binds,
            user_namespace: spec.user_namespace.is_some(),
            cgroup_namespace: hierarchy.is_some(),
            log_max_bytes: spec.log_max_bytes,
            log_keep: spec.log_keep,
        };
        let mut config = serde_json::to_vec(&config)
            .map_err(|e| SandboxError::Syscall(format!("encode the init config: {e}")))?;
        config.push(b'\n');
        crate::trace::mark("config ready");

        let child = self.clone_init(spec, dir)?;
        undo.pid = Some(child.pid);
        crate::trace::mark("cloned");
        let pid = child.pid;
        if let Some(map) = &spec.user_namespace {
            write_id_maps(pid, map)?;
        }
        if let Some(sync) = child.sync {
            // The user namespace has its maps; init may exec now.
            nix::unistd::write(&sync, b"g")
                .map_err(|e| SandboxError::Syscall(format!("release init: {e}")))?;
        }
        let config_w = std::fs::File::from(child.config_w);
        let status_r = child.status_r;
        let prepared = self.prepare_init(spec, config_w, &config, pid, &hierarchy, &network, undo);
        let (cgroup_version, cgroups) = match prepared {
            Ok(p) => p,
            Err(e) => {
                // Init may have ended first and said why (the runtime then sees only
                // a broken pipe or a vanished process): its reason is the one to show.
                // Its descriptors close before its exit is visible, so allow it a moment.
                if poll_readable(&child.pidfd, 100)
                    && let Ok(line) = read_status(status_r, Duration::from_millis(200))
                    && let Some(reason) = line.strip_prefix("failed ")
                {
                    return Err(SandboxError::Start {
                        name: spec.name.clone(),
                        reason: reason.trim().to_owned(),
                    });
                }
                return Err(e);
            }
        };

        let line = read_status(status_r, Duration::from_secs(30))?;
        crate::trace::mark("init reported");
        let app_pid = match line.strip_prefix("started ") {
            Some(p) => p.trim().parse().unwrap_or(0),
            None => {
                return Err(SandboxError::Start {
                    name: spec.name.clone(),
                    reason: line
                        .strip_prefix("failed ")
                        .unwrap_or(&line)
                        .trim()
                        .to_owned(),
                });
            }
        };
        // The start time is how adoption tells this process from a recycled pid: a
        // record without it would make a live instance look dead to the next daemon.
        let started = start_time(pid).ok_or_else(|| SandboxError::Start {
            name: spec.name.clone(),
            reason: format!("cannot read the start time of juice-init (pid {pid})"),
        })?;
        let state = InstanceState {
            name: spec.name.clone(),
            pid,
            start_time: started,
            app_pid,
            rootfs: spec.rootfs.clone(),
            cgroup_version,
            cgroups,
            network,
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let state_path = dir.join("state.json");
        let bytes = serde_json::to_vec_pretty(&state)
            .map_err(|e| SandboxError::Syscall(format!("encode state: {e}")))?;
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &state_path).map_err(io_err("write", &state_path))?;
        *undo = Undo::default();
        Ok(Instance {
            state,
            pidfd: child.pidfd,
            is_child: true,
            dir: dir.to_owned(),
            cgroups: self.cgroups.clone(),
            home: self.home.clone(),
            reaped: None,
            released: false,
        })
    }

    /// Sends init its config, makes the cgroups and the network while init
    /// builds the root, then lets it go.
    #[allow(clippy::too_many_arguments)]
    fn prepare_init(
        &self,
        spec: &SandboxSpec,
        mut config_w: std::fs::File,
        config: &[u8],
        pid: i32,
        hierarchy: &Option<Arc<dyn Hierarchy>>,
        network: &Option<Attachment>,
        undo: &mut Undo,
    ) -> Result<(Option<String>, Vec<PathBuf>), SandboxError> {
        // Init builds the root from this while we make the cgroup and the network.
        config_w
            .write_all(config)
            .map_err(io_err("send the config to", Path::new("juice-init")))?;

        // Init runs at -1000 so the OOM killer picks the appliance; init resets it for the appliance.
        let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "-1000");
        let (cgroup_version, cgroups) = match hierarchy {
            Some(h) => {
                let dirs = h.create(&spec.name, &spec.limits)?;
                undo.cgroups = dirs.clone();
                h.attach(&dirs, pid)?;
                (Some(h.version().to_owned()), dirs)
            }
            None => (None, Vec::new()),
        };
        if let Some(a) = network {
            network::attach(&self.home, a, pid)?;
        }
        crate::trace::mark("cgroup, network ready");
        config_w
            .write_all(&[juice_init::GO])
            .map_err(io_err("start", Path::new("juice-init")))?;
        Ok((cgroup_version, cgroups))
    }

    /// Clones into new namespaces and execs juice-init there.
    fn clone_init(&self, spec: &SandboxSpec, dir: &Path) -> Result<ClonedInit, SandboxError> {
        let (config_r, config_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        // Init gets only the two directories it writes, never the instance's own
        // (state.json is the runtime's record, which the appliance must not reach).
        let log_dir = open_detached(&dir.join("logs"))?;
        let state_dir = open_detached(&dir.join(EXIT_DIR))?;
        let (sync_r, sync_w) = if spec.user_namespace.is_some() {
            let (r, w) = pipe()?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        // Above any number dup2 will write to, so no source is overwritten before it is moved.
        let sources = [
            high_dup(&config_r)?,
            high_dup(&status_w)?,
            high_dup(&log_dir)?,
            high_dup(&state_dir)?,
        ];
        let sync_fd = sync_r.as_ref().map(high_dup).transpose()?;
        let may_setgroups = !spec.user_namespace.is_some_and(|m| m.denies_setgroups());
        let argv0 = c"juice-init";
        let argv = [argv0.as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];

        let mut flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWNET
            | libc::CLONE_PIDFD;
        if spec.user_namespace.is_some() {
            flags |= libc::CLONE_NEWUSER;
        }
        let mut pidfd: RawFd = -1;
        let die_with_parent = spec.die_with_parent;
        let init = self.init.as_ptr();
        // SAFETY: clone with a null stack duplicates this thread like fork. The child runs
        // only async-signal-safe calls (dup2, prctl, read, execve, _exit) on data prepared
        // above, so it is sound even if other threads held locks at the time of the clone.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags | libc::SIGCHLD) as libc::c_ulong,
                std::ptr::null_mut::<libc::c_void>(),
                &mut pidfd as *mut RawFd,
                std::ptr::null_mut::<libc::c_void>(),
                0 as libc::c_ulong,
            )
        };
        if ret == 0 {
            // SAFETY: see above; in the child, only async-signal-safe calls follow.
            unsafe {
                for (i, fd) in sources.iter().enumerate() {
                    if libc::dup2(*fd, juice_init::CONFIG_FD + i as i32) < 0 {
                        libc::_exit(126);
                    }
                }
                if die_with_parent {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                }
                if let Some(fd) = sync_fd {
                    let mut b = 0u8;
                    libc::read(fd, &mut b as *mut u8 as *mut libc::c_void, 1);
                    // Our credentials are still the caller's, which the new namespace may not
                    // map; become its root (the mapped host id) so exec keeps the capabilities.
                    if (may_setgroups && libc::setgroups(0, std::ptr::null()) < 0)
                        || libc::setresgid(0, 0, 0) < 0
                        || libc::setresuid(0, 0, 0) < 0
                    {
                        libc::_exit(126);
                    }
                }
                libc::execve(init, argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        for fd in sources.iter().chain(sync_fd.iter()) {
            // SAFETY: these are our own dups, not owned by any Rust object.
            unsafe { libc::close(*fd) };
        }
        if ret < 0 {
            return Err(errno(
                "clone the instance's init (new mount, pid, uts, ipc and net namespaces)",
            ));
        }
        drop((config_r, status_w, log_dir, state_dir, sync_r));
        // SAFETY: CLONE_PIDFD stored a fresh pidfd here that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        Ok(ClonedInit {
            pid: ret as i32,
            pidfd,
            config_w,
            status_r,
            sync: sync_w,
        })
    }

    /// Finds an instance started earlier, by this process or another.
    pub fn adopt(&self, name: &str) -> Result<Instance, SandboxError> {
        check_name(name)?;
        let dir = self.instance_dir(name);
        let path = dir.join("state.json");
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SandboxError::NotFound(name.to_owned()),
            _ => io_err("read", &path)(e),
        })?;
        let state: InstanceState =
            serde_json::from_slice(&bytes).map_err(|e| SandboxError::Damaged {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        let pidfd = pidfd_of(state.pid, state.start_time)
            .map_err(|e| SandboxError::Syscall(format!("find instance {name:?} again: {e}")))?;
        Ok(Instance {
            state,
            pidfd,
            is_child: false,
            dir,
            cgroups: self.cgroups.clone(),
            home: self.home.clone(),
            reaped: None,
            released: false,
        })
    }

    /// Names of all instances with state on disk.
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.home.join("instances"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("state.json").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Removes everything an instance that is not running left: for one whose
    /// starter was killed halfway (no state record yet), its cgroups, address
    /// and directory are found by name. A running instance is left alone.
    pub fn discard(&self, name: &str) -> Result<(), SandboxError> {
        check_name(name)?;
        if let Ok(i) = self.adopt(name) {
            if i.is_running() {
                return Err(SandboxError::Exists(name.to_owned()));
            }
            i.cleanup();
        }
        if let Some(h) = &self.cgroups {
            let _ = h.remove(&h.dirs(name));
        }
        network::release_name(&self.home, name);
        let _ = std::fs::remove_dir_all(self.instance_dir(name));
        Ok(())
    }

    /// Removes what dead instances left behind (after a crash of whoever started them).
    pub fn cleanup_stale(&self) -> usize {
        let mut n = 0;
        for name in self.list() {
            if let Ok(i) = self.adopt(&name)
                && !i.is_running()
            {
                i.cleanup();
                n += 1;
            }
        }
        n
    }
}

/// What is undone when a start fails halfway.
#[derive(Default)]
struct Undo {
    pid: Option<i32>,
    cgroups: Vec<PathBuf>,
    network: Option<Attachment>,
}

impl Undo {
    fn run(self, runtime: &Runtime) {
        if let Some(pid) = self.pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        }
        if let Some(h) = &runtime.cgroups {
            let _ = h.remove(&self.cgroups);
        }
        if let Some(a) = &self.network {
            network::release(&runtime.home, a);
        }
    }
}

struct ClonedInit {
    pid: i32,
    pidfd: OwnedFd,
    config_w: OwnedFd,
    status_r: OwnedFd,
    sync: Option<OwnedFd>,
}

/// A running (or finished) instance.
pub struct Instance {
    state: InstanceState,
    pidfd: OwnedFd,
    /// We are init's parent and must reap it.
    is_child: bool,
    dir: PathBuf,
    cgroups: Option<Arc<dyn Hierarchy>>,
    home: PathBuf,
    reaped: Option<ExitReport>,
    released: bool,
}

impl Instance {
    pub fn state(&self) -> &InstanceState {
        &self.state
    }
    pub fn name(&self) -> &str {
        &self.state.name
    }
    pub fn pid(&self) -> i32 {
        self.state.pid
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    pub fn is_running(&self) -> bool {
        self.reaped.is_none() && !poll_readable(&self.pidfd, 0)
    }

    /// Waits up to `timeout` (forever if `None`) for the instance to end; then cleans up.
    pub fn wait_timeout(&mut self, timeout: Option<Duration>) -> Option<ExitReport> {
        let report = self.reap_timeout(timeout)?;
        self.release();
        Some(report)
    }

    /// Waits for the instance to end and collects its exit, but keeps its cgroups
    /// and address until `release`: a caller that starts a replacement first takes
    /// the release off that path.
    pub fn reap(&mut self) -> ExitReport {
        loop {
            if let Some(r) = self.reap_timeout(None) {
                return r;
            }
        }
    }

    fn reap_timeout(&mut self, timeout: Option<Duration>) -> Option<ExitReport> {
        if let Some(r) = self.reaped {
            return Some(r);
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        if !poll_readable(&self.pidfd, ms) {
            return None;
        }
        let mut init_status = None;
        if self.is_child {
            let mut status = 0;
            // SAFETY: waitpid on our own child; `status` is a valid out pointer.
            if unsafe { libc::waitpid(self.state.pid, &mut status, 0) } == self.state.pid {
                init_status = Some(status);
            }
        }
        let record = read_exit_record(&self.dir);
        let (code, signal) = match (record, init_status) {
            (Some(r), _) => (r.code, r.signal),
            (None, Some(s)) if libc::WIFEXITED(s) => (Some(libc::WEXITSTATUS(s)), None),
            (None, Some(s)) if libc::WIFSIGNALED(s) => (None, Some(libc::WTERMSIG(s))),
            _ => (None, None),
        };
        crate::trace::mark("instance ended");
        let oom_killed = self.oom_kills() > 0;
        let report = ExitReport {
            code,
            signal,
            oom_killed,
        };
        self.reaped = Some(report);
        Some(report)
    }

    pub fn wait(&mut self) -> ExitReport {
        loop {
            if let Some(r) = self.wait_timeout(None) {
                return r;
            }
        }
    }

    /// SIGTERM (init passes it on), then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> ExitReport {
        if self.reaped.is_none() {
            self.signal(libc::SIGTERM);
            if let Some(r) = self.wait_timeout(Some(grace)) {
                return r;
            }
            self.signal(libc::SIGKILL);
        }
        self.wait()
    }

    /// Sends a signal to init through the pidfd (never to a recycled pid).
    pub fn signal(&self, sig: i32) {
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo and no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }

    /// The hierarchy the instance's cgroups were made in, if it has any.
    fn hierarchy(&self) -> Option<&dyn Hierarchy> {
        let h = self.cgroups.as_deref()?;
        (!self.state.cgroups.is_empty()
            && self.state.cgroup_version.as_deref() == Some(h.version()))
        .then_some(h)
    }

    fn oom_kills(&self) -> u64 {
        match self.hierarchy() {
            Some(h) => h.oom_kills(&self.state.cgroups),
            None => 0,
        }
    }

    /// The limits as the kernel holds them.
    pub fn limits(&self) -> Option<Limits> {
        self.hierarchy().map(|h| h.read_limits(&self.state.cgroups))
    }

    /// Removes the cgroups and the network attachment; keeps logs and exit status.
    /// Once, and only after the instance has ended.
    pub fn release(&mut self) {
        if self.reaped.is_none() || self.released {
            return;
        }
        self.released = true;
        crate::trace::mark("releasing");
        if let Some(h) = self.hierarchy() {
            let _ = h.remove(&self.state.cgroups);
        }
        crate::trace::mark("cgroups removed");
        if let Some(a) = &self.state.network {
            network::release(&self.home, a);
        }
        let _ = std::fs::remove_file(self.dir.join("state.json"));
        crate::trace::mark("released");
    }

    /// For an instance found dead: remove what it left.
    fn cleanup(mut self) {
        if self.reaped.is_none() {
            self.reaped = Some(ExitReport {
                code: None,
                signal: None,
                oom_killed: false,
            });
        }
        self.release();
    }
}

fn check_name(name: &str) -> Result<(), SandboxError> {
    if crate::process::valid_name(name) {
        Ok(())
    } else {
        Err(SandboxError::BadName(name.to_owned()))
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::Syscall(format!("pipe: {e}")))
}

/// Where init writes its exit record: a directory of its own.
const EXIT_DIR: &str = "exit";

/// The exit record init wrote. The directory is writable from inside the
/// sandbox (through init), so nothing in it is followed and the read is bounded.
/// An instance started by an older runtime wrote it beside state.json.
fn read_exit_record(dir: &Path) -> Option<ExitRecord> {
    use std::io::Read;
    let read = |d: &Path| -> Option<Vec<u8>> {
        let root = juice_image::confine::open_root(d).ok()?;
        let f = juice_image::confine::open_beneath(&root, Path::new(EXIT_FILE)).ok()?;
        let mut bytes = Vec::new();
        f.take(4096).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    };
    let bytes = read(&dir.join(EXIT_DIR)).or_else(|| read(dir))?;
    serde_json::from_slice(&bytes).ok()
}

/// A directory for init, as a detached mount of itself (`open_tree(OPEN_TREE_CLONE)`):
/// the same files, but `..` from its top stays there. The appliance can reach
/// PID 1's descriptors through /proc/1/fd if the host grants it CAP_SYS_PTRACE,
/// and a plain descriptor of a host directory would walk it out to the host
/// (runc's CVE-2024-21626). Made here, in the host's mount namespace: the
/// kernel clones only mounts of the caller's own namespace. Without the
/// privilege to make one (a rootless `juice run`), the plain directory is
/// passed: that user can reach nothing through it that it could not already.
fn open_detached(path: &Path) -> Result<OwnedFd, SandboxError> {
    use rustix::mount::{OpenTreeFlags, open_tree};
    match open_tree(
        rustix::fs::CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    ) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::PERM) => open_dir(path),
        Err(e) => Err(io_err("detach", path)(e.into())),
    }
}

fn open_dir(path: &Path) -> Result<OwnedFd, SandboxError> {
    let f = std::fs::File::open(path).map_err(io_err("open", path))?;
    Ok(OwnedFd::from(f))
}

fn high_dup(fd: &OwnedFd) -> Result<RawFd, SandboxError> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd to the lowest free number >= 10.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if r < 0 { Err(errno("dup")) } else { Ok(r) }
}

fn read_status(fd: OwnedFd, timeout: Duration) -> Result<String, SandboxError> {
    let deadline = Instant::now() + timeout;
    let mut file = std::fs::File::from(fd);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        let fd = file.as_raw_fd();
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r == 0 {
            return Err(SandboxError::Syscall(
                "juice-init did not report within 30 s".into(),
            ));
        }
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read the status of", Path::new("juice-init"))(e)),
        }
    }
    let text = String::from_utf8_lossy(&out).trim().to_owned();
    Ok(if text.is_empty() {
        "failed juice-init ended without reporting (is it executable?)".into()
    } else {
        text
    })
}

fn write_id_maps(pid: i32, map: &IdMap) -> Result<(), SandboxError> {
    let write = |file: &str, text: String| {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        std::fs::write(&path, text).map_err(io_err("write", &path))
    };
    if map.denies_setgroups() {
        write("setgroups", "deny".into())?;
    }
    write("uid_map", format!("0 {} {}\n", map.host_uid, map.size))?;
    write("gid_map", format!("0 {} {}\n", map.host_gid, map.size))
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past its last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["web", "web-1", "0a"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "a/b", "../x", "a_b", &"x".repeat(49)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn start_time_reads_our_own() {
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some_and(|t| t > 0));
        assert_eq!(start_time(me), start_time(me));
        assert!(start_time(i32::MAX).is_none());
    }
}
