//! The fleet commands: `juice daemon --fleet` (this host's registration and its work on its
//! assignments, and with `--fleet-controller` its candidacy as the fleet's controller, all
//! started beside the agent), `juice fleet get hosts|controller|assignments|groups`,
//! `juice fleet describe group NAME` and `juice fleet plan|apply -f fleet.toml`. The records
//! and their rules are in `juice-fleet`; this module reads the host's facts and flags and
//! prints the answers.

use std::path::Path;
use std::time::Duration;

use juice_agent::doctor;
use std::collections::BTreeMap;

use juice_fleet::controller::Event;
use juice_fleet::host::Event as HostEvent;
use juice_fleet::report::GroupSummary;
use juice_fleet::{
    Backend, Controller, Endpoints, FleetSpec, HostRecord, HostWork, Label, Labels, Plan,
    Registration, Status,
};

use crate::output::{self, Format};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How long `juice fleet get` waits for etcd before saying it is unreachable.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// `juice daemon`'s fleet flags.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    /// Join the fleet whose etcd is at ENDPOINTS (comma-separated http://HOST:PORT, or
    /// https://HOST:PORT for mutual TLS).
    #[arg(long = "fleet", value_name = "ENDPOINTS")]
    pub endpoints: Option<Endpoints>,
    /// With https:// endpoints: the fleet's CA, this host's certificate and key (ca.pem,
    /// cert.pem, key.pem; default: $JUICE_FLEET_TLS, else $JUICE_HOME/fleet-tls, made by
    /// `juice certs fleet host`).
    #[arg(long = "fleet-tls", value_name = "DIR", requires = "endpoints")]
    pub fleet_tls: Option<std::path::PathBuf>,
    /// A label of this host in the fleet, such as zone=eu-1 (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", requires = "endpoints")]
    pub labels: Vec<Label>,
    /// The time to live of this host's lease: it disappears from the fleet this long after it dies.
    #[arg(long = "fleet-lease", value_name = "SECONDS", default_value_t = juice_fleet::registration::DEFAULT_TTL.as_secs(), requires = "endpoints")]
    pub lease_secs: u64,
    /// Stand as the fleet's controller: one of the daemons started so is elected, and it
    /// alone places the fleet's groups on hosts.
    #[arg(long = "fleet-controller", requires = "endpoints")]
    pub controller: bool,
}

/// What a daemon does in the fleet: its registration (and its work on its assignments,
/// started beside the agent), and maybe its candidacy as controller.
pub struct Member {
    pub registration: Registration,
    pub controller: Option<Controller>,
    /// The running binary, for host updates.
    pub running: crate::fleet_update::Running,
}

/// This host's registration, when `--fleet` was given: the record is read and checked
/// now, so a bad label or lease is refused before the daemon starts anything.
pub fn member(home: &Path, args: &JoinArgs) -> Result<Option<Member>> {
    let Some(endpoints) = args.endpoints.clone() else {
        return Ok(None);
    };
    let tls = crate::fleet_tls::dir_or_default(args.fleet_tls.clone(), home);
    let endpoints = endpoints.with_tls(&tls)?;
    let labels = Labels::new(args.labels.iter().cloned())?;
    std::fs::create_dir_all(home).map_err(|e| format!("{}: {e}", home.display()))?;
    let id = juice_fleet::facts::host_id(&home.join("host-id"))?;
    let facts = juice_fleet::facts::Facts::current();
    // The daemon only starts where the sandbox backend can run (its preflight); microVMs
    // are offered where their prerequisites are all there, as `juice doctor` judges them.
    let mut backends = vec![Backend::Sandbox];
    let microvm = doctor::microvm(&doctor::Host::current(home));
    if microvm.iter().all(|c| c.result != doctor::Outcome::Missing) {
        backends.push(Backend::Microvm);
    }
    let running = crate::fleet_update::Running::current()?;
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let record = HostRecord {
        id,
        hostname: facts.hostname,
        cpus: facts.cpus,
        memory_bytes: facts.memory_bytes,
        labels,
        backends,
        juice_version: env!("CARGO_PKG_VERSION").to_owned(),
        os: facts.os,
        kernel: facts.kernel,
        started_ms,
        binary_sha256: running.sha256.clone(),
    };
    let mut registration = Registration::new(endpoints.clone(), record, args.lease_secs)?;
    // Kept across restarts: a re-executed daemon takes its lease (and update slot) over.
    registration.lease_file = Some(home.join("fleet/lease"));
    let controller = args.controller.then(|| Controller {
        endpoints,
        host: registration.record.id.clone(),
        ttl: registration.ttl(),
    });
    Ok(Some(Member {
        registration,
        controller,
        running,
    }))
}

/// Runs `controller` for as long as the runtime it is spawned on, logging each change as
/// a JSON line.
pub async fn keep_controlling(controller: Controller) {
    let host = controller.host.clone();
    controller
        .run(move |event| {
            let line = match event {
                Event::Elected { revision } => serde_json::json!({
                    "level": "info", "msg": "elected fleet controller", "host": host, "revision": revision,
                }),
                Event::Placed { revision, writes } => serde_json::json!({
                    "level": "info", "msg": "fleet spec placed", "spec_revision": revision, "writes": writes,
                }),
                Event::Unplaceable { revision, error } => serde_json::json!({
                    "level": "error", "msg": "fleet spec cannot be placed; assignments unchanged",
                    "spec_revision": revision, "error": error.to_string(),
                }),
                Event::Moved { host: missing, groups, after } => serde_json::json!({
                    "level": "warn", "msg": "a missing host's groups placed elsewhere", "host": missing,
                    "groups": groups, "missing_ms": u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
                }),
                Event::Brake(Some(brake)) => serde_json::json!({
                    "level": "error", "msg": "too many hosts missing; nothing is rescheduled",
                    "missing": brake.missing.len(), "hosts": brake.hosts, "max_missing": brake.max_missing, "limit": brake.limit,
                }),
                Event::Brake(None) => serde_json::json!({
                    "level": "info", "msg": "the brake is released; missing hosts' groups move again",
                }),
                Event::Rollout { group, record } => serde_json::json!({
                    "level": if record.state == juice_fleet::rollout::State::Failed { "error" } else { "info" },
                    "msg": "fleet rollout moved", "group": group.to_string(), "state": record.state.to_string(),
                    "wave": record.wave + 1, "touched": record.touched, "revision": record.to.revision,
                    "reason": record.reason,
                }),
                Event::Lost { error, retry } => serde_json::json!({
                    "level": "warn", "msg": "not leading the fleet; campaigning again", "host": host,
                    "error": error.to_string(), "retry_ms": u64::try_from(retry.as_millis()).unwrap_or(u64::MAX),
                }),
            };
            eprintln!("{line}");
        })
        .await;
}

/// Runs `registration` for as long as the runtime it is spawned on, logging each change
/// as a JSON line like the daemon's other logs; `lease` says the host's lease to the
/// host's work (its reports are written under it).
pub async fn keep_registered(
    registration: Registration,
    lease_now: tokio::sync::watch::Sender<Option<i64>>,
) {
    let host = registration.record.id.clone();
    let endpoints = registration.endpoints.to_string();
    registration
        .run(move |status| {
            let line = match status {
                Status::Registered { lease, ttl } => {
                    lease_now.send_replace(Some(lease));
                    serde_json::json!({
                        "level": "info", "msg": "registered in the fleet", "host": host,
                        "endpoints": endpoints, "lease": format!("{lease:x}"), "ttl_s": ttl.as_secs(),
                    })
                }
                Status::Lost { error, retry } => {
                    lease_now.send_replace(None);
                    serde_json::json!({
                    "level": "warn", "msg": "fleet registration lost; instances keep running",
                    "host": host, "error": error.to_string(), "retry_ms": u64::try_from(retry.as_millis()).unwrap_or(u64::MAX),
                    })
                }
            };
            eprintln!("{line}");
        })
        .await;
}

/// Runs this host's fleet work (applying its assignments, writing its reports) for as
/// long as the runtime it is spawned on, logging each change as a JSON line.
pub async fn keep_working(work: HostWork<crate::fleet_host::AgentHost>) {
    let host = work.host.clone();
    work.run(move |event| {
        let line = match event {
            HostEvent::Applied { groups, failed } => {
                let failed: BTreeMap<String, String> =
                    failed.into_iter().map(|(g, e)| (g.to_string(), e)).collect();
                serde_json::json!({
                    "level": if failed.is_empty() { "info" } else { "error" },
                    "msg": "fleet assignments applied", "host": host, "groups": groups, "failed": failed,
                })
            }
            HostEvent::Reported { writes } => serde_json::json!({
                "level": "info", "msg": "fleet reports written", "host": host, "writes": writes,
            }),
            HostEvent::Malformed { error } => serde_json::json!({
                "level": "warn", "msg": "fleet assignment ignored", "host": host, "error": error.to_string(),
            }),
            HostEvent::Compacted { revision } => serde_json::json!({
                "level": "info", "msg": "fleet assignments compacted away; reading them again", "host": host, "revision": revision,
            }),
            HostEvent::Lost { error, retry } => serde_json::json!({
                "level": "warn", "msg": "fleet assignments not watched; groups keep running as they are",
                "host": host, "error": error.to_string(), "retry_ms": u64::try_from(retry.as_millis()).unwrap_or(u64::MAX),
            }),
        };
        eprintln!("{line}");
    })
    .await;
}

/// `juice fleet` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// List what the fleet knows: its hosts, controller, assignments, or groups and their health.
    Get {
        #[arg(value_enum)]
        what: FleetGetKind,
        /// etcd's endpoints (comma-separated http://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
    /// Show where the groups of a fleet file would run on the hosts registered now; changes nothing.
    Plan {
        /// The fleet file.
        #[arg(short = 'f', long = "file", value_name = "FLEET.TOML")]
        file: std::path::PathBuf,
        /// etcd's endpoints (comma-separated http://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
    /// Show one fleet group host by host: its assignment, report and labels.
    Describe {
        #[arg(value_enum)]
        kind: FleetDescribeKind,
        /// The group's name (as in the fleet file), or the host's id (a unique prefix of
        /// it will do) or hostname.
        name: String,
        /// etcd's endpoints (comma-separated http://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
    /// A group's rollout: its status, or ask the controller to pause, resume or undo it.
    Rollout {
        #[arg(value_enum)]
        verb: crate::fleet_rollout::RolloutVerb,
        /// The group's name (as in the fleet file).
        group: String,
        /// etcd's endpoints (comma-separated http://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
    /// Store a fleet file as the fleet's declared state; the controller places it.
    Apply {
        /// The fleet file.
        #[arg(short = 'f', long = "file", value_name = "FLEET.TOML")]
        file: std::path::PathBuf,
        /// Store it only if the fleet's spec is still at this revision (the one `juice
        /// fleet plan` planned against; 0: only if there is no spec yet).
        #[arg(long, value_name = "REVISION")]
        expect_revision: Option<i64>,
        /// etcd's endpoints (comma-separated http://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
    /// Print this host's id in the fleet (made if it has none yet), to issue its certificate.
    Id,
    /// etcd's users and roles: a host may write only its own records (operator's certificate).
    Auth {
        #[command(subcommand)]
        command: crate::fleet_tls::AuthCommand,
    },
    /// Update the hosts' own daemon, a few hosts at a time (see docs/fleet.md, "Host updates").
    Update {
        #[command(subcommand)]
        command: crate::fleet_update::UpdateCommand,
    },
}

/// What `juice fleet get` lists (the singular is accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FleetGetKind {
    #[value(alias = "host")]
    Hosts,
    /// The elected controller.
    Controller,
    /// The assignments the controller wrote, by host and group.
    #[value(alias = "assignment")]
    Assignments,
    /// Each group: desired, placed and ready instances, and the hosts not reporting.
    #[value(alias = "group")]
    Groups,
}

/// What `juice fleet describe` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FleetDescribeKind {
    Group,
    /// A host: its record, and each group it is assigned or reports on.
    Host,
}

pub fn run(command: FleetCommand, tls: Option<std::path::PathBuf>, format: Format) -> Result {
    crate::fleet_tls::use_dir(tls);
    match command {
        FleetCommand::Id => crate::fleet_tls::print_id(),
        FleetCommand::Auth { command } => crate::fleet_tls::auth(command, endpoints_or_env),
        FleetCommand::Get { what, endpoints } => {
            let endpoints = endpoints_or_env(endpoints)?;
            match what {
                FleetGetKind::Hosts => get_hosts(&endpoints, format),
                FleetGetKind::Controller => get_controller(&endpoints, format),
                FleetGetKind::Assignments => get_assignments(&endpoints, format),
                FleetGetKind::Groups => get_groups(&endpoints, format),
            }
        }
        FleetCommand::Describe {
            kind: FleetDescribeKind::Group,
            name,
            endpoints,
        } => describe_group(&endpoints_or_env(endpoints)?, &name, format),
        FleetCommand::Describe {
            kind: FleetDescribeKind::Host,
            name,
            endpoints,
        } => describe_host(&endpoints_or_env(endpoints)?, &name, format),
        FleetCommand::Rollout {
            verb,
            group,
            endpoints,
        } => crate::fleet_rollout::run(verb, &group, &endpoints_or_env(endpoints)?, format),
        FleetCommand::Plan { file, endpoints } => {
            let spec = FleetSpec::load(&file)?;
            let endpoints = endpoints_or_env(endpoints)?;
            let (plan, revision) = block_on(async {
                let store = juice_fleet::Store::connect(&endpoints, QUERY_TIMEOUT).await?;
                let revision = store.spec().await?.map_or(0, |s| s.revision);
                Ok::<_, juice_fleet::Error>((store.plan(&spec).await??, revision))
            })??;
            if format == Format::Json {
                return output::json(
                    &serde_json::json!({ "spec_revision": revision, "plan": plan }),
                );
            }
            println!(
                "planned against the fleet's spec at revision {revision} (`juice fleet apply --expect-revision {revision}` stores it only if that is still so):"
            );
            print_plan(&plan, format)
        }
        FleetCommand::Apply {
            file,
            endpoints,
            expect_revision,
        } => {
            let spec = FleetSpec::load(&file)?;
            let endpoints = endpoints_or_env(endpoints)?;
            let (plan, revision) = block_on(async {
                let store = juice_fleet::Store::connect(&endpoints, QUERY_TIMEOUT).await?;
                // The spec this apply replaces: stored only if it is still that one when
                // written, so two applies at once never lose one without a word.
                let current = store.spec().await?.map_or(0, |s| s.revision);
                if let Some(expected) = expect_revision
                    && expected != current
                {
                    return Err(juice_fleet::Error::StaleSpec {
                        expected,
                        actual: current,
                    });
                }
                // A spec that cannot be placed now is refused before it is stored.
                let plan = store.plan(&spec).await??;
                let revision = store.replace_spec(&spec, current).await?;
                Ok::<_, juice_fleet::Error>((plan, revision))
            })??;
            if format == Format::Json {
                return output::json(&serde_json::json!({ "revision": revision, "plan": plan }));
            }
            println!(
                "fleet spec stored at revision {revision}; the controller places it as planned:"
            );
            print_plan(&plan, format)
        }
        FleetCommand::Update { command } => crate::fleet_update::run(command, format),
    }
}

pub(crate) fn block_on<T>(f: impl Future<Output = T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

fn print_plan(plan: &Plan, format: Format) -> Result {
    if format == Format::Json {
        return output::json(plan);
    }
    let mut t = output::table([
        "HOST",
        "GROUP",
        "SIZE",
        "REVISION",
        "IMAGE",
        "ISOLATION",
        "CPUS",
        "MEMORY",
        "PORTS",
    ]);
    for (host, groups) in &plan.hosts {
        for (group, a) in groups {
            let ports: Vec<String> = a.ports.iter().map(ToString::to_string).collect();
            t.add_row([
                host.to_string(),
                group.to_string(),
                a.size.to_string(),
                a.revision.clone(),
                a.image.clone(),
                a.isolation.to_string(),
                format!("{}", a.millicpus as f64 / 1000.0),
                output::size(a.memory_bytes),
                if ports.is_empty() {
                    "-".into()
                } else {
                    ports.join(",")
                },
            ]);
        }
    }
    println!("{t}");
    Ok(())
}

fn get_controller(endpoints: &Endpoints, format: Format) -> Result {
    let (leader, brake) = block_on(async {
        let store = juice_fleet::Store::connect(endpoints, QUERY_TIMEOUT).await?;
        Ok::<_, juice_fleet::Error>((store.leader().await?, store.brake().await?))
    })??;
    if format == Format::Json {
        // The leader's fields, and the brake's record while it holds.
        let mut value = serde_json::to_value(&leader).unwrap_or_default();
        if let (Some(map), Some(b)) = (value.as_object_mut(), &brake) {
            map.insert("brake".into(), serde_json::to_value(b).unwrap_or_default());
        }
        return output::json(&value);
    }
    match leader {
        Some(l) => println!("{} (elected at revision {})", l.host, l.revision),
        None => println!("no controller leads the fleet"),
    }
    if let Some(b) = brake {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let hosts: Vec<String> = b
            .missing
            .iter()
            .map(|m| {
                format!(
                    "{} (missing for {}s)",
                    m.host,
                    now.saturating_sub(m.since_ms) / 1000
                )
            })
            .collect();
        println!(
            "brake: {} of {} hosts with assignments are missing, more than max_missing = {} ({}) allows; nothing is rescheduled: {}",
            b.missing.len(),
            b.hosts,
            b.max_missing,
            b.limit,
            hosts.join(", ")
        );
    }
    Ok(())
}

fn get_assignments(endpoints: &Endpoints, format: Format) -> Result {
    let plan = block_on(async {
        let store = juice_fleet::Store::connect(endpoints, QUERY_TIMEOUT).await?;
        store.assignments().await
    })??;
    print_plan(&plan, format)
}

/// `--endpoints`, else `$JUICE_FLEET`; `https://` ones with the TLS files of `--tls`.
pub(crate) fn endpoints_or_env(given: Option<Endpoints>) -> Result<Endpoints> {
    let endpoints = match given {
        Some(e) => e,
        None => match std::env::var("JUICE_FLEET") {
            Ok(s) if !s.trim().is_empty() => s
                .parse::<Endpoints>()
                .map_err(|e| format!("JUICE_FLEET: {e}"))?,
            _ => {
                return Err(
                    "no fleet to ask: give --endpoints http://HOST:2379 or set JUICE_FLEET".into(),
                );
            }
        },
    };
    Ok(endpoints.with_tls(&crate::fleet_tls::dir())?)
}

fn get_hosts(endpoints: &Endpoints, format: Format) -> Result {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listing = rt.block_on(async {
        let store = juice_fleet::Store::connect(endpoints, QUERY_TIMEOUT).await?;
        store.hosts().await
    })?;
    // A record that cannot be read is said, not hidden; the others are still listed.
    for e in &listing.malformed {
        eprintln!("juice: warning: {e}");
    }
    if format == Format::Json {
        return output::json(&listing.hosts);
    }
    println!("{}", hosts_table(&listing.hosts));
    Ok(())
}

fn hosts_table(hosts: &[HostRecord]) -> output::Table {
    let mut t = output::table([
        "HOST", "HOSTNAME", "CPUS", "MEMORY", "BACKENDS", "LABELS", "JUICE", "OS",
    ]);
    for h in hosts {
        let backends: Vec<String> = h.backends.iter().map(ToString::to_string).collect();
        t.add_row([
            h.id.to_string(),
            h.hostname.clone(),
            h.cpus.to_string(),
            output::size(h.memory_bytes),
            backends.join(","),
            h.labels.to_string(),
            h.juice_version.clone(),
            h.os.clone(),
        ]);
    }
    t
}

/// Everything `get groups` and `describe group` read, in one connection.
struct Overview {
    spec: FleetSpec,
    assigned: Plan,
    reports: juice_fleet::host::Reports,
    hosts: juice_fleet::Listing,
}

fn overview(endpoints: &Endpoints) -> Result<Overview> {
    let o = block_on(async {
        let store = juice_fleet::Store::connect(endpoints, QUERY_TIMEOUT).await?;
        Ok::<_, juice_fleet::Error>(Overview {
            spec: store.spec().await?.map(|s| s.spec).unwrap_or_default(),
            assigned: store.assignments().await?,
            reports: store.reports().await?,
            hosts: store.hosts().await?,
        })
    })??;
    for e in o.reports.malformed.iter().chain(&o.hosts.malformed) {
        eprintln!("juice: warning: {e}");
    }
    Ok(o)
}

/// A group's summary and its rollout's state (`rolling 1/2`, `failed`, ...; none when the
/// group never had one).
#[derive(Debug, serde::Serialize)]
struct GroupLine<'a> {
    #[serde(flatten)]
    summary: &'a GroupSummary,
    rollout: Option<String>,
}

fn get_groups(endpoints: &Endpoints, format: Format) -> Result {
    let o = overview(endpoints)?;
    let rollouts = block_on(async {
        let store = juice_fleet::Store::connect(endpoints, QUERY_TIMEOUT).await?;
        store.rollouts().await
    })??;
    let groups = juice_fleet::report::summarise(&o.spec, &o.assigned, &o.reports.hosts);
    let lines: Vec<GroupLine> = groups
        .iter()
        .map(|g| GroupLine {
            summary: g,
            rollout: rollouts.get(&g.name).map(|r| {
                let waves = o
                    .spec
                    .group
                    .get(&g.name)
                    .map_or(0, |s| s.rollout.waves.len());
                if r.active() {
                    format!("{} {}/{waves}", r.state, r.wave + 1)
                } else {
                    r.state.to_string()
                }
            }),
        })
        .collect();
    if format == Format::Json {
        return output::json(&lines);
    }
    println!("{}", groups_table(&lines));
    Ok(())
}

fn groups_table(groups: &[GroupLine]) -> output::Table {
    let mut t = output::table([
        "GROUP",
        "REVISION",
        "READY",
        "PLACED",
        "HOSTS",
        "BY REVISION",
        "NOT REPORTING",
        "ROLLOUT",
    ]);
    for line in groups {
        let g = line.summary;
        let by: Vec<String> = g.ready.iter().map(|(r, n)| format!("{r}:{n}")).collect();
        let silent: Vec<String> = g.not_reporting.iter().map(ToString::to_string).collect();
        t.add_row([
            g.name.to_string(),
            g.revision.clone().unwrap_or_else(|| "(removed)".into()),
            format!("{}/{}", g.ready_now, g.desired),
            g.placed.to_string(),
            g.hosts.len().to_string(),
            if by.is_empty() {
                "-".into()
            } else {
                by.join(",")
            },
            if silent.is_empty() {
                "-".into()
            } else {
                silent.join(",")
            },
            line.rollout.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}

/// One host's part in a group, as `describe group` shows it.
#[derive(Debug, serde::Serialize)]
struct HostPart {
    host: juice_fleet::HostId,
    hostname: Option<String>,
    labels: Option<juice_fleet::Labels>,
    assignment: Option<juice_fleet::Assignment>,
    report: Option<juice_fleet::Report>,
}

/// A report's cells as `describe` shows them: revision, ready, status, restarts, age.
fn report_cells(report: Option<&juice_fleet::Report>, now_ms: u64) -> [String; 5] {
    match report {
        Some(r) => [
            r.revision.clone(),
            format!("{}/{}", r.ready, r.size),
            match &r.error {
                Some(e) => format!("{}: {e}", r.status),
                None => r.status.clone(),
            },
            r.restarts.to_string(),
            format!("{}s ago", now_ms.saturating_sub(r.written_ms) / 1000),
        ],
        None => [
            "-".into(),
            "-".into(),
            "not reporting".into(),
            "-".into(),
            "-".into(),
        ],
    }
}

/// The host `name` names among `known` (registered, assigned or reporting): its id, a
/// unique prefix of it (4 characters at least), or its hostname.
fn find_host<'a>(
    known: &'a [(juice_fleet::HostId, Option<String>)],
    name: &str,
) -> Result<&'a juice_fleet::HostId> {
    if let Some((id, _)) = known.iter().find(|(id, _)| id.as_str() == name) {
        return Ok(id);
    }
    let mut matching: Vec<&(juice_fleet::HostId, Option<String>)> = known
        .iter()
        .filter(|(id, hostname)| {
            (name.len() >= 4 && id.as_str().starts_with(name)) || hostname.as_deref() == Some(name)
        })
        .collect();
    matching.dedup_by(|a, b| a.0 == b.0);
    match matching.as_slice() {
        [one] => Ok(&one.0),
        [] => Err(format!(
            "no host `{name}` in the fleet: no registered, assigned or reporting host has that id, id prefix (4 characters at least) or hostname ({} known; see `juice fleet get hosts`)",
            known.len()
        )
        .into()),
        many => {
            let named: Vec<String> = many
                .iter()
                .map(|(id, h)| format!("{id} ({})", h.as_deref().unwrap_or("not registered")))
                .collect();
            Err(format!(
                "host `{name}` is ambiguous: it names {}; give more of the id",
                named.join(", ")
            )
            .into())
        }
    }
}

/// One group of a host, as `describe host` shows it.
#[derive(Debug, serde::Serialize)]
struct HostGroupPart {
    group: juice_fleet::GroupName,
    assignment: Option<juice_fleet::Assignment>,
    report: Option<juice_fleet::Report>,
}

fn describe_host(endpoints: &Endpoints, name: &str, format: Format) -> Result {
    let o = overview(endpoints)?;
    let mut known: Vec<(juice_fleet::HostId, Option<String>)> = o
        .hosts
        .hosts
        .iter()
        .map(|r| (r.id.clone(), Some(r.hostname.clone())))
        .collect();
    for id in o.assigned.hosts.keys().chain(o.reports.hosts.keys()) {
        if !known.iter().any(|(k, _)| k == id) {
            known.push((id.clone(), None));
        }
    }
    known.sort();
    let id = find_host(&known, name)?;
    let record = o.hosts.hosts.iter().find(|r| &r.id == id);
    let empty = BTreeMap::new();
    let assigned = o.assigned.hosts.get(id).unwrap_or(&empty);
    let empty_reports = BTreeMap::new();
    let reports = o.reports.hosts.get(id).unwrap_or(&empty_reports);
    let mut groups: Vec<&juice_fleet::GroupName> = assigned.keys().chain(reports.keys()).collect();
    groups.sort();
    groups.dedup();
    let parts: Vec<HostGroupPart> = groups
        .into_iter()
        .map(|g| HostGroupPart {
            group: g.clone(),
            assignment: assigned.get(g).cloned(),
            report: reports.get(g).cloned(),
        })
        .collect();
    if format == Format::Json {
        return output::json(&serde_json::json!({
            "id": id, "registered": record.is_some(), "record": record, "groups": parts,
        }));
    }
    println!("Host:       {id}");
    match record {
        Some(r) => {
            println!("Hostname:   {}", r.hostname);
            println!("Labels:     {}", r.labels);
            let backends: Vec<String> = r.backends.iter().map(ToString::to_string).collect();
            println!("Backends:   {}", backends.join(", "));
            println!("CPUs:       {}", r.cpus);
            println!("Memory:     {}", output::size(r.memory_bytes));
            println!("Juice:      {}", r.juice_version);
            if !r.binary_sha256.is_empty() {
                println!("Binary:     sha256:{}", r.binary_sha256);
            }
            println!("OS:         {} (kernel {})", r.os, r.kernel);
        }
        None => println!(
            "Registered: no (its lease is gone: dead or cut off; its assignments stay until its groups' reschedule_after)"
        ),
    }
    println!();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut t = output::table([
        "GROUP", "ASSIGNED", "IMAGE", "REVISION", "READY", "STATUS", "RESTARTS", "REPORTED",
    ]);
    for p in &parts {
        let [revision, ready, status, restarts, age] = report_cells(p.report.as_ref(), now);
        t.add_row([
            p.group.to_string(),
            p.assignment
                .as_ref()
                .map_or("-".into(), |a| format!("{} @ {}", a.size, a.revision)),
            p.assignment
                .as_ref()
                .map_or("-".into(), |a| a.image.clone()),
            revision,
            ready,
            status,
            restarts,
            age,
        ]);
    }
    println!("{t}");
    Ok(())
}

fn describe_group(endpoints: &Endpoints, name: &str, format: Format) -> Result {
    let o = overview(endpoints)?;
    let groups = juice_fleet::report::summarise(&o.spec, &o.assigned, &o.reports.hosts);
    let Some(summary) = groups.iter().find(|g| g.name.as_str() == name) else {
        let known: Vec<String> = groups.iter().map(|g| g.name.to_string()).collect();
        let message = if known.is_empty() {
            format!("no fleet group `{name}`: the fleet has no groups (see `juice fleet apply`)")
        } else {
            format!(
                "no fleet group `{name}`: the fleet's groups are {}",
                known.join(", ")
            )
        };
        return Err(message.into());
    };
    let group = &summary.name;
    let mut hosts: Vec<&juice_fleet::HostId> = summary.hosts.iter().collect();
    // Hosts that still report on it without an assignment (it moved away a moment ago).
    for (h, reports) in &o.reports.hosts {
        if reports.contains_key(group) && !hosts.contains(&h) {
            hosts.push(h);
        }
    }
    let parts: Vec<HostPart> = hosts
        .into_iter()
        .map(|h| {
            let record = o.hosts.hosts.iter().find(|r| &r.id == h);
            HostPart {
                host: h.clone(),
                hostname: record.map(|r| r.hostname.clone()),
                labels: record.map(|r| r.labels.clone()),
                assignment: o.assigned.hosts.get(h).and_then(|g| g.get(group)).cloned(),
                report: o.reports.hosts.get(h).and_then(|g| g.get(group)).cloned(),
            }
        })
        .collect();
    if format == Format::Json {
        return output::json(&serde_json::json!({ "group": summary, "hosts": parts }));
    }
    println!("Group:      {}", summary.name);
    println!(
        "Revision:   {}",
        summary
            .revision
            .as_deref()
            .unwrap_or("(removed from the spec)")
    );
    if let Some(g) = o.spec.group.get(group) {
        println!("Image:      {}", g.image);
    }
    println!(
        "Ready:      {}/{} at this revision ({} placed)\n",
        summary.ready_now, summary.desired, summary.placed
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut t = output::table([
        "HOST", "HOSTNAME", "LABELS", "ASSIGNED", "REVISION", "READY", "STATUS", "RESTARTS",
        "REPORTED",
    ]);
    for p in &parts {
        let [revision, ready, status, restarts, age] = report_cells(p.report.as_ref(), now);
        t.add_row([
            p.host.to_string(),
            p.hostname
                .clone()
                .unwrap_or_else(|| "(not registered)".into()),
            p.labels.as_ref().map_or("-".into(), ToString::to_string),
            p.assignment
                .as_ref()
                .map_or("-".into(), |a| format!("{} @ {}", a.size, a.revision)),
            revision,
            ready,
            status,
            restarts,
            age,
        ]);
    }
    println!("{t}");
    Ok(())
}
