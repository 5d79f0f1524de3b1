//! The agent: applies site files, and a reconciler that keeps every group at
//! its declared size and revision, replaces dead instances, gates rollouts on
//! health and rolls back by itself.
//!
//! The reconciler is event-driven: it sleeps in `poll` on every instance's
//! pidfd and on a wake-up eventfd (apply, delete, rollback), with a periodic
//! pass as a safety net and for health transitions.
//!
//! Each pass reads the world (which instances run, their health, what ended)
//! into the summaries the [`planner`] takes, and carries out the
//! steps it returns: the rules live there, the I/O here. The time comes from the
//! agent's [`Clock`], so tests move it instead of sleeping. The views queries
//! show are in `views`, the mapping from a manifest to a sandbox in `spec`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use juice_image::appliance::ApplianceConfig;
use juice_image::build::{BuildOptions, build};
use juice_image::manifest::HealthCheck;
use juice_image::store::Store;
use juice_image::unpack::materialise;
use juice_net::publish::{self, Published};
use juice_runtime::{InstanceSpec, NetworkSpec};
use juice_sandbox::Runtime;
use rustix::event::{EventfdFlags, eventfd};

use crate::backend::{Backend, Handle};

use crate::health::Prober;
use crate::planner::{self, Ended, HealthSummary, InstanceSummary, Step, StopReason};
use crate::site::{GroupName, GroupSpec, Isolation, Site};
pub use crate::state::{Clock, system_clock};
use crate::state::{
    GroupRecord, InstanceRecord, Revision, Rollout, State, StateError, Template, now_ms,
};

mod debug;
#[cfg(test)]
mod reconciler_tests;
mod views;

pub use debug::{DEFAULT_TOOLBOX, DebugRequest, OpenSession};

pub use views::{
    Action, Change, GroupDescription, GroupStats, GroupStatus, GroupView, InstanceHealth,
    InstanceStats, InstanceView, Stats, UnknownStatus,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("group {group}: {reason}")]
    Group { group: String, reason: String },
    #[error("no group {0:?}")]
    NoGroup(String),
    #[error("no instance {0:?}")]
    NoInstance(String),
    #[error("cannot debug instance {instance:?}: {reason}")]
    Debug { instance: String, reason: String },
    /// The trust policy refuses the toolbox.
    #[error("cannot debug instance {instance:?}: {reason}")]
    DebugRefused { instance: String, reason: String },
    #[error("group {group}: cannot start an instance of revision {revision}: {source}")]
    Start {
        group: String,
        revision: u64,
        #[source]
        source: juice_runtime::BackendError,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Os(#[from] crate::os::OsError),
}

fn group_err(group: &str, reason: impl std::fmt::Display) -> AgentError {
    AgentError::Group {
        group: group.to_owned(),
        reason: reason.to_string(),
    }
}

/// Which of the host's groups an apply manages; it neither changes nor deletes the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The operator's groups (`juice apply`, `--site`, `juice up`).
    Local,
    /// The fleet's groups, named `fleet-...`.
    Fleet,
}

/// What [`Agent::apply_fleet`] did: the changes, and the groups it could not apply (left
/// as they were), each with why.
#[derive(Debug, Clone, Default)]
pub struct FleetApplied {
    pub changes: Vec<Change>,
    pub failed: BTreeMap<GroupName, String>,
}

/// An instance the agent holds.
struct Live {
    instance: Box<dyn Handle>,
    group: String,
    revision: u64,
    isolation: Isolation,
    address: Option<Ipv4Addr>,
    prober: Prober,
    /// When this daemon started or adopted it, on the agent's clock.
    started_ms: u64,
    /// Started by an earlier daemon: until its first probe, it keeps the place it
    /// had in the published ports.
    adopted: bool,
}

pub struct Agent {
    home: PathBuf,
    store: Store,
    sandbox: Box<dyn Backend>,
    /// Made on first use, so a host without QEMU or a guest kernel still runs sandboxes
    /// (and a failure is not remembered: installing QEMU later needs no restart).
    microvm: std::sync::OnceLock<Box<dyn Backend>>,
    /// Held while the microVM runtime is made: apply makes it without the world
    /// lock, and its clean-up of stale VMs must not race a second one.
    microvm_init: Mutex<()>,
    state: State,
    /// Serialises apply, delete, rollback and reconcile passes.
    world: Mutex<World>,
    /// What queries read (the world's `views`).
    views: Views,
    /// Frees ended instances' cgroups and addresses off the path to their replacement.
    releaser: crate::releaser::Releaser,
    wake: OwnedFd,
    /// The reconciler's time in milliseconds (the system clock; tests move a fake one).
    clock: Clock,
    pub metrics: crate::metrics::Metrics,
    /// The host's own OS versions, when it runs Juice OS.
    os: Option<Arc<crate::os::OsControl>>,
}

/// What a query shows of a live instance: its fixed facts and a handle on its
/// health. Kept beside the world, so that no query waits for a reconcile pass
/// (a start, a stop's grace period, a microVM boot).
#[derive(Clone)]
struct Facts {
    group: String,
    revision: u64,
    pid: i32,
    address: Option<Ipv4Addr>,
    started_unix_ms: u64,
    health: Arc<Mutex<crate::health::Health>>,
    /// Being stopped: shown until it is gone.
    stopping: bool,
    isolation: Isolation,
    /// Where its resource use is read from, so `stats` reads it without the world lock.
    meter: Option<Arc<dyn juice_runtime::Meter>>,
}

type Views = Arc<Mutex<BTreeMap<String, Facts>>>;

#[derive(Default)]
struct World {
    live: BTreeMap<String, Live>,
    /// The queries' copy of `live`, changed with it.
    views: Views,
    /// Instances that ended, per group (revision, why), not yet counted by a pass.
    ended: BTreeMap<String, Vec<Ended>>,
    /// The groups as this pass read them, for withdrawing an instance from the
    /// published ports before it is stopped.
    groups: BTreeMap<String, GroupRecord>,
    /// Ended instances whose cgroups and addresses are freed once this pass has
    /// started their replacements (the release and a start take the same
    /// address lock and nftables transactions: one would wait for the other).
    to_release: Vec<Box<dyn Handle>>,
    /// What this daemon's groups publish as the kernel has it (`None` until
    /// read back from the home at the first pass).
    published: Option<BTreeMap<String, Published>>,
    /// The last error updating them, reported once.
    publish_error: Option<String>,
    /// Instances in the database whose backend cannot be made now (reported once each).
    unadoptable: std::collections::BTreeSet<String>,
}

impl World {
    fn insert(&mut self, name: String, l: Live) {
        let facts = Facts {
            group: l.group.clone(),
            revision: l.revision,
            pid: l.instance.pid(),
            address: l.address,
            started_unix_ms: l.instance.started_unix_ms(),
            health: l.prober.health.clone(),
            stopping: false,
            isolation: l.isolation,
            meter: l.instance.meter(),
        };
        lock(&self.views).insert(name.clone(), facts);
        self.live.insert(name, l);
    }

    fn remove(&mut self, name: &str) -> Option<Live> {
        lock(&self.views).remove(name);
        self.live.remove(name)
    }

    /// Takes an instance out to stop it; the queries still show it, as stopping,
    /// until `stopped`.
    fn take_to_stop(&mut self, name: &str) -> Option<Live> {
        if let Some(f) = lock(&self.views).get_mut(name) {
            f.stopping = true;
        }
        self.live.remove(name)
    }

    fn stopped(&mut self, name: &str) {
        lock(&self.views).remove(name);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    pub fn open(home: &Path) -> Result<Arc<Agent>, AgentError> {
        let store = Store::open(home).map_err(|e| AgentError::Setup(e.to_string()))?;
        let runtime = Runtime::new(home).map_err(|e| AgentError::Setup(e.to_string()))?;
        // What ended instances left (an earlier daemon killed before it freed them).
        runtime.cleanup_stale();
        crate::releaser::prune_ended(home, crate::releaser::KEEP_ENDED);
        let sandbox: Box<dyn Backend> = Box::new(runtime);
        Agent::with_sandbox(home, store, sandbox, system_clock())
    }

    /// An agent whose sandbox backend is `sandbox` and whose reconciler reads the
    /// time from `clock` (tests use fakes for both).
    pub fn with_sandbox(
        home: &Path,
        store: Store,
        sandbox: Box<dyn Backend>,
        clock: Clock,
    ) -> Result<Arc<Agent>, AgentError> {
        let state = State::open(&home.join("agent.redb"))?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| AgentError::Setup(format!("eventfd: {e}")))?;
        let world = World::default();
        let views = world.views.clone();
        Ok(Arc::new(Agent {
            home: home.to_owned(),
            store,
            sandbox,
            microvm: std::sync::OnceLock::new(),
            microvm_init: Mutex::new(()),
            state,
            world: Mutex::new(world),
            views,
            releaser: crate::releaser::Releaser::start(home),
            wake,
            clock,
            metrics: crate::metrics::Metrics::new(),
            os: crate::os::OsControl::detect(home).map(Arc::new),
        }))
    }

    /// The reconciler's time.
    fn now(&self) -> u64 {
        (self.clock)()
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The host's OS versions, when this daemon runs on Juice OS.
    pub fn os(&self) -> Option<&Arc<crate::os::OsControl>> {
        self.os.as_ref()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }

    /// The backend for an isolation kind.
    fn backend(&self, isolation: Isolation) -> Result<&dyn Backend, AgentError> {
        match isolation {
            Isolation::Sandbox => Ok(&*self.sandbox),
            Isolation::Microvm => {
                let _init = self.microvm_init.lock().unwrap_or_else(|e| e.into_inner());
                if self.microvm.get().is_none() {
                    let vms = juice_microvm::Runtime::new(&self.home)
                        .map_err(|e| AgentError::Setup(format!("isolation \"microvm\": {e}")))?;
                    vms.cleanup_stale();
                    // Another caller may have won the race; either runtime is the same.
                    let _ = self.microvm.set(Box::new(vms));
                }
                self.microvm
                    .get()
                    .map(|b| &**b)
                    .ok_or_else(|| AgentError::Setup("isolation \"microvm\" is unavailable".into()))
            }
        }
    }

    /// Wakes the reconciler now.
    pub fn nudge(&self) {
        wake(&self.wake);
    }

    /// A callback that wakes the reconciler, for health probers.
    fn waker(&self) -> Arc<dyn Fn() + Send + Sync> {
        // A copy of the eventfd owned by the closure; if none can be made (no
        // descriptors left), the prober's wake is lost and the next tick catches up.
        match self.wake.try_clone() {
            Ok(fd) => Arc::new(move || wake(&fd)),
            Err(_) => Arc::new(|| {}),
        }
    }

    fn event(&self, group: Option<&str>, instance: Option<&str>, message: &str) {
        let _ = self.state.event(group, instance, message);
    }

    /// Resolves an image reference to a digest: a local name or digest, a directory
    /// with a juice.toml (built now), or a registry reference (pulled if missing).
    /// The image must pass this host's trust policy.
    fn resolve_image(&self, group: &str, image: &str) -> Result<String, AgentError> {
        let path = Path::new(image);
        let looks_like_path =
            image.starts_with('/') || image.starts_with("./") || image.starts_with("../");
        let reference = if looks_like_path {
            let dir = if path.is_dir() {
                path.to_owned()
            } else {
                path.parent().unwrap_or(Path::new(".")).to_owned()
            };
            let built = build(&self.store, &dir, &BuildOptions::default())
                .map_err(|e| group_err(group, format!("building {image}: {e}")))?;
            built.reference
        } else {
            if juice_registry::reference::looks_remote(image) && self.store.resolve(image).is_err()
            {
                // The pull checks the policy before any layer moves; what it got is pinned by digest.
                juice_registry::remote::RemoteOptions::from_env(self.store.home())
                    .and_then(|o| juice_registry::remote::Remote::new(&o))
                    .and_then(|r| r.pull(&self.store, image))
                    .map_err(|e| group_err(group, format!("pulling {image}: {e}")))?
                    .digest
            } else {
                image.to_owned()
            }
        };
        // Resolved once: the digest the policy admitted is the one the group runs.
        let admitted = juice_registry::policy::admit(&self.store, &reference)
            .map_err(|e| group_err(group, e))?;
        Ok(admitted.digest.to_string())
    }

    /// What applying `site` would change, and (if `apply`) does it. The site holds the
    /// operator's groups: the fleet's (named `fleet-...`, see [`crate::site::FLEET_PREFIX`])
    /// are neither changed nor deleted by it, and a site may not name one.
    pub fn apply(&self, site: &Site, apply: bool) -> Result<Vec<Change>, AgentError> {
        if let Some(name) = site.group.keys().find(|n| n.is_fleet()) {
            return Err(group_err(
                name.as_str(),
                format!(
                    "names starting with `{}` belong to groups the fleet assigns to this host",
                    crate::site::FLEET_PREFIX
                ),
            ));
        }
        let (changes, _) = self.apply_in(site, apply, Scope::Local)?;
        Ok(changes)
    }

    /// Makes this host's fleet groups (named `fleet-...`) exactly those of `site`, leaving
    /// the operator's groups alone. A group whose image cannot be had (not built here, a
    /// pull refused) is left as it is and returned with why; the others are applied.
    pub fn apply_fleet(&self, site: &Site) -> Result<FleetApplied, AgentError> {
        if let Some(name) = site.group.keys().find(|n| !n.is_fleet()) {
            return Err(group_err(
                name.as_str(),
                format!(
                    "a fleet group's name starts with `{}`",
                    crate::site::FLEET_PREFIX
                ),
            ));
        }
        let (changes, failed) = self.apply_in(site, true, Scope::Fleet)?;
        Ok(FleetApplied { changes, failed })
    }

    fn apply_in(
        &self,
        site: &Site,
        apply: bool,
        scope: Scope,
    ) -> Result<(Vec<Change>, BTreeMap<GroupName, String>), AgentError> {
        // The slow work first, without the lock: builds, pulls, unpacking and the
        // microVM probe boot. The reconciler and every query go on meanwhile, and
        // get the CPU first: this thread runs at a lower priority until it is done.
        let background = Background::lower();
        let mut digests = Vec::new();
        let mut failed = BTreeMap::new();
        let mut site = std::borrow::Cow::Borrowed(site);
        for (name, spec) in &site.group {
            let digest = match (self.prepare(name, spec), scope) {
                (Ok(d), _) => d,
                (Err(e), Scope::Fleet) => {
                    failed.insert(name.clone(), e.to_string());
                    continue;
                }
                (Err(e), Scope::Local) => return Err(e),
            };
            digests.push(digest);
        }
        drop(background);
        if !failed.is_empty() {
            // Applied without them; they are kept as they are (not deleted) below.
            let mut rest = site.into_owned();
            rest.group.retain(|n, _| !failed.contains_key(n));
            site = std::borrow::Cow::Owned(rest);
        }
        let _w = self.world();
        let mut changes = Vec::new();
        let mut updates = Vec::new();
        for ((name, spec), digest) in site.group.iter().zip(digests) {
            let template = Template {
                image: spec.image.clone(),
                digest,
                isolation: spec.isolation,
                publish: spec.publish.clone(),
                links: spec.links.clone(),
                resources: spec.resources.clone(),
            };
            let (change, record) = self.plan_group(name, spec, template)?;
            changes.extend(change);
            if let Some(r) = record {
                updates.push(r);
            }
        }
        let mut deletes = Vec::new();
        for g in self.state.groups()? {
            let mine = match scope {
                Scope::Local => !g.name.is_fleet(),
                Scope::Fleet => g.name.is_fleet(),
            };
            if mine && !site.group.contains_key(&g.name) && !failed.contains_key(&g.name) {
                changes.push(Change {
                    group: g.name.to_string(),
                    action: Action::Delete,
                    reason: match scope {
                        Scope::Local => "not in the site file".into(),
                        Scope::Fleet => "no longer assigned to this host".into(),
                    },
                });
                deletes.push(g.name.to_string());
            }
        }
        if apply {
            for r in &updates {
                self.state.put_group(r)?;
            }
            for d in &deletes {
                self.state.delete_group(d)?;
            }
            for c in &changes {
                if c.action != Action::Unchanged {
                    self.event(
                        Some(&c.group),
                        None,
                        &format!("apply: {} ({})", c.action, c.reason),
                    );
                }
            }
            self.nudge();
        }
        Ok((changes, failed))
    }

    /// A group's image resolved (built, pulled, admitted) and unpacked, and what its
    /// isolation needs checked: the slow part of an apply, done without the lock.
    fn prepare(&self, name: &GroupName, spec: &GroupSpec) -> Result<String, AgentError> {
        let digest = self.resolve_image(name.as_str(), &spec.image)?;
        // Unpacked now, the reconciler's start finds it cached.
        materialise(&self.store, &digest).map_err(|e| group_err(name.as_str(), e))?;
        if spec.isolation == Isolation::Microvm {
            // What the microVM backend needs, in one sentence naming the packages,
            // before the runtime is made (which may boot a probe guest).
            crate::doctor::require(crate::doctor::microvm(&crate::doctor::Host::current(
                &self.home,
            )))
            .map_err(|e| {
                group_err(
                    name.as_str(),
                    format!("isolation \"microvm\" cannot run on this host: {e}"),
                )
            })?;
            self.backend(Isolation::Microvm)
                .map_err(|e| group_err(name.as_str(), e))?;
            let volumes = self
                .appliance(&digest)
                .map(|a| a.manifest.volumes.len())
                .unwrap_or(0);
            if volumes > 0 && spec.size > 1 {
                return Err(group_err(
                    name.as_str(),
                    "size: the image declares volumes, and under isolation \"microvm\" a volume is a disk that one VM uses at a time; use size = 1 or isolation = \"sandbox\"",
                ));
            }
        }
        Ok(digest)
    }

    fn plan_group(
        &self,
        name: &GroupName,
        spec: &GroupSpec,
        template: Template,
    ) -> Result<(Vec<Change>, Option<GroupRecord>), AgentError> {
        let change = |action: Action, reason: String| Change {
            group: name.to_string(),
            action,
            reason,
        };
        let Some(mut g) = self.state.group(name.as_str())? else {
            let record = GroupRecord {
                name: name.clone(),
                size: spec.size,
                update: spec.update.clone(),
                revisions: vec![Revision {
                    number: 1,
                    template: template.clone(),
                    created_ms: now_ms(),
                }],
                current: 1,
                last_good: None,
                rollout: Rollout::Progressing {
                    from: None,
                    to: 1,
                    since_ms: now_ms(),
                },
                restarts: 0,
                failures: 0,
                backoff_until_ms: 0,
                start_failures: 0,
                critical: spec.critical,
            };
            let c = change(
                Action::Create,
                format!(
                    "{} instance(s) of {} ({})",
                    spec.size,
                    template.image,
                    short(&template.digest)
                ),
            );
            return Ok((vec![c], Some(record)));
        };
        let mut changes = Vec::new();
        let current = g.current_revision().map(|r| r.template.clone());
        if current.as_ref() != Some(&template) {
            let reason = match &current {
                Some(c) if c.digest != template.digest => format!(
                    "image changed: {} ({}) -> {} ({})",
                    c.image,
                    short(&c.digest),
                    template.image,
                    short(&template.digest)
                ),
                Some(c) if c.publish != template.publish => "published ports changed".to_owned(),
                Some(c) if c.links != template.links => "links changed".to_owned(),
                _ => "template changed".to_owned(),
            };
            let n = g.next_number();
            g.revisions.push(Revision {
                number: n,
                template,
                created_ms: now_ms(),
            });
            g.start_rollout(n);
            g.prune();
            changes.push(change(
                Action::Replace,
                format!(
                    "revision {n}: {reason}; instances replaced in batches of {} after {} healthy",
                    spec.update.max_unavailable,
                    humantime::format_duration(spec.update.health_gate)
                ),
            ));
        } else if matches!(g.rollout, Rollout::Paused { .. }) {
            // Applying again is how a paused rollout is retried.
            g.rollout = Rollout::Progressing {
                from: g.last_good,
                to: g.current,
                since_ms: now_ms(),
            };
            changes.push(change(
                Action::Replace,
                format!("retry the paused rollout of revision {}", g.current),
            ));
        }
        if g.size != spec.size {
            changes.push(change(
                Action::Scale,
                format!("{} -> {} instances", g.size, spec.size),
            ));
            g.size = spec.size;
        }
        if g.update != spec.update {
            changes.push(change(Action::Update, "update policy changed".into()));
            g.update = spec.update.clone();
        }
        if g.critical != spec.critical {
            let what = if spec.critical { "now" } else { "no longer" };
            changes.push(change(
                Action::Update,
                format!("{what} critical to an OS trial"),
            ));
            g.critical = spec.critical;
        }
        if changes.is_empty() {
            return Ok((
                vec![change(Action::Unchanged, "already as declared".into())],
                None,
            ));
        }
        Ok((changes, Some(g)))
    }

    /// Deletes a group: its instances are stopped by the next pass.
    pub fn delete(&self, name: &str) -> Result<(), AgentError> {
        let _w = self.world();
        if self.state.group(name)?.is_none() {
            return Err(AgentError::NoGroup(name.to_owned()));
        }
        self.state.delete_group(name)?;
        self.event(Some(name), None, "deleted");
        self.nudge();
        Ok(())
    }

    /// Makes revision `to` (default: the one before the current) the current one.
    pub fn rollback(&self, name: &str, to: Option<u64>) -> Result<u64, AgentError> {
        let _w = self.world();
        let mut g = self
            .state
            .group(name)?
            .ok_or_else(|| AgentError::NoGroup(name.to_owned()))?;
        let target = match to {
            Some(n) => n,
            None => g
                .revisions
                .iter()
                .map(|r| r.number)
                .filter(|n| *n < g.current)
                .max()
                .ok_or_else(|| group_err(name, "there is no earlier revision to roll back to"))?,
        };
        if g.revision(target).is_none() {
            let kept: Vec<String> = g.revisions.iter().map(|r| r.number.to_string()).collect();
            return Err(group_err(
                name,
                format!("revision {target} is not kept (kept: {})", kept.join(", ")),
            ));
        }
        if target == g.current {
            return Err(group_err(
                name,
                format!("revision {target} is already the current one"),
            ));
        }
        g.start_rollout(target);
        self.state.put_group(&g)?;
        self.event(
            Some(name),
            None,
            &format!("rollback to revision {target} requested"),
        );
        self.nudge();
        Ok(target)
    }

    /// Runs the reconciler until the process ends.
    pub fn run_reconciler(self: &Arc<Agent>) {
        loop {
            if let Err(e) = self.reconcile() {
                self.event(None, None, &format!("reconcile failed: {e}"));
            }
            self.sleep_until_something_happens(Duration::from_millis(250));
        }
    }

    fn sleep_until_something_happens(&self, at_most: Duration) {
        let mut fds = vec![libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        {
            let w = self.world();
            for l in w.live.values() {
                fds.push(libc::pollfd {
                    fd: l.instance.wait_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // The fds stay valid: instances are only dropped by the reconciler, which is us.
        }
        // SAFETY: a valid array of pollfds.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                i32::try_from(at_most.as_millis()).unwrap_or(i32::MAX),
            )
        };
        // Drain our non-blocking eventfd; EAGAIN means nobody woke us.
        let _ = rustix::io::read(&self.wake, &mut [0u8; 8]);
    }

    /// Instances in the database this daemon does not hold: started by an earlier one.
    fn adopt_into(
        &self,
        w: &mut World,
        groups: &BTreeMap<String, GroupRecord>,
    ) -> Result<(), AgentError> {
        for rec in self.state.instances()? {
            if w.live.contains_key(&rec.name) {
                continue;
            }
            let backend = match self.backend(rec.isolation) {
                Ok(b) => b,
                Err(e) => {
                    // QEMU or the guest kernel went away while the daemon was down: the
                    // record stays (its VM may still run) and adoption is tried again
                    // each pass; the other groups go on.
                    if w.unadoptable.insert(rec.name.clone()) {
                        self.event(
                            Some(rec.group.as_str()),
                            Some(&rec.name),
                            &format!("cannot adopt {} yet: {e}", rec.name),
                        );
                    }
                    continue;
                }
            };
            w.unadoptable.remove(&rec.name);
            match backend.adopt(&rec.name) {
                Ok(instance) if instance.is_running() => {
                    let live = self.live_for(instance, &rec, groups);
                    self.event(
                        Some(rec.group.as_str()),
                        Some(&rec.name),
                        &format!("adopted running instance {}", rec.name),
                    );
                    w.insert(rec.name.clone(), live);
                }
                other => {
                    if let Ok(mut i) = other {
                        let _ = i.wait_timeout(Duration::ZERO);
                    }
                    // Also what a start cut short by a killed daemon made before its
                    // state record: cgroups, an address, a directory.
                    if let Err(e) = backend.discard(&rec.name) {
                        self.event(
                            Some(rec.group.as_str()),
                            Some(&rec.name),
                            &format!("cannot remove what {} left: {e}", rec.name),
                        );
                    }
                    self.state.delete_instance(&rec.name)?;
                    self.event(
                        Some(rec.group.as_str()),
                        Some(&rec.name),
                        &format!("instance {} was gone", rec.name),
                    );
                    w.ended
                        .entry(rec.group.to_string())
                        .or_default()
                        .push(Ended {
                            revision: rec.revision,
                            why: "gone while the daemon was away".into(),
                        });
                }
            }
        }
        Ok(())
    }

    /// Takes over the instances an earlier daemon started, before the API
    /// answers: until then a query would show none of them.
    pub fn adopt(&self) -> Result<(), AgentError> {
        let mut w = self.world();
        let groups = self.group_map()?;
        self.adopt_into(&mut w, &groups)
    }

    fn group_map(&self) -> Result<BTreeMap<String, GroupRecord>, AgentError> {
        Ok(self
            .state
            .groups()?
            .into_iter()
            .map(|g| (g.name.to_string(), g))
            .collect())
    }

    /// One pass: reap, adopt, then converge every group.
    pub fn reconcile(&self) -> Result<(), AgentError> {
        let mut w = self.world();
        let groups = self.group_map()?;
        w.groups = groups.clone();

        // Instances that ended.
        let dead: Vec<String> = w
            .live
            .iter()
            .filter(|(_, l)| !l.instance.is_running())
            .map(|(n, _)| n.clone())
            .collect();
        for name in dead {
            if let Some(mut l) = w.remove(&name) {
                // Its cgroups and address are freed after the replacement has started.
                let report = l.instance.reap();
                w.to_release.push(l.instance);
                self.state.instance_ended(
                    &l.group,
                    &name,
                    &format!("instance {name} ended: {report}"),
                )?;
                w.ended.entry(l.group.clone()).or_default().push(Ended {
                    revision: l.revision,
                    why: report.to_string(),
                });
            }
        }
        self.adopt_into(&mut w, &groups)?;
        let ended = std::mem::take(&mut w.ended);
        // Instances of deleted groups.
        let orphans: Vec<String> = w
            .live
            .iter()
            .filter(|(_, l)| !groups.contains_key(&l.group))
            .map(|(n, _)| n.clone())
            .collect();
        for name in orphans {
            self.stop_instance(&mut w, &name, StopReason::GroupDeleted.as_str())?;
        }
        for g in groups.values() {
            let mut g = g.clone();
            let before = g.clone();
            let ended_here = ended.get(g.name.as_str()).cloned().unwrap_or_default();
            self.converge(&mut w, &mut g, &ended_here)?;
            if g != before {
                self.state.put_group(&g)?;
            }
        }
        self.update_publishers(&mut w);
        for h in std::mem::take(&mut w.to_release) {
            self.releaser.release(h);
        }
        for l in w.live.values_mut() {
            l.instance.maintain();
        }
        Ok(())
    }

    fn live_for(
        &self,
        instance: Box<dyn Handle>,
        rec: &InstanceRecord,
        groups: &BTreeMap<String, GroupRecord>,
    ) -> Live {
        let address = instance.address();
        let check = groups
            .get(rec.group.as_str())
            .and_then(|g| g.revision(rec.revision))
            .and_then(|r| self.appliance(&r.template.digest).ok())
            .and_then(|a| a.manifest.health);
        let prober = self.prober(&*instance, check);
        Live {
            instance,
            group: rec.group.to_string(),
            revision: rec.revision,
            isolation: rec.isolation,
            address,
            prober,
            started_ms: self.now(),
            adopted: true,
        }
    }

    /// The instance's health: as it reports it (the fake backend), else probed with `check`.
    fn prober(&self, instance: &dyn Handle, check: Option<HealthCheck>) -> Prober {
        match instance.health() {
            Some(health) => Prober::reported(health),
            None => Prober::start(
                check,
                instance.address(),
                self.waker(),
                self.metrics.probe_seconds.clone(),
                self.clock.clone(),
            ),
        }
    }

    fn appliance(&self, digest: &str) -> Result<ApplianceConfig, String> {
        let image = self.store.image(digest).map_err(|e| e.to_string())?;
        image
            .appliance
            .ok_or_else(|| format!("{digest} is not a Juice appliance"))
    }

    fn start_instance(
        &self,
        w: &mut World,
        g: &GroupRecord,
        revision: u64,
    ) -> Result<(), AgentError> {
        let name = g.name.as_str();
        let rev = g
            .revision(revision)
            .ok_or_else(|| group_err(name, format!("revision {revision} is missing")))?;
        // First, so that a backend that cannot be made leaves no instance record behind.
        let backend = self
            .backend(rev.template.isolation)
            .map_err(|e| group_err(name, e))?;
        let rootfs =
            materialise(&self.store, &rev.template.digest).map_err(|e| group_err(name, e))?;
        let appliance = rootfs
            .appliance
            .clone()
            .ok_or_else(|| group_err(name, "the image is not a Juice appliance"))?;
        // Two starts in one millisecond, or by two daemons, must not share a name:
        // mix the pid and a counter into the bits that are kept.
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nonce = now_ms()
            ^ u64::from(std::process::id()).wrapping_mul(0x9e37_79b9)
            ^ STARTS
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .wrapping_mul(0x85eb_ca6b);
        let instance_name = format!("{name}-r{revision}-{:04x}", nonce & 0xffff);
        // Read at each start, so an operator's change applies to the next instance.
        let host = crate::limits::HostLimits::load(&self.home).map_err(|e| group_err(name, e))?;
        let mut spec = InstanceSpec::for_appliance(
            &appliance,
            &rootfs.path,
            &instance_name,
            &self.home.join("volumes").join(name),
            &host,
        );
        if let Some(o) = &rev.template.resources {
            let image = &appliance.manifest.resources;
            spec.limits = host.apply(juice_runtime::Limits {
                cpus: o.cpus.or(image.cpus).map(|c| c.get()),
                memory: o.memory.or(image.memory).map(|m| m.0),
                pids: o.pids.or(image.pids),
            });
        }
        let mut net = NetworkSpec::new(name);
        net.links = rev.template.links.iter().map(|l| l.to_string()).collect();
        spec.network = Some(net);
        if rev.template.isolation == Isolation::Microvm {
            // A microVM takes no disk once it runs: it carries the toolbox from its boot.
            spec.toolbox = self.vm_toolbox();
        }
        spec.prepare_volumes(0).map_err(|e| group_err(name, e))?;
        let record = InstanceRecord {
            name: instance_name.clone(),
            group: g.name.clone(),
            revision,
            created_ms: now_ms(),
            isolation: rev.template.isolation,
        };
        // Recorded before it starts: a daemon killed in between finds the record and sweeps it.
        self.state.put_instance(&record)?;
        let started = Instant::now();
        let spawned = backend.spawn(&spec);
        let spawn_time = started.elapsed();
        self.metrics.start_seconds.observe(spawn_time.as_secs_f64());
        let instance = match spawned {
            Ok(i) => i,
            Err(e) => {
                self.state.delete_instance(&instance_name)?;
                return Err(AgentError::Start {
                    group: name.to_owned(),
                    revision,
                    source: e,
                });
            }
        };
        let address = instance.address();
        self.event(
            Some(name),
            Some(&instance_name),
            &format!(
                "started {instance_name} (revision {revision}{}) in {} ms",
                address.map(|a| format!(", {a}")).unwrap_or_default(),
                spawn_time.as_millis()
            ),
        );
        let prober = self.prober(&*instance, appliance.manifest.health.clone());
        w.insert(
            instance_name,
            Live {
                instance,
                group: name.to_owned(),
                revision,
                isolation: rev.template.isolation,
                address,
                prober,
                started_ms: self.now(),
                adopted: false,
            },
        );
        Ok(())
    }

    fn stop_instance(&self, w: &mut World, name: &str, why: &str) -> Result<(), AgentError> {
        if let Some(mut l) = w.take_to_stop(name) {
            // Out of the published ports first: no new connection reaches it while it stops.
            if l.address.is_some() {
                self.update_publishers(w);
            }
            let report = l.instance.stop(Duration::from_secs(10));
            w.stopped(name);
            // Released by the stop; the releaser prunes the ended instances' directories.
            self.releaser.release(l.instance);
            self.state.delete_instance(name)?;
            self.event(
                Some(&l.group),
                Some(name),
                &format!("stopped {name} ({why}): {report}"),
            );
        }
        Ok(())
    }

    /// What the planner sees of a group's live instances, in name order.
    fn summaries(&self, w: &World, group: &str) -> Vec<InstanceSummary> {
        w.live
            .iter()
            .filter(|(_, l)| l.group == group)
            .map(|(name, l)| {
                let h = l.prober.snapshot();
                InstanceSummary {
                    name: name.clone(),
                    revision: l.revision,
                    started_ms: l.started_ms,
                    health: HealthSummary {
                        healthy: h.healthy,
                        healthy_since_ms: h.healthy_since_ms,
                        ever_healthy: h.ever_healthy,
                        failed: h.failed,
                        last_error: h.last_error,
                    },
                }
            })
            .collect()
    }

    /// The group's revisions that run as microVMs with volume disks (looked up
    /// only for microVM revisions: sandboxes share a volume directory).
    fn disk_revisions(&self, g: &GroupRecord) -> Vec<u64> {
        g.revisions
            .iter()
            .filter(|r| {
                r.template.isolation == Isolation::Microvm
                    && self
                        .appliance(&r.template.digest)
                        .is_ok_and(|a| !a.manifest.volumes.is_empty())
            })
            .map(|r| r.number)
            .collect()
    }

    /// One group's step toward its declared state: the planner decides, this
    /// carries its steps out.
    fn converge(
        &self,
        w: &mut World,
        g: &mut GroupRecord,
        ended: &[Ended],
    ) -> Result<(), AgentError> {
        let now = self.now();
        let name = g.name.to_string();
        let instances = self.summaries(w, &name);
        // Only a group with another revision running, or one that may roll back, can
        // replace without a surge: the others skip reading their images.
        let mixed = instances.iter().any(|i| i.revision != g.current)
            || matches!(g.rollout, Rollout::Progressing { .. });
        let disk_revisions = if mixed {
            self.disk_revisions(g)
        } else {
            Vec::new()
        };
        let plan = planner::plan(&planner::Input {
            group: g,
            instances: &instances,
            ended,
            disk_revisions: &disk_revisions,
            now_ms: now,
        });
        *g = plan.group;
        let mut start_failed = false;
        for step in plan.steps {
            match step {
                Step::Start { .. } if start_failed => {}
                Step::Start { revision } => match self.start_instance(w, g, revision) {
                    Ok(()) => planner::start_succeeded(g),
                    Err(e @ AgentError::State(_)) => return Err(e),
                    Err(e) => {
                        // A start that fails (a backend that is missing, an image that cannot
                        // be unpacked) backs off like a crash, and the other groups go on.
                        let reason = match e {
                            AgentError::Group { reason, .. } => reason,
                            AgentError::Start {
                                revision, source, ..
                            } => {
                                format!("cannot start an instance of revision {revision}: {source}")
                            }
                            other => other.to_string(),
                        };
                        let instances = self.summaries(w, &name);
                        for step in planner::start_failed(g, &reason, &instances, now) {
                            self.carry_out(w, &name, step)?;
                        }
                        start_failed = true;
                    }
                },
                step => self.carry_out(w, &name, step)?,
            }
        }
        Ok(())
    }

    /// A step that is not a start.
    fn carry_out(&self, w: &mut World, group: &str, step: Step) -> Result<(), AgentError> {
        match step {
            Step::Stop { name, why } => self.stop_instance(w, &name, why.as_str())?,
            Step::Event(message) => self.event(Some(group), None, &message),
            Step::Restarted => {
                self.metrics.restarts.inc();
            }
            Step::RolloutEnded(end) => self.metrics.rollout(end.as_str()),
            Step::Start { revision } => {
                return Err(group_err(
                    group,
                    format!("a start of revision {revision} out of its place in the plan"),
                ));
            }
        }
        Ok(())
    }

    /// Points each group's published ports (nftables DNAT, which outlives the
    /// daemon) at its ready instances; changes only what differs, in one
    /// transaction.
    fn update_publishers(&self, w: &mut World) {
        let groups = std::mem::take(&mut w.groups);
        self.update_publishers_for(w, &groups);
        w.groups = groups;
    }

    fn update_publishers_for(&self, w: &mut World, groups: &BTreeMap<String, GroupRecord>) {
        // The first pass rewrites every rule: an earlier daemon killed between
        // `nft` and its record may have left them unlike the record.
        let first = w.published.is_none();
        let before = w.published.get_or_insert_with(|| {
            publish::current(&self.home)
                .into_iter()
                .filter(|(owner, _)| owner.starts_with(&publish::group_owner("")))
                .collect()
        });
        let mut wanted: BTreeMap<String, Published> = BTreeMap::new();
        for g in groups.values() {
            let Some(r) = g.current_revision() else {
                continue;
            };
            if r.template.publish.is_empty() {
                continue;
            }
            let owner = publish::group_owner(g.name.as_str());
            let was: &[Ipv4Addr] = before.get(&owner).map_or(&[], |p| &p.targets);
            let mut targets: Vec<Ipv4Addr> = w
                .live
                .values()
                .filter(|l| l.group == g.name.as_str())
                .filter_map(|l| {
                    let h = l.prober.snapshot();
                    let unprobed = !h.ever_healthy && h.last_error.is_none() && !h.failed;
                    let a = l.address?;
                    (h.healthy || (l.adopted && unprobed && was.contains(&a))).then_some(a)
                })
                .collect();
            targets.sort_unstable();
            wanted.insert(
                owner,
                Published {
                    bridge: NetworkSpec::new("").bridge,
                    ports: r.template.publish.iter().map(|p| p.0).collect(),
                    targets,
                },
            );
        }
        let mut changes: BTreeMap<String, Option<Published>> = before
            .keys()
            .filter(|o| !wanted.contains_key(*o))
            .map(|o| (o.clone(), None))
            .collect();
        for (owner, p) in &wanted {
            if first || before.get(owner) != Some(p) {
                changes.insert(owner.clone(), Some(p.clone()));
            }
        }
        if changes.is_empty() {
            return;
        }
        match publish::apply(&self.home, &changes) {
            Ok(()) => {
                w.published = Some(wanted);
                w.publish_error = None;
            }
            Err(e) => {
                let e = e.to_string();
                if w.publish_error.as_ref() != Some(&e) {
                    self.event(None, None, &format!("cannot publish ports: {e}"));
                    w.publish_error = Some(e);
                }
            }
        }
    }

    /// The live instances, from the queries' copy: never waits for a reconcile pass.
    pub fn instances(&self) -> Vec<InstanceView> {
        let views = lock(&self.views).clone();
        views
            .into_iter()
            .map(|(name, l)| {
                let h = lock(&l.health).clone();
                let health = if l.stopping {
                    InstanceHealth::Stopping
                } else if h.healthy {
                    InstanceHealth::Healthy
                } else if h.ever_healthy || h.failed {
                    InstanceHealth::Unhealthy
                } else {
                    InstanceHealth::Starting
                };
                InstanceView {
                    name,
                    group: l.group,
                    revision: l.revision,
                    pid: l.pid,
                    address: l.address,
                    health,
                    // From the instance's own start, which survives a daemon restart.
                    uptime_s: now_ms().saturating_sub(l.started_unix_ms) / 1000,
                    last_error: h.last_error,
                }
            })
            .collect()
    }

    pub fn groups(&self) -> Result<Vec<GroupView>, AgentError> {
        let instances = self.instances();
        let mut out = Vec::new();
        for g in self.state.groups()? {
            let mine: Vec<&InstanceView> = instances
                .iter()
                .filter(|i| i.group == g.name.as_str())
                .collect();
            let status = match &g.rollout {
                Rollout::Paused { .. } => GroupStatus::Paused,
                _ if g.start_failures > 0 => GroupStatus::CannotStart {
                    tries: g.start_failures,
                },
                _ if g.failures >= 3 => GroupStatus::CrashLoop {
                    failures: g.failures,
                },
                Rollout::Progressing { .. } => GroupStatus::RollingOut,
                Rollout::RolledBack { failed, .. } => GroupStatus::RolledBack { failed: *failed },
                Rollout::Stable => GroupStatus::Ok,
            };
            out.push(GroupView {
                name: g.name.to_string(),
                size: g.size,
                running: mine.len(),
                ready: mine
                    .iter()
                    .filter(|i| i.health == InstanceHealth::Healthy)
                    .count(),
                revision: g.current,
                image: g
                    .current_revision()
                    .map(|r| r.template.image.clone())
                    .unwrap_or_default(),
                rollout: g.rollout.clone(),
                restarts: g.restarts,
                status,
                critical: g.critical,
            });
        }
        Ok(out)
    }

    /// One sample of every live instance's resource use, with its group's
    /// restarts, and the sums per group. The meters are taken from the queries'
    /// copy and read after its lock is let go: a sample never waits for a
    /// reconcile pass, and a pass never waits for the files (about ten small
    /// reads per instance). CPU is a counter here; the caller takes the rate
    /// (see [`InstanceStats::cpu_ns`]).
    pub fn stats(&self) -> Result<Stats, AgentError> {
        let views: Vec<(String, Facts)> = lock(&self.views)
            .iter()
            .map(|(n, f)| (n.clone(), f.clone()))
            .collect();
        let restarts: BTreeMap<String, u64> = self
            .state
            .groups()?
            .into_iter()
            .map(|g| (g.name.to_string(), g.restarts))
            .collect();
        let instances = views
            .into_iter()
            .map(|(name, f)| {
                let usage = f.meter.as_ref().map(|m| m.read()).unwrap_or_default();
                InstanceStats::new(
                    name,
                    f.group.clone(),
                    f.revision,
                    f.isolation,
                    usage,
                    restarts.get(&f.group).copied().unwrap_or(0),
                )
            })
            .collect::<Vec<_>>();
        Ok(Stats::new(now_ms(), instances, &restarts))
    }

    /// The metrics text, with the instance gauges set from the current view.
    pub fn metrics_text(&self) -> String {
        let instances = self.instances();
        for state in InstanceHealth::ALL {
            let n = instances.iter().filter(|i| i.health == state).count();
            self.metrics
                .instances
                .get_or_create(&crate::metrics::StateLabel {
                    state: state.as_str().into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.metrics.encode()
    }

    pub fn describe(&self, name: &str) -> Result<GroupDescription, AgentError> {
        let group = self
            .state
            .group(name)?
            .ok_or_else(|| AgentError::NoGroup(name.to_owned()))?;
        Ok(GroupDescription {
            group,
            instances: self
                .instances()
                .into_iter()
                .filter(|i| i.group == name)
                .collect(),
            events: self.state.events(0, Some(name), 20)?,
        })
    }

    /// The log file of an instance this agent holds (or held).
    pub fn log_path(&self, instance: &str) -> Option<PathBuf> {
        // The name may come from a client: it must be a name, not a path.
        if !juice_runtime::process::valid_name(instance) {
            return None;
        }
        let p = self.sandbox.log_path(instance);
        if p.exists() {
            return Some(p);
        }
        let vm = juice_microvm::Runtime::log_path_in(&self.home, instance);
        vm.exists().then_some(vm)
    }

    /// Stops every instance and drops every group (for `juice up` on Ctrl-C).
    pub fn teardown(&self) -> Result<(), AgentError> {
        {
            let _w = self.world();
            for g in self.state.groups()? {
                self.state.delete_group(g.name.as_str())?;
            }
        }
        let done = self.reconcile();
        self.releaser.settle();
        done
    }

    /// Waits until the ended instances' cgroups and addresses are freed.
    pub fn settle(&self) {
        self.releaser.settle();
    }
}

/// The calling thread at a lower CPU priority (nice + 10) until dropped: an
/// apply's pulls and builds yield to queries and to the reconciler on a busy
/// host. Threads the work starts inherit it.
struct Background {
    tid: libc::id_t,
    was: Option<i32>,
    /// Not Send: it is dropped on the thread it lowered.
    _here: std::marker::PhantomData<*const ()>,
}

impl Background {
    fn lower() -> Background {
        // SAFETY: gettid has no arguments and cannot fail.
        let Ok(tid) = libc::id_t::try_from(unsafe { libc::gettid() }) else {
            // A thread id is positive; were it not, the priority is left as it is.
            return Background {
                tid: 0,
                was: None,
                _here: std::marker::PhantomData,
            };
        };
        // getpriority can return -1 as a value: errno tells; a failure leaves it as it is.
        // SAFETY: errno is thread-local; setting it to 0 before the call is how its
        // result is told from a failure.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: getpriority on this thread's id; no memory is passed.
        let was = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        let failed = std::io::Error::last_os_error().raw_os_error().unwrap_or(0) != 0;
        if failed {
            return Background {
                tid,
                was: None,
                _here: std::marker::PhantomData,
            };
        }
        // SAFETY: setpriority on this thread's id; no memory is passed.
        let set = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (was + 10).min(19)) };
        Background {
            tid,
            was: (set == 0).then_some(was),
            _here: std::marker::PhantomData,
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(was) = self.was {
            // SAFETY: setpriority on the id of the thread that lowered itself (a
            // Background is not Send, so this is that thread); no memory is passed.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, was) };
        }
    }
}

/// Adds one to the wake-up eventfd (an eventfd takes 8-byte native-endian counts).
fn wake(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn short(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use juice_runtime::{BackendError, InstanceSpec};

    /// A backend that cannot start anything, as on a host without nft.
    struct Failing(Arc<std::sync::atomic::AtomicUsize>);

    impl Backend for Failing {
        fn spawn(&self, _: &InstanceSpec) -> Result<Box<dyn Handle>, BackendError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(BackendError::Failed(
                "nftables: cannot run nft: No such file or directory".into(),
            ))
        }
        fn adopt(&self, name: &str) -> Result<Box<dyn Handle>, BackendError> {
            Err(BackendError::NotFound(name.to_owned()))
        }
        fn list(&self) -> Vec<String> {
            Vec::new()
        }
        fn log_path(&self, name: &str) -> PathBuf {
            PathBuf::from("/nonexistent").join(name)
        }
        fn forget(&self, _: &str) {}
    }

    #[test]
    fn a_start_that_fails_backs_off_and_the_other_groups_go_on() {
        let home = tempfile::tempdir().unwrap();
        reconciler_tests::build_appliance(home.path(), 1);
        let store = Store::open(home.path()).unwrap();
        let tries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let agent = Agent::with_sandbox(
            home.path(),
            store,
            Box::new(Failing(tries.clone())),
            system_clock(),
        )
        .unwrap();
        let site = home.path().join("site.toml");
        std::fs::write(
            &site,
            "[group.a]\nimage = \"t:1\"\n\n[group.b]\nimage = \"t:1\"\nsize = 2\n",
        )
        .unwrap();
        agent.apply(&Site::load(&site).unwrap(), true).unwrap();
        let tried = || tries.load(std::sync::atomic::Ordering::SeqCst);

        // Passes as fast as wake-ups can come: each group tries once, then waits.
        for _ in 0..20 {
            agent
                .reconcile()
                .expect("a failed start does not fail the pass");
        }
        assert_eq!(tried(), 2, "one try per group, not one per pass");
        let groups = agent.groups().unwrap();
        assert!(
            groups
                .iter()
                .all(|g| g.status == GroupStatus::CannotStart { tries: 1 }),
            "{groups:?}"
        );
        let said: Vec<String> = agent
            .state()
            .events(0, None, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .filter(|m| m.contains("cannot run nft"))
            .collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[0].contains("next try in 250ms"), "{said:?}");
        // No instance record is left behind by a start that failed.
        assert!(agent.state().instances().unwrap().is_empty());

        // After the back-off, one more try each, and the next wait doubles.
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..20 {
            agent.reconcile().unwrap();
        }
        assert_eq!(tried(), 4);
        let last = agent.state().events(0, None, 100).unwrap();
        assert!(
            last.iter().any(|e| e
                .message
                .contains("failed start 2 in a row; next try in 500ms")),
            "{last:?}"
        );
    }

    #[test]
    fn back_off_doubles_after_the_first_failure_and_caps() {
        assert_eq!([1, 2, 3, 4].map(planner::backoff_ms), [0, 250, 500, 1000]);
        assert_eq!(planner::backoff_ms(30), 30_000);
    }
}
