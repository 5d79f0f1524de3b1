//! The fleet commands: `juice daemon --fleet` (this host's registration, and with
//! `--fleet-controller` its candidacy as the fleet's controller, started beside the agent),
//! `juice fleet get hosts|controller` and `juice fleet plan|apply -f fleet.toml`. The records and their rules are in
//! `juice-fleet`; this module reads the host's facts and flags and prints the answers.

use std::path::Path;
use std::time::Duration;

use juice_agent::doctor;
use juice_fleet::controller::Event;
use juice_fleet::{
    Backend, Controller, Endpoints, FleetSpec, HostRecord, Label, Labels, Plan, Registration,
    Status,
};

use crate::output::{self, Format};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How long `juice fleet get` waits for etcd before saying it is unreachable.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// `juice daemon`'s fleet flags.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    /// Join the fleet whose etcd is at ENDPOINTS (comma-separated http://HOST:PORT).
    #[arg(long = "fleet", value_name = "ENDPOINTS")]
    pub endpoints: Option<Endpoints>,
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

/// What a daemon does in the fleet: its registration, and maybe its candidacy as controller.
pub struct Member {
    pub registration: Registration,
    pub controller: Option<Controller>,
}

/// This host's registration, when `--fleet` was given: the record is read and checked
/// now, so a bad label or lease is refused before the daemon starts anything.
pub fn member(home: &Path, args: &JoinArgs) -> Result<Option<Member>> {
    let Some(endpoints) = args.endpoints.clone() else {
        return Ok(None);
    };
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
    };
    let registration = Registration::new(endpoints.clone(), record, args.lease_secs)?;
    let controller = args.controller.then(|| Controller {
        endpoints,
        host: registration.record.id.clone(),
        ttl: registration.ttl(),
    });
    Ok(Some(Member {
        registration,
        controller,
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
/// as a JSON line like the daemon's other logs.
pub async fn keep_registered(registration: Registration) {
    let host = registration.record.id.clone();
    let endpoints = registration.endpoints.to_string();
    registration
        .run(move |status| {
            let line = match status {
                Status::Registered { lease, ttl } => serde_json::json!({
                    "level": "info", "msg": "registered in the fleet", "host": host,
                    "endpoints": endpoints, "lease": format!("{lease:x}"), "ttl_s": ttl.as_secs(),
                }),
                Status::Lost { error, retry } => serde_json::json!({
                    "level": "warn", "msg": "fleet registration lost; instances keep running",
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
    /// List what the fleet knows: the hosts registered now, or the controller leading it.
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
    /// Store a fleet file as the fleet's declared state; the controller places it.
    Apply {
        /// The fleet file.
        #[arg(short = 'f', long = "file", value_name = "FLEET.TOML")]
        file: std::path::PathBuf,
        /// etcd's endpoints (comma-separated http://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
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
}

pub fn run(command: FleetCommand, format: Format) -> Result {
    match command {
        FleetCommand::Get { what, endpoints } => {
            let endpoints = endpoints_or_env(endpoints)?;
            match what {
                FleetGetKind::Hosts => get_hosts(&endpoints, format),
                FleetGetKind::Controller => get_controller(&endpoints, format),
                FleetGetKind::Assignments => get_assignments(&endpoints, format),
            }
        }
        FleetCommand::Plan { file, endpoints } => {
            let spec = FleetSpec::load(&file)?;
            let endpoints = endpoints_or_env(endpoints)?;
            let plan = block_on(async {
                let store = juice_fleet::Store::connect(&endpoints, QUERY_TIMEOUT).await?;
                Ok::<_, juice_fleet::Error>(store.plan(&spec).await??)
            })??;
            print_plan(&plan, format)
        }
        FleetCommand::Apply { file, endpoints } => {
            let spec = FleetSpec::load(&file)?;
            let endpoints = endpoints_or_env(endpoints)?;
            let (plan, revision) = block_on(async {
                let store = juice_fleet::Store::connect(&endpoints, QUERY_TIMEOUT).await?;
                // A spec that cannot be placed now is refused before it is stored.
                let plan = store.plan(&spec).await??;
                let revision = store.apply_spec(&spec).await?;
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
    }
}

fn block_on<T>(f: impl Future<Output = T>) -> Result<T> {
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
    let leader = block_on(async {
        let store = juice_fleet::Store::connect(endpoints, QUERY_TIMEOUT).await?;
        store.leader().await
    })??;
    if format == Format::Json {
        return output::json(&leader);
    }
    match leader {
        Some(l) => println!("{} (elected at revision {})", l.host, l.revision),
        None => println!("no controller leads the fleet"),
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

/// `--endpoints`, else `$JUICE_FLEET`.
fn endpoints_or_env(given: Option<Endpoints>) -> Result<Endpoints> {
    if let Some(e) = given {
        return Ok(e);
    }
    match std::env::var("JUICE_FLEET") {
        Ok(s) if !s.trim().is_empty() => Ok(s
            .parse::<Endpoints>()
            .map_err(|e| format!("JUICE_FLEET: {e}"))?),
        _ => Err("no fleet to ask: give --endpoints http://HOST:2379 or set JUICE_FLEET".into()),
    }
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
