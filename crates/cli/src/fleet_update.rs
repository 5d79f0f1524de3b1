//! A fleet host updating its own daemon (docs/fleet.md, "Host updates"): it takes a slot
//! of the fleet's update semaphore under its lease, pulls the desired daemon image through
//! its image store (the trust policy applies), checks the binary, runs it once in a check
//! mode, installs it beside the running one (keeping that one as `.prev`), and re-executes
//! itself with the same arguments. The new daemon adopts the instances (live restore),
//! and gives the slot back once its fleet groups have all been ready for the gate; if they
//! are not within the deadline, or it stops before (a crash restarted by a supervisor), it
//! goes back to `.prev`, and the previous daemon records the failure, which pauses the
//! update fleet-wide.
//!
//! The state of an update in progress survives the re-execution in
//! `$JUICE_HOME/fleet/update.json` ([`Pending`]).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use juice_agent::agent::Agent;
use juice_fleet::update::{Desired, Failure, Step, next_step};
use juice_fleet::{Endpoints, HostId, Store};
use serde::{Deserialize, Serialize};

/// How often a host looks at the update records.
const EVERY: Duration = Duration::from_secs(1);

/// How long the new binary has to answer `--version` in the check before it is installed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The running daemon: its binary's path and sha256, and its arguments, read at start.
#[derive(Debug, Clone)]
pub struct Running {
    pub exe: PathBuf,
    pub sha256: String,
    pub argv: Vec<std::ffi::OsString>,
}

impl Running {
    /// The running binary (`/proc/self/exe`: the file this process runs, even if its path
    /// was replaced since) and this process's arguments.
    pub fn current() -> Result<Running, String> {
        let exe =
            std::fs::read_link("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
        let sha256 = juice_os::version::file_sha256(Path::new("/proc/self/exe"))
            .map_err(|e| e.to_string())?;
        Ok(Running {
            exe,
            sha256,
            argv: std::env::args_os().collect(),
        })
    }

    fn prev(&self) -> PathBuf {
        with_suffix(&self.exe, ".prev")
    }

    /// Replaces this process with the binary now at `exe`, with the same arguments and
    /// environment (the PID, and so every guard and supervisor, stays). Returns only on
    /// failure.
    fn exec(&self) -> std::io::Error {
        eprintln!(
            "{}",
            serde_json::json!({"level": "info", "msg": "re-executing the daemon", "binary": self.exe})
        );
        let _ = std::io::stderr().flush();
        let mut cmd = std::process::Command::new(&self.exe);
        if let Some((first, rest)) = self.argv.split_first() {
            cmd.arg0(first).args(rest);
        }
        cmd.exec()
    }

    /// Puts `.prev` back in place of the binary and re-executes it.
    fn go_back(&self) -> String {
        if let Err(e) = std::fs::rename(self.prev(), &self.exe) {
            return format!("cannot put {} back: {e}", self.prev().display());
        }
        sync_dir(&self.exe);
        format!(
            "re-executing {} failed: {}",
            self.exe.display(),
            self.exec()
        )
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn sync_dir(file: &Path) {
    if let Some(dir) = file.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn log(level: &str, msg: &str, fields: serde_json::Value) {
    let mut line = serde_json::json!({"level": level, "msg": msg});
    if let (Some(l), serde_json::Value::Object(f)) = (line.as_object_mut(), fields) {
        l.extend(f);
    }
    eprintln!("{line}");
}

/// An update in progress, kept across the re-execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub from_sha256: String,
    pub to_sha256: String,
    pub version: String,
    pub image: String,
    /// When the new daemon was installed, ms since 1970.
    pub started_ms: u64,
    pub gate_ms: u64,
    pub deadline_ms: u64,
    /// How many times the new binary started (a second start means the first stopped
    /// before it was healthy: a crash that a supervisor restarted).
    pub starts: u32,
    /// Why the new daemon was given up, once it is.
    pub failed: Option<String>,
}

/// Where [`Pending`] is kept.
pub fn pending_file(home: &Path) -> PathBuf {
    home.join("fleet/update.json")
}

fn read_pending(home: &Path) -> Option<Pending> {
    let text = std::fs::read(pending_file(home)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_pending(home: &Path, p: &Pending) -> Result<(), String> {
    let file = pending_file(home);
    let err = |e: std::io::Error| format!("{}: {e}", file.display());
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&serde_json::to_vec(p).unwrap_or_default())
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, &file).map_err(err)?;
    sync_dir(&file);
    Ok(())
}

fn remove_pending(home: &Path) {
    let _ = std::fs::remove_file(pending_file(home));
}

/// At the daemon's start, before anything else: a new binary that starts a second time
/// during its trial stopped before it was healthy (it crashed, and a supervisor started
/// it again). It goes back to `.prev` now (this returns only if that fails).
pub fn on_start(home: &Path, running: &Running) {
    let Some(mut p) = read_pending(home) else {
        return;
    };
    if p.to_sha256 != running.sha256 || p.failed.is_some() {
        return;
    }
    if p.starts == 0 {
        p.starts = 1;
        if let Err(e) = write_pending(home, &p) {
            log(
                "error",
                "cannot record the new daemon's start",
                serde_json::json!({"error": e}),
            );
        }
        return;
    }
    p.failed = Some("the new daemon stopped before it was healthy for its gate".into());
    if let Err(e) = write_pending(home, &p) {
        log(
            "error",
            "cannot record the new daemon's failure",
            serde_json::json!({"error": e}),
        );
    }
    log(
        "error",
        "host update failed; going back to the previous daemon",
        serde_json::json!({"reason": p.failed, "binary": running.exe}),
    );
    let why = running.go_back();
    log(
        "error",
        "cannot go back to the previous daemon",
        serde_json::json!({"error": why}),
    );
}

/// A host's updater: everything it needs, started beside the registration.
pub struct Updater {
    pub endpoints: Endpoints,
    pub host: HostId,
    pub ttl: Duration,
    pub home: PathBuf,
    pub running: Running,
    pub agent: Arc<Agent>,
    pub lease: tokio::sync::watch::Receiver<Option<i64>>,
}

/// Whether every fleet group of the host is ready (all its instances healthy).
fn fleet_ready(agent: &Agent) -> Result<bool, String> {
    let groups = agent.groups().map_err(|e| e.to_string())?;
    Ok(groups
        .iter()
        .filter(|g| juice_fleet::host::fleet_name(&g.name).is_some())
        .all(|g| g.ready >= g.size as usize))
}

impl Updater {
    /// Runs until the task running it is dropped (or the daemon re-executes itself).
    pub async fn run(self) {
        let mut healthy_since: Option<tokio::time::Instant> = None;
        let mut said = String::new();
        let mut store: Option<Store> = None;
        loop {
            tokio::time::sleep(EVERY).await;
            let Some(lease) = *self.lease.borrow() else {
                continue;
            };
            if store.is_none() {
                store = Store::connect(&self.endpoints, self.ttl / 3).await.ok();
            }
            let Some(s) = &store else { continue };
            if let Err(e) = self.round(s, lease, &mut healthy_since, &mut said).await {
                let text = e.to_string();
                if text != said {
                    log(
                        "warn",
                        "host update: etcd",
                        serde_json::json!({"error": text}),
                    );
                    said = text;
                }
                if matches!(e, juice_fleet::Error::Unreachable { .. }) {
                    store = None;
                }
            }
        }
    }

    async fn round(
        &self,
        store: &Store,
        lease: i64,
        healthy_since: &mut Option<tokio::time::Instant>,
        said: &mut String,
    ) -> juice_fleet::Result<()> {
        let pending = read_pending(&self.home);
        if let Some(p) = &pending {
            if let Some(reason) = &p.failed {
                // The new daemon was given up (this is the previous one, back): the failure
                // is recorded for the operator, and the slot given back.
                store
                    .put_failure(&Failure {
                        host: self.host.clone(),
                        sha256: p.to_sha256.clone(),
                        version: p.version.clone(),
                        reason: reason.clone(),
                        at_ms: now_ms(),
                    })
                    .await?;
                store.release_slot(&self.host).await?;
                remove_pending(&self.home);
                log(
                    "error",
                    "host update failed and was undone; the fleet's update is paused",
                    serde_json::json!({"host": self.host, "to": p.to_sha256, "reason": reason}),
                );
                return Ok(());
            }
            if p.to_sha256 == self.running.sha256 {
                return self.trial(store, p, healthy_since).await;
            }
            // An update this binary is not part of (replaced by hand meanwhile): forgotten.
            remove_pending(&self.home);
        }
        let state = store.update_state().await?;
        match next_step(&self.host, &self.running.sha256, &state, false) {
            Step::Nothing => {}
            Step::Wait(why) => {
                if *said != why {
                    log(
                        "info",
                        "host update waits",
                        serde_json::json!({"host": self.host, "why": why}),
                    );
                    *said = why;
                }
            }
            Step::Release(i) => {
                store.release_slot(&self.host).await?;
                log(
                    "info",
                    "host update slot given back",
                    serde_json::json!({"host": self.host, "slot": i}),
                );
            }
            Step::Acquire => {
                let Some(desired) = state.desired else {
                    return Ok(());
                };
                let what = format!("daemon {} {}", desired.version, desired.sha256);
                let Some(slot) = store
                    .acquire_slot(&self.host, lease, desired.slots, &what)
                    .await?
                else {
                    return Ok(());
                };
                log(
                    "info",
                    "host update slot taken",
                    serde_json::json!({"host": self.host, "slot": slot, "version": desired.version, "sha256": desired.sha256}),
                );
                let (home, running, d) = (self.home.clone(), self.running.clone(), desired.clone());
                let installed = tokio::task::spawn_blocking(move || install(&home, &running, &d))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                match installed {
                    Err(reason) => {
                        store
                            .put_failure(&Failure {
                                host: self.host.clone(),
                                sha256: desired.sha256.clone(),
                                version: desired.version.clone(),
                                reason: reason.clone(),
                                at_ms: now_ms(),
                            })
                            .await?;
                        store.release_slot(&self.host).await?;
                        log(
                            "error",
                            "host update refused; the fleet's update is paused",
                            serde_json::json!({"host": self.host, "reason": reason}),
                        );
                    }
                    Ok(()) => {
                        // The successor gets the lease's whole time to live to take it over.
                        let _ = store.renew_once(lease).await;
                        let why = self.running.exec();
                        // The exec failed: the old binary is still running; undo.
                        let reason = format!("re-executing the new daemon failed: {why}");
                        let _ = std::fs::rename(self.running.prev(), &self.running.exe);
                        remove_pending(&self.home);
                        store
                            .put_failure(&Failure {
                                host: self.host.clone(),
                                sha256: desired.sha256.clone(),
                                version: desired.version.clone(),
                                reason: reason.clone(),
                                at_ms: now_ms(),
                            })
                            .await?;
                        store.release_slot(&self.host).await?;
                        log(
                            "error",
                            "host update failed",
                            serde_json::json!({"host": self.host, "reason": reason}),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The new daemon on trial: the slot goes back once the fleet groups have all been
    /// ready for the gate; past the deadline, the previous daemon comes back.
    async fn trial(
        &self,
        store: &Store,
        p: &Pending,
        healthy_since: &mut Option<tokio::time::Instant>,
    ) -> juice_fleet::Result<()> {
        let agent = self.agent.clone();
        let ready = tokio::task::spawn_blocking(move || fleet_ready(&agent))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .unwrap_or(false);
        if !ready {
            *healthy_since = None;
        } else if healthy_since.is_none() {
            *healthy_since = Some(tokio::time::Instant::now());
        }
        let gate = Duration::from_millis(p.gate_ms);
        if healthy_since.is_some_and(|t| t.elapsed() >= gate) {
            let freed = store.release_slot(&self.host).await?;
            remove_pending(&self.home);
            log(
                "info",
                "host update done; slot given back",
                serde_json::json!({"host": self.host, "slot": freed, "version": p.version, "sha256": p.to_sha256}),
            );
            return Ok(());
        }
        if now_ms().saturating_sub(p.started_ms) > p.deadline_ms {
            let mut failed = p.clone();
            failed.failed = Some(format!(
                "the new daemon's fleet groups were not all ready for {} within {}",
                humantime::format_duration(gate),
                humantime::format_duration(Duration::from_millis(p.deadline_ms))
            ));
            if let Err(e) = write_pending(&self.home, &failed) {
                log(
                    "error",
                    "cannot record the new daemon's failure",
                    serde_json::json!({"error": e}),
                );
            }
            log(
                "error",
                "host update failed; going back to the previous daemon",
                serde_json::json!({"host": self.host, "reason": failed.failed}),
            );
            let why = self.running.go_back();
            log(
                "error",
                "cannot go back to the previous daemon",
                serde_json::json!({"error": why}),
            );
        }
        Ok(())
    }
}

/// Pulls and checks the desired daemon, runs it once in the check mode, and installs it
/// beside the running binary (which is kept as `.prev`); writes [`Pending`]. Nothing is
/// replaced unless every check passed.
fn install(home: &Path, running: &Running, desired: &Desired) -> Result<(), String> {
    let image = &desired.image;
    let store = juice_image::store::Store::open(home).map_err(|e| e.to_string())?;
    if juice_registry::reference::looks_remote(image) {
        juice_registry::remote::RemoteOptions::from_env(home)
            .and_then(|o| juice_registry::remote::Remote::new(&o))
            .and_then(|r| r.pull(&store, image))
            .map_err(|e| format!("pulling {image}: {e}"))?;
    }
    let admitted =
        juice_registry::policy::admit(&store, image).map_err(|e| format!("{image}: {e}"))?;
    let daemon = juice_os::daemon::DaemonImage::open(&store, &admitted.digest.to_string())
        .map_err(|e| e.to_string())?;
    if daemon.config.sha256 != desired.sha256 || daemon.config.version != desired.version {
        return Err(format!(
            "{image} holds juice {} with sha256 {}, and the update asks for {} with {}",
            daemon.config.version, daemon.config.sha256, desired.version, desired.sha256
        ));
    }
    let dir = running
        .exe
        .parent()
        .ok_or_else(|| format!("{} has no directory", running.exe.display()))?;
    let work = dir.join(format!(".juice-update-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let result = (|| {
        let new = daemon.extract(&store, &work).map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", new.display()))?;
        }
        check_binary(&new, &desired.version)?;
        // The running binary stays as `.prev` (a hard link, so the path is never empty),
        // then the new one takes its name: each step a rename.
        let prev = running.prev();
        let prev_tmp = with_suffix(&running.exe, ".prev.tmp");
        let _ = std::fs::remove_file(&prev_tmp);
        std::fs::hard_link(&running.exe, &prev_tmp)
            .and_then(|()| std::fs::rename(&prev_tmp, &prev))
            .map_err(|e| {
                format!(
                    "keeping {} as {}: {e}",
                    running.exe.display(),
                    prev.display()
                )
            })?;
        write_pending(
            home,
            &Pending {
                from_sha256: running.sha256.clone(),
                to_sha256: desired.sha256.clone(),
                version: desired.version.clone(),
                image: image.clone(),
                started_ms: now_ms(),
                gate_ms: desired.gate_ms,
                deadline_ms: desired.deadline_ms,
                starts: 0,
                failed: None,
            },
        )?;
        std::fs::rename(&new, &running.exe).map_err(|e| {
            remove_pending(home);
            format!("installing {}: {e}", running.exe.display())
        })?;
        sync_dir(&running.exe);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The check mode: the new binary must answer `--version` with `juice VERSION`, exit 0,
/// within [`CHECK_TIMEOUT`]. A binary that cannot even do that is never executed as the
/// daemon (after the exec, nothing would be left to undo it).
fn check_binary(binary: &Path, version: &str) -> Result<(), String> {
    let refused = |why: String| {
        format!(
            "the new binary refused by its check ({} --version): {why}",
            binary.display()
        )
    };
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| refused(e.to_string()))?;
    let start = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < CHECK_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(refused(format!(
                    "no answer within {}",
                    humantime::format_duration(CHECK_TIMEOUT)
                )));
            }
            Err(e) => return Err(refused(e.to_string())),
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.by_ref().take(4096).read_to_string(&mut out);
    }
    if !status.success() {
        return Err(refused(format!("it exited with {status}")));
    }
    let want = format!("juice {version}");
    if out.trim() != want {
        return Err(refused(format!(
            "it answered {:?}, and its label promises {want:?}",
            out.trim()
        )));
    }
    Ok(())
}

/// How long an OS update's slot outlives a host that never comes back from its reboot.
pub const OS_SLOT_TTL: Duration = Duration::from_secs(15 * 60);

/// A fleet host's gate on `juice os update`: a slot of the fleet's update semaphore,
/// taken before the new version is written and given back by the trial's verdict.
pub struct OsSlots {
    pub endpoints: Endpoints,
    pub host: HostId,
}

impl OsSlots {
    fn store_call<T>(
        &self,
        f: impl AsyncFnOnce(Store) -> juice_fleet::Result<T>,
    ) -> Result<T, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let store = Store::connect(&self.endpoints, Duration::from_secs(3)).await?;
            f(store).await
        })
        .map_err(|e| e.to_string())
    }
}

impl juice_agent::os::UpdateGate for OsSlots {
    fn before(&self, version: &str) -> Result<(), String> {
        let host = self.host.clone();
        let taken = self
            .store_call(async move |s: Store| s.acquire_os_slot(&host, OS_SLOT_TTL, version).await)
            .map_err(|e| {
                format!("this host is in a fleet, and its update slot could not be taken: {e}")
            })?;
        let slot = taken.map_err(|why| format!("this host is in a fleet: {why}"))?;
        log(
            "info",
            "OS update slot taken",
            serde_json::json!({"host": self.host, "slot": slot, "version": version}),
        );
        Ok(())
    }

    fn after(&self) {
        let host = self.host.clone();
        match self.store_call(async move |s: Store| {
            s.release_slot_if(&host, juice_fleet::update::Slot::is_os)
                .await
        }) {
            Ok(Some(slot)) => log(
                "info",
                "OS update slot given back",
                serde_json::json!({"host": self.host, "slot": slot}),
            ),
            Ok(None) => {}
            Err(e) => log(
                "warn",
                "OS update slot not given back; it goes with its lease",
                serde_json::json!({"host": self.host, "error": e}),
            ),
        }
    }
}

/// `juice fleet update` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum UpdateCommand {
    /// Pack a juice binary as a daemon image in the local store (push it, sign it as any image).
    Pack {
        /// The juice binary.
        #[arg(long, value_name = "PATH")]
        binary: PathBuf,
        /// The image's name, NAME:TAG.
        #[arg(long, value_name = "NAME:TAG")]
        tag: String,
        /// The version the label promises (default: what `BINARY --version` says).
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
    },
    /// Ask every host of the fleet to run the daemon of image REF, a few hosts at a time.
    Daemon {
        /// A daemon image made by `juice fleet update pack` (a registry reference, or a
        /// name in the hosts' stores).
        reference: String,
        /// At most this many hosts update at once.
        #[arg(long, default_value_t = 1)]
        slots: u32,
        /// How long a new daemon's fleet groups must all be ready before its slot is freed.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        gate: Duration,
        /// A new daemon not healthy this long after its start goes back to the previous one.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// etcd's endpoints (comma-separated http://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
    /// The desired daemon, each host's running binary, the slots held, and the failures.
    Status {
        /// etcd's endpoints (comma-separated http://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
    /// Clear the recorded failures: the paused update goes on.
    Resume {
        /// etcd's endpoints (comma-separated http://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
}

type CliResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

pub fn run(command: UpdateCommand, format: crate::output::Format) -> CliResult {
    use crate::fleet::{QUERY_TIMEOUT, block_on, endpoints_or_env};
    use crate::output::{self, Format};
    match command {
        UpdateCommand::Pack {
            binary,
            tag,
            version,
        } => {
            let version = match version {
                Some(v) => v,
                None => {
                    let out = std::process::Command::new(&binary)
                        .arg("--version")
                        .output()
                        .map_err(|e| format!("{}: {e}", binary.display()))?;
                    let text = String::from_utf8_lossy(&out.stdout);
                    match text.trim().strip_prefix("juice ") {
                        Some(v) if out.status.success() => v.to_owned(),
                        _ => {
                            return Err(format!(
                                "{} --version does not say `juice VERSION`; give --version",
                                binary.display()
                            )
                            .into());
                        }
                    }
                }
            };
            let config = juice_os::daemon::DaemonConfig {
                version,
                sha256: juice_os::version::file_sha256(&binary)?,
            };
            let store = juice_image::store::Store::open(&crate::juice_home())?;
            let record = juice_os::daemon::pack(&store, &tag, &config, &binary)?;
            if format == Format::Json {
                return output::json(&serde_json::json!({
                    "reference": record.reference, "digest": record.digest.to_string(),
                    "version": config.version, "sha256": config.sha256,
                }));
            }
            println!(
                "packed juice {} (sha256 {}) as {} ({})",
                config.version, config.sha256, record.reference, record.digest
            );
            Ok(())
        }
        UpdateCommand::Daemon {
            reference,
            slots,
            gate,
            deadline,
            endpoints,
        } => {
            if !(1..=juice_fleet::update::MAX_SLOTS).contains(&slots) {
                return Err(format!(
                    "--slots {slots}: it must be 1 to {}",
                    juice_fleet::update::MAX_SLOTS
                )
                .into());
            }
            let endpoints = endpoints_or_env(endpoints)?;
            // The label is read here, so the hosts compare a sha256 and pull only if they need it.
            let store = juice_image::store::Store::open(&crate::juice_home())?;
            if juice_registry::reference::looks_remote(&reference) {
                juice_registry::remote::RemoteOptions::from_env(&crate::juice_home())
                    .and_then(|o| juice_registry::remote::Remote::new(&o))
                    .and_then(|r| r.pull(&store, &reference))
                    .map_err(|e| format!("pulling {reference}: {e}"))?;
            }
            let daemon = juice_os::daemon::DaemonImage::open(&store, &reference)?;
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            let desired = Desired {
                image: reference.clone(),
                version: daemon.config.version.clone(),
                sha256: daemon.config.sha256.clone(),
                slots,
                gate_ms: ms(gate),
                deadline_ms: ms(deadline),
                written_ms: now_ms(),
            };
            block_on(async {
                let store = Store::connect(&endpoints, QUERY_TIMEOUT).await?;
                store.put_desired(&desired).await
            })??;
            if format == Format::Json {
                return output::json(&desired);
            }
            println!(
                "the fleet's hosts update to juice {} (sha256 {}) from {reference}, {slots} at a time, each gated {}",
                desired.version,
                desired.sha256,
                humantime::format_duration(gate)
            );
            Ok(())
        }
        UpdateCommand::Status { endpoints } => {
            let endpoints = endpoints_or_env(endpoints)?;
            let (state, hosts) = block_on(async {
                let store = Store::connect(&endpoints, QUERY_TIMEOUT).await?;
                Ok::<_, juice_fleet::Error>((store.update_state().await?, store.hosts().await?))
            })??;
            for e in state.malformed.iter().chain(&hosts.malformed) {
                eprintln!("juice: warning: {e}");
            }
            let rows: Vec<serde_json::Value> = hosts
                .hosts
                .iter()
                .map(|h| {
                    let slot = state.held_by(&h.id).map(|(i, s, _)| (i, s.what.clone()));
                    serde_json::json!({
                        "host": h.id, "hostname": h.hostname, "juice_version": h.juice_version,
                        "sha256": h.binary_sha256,
                        "updated": state.desired.as_ref().is_some_and(|d| d.sha256 == h.binary_sha256),
                        "slot": slot.as_ref().map(|s| s.0), "slot_for": slot.map(|s| s.1),
                        "failed": state.failed.get(&h.id),
                    })
                })
                .collect();
            let slots: Vec<serde_json::Value> = state
                .slots
                .iter()
                .map(|(i, (s, lease))| serde_json::json!({"slot": i, "host": s.host, "started_ms": s.started_ms, "what": s.what, "lease": format!("{lease:x}")}))
                .collect();
            let failed: Vec<&Failure> = state.failed.values().collect();
            if format == Format::Json {
                return output::json(&serde_json::json!({
                    "desired": state.desired, "paused": !failed.is_empty(),
                    "hosts": rows, "slots": slots, "failed": failed,
                }));
            }
            match &state.desired {
                Some(d) => println!(
                    "desired: juice {} (sha256 {}) from {}, {} slot(s), gate {}",
                    d.version,
                    &d.sha256,
                    d.image,
                    d.slots,
                    humantime::format_duration(Duration::from_millis(d.gate_ms))
                ),
                None => println!("desired: none (`juice fleet update daemon REF` sets it)"),
            }
            let mut t = output::table(["HOST", "HOSTNAME", "JUICE", "SHA256", "UPDATED", "SLOT"]);
            for r in &rows {
                t.add_row([
                    r["host"].as_str().unwrap_or_default().to_owned(),
                    r["hostname"].as_str().unwrap_or_default().to_owned(),
                    r["juice_version"].as_str().unwrap_or_default().to_owned(),
                    r["sha256"]
                        .as_str()
                        .unwrap_or_default()
                        .chars()
                        .take(12)
                        .collect(),
                    if r["updated"] == true { "yes" } else { "no" }.to_owned(),
                    r["slot"].as_u64().map_or("-".into(), |s| s.to_string()),
                ]);
            }
            println!("{t}");
            for f in &failed {
                println!(
                    "FAILED on {}: juice {} ({}): {}",
                    f.host, f.version, f.sha256, f.reason
                );
            }
            if !failed.is_empty() {
                println!("the update is paused: `juice fleet update resume` clears the failures");
            }
            Ok(())
        }
        UpdateCommand::Resume { endpoints } => {
            let endpoints = endpoints_or_env(endpoints)?;
            let n = block_on(async {
                let store = Store::connect(&endpoints, QUERY_TIMEOUT).await?;
                store.clear_failures().await
            })??;
            println!("{n} failure(s) cleared; the update goes on");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("juice");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn the_check_mode_takes_only_a_binary_that_answers_its_promised_version() {
        let dir = tempfile::tempdir().unwrap();
        let good = script(dir.path(), "echo juice 9.9.9");
        check_binary(&good, "9.9.9").unwrap();
        let e = check_binary(&good, "9.9.8").unwrap_err();
        assert!(e.contains("answered \"juice 9.9.9\""), "{e}");
        let e = check_binary(Path::new("/bin/false"), "9.9.9").unwrap_err();
        assert!(e.contains("exited with"), "{e}");
        let slow = script(dir.path(), "exec sleep 30");
        let e = check_binary(&slow, "9.9.9").unwrap_err();
        assert!(e.contains("no answer within 5s"), "{e}");
    }

    #[test]
    fn an_update_in_progress_is_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_pending(dir.path()), None);
        let p = Pending {
            from_sha256: "aa".into(),
            to_sha256: "bb".into(),
            version: "0.2.0".into(),
            image: "juice-daemon:2".into(),
            started_ms: 1,
            gate_ms: 2,
            deadline_ms: 3,
            starts: 0,
            failed: None,
        };
        write_pending(dir.path(), &p).unwrap();
        assert_eq!(read_pending(dir.path()), Some(p));
        remove_pending(dir.path());
        assert_eq!(read_pending(dir.path()), None);
    }
}
