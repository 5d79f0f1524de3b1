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

use juice_net::{self as network, Attachment, NetworkError};
use juice_runtime::process::{Process, now_unix_ms, poll_readable, record, start_time};
use juice_runtime::seccomp::{self, SeccompError};
use juice_runtime::{
    Backend, BackendError, ExitReport, Handle, IdMap, InstanceSpec, Limits, Meter, Usage, trace,
};

use crate::cgroup::{self, CgroupError, Hierarchy};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Io(#[from] juice_image::PathError),
    #[error("{0}")]
    Syscall(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Record(#[from] record::RecordError),
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
    #[error("cannot debug instance {name:?}: {reason}")]
    Debug { name: String, reason: String },
    #[error("the state of instance {name:?} is damaged: {reason}")]
    Damaged { name: String, reason: String },
}

fn io_err(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> SandboxError + use<> {
    let at = juice_image::PathError::at(action, path);
    move |source| SandboxError::Io(at(source))
}

fn errno(what: &str) -> SandboxError {
    SandboxError::Syscall(format!("{what}: {}", std::io::Error::last_os_error()))
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

    pub(crate) fn cgroups_arc(&self) -> Option<Arc<dyn Hierarchy>> {
        self.cgroups.clone()
    }

    /// Where `juice-init` is.
    pub(crate) fn init_path(&self) -> &std::ffi::CStr {
        &self.init
    }

    /// Starts an instance. On any failure everything created so far is removed again.
    pub fn spawn(&self, spec: &InstanceSpec) -> Result<Instance, SandboxError> {
        check_name(&spec.name)?;
        let dir = self.instance_dir(&spec.name);
        if let Ok(mut existing) = self.adopt(&spec.name) {
            if existing.is_running() {
                return Err(SandboxError::Exists(spec.name.clone()));
            }
            existing.abandon();
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
        spec: &InstanceSpec,
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

        trace::mark("files written");
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
            program: spec.program.clone(),
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
        trace::mark("config ready");

        let child = self.clone_init(spec, dir)?;
        undo.pid = Some(child.pid);
        trace::mark("cloned");
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
                if poll_readable(&child.pidfd, Some(Duration::from_millis(100)))
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
        trace::mark("init reported");
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
            started_unix_ms: now_unix_ms(),
        };
        record::write(dir, &state)?;
        *undo = Undo::default();
        Ok(Instance {
            state,
            process: Process::child(pid, child.pidfd),
            dir: dir.to_owned(),
            cgroups: self.cgroups.clone(),
            home: self.home.clone(),
        })
    }

    /// Sends init its config, makes the cgroups and the network while init
    /// builds the root, then lets it go.
    #[allow(clippy::too_many_arguments)]
    fn prepare_init(
        &self,
        spec: &InstanceSpec,
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
        trace::mark("cgroup, network ready");
        config_w
            .write_all(&[juice_init::GO])
            .map_err(io_err("start", Path::new("juice-init")))?;
        Ok((cgroup_version, cgroups))
    }

    /// Clones into new namespaces and execs juice-init there.
    fn clone_init(&self, spec: &InstanceSpec, dir: &Path) -> Result<ClonedInit, SandboxError> {
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
        // clone takes the C int flags as an unsigned long: the bits are the intent.
        #[allow(clippy::cast_sign_loss)]
        let clone_flags = (flags | libc::SIGCHLD) as libc::c_ulong;
        // SAFETY: clone with a null stack duplicates this thread like fork. The child runs
        // only async-signal-safe calls (dup2, prctl, read, execve, _exit) on data prepared
        // above, so it is sound even if other threads held locks at the time of the clone.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                clone_flags,
                std::ptr::null_mut::<libc::c_void>(),
                &mut pidfd as *mut RawFd,
                std::ptr::null_mut::<libc::c_void>(),
                0 as libc::c_ulong,
            )
        };
        if ret == 0 {
            // SAFETY: see above; in the child, only async-signal-safe calls follow.
            unsafe {
                for (target, fd) in (juice_init::CONFIG_FD..).zip(&sources) {
                    if libc::dup2(*fd, target) < 0 {
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
        let pid = i32::try_from(ret)
            .map_err(|_| SandboxError::Syscall(format!("clone returned {ret}, which is no pid")))?;
        Ok(ClonedInit {
            pid,
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
        let state: InstanceState = record::read(&dir).map_err(|e| match e {
            record::RecordError::NotFound(_) => SandboxError::NotFound(name.to_owned()),
            e => SandboxError::Damaged {
                name: name.to_owned(),
                reason: e.to_string(),
            },
        })?;
        let process = Process::found(state.pid, state.start_time)
            .map_err(|e| SandboxError::Syscall(format!("find instance {name:?} again: {e}")))?;
        Ok(Instance {
            state,
            process,
            dir,
            cgroups: self.cgroups.clone(),
            home: self.home.clone(),
        })
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
    process: Process,
    dir: PathBuf,
    cgroups: Option<Arc<dyn Hierarchy>>,
    home: PathBuf,
}

impl Instance {
    pub fn state(&self) -> &InstanceState {
        &self.state
    }
    pub fn name(&self) -> &str {
        &self.state.name
    }
    pub fn dir(&self) -> &Path {
        &self.dir
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
}

/// Reads a sandbox's use from its cgroups and the host end of its veth.
struct SandboxMeter {
    cgroups: Option<(Arc<dyn Hierarchy>, Vec<PathBuf>)>,
    veth: Option<String>,
}

impl Meter for SandboxMeter {
    fn read(&self) -> Usage {
        let mut usage = Usage::default();
        if let Some((h, dirs)) = &self.cgroups {
            let now = h.usage(dirs);
            let limits = h.read_limits(dirs);
            usage.cpu_ns = now.cpu_ns;
            usage.memory_bytes = now.memory_bytes;
            usage.pids = now.pids;
            usage.memory_limit_bytes = limits.memory;
            usage.pids_limit = limits.pids.map(u64::from);
        }
        usage.net = self
            .veth
            .as_deref()
            .and_then(|v| juice_runtime::usage::interface_bytes(v).ok());
        usage
    }
}

impl Handle for Instance {
    fn process(&self) -> &Process {
        &self.process
    }
    fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Init's exit record says how the appliance ended; without one (init itself
    /// was killed), init's own status.
    fn collect(&mut self, status: Option<nix::sys::wait::WaitStatus>) -> ExitReport {
        use nix::sys::wait::WaitStatus;
        let (code, signal) = match (read_exit_record(&self.dir), status) {
            (Some(r), _) => (r.code, r.signal),
            (None, Some(WaitStatus::Exited(_, c))) => (Some(c), None),
            (None, Some(WaitStatus::Signaled(_, s, _))) => (None, Some(s as i32)),
            _ => (None, None),
        };
        trace::mark("instance ended");
        ExitReport {
            code,
            signal,
            oom_killed: self.oom_kills() > 0,
        }
    }

    /// Removes the cgroups and the network attachment; keeps logs and exit status.
    fn free(&mut self) {
        trace::mark("releasing");
        if let Some(h) = self.hierarchy() {
            let _ = h.remove(&self.state.cgroups);
        }
        trace::mark("cgroups removed");
        if let Some(a) = &self.state.network {
            network::release(&self.home, a);
        }
        record::remove(&self.dir);
        trace::mark("released");
    }

    /// SIGTERM (init passes it on), then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) -> ExitReport {
        if self.process.reaped().is_none() {
            self.signal(libc::SIGTERM);
            if let Some(r) = self.wait_timeout(grace) {
                return r;
            }
            self.signal(libc::SIGKILL);
        }
        self.wait()
    }

    fn address(&self) -> Option<std::net::Ipv4Addr> {
        self.state.network.as_ref().map(|a| a.address)
    }

    fn started_unix_ms(&self) -> u64 {
        self.state.started_unix_ms
    }

    fn meter(&self) -> Option<Arc<dyn Meter>> {
        let cgroups = self.cgroups.clone().filter(|_| self.hierarchy().is_some());
        Some(Arc::new(SandboxMeter {
            cgroups: cgroups.map(|h| (h, self.state.cgroups.clone())),
            veth: self.state.network.as_ref().map(|a| a.veth.clone()),
        }))
    }
}

impl From<SandboxError> for BackendError {
    fn from(e: SandboxError) -> BackendError {
        match e {
            SandboxError::BadName(n) => BackendError::BadName(n),
            SandboxError::Exists(n) => BackendError::Exists(n),
            SandboxError::NotFound(n) => BackendError::NotFound(n),
            e @ SandboxError::Debug { .. } => BackendError::Refused(Box::new(e)),
            e @ SandboxError::NoInit(_) => BackendError::Unavailable(Box::new(e)),
            e => BackendError::Failed(Box::new(e)),
        }
    }
}

impl Backend for Runtime {
    fn spawn(&self, spec: &InstanceSpec) -> Result<Box<dyn Handle>, BackendError> {
        Ok(Box::new(Runtime::spawn(self, spec)?))
    }
    fn adopt(&self, name: &str) -> Result<Box<dyn Handle>, BackendError> {
        Ok(Box::new(Runtime::adopt(self, name)?))
    }
    fn list(&self) -> Vec<String> {
        record::list(&self.home.join("instances"))
    }
    fn log_path(&self, name: &str) -> PathBuf {
        Runtime::log_path(self, name)
    }
    fn debug(
        &self,
        name: &str,
        spec: &juice_runtime::DebugSpec,
    ) -> Result<juice_runtime::DebugSession, BackendError> {
        Ok(Runtime::debug(self, name, spec)?)
    }
    fn sweep(&self) {
        crate::debug::sweep(self);
    }
    /// The cgroups and the address are found by name: a start cut short has no record.
    fn forget(&self, name: &str) {
        if let Some(h) = &self.cgroups {
            let _ = h.remove(&h.dirs(name));
        }
        network::release_name(&self.home, name);
        let _ = std::fs::remove_dir_all(self.instance_dir(name));
    }
}

fn check_name(name: &str) -> Result<(), SandboxError> {
    if juice_runtime::process::valid_name(name) {
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
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
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
}
