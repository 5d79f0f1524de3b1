//! The host commands: `juice daemon`, `up`, `plan`, `apply`, `get`, `describe`,
//! `events`, `logs`, `rollback`, `delete`. All but `daemon` and `up` talk to the
//! daemon only through its API client.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use juice_agent::agent::{Action, Agent, Change, GroupView, InstanceView};
use juice_agent::client::Client;
use juice_agent::doctor;
use juice_agent::site::Site;
use juice_agent::state::Event;

use crate::output::{self, Format};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn client() -> Result<Client> {
    Ok(Client::new(&crate::juice_home())?)
}

/// Reads a site file; image paths become absolute (relative to the file), so the daemon
/// finds them wherever it runs.
pub fn load_site(path: &Path) -> Result<Site> {
    let mut site = Site::load(path)?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    for g in site.group.values_mut() {
        if g.image.starts_with("./") || g.image.starts_with("../") {
            let p = base.join(&g.image);
            let abs = p
                .canonicalize()
                .map_err(|e| format!("{}: image path {}: {e}", path.display(), p.display()))?;
            g.image = abs.display().to_string();
        }
    }
    Ok(site)
}

fn print_changes(changes: &[Change], format: Format, applied: bool) -> Result {
    if format == Format::Json {
        return output::json(&changes);
    }
    let mut t = output::table(["GROUP", "ACTION", "REASON"]);
    for c in changes {
        t.add_row([c.group.clone(), c.action.to_string(), c.reason.clone()]);
    }
    println!("{t}");
    if changes.iter().all(|c| c.action == Action::Unchanged) {
        println!("nothing to do: the host is as declared");
    } else if !applied {
        println!("(plan only: `juice apply -f FILE` makes these changes)");
    }
    Ok(())
}

pub fn plan(file: &Path, format: Format) -> Result {
    let site = load_site(file)?;
    let changes = client()?.apply(&site, true)?;
    print_changes(&changes, format, false)
}

pub fn apply(file: &Path, format: Format) -> Result {
    let site = load_site(file)?;
    let changes = client()?.apply(&site, false)?;
    print_changes(&changes, format, true)
}

pub fn groups_table(groups: &[GroupView]) -> String {
    let mut t = output::table(["GROUP", "READY", "REVISION", "IMAGE", "RESTARTS", "STATUS"]);
    for g in groups {
        t.add_row([
            g.name.clone(),
            format!("{}/{}", g.ready, g.size),
            g.revision.to_string(),
            g.image.clone(),
            g.restarts.to_string(),
            g.status.to_string(),
        ]);
    }
    t.to_string()
}

fn instances_table(instances: &[InstanceView]) -> String {
    let mut t = output::table([
        "INSTANCE", "GROUP", "REVISION", "HEALTH", "ADDRESS", "PID", "UPTIME",
    ]);
    for i in instances {
        t.add_row([
            i.name.clone(),
            i.group.clone(),
            i.revision.to_string(),
            i.health.to_string(),
            i.address
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            i.pid.to_string(),
            format!("{}s", i.uptime_s),
        ]);
    }
    t.to_string()
}

/// What `juice get` lists (the singular is accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GetKind {
    #[value(alias = "group")]
    Groups,
    #[value(alias = "instance")]
    Instances,
    #[value(alias = "image")]
    Images,
}

/// What `juice describe` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DescribeKind {
    Group,
}

pub fn get(what: GetKind, format: Format) -> Result {
    match what {
        GetKind::Groups => {
            let groups = client()?.groups()?;
            if format == Format::Json {
                return output::json(&groups);
            }
            println!("{}", groups_table(&groups));
        }
        GetKind::Instances => {
            let instances = client()?.instances()?;
            if format == Format::Json {
                return output::json(&instances);
            }
            println!("{}", instances_table(&instances));
        }
        GetKind::Images => return crate::images::list(format),
    }
    Ok(())
}

pub fn describe(kind: DescribeKind, name: &str, format: Format) -> Result {
    // Groups are all there is to describe so far; another kind will not compile here.
    let DescribeKind::Group = kind;
    let d = client()?.group(name)?;
    if format == Format::Json {
        return output::json(&d);
    }
    let g = &d.group;
    println!("Group:      {}", g.name);
    println!("Size:       {}", g.size);
    println!(
        "Revision:   {} (last good: {})",
        g.current,
        g.last_good.map_or("none".into(), |n| n.to_string())
    );
    println!("Rollout:    {}", serde_json::to_string(&g.rollout)?);
    println!(
        "Update:     max_unavailable {}, health_gate {}, on_failure {:?}, keep {}",
        g.update.max_unavailable,
        humantime::format_duration(g.update.health_gate),
        g.update.on_failure,
        g.update.keep_revisions
    );
    println!("Restarts:   {}\n", g.restarts);
    let mut t = output::table(["REVISION", "IMAGE", "DIGEST", "PUBLISH", "LINKS"]);
    for r in g.revisions.iter().rev() {
        let publish: Vec<String> = r
            .template
            .publish
            .iter()
            .map(|p| String::from(*p))
            .collect();
        let links: Vec<String> = r.template.links.iter().map(|l| l.to_string()).collect();
        t.add_row([
            format!(
                "{}{}",
                r.number,
                if r.number == g.current { " *" } else { "" }
            ),
            r.template.image.clone(),
            r.template
                .digest
                .trim_start_matches("sha256:")
                .chars()
                .take(12)
                .collect(),
            publish.join(","),
            links.join(","),
        ]);
    }
    println!("{t}\n");
    println!("{}\n", instances_table(&d.instances));
    println!("Recent events:");
    for e in &d.events {
        println!("  {}", event_line(e));
    }
    Ok(())
}

fn event_line(e: &Event) -> String {
    let secs = e.time_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!(
        "{h:02}:{m:02}:{s:02}  {:<10} {}",
        e.group.as_deref().unwrap_or("-"),
        e.message
    )
}

pub fn events(group: Option<&str>, follow: bool, format: Format) -> Result {
    let client = client()?;
    let mut since = 0;
    loop {
        let events = client.events(since, group, None)?;
        for e in &events {
            if format == Format::Json {
                println!("{}", serde_json::to_string(e)?);
            } else {
                println!("{}", event_line(e));
            }
            since = e.seq;
        }
        if !follow {
            return Ok(());
        }
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn logs(instance: &str, follow: bool) -> Result {
    let client = client()?;
    let mut offset = 0u64;
    loop {
        let chunk = client.logs(instance, offset)?;
        std::io::stdout().write_all(&chunk.bytes)?;
        std::io::stdout().flush()?;
        offset = chunk.next;
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub fn rollback(group: &str, to: Option<u64>) -> Result {
    let revision = client()?.rollback(group, to)?;
    println!("rolling {group} back to revision {revision}");
    Ok(())
}

pub fn delete(group: &str) -> Result {
    client()?.delete_group(group)?;
    println!("deleted {group}; its instances are being stopped");
    Ok(())
}

/// Blocks SIGINT and SIGTERM in every thread started after this, so they can be awaited.
fn block_signals() -> Result<nix::sys::signal::SigSet> {
    let mut s = nix::sys::signal::SigSet::empty();
    s.add(nix::sys::signal::Signal::SIGINT);
    s.add(nix::sys::signal::Signal::SIGTERM);
    s.thread_block()?;
    Ok(s)
}

/// Waits up to `timeout` for SIGINT or SIGTERM.
fn signalled(set: &nix::sys::signal::SigSet, timeout: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: sigtimedwait with a valid set and timespec; no siginfo wanted.
    unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) > 0 }
}

type Remote = Option<(std::net::SocketAddr, Arc<rustls::ServerConfig>)>;

/// Starts the agent: reconciler and API, in threads of this process.
/// With `fleet`, the host's registration runs on the same runtime, beside the API.
fn start_agent(
    home: &Path,
    remote: Remote,
    fleet: Option<crate::fleet::Member>,
) -> Result<(
    Arc<Agent>,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
)> {
    let agent = Agent::open(home)?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let served = agent.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Bind now, so an error (another daemon on the socket) is reported before anything starts.
    let probe = std::os::unix::net::UnixStream::connect(juice_agent::socket(home));
    if probe.is_ok() {
        return Err(format!(
            "another daemon is answering on {}",
            juice_agent::socket(home).display()
        )
        .into());
    }
    let local = Arc::new(crate::fleet_host::AgentHost(agent.clone()));
    let (updating, home_dir) = (agent.clone(), home.to_owned());
    let server = std::thread::spawn(move || {
        rt.block_on(async move {
            let shutdown = async move {
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            };
            // Ends with the runtime; the lease then lapses by itself, and the fleet's
            // groups go on running as they are.
            if let Some(member) = fleet {
                let (lease_now, lease) = tokio::sync::watch::channel(None);
                let updater = crate::fleet_update::Updater {
                    endpoints: member.registration.endpoints.clone(),
                    host: member.registration.record.id.clone(),
                    ttl: member.registration.ttl(),
                    home: home_dir,
                    running: member.running,
                    agent: updating,
                    lease: lease.clone(),
                };
                tokio::spawn(updater.run());
                let work = juice_fleet::HostWork {
                    endpoints: member.registration.endpoints.clone(),
                    host: member.registration.record.id.clone(),
                    ttl: member.registration.ttl(),
                    local,
                    lease,
                };
                tokio::spawn(crate::fleet::keep_registered(
                    member.registration,
                    lease_now,
                ));
                tokio::spawn(crate::fleet::keep_working(work));
                if let Some(controller) = member.controller {
                    tokio::spawn(crate::fleet::keep_controlling(controller));
                }
            }
            if let Err(e) = juice_agent::serve(served, remote, shutdown).await {
                eprintln!("juice: the API stopped: {e}");
            }
        });
    });
    Ok((agent, stop_tx, server))
}

/// `juice doctor`: every check and its result; exits 1 when the sandbox backend
/// (and so the daemon) cannot run.
pub fn doctor(format: Format) -> Result<i32> {
    let report = doctor::Report::new(&doctor::Host::current(&crate::juice_home()));
    let code = i32::from(report.sandbox == doctor::Outcome::Missing);
    if format == Format::Json {
        output::json(&report)?;
        return Ok(code);
    }
    let mut t = output::table(["CHECK", "FOR", "RESULT", "DETAIL / FIX"]);
    for c in &report.checks {
        t.add_row([
            c.name.to_owned(),
            c.backend.to_string(),
            c.result.to_string(),
            match &c.fix {
                Some(fix) => format!("{}; fix: {fix}", c.detail),
                None => c.detail.clone(),
            },
        ]);
    }
    println!("{t}\n");
    for (backend, verdict) in [("sandbox", report.sandbox), ("microvm", report.microvm)] {
        println!(
            "{backend}: {}",
            match verdict {
                doctor::Outcome::Ok => "ready",
                doctor::Outcome::Warning => "ready, with warnings",
                doctor::Outcome::Missing => "cannot run until what is missing is installed",
            }
        );
    }
    Ok(code)
}

/// `juice daemon`: runs until SIGINT/SIGTERM; instances keep running after it.
/// With `listen`, the API is also served over TCP to mutual-TLS clients only.
/// On Juice OS: settles trials that fell back before a verdict, and judges this boot's
/// trial in the background. The trial's timing is host.toml's (`[os]`), the deadline
/// overridden by `juice.os.deadline=` on the kernel command line; the daemon decides
/// before PID 1's own deadline, so its verdict (and reason) comes first.
fn judge_os_trial(agent: &Arc<Agent>, os: Arc<juice_agent::os::OsControl>) {
    let event = |msg: String| {
        let _ = agent.state().event(None, None, &msg);
    };
    match os.settle_unjudged() {
        Ok(settled) => {
            for slot in settled {
                event(format!(
                    "OS slot {slot} fell back before its trial's verdict: marked bad"
                ));
            }
        }
        Err(e) => event(format!("cannot settle earlier OS trials: {e}")),
    }
    if os.decided() {
        return;
    }
    let settings =
        juice_os::settings::Settings::load_if_present(&agent.home().join(juice_os::settings::FILE))
            .ok()
            .flatten()
            .map(|l| l.settings.os)
            .unwrap_or_default();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let deadline =
        juice_os::slots::deadline_from_cmdline(&cmdline).unwrap_or(settings.trial_deadline);
    let margin = (deadline / 4).min(Duration::from_secs(15));
    let ours = deadline.saturating_sub(margin);
    event(format!(
        "OS trial: commits after {} healthy, or fails at {} after the boot",
        humantime::format_duration(settings.stability),
        humantime::format_duration(ours)
    ));
    if let Err(e) = juice_agent::os::spawn_trial_judge(
        os,
        juice_agent::socket(agent.home()),
        settings.stability,
        ours,
    ) {
        event(format!("cannot judge the OS trial: {e}"));
    }
}

pub fn daemon(
    listen: Option<std::net::SocketAddr>,
    tls: Option<PathBuf>,
    site: Option<PathBuf>,
    fleet: &crate::fleet::JoinArgs,
) -> Result {
    let home = crate::juice_home();
    // Before anything is made: a host that lacks a prerequisite gets one sentence, not a
    // daemon that says it serves and then fails every start.
    doctor::preflight(&doctor::Host::current(&home), false)?;
    let member = crate::fleet::member(&home, fleet)?;
    if let Some(m) = &member {
        // A new daemon that crashed during its update's trial goes back to the previous one.
        crate::fleet_update::on_start(&home, &m.running);
    }
    let signals = block_signals()?;
    let remote = match listen {
        Some(addr) => {
            let dir = tls.unwrap_or_else(|| home.join("tls"));
            let config = juice_agent::tls::server_config(&dir).map_err(|e| {
                format!(
                    "--listen needs the certificates `juice certs {}` makes: {e}",
                    dir.display()
                )
            })?;
            Some((addr, config))
        }
        None => None,
    };
    let fleet_slots = member.as_ref().map(|m| {
        (
            m.registration.endpoints.clone(),
            m.registration.record.id.clone(),
        )
    });
    let (agent, stop, server) = start_agent(&home, remote, member)?;
    eprintln!(
        "{}",
        serde_json::json!({"level": "info", "msg": "juice daemon started", "socket": juice_agent::socket(&home), "pid": std::process::id()})
    );
    let mut since = agent
        .state()
        .events(0, None, 1)
        .ok()
        .and_then(|e| e.last().map(|e| e.seq))
        .unwrap_or(0);
    // The site is applied beside the API, not before it: a site that takes long to pull,
    // or is invalid, must not keep the host's API from answering (a Juice OS host has no
    // other way in). An error becomes an event, which the loop below logs.
    if let Some(file) = site {
        let agent = agent.clone();
        let socket = juice_agent::socket(&home);
        std::thread::spawn(move || {
            // After the adoption of what is still running, as a `juice apply` would come:
            // the API answers once the earlier daemon's instances are adopted.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::os::unix::net::UnixStream::connect(&socket).is_err()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let result =
                load_site(&file).and_then(|site| agent.apply(&site, true).map_err(Into::into));
            let msg = match result {
                Ok(changes) => format!(
                    "site {} applied at start: {} change(s)",
                    file.display(),
                    changes.len()
                ),
                Err(e) => format!("site {} not applied at start: {e}", file.display()),
            };
            let _ = agent.state().event(None, None, &msg);
        });
    }
    if let Some(os) = agent.os().cloned() {
        if let Some(f) = &fleet_slots {
            // `juice os update` on a fleet host takes an update slot; the verdict gives it back.
            os.set_gate(Arc::new(crate::fleet_update::OsSlots {
                endpoints: f.0.clone(),
                host: f.1.clone(),
            }));
        }
        judge_os_trial(&agent, os);
    }
    loop {
        if signalled(&signals, Duration::from_millis(200)) {
            break;
        }
        // Structured logs: every event as a JSON line.
        if let Ok(events) = agent.state().events(since, None, 1000) {
            for e in events {
                since = e.seq;
                eprintln!(
                    "{}",
                    serde_json::json!({"level": "info", "time_ms": e.time_ms, "group": e.group, "instance": e.instance, "msg": e.message})
                );
            }
        }
    }
    let _ = stop.send(());
    let _ = server.join();
    eprintln!(
        "{}",
        serde_json::json!({"level": "info", "msg": "juice daemon stopped; instances keep running"})
    );
    Ok(())
}

/// `juice up`: an embedded daemon in the foreground, the site applied, a live view of
/// groups, events and logs; Ctrl-C stops everything it started.
pub fn up(file: &Path) -> Result {
    let home = crate::juice_home();
    let site = load_site(file)?;
    let microvm = site
        .group
        .values()
        .any(|g| g.isolation == juice_agent::site::Isolation::Microvm);
    doctor::preflight(&doctor::Host::current(&home), microvm)?;
    let signals = block_signals()?;
    let (agent, stop, server) = start_agent(&home, None, None)?;
    let changes = agent.apply(&site, true)?;
    print_changes(&changes, Format::Table, true)?;
    println!("juice up: serving {}; Ctrl-C stops it", file.display());

    let mut since = 0u64;
    let mut offsets: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut last_table = String::new();
    loop {
        if signalled(&signals, Duration::from_millis(500)) {
            break;
        }
        let table = groups_table(&agent.groups()?);
        if table != last_table {
            println!("\n{table}");
            last_table = table;
        }
        for e in agent.state().events(since, None, 1000)? {
            since = e.seq;
            println!("{}", event_line(&e));
        }
        for i in agent.instances() {
            let Some(path) = agent.log_path(&i.name) else {
                continue;
            };
            let offset = offsets.entry(i.name.clone()).or_insert(0);
            if let Ok(text) = read_from(&path, offset) {
                for line in text.lines() {
                    println!("[{}] {line}", i.name);
                }
            }
        }
        std::io::stdout().flush()?;
    }
    println!("\njuice up: stopping");
    agent.teardown()?;
    let _ = stop.send(());
    let _ = server.join();
    Ok(())
}

fn read_from(path: &PathBuf, offset: &mut u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if *offset > len {
        *offset = 0;
    }
    f.seek(SeekFrom::Start(*offset))?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    *offset += s.len() as u64;
    Ok(s)
}

/// `juice certs DIR`: a CA, and server and client certificates it signed.
pub fn certs(dir: &Path, hosts: &[String]) -> Result {
    let mut hosts = hosts.to_vec();
    if hosts.is_empty() {
        hosts = vec!["localhost".into(), "127.0.0.1".into()];
    }
    juice_agent::tls::make_certificates(dir, &hosts)?;
    println!(
        "wrote {0}/ca.pem, {0}/server.pem, {0}/server-key.pem, {0}/client.pem, {0}/client-key.pem (server names: {1})",
        dir.display(),
        hosts.join(", ")
    );
    println!("daemon: juice daemon --listen ADDR --tls {}", dir.display());
    println!(
        "client: JUICE_REMOTE=HOST:PORT JUICE_TLS={} juice get groups",
        dir.display()
    );
    Ok(())
}
