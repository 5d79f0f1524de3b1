//! The fleet commands: `juice daemon --fleet` (this host's registration, started beside
//! the agent) and `juice fleet get hosts`. The records and their rules are in
//! `juice-fleet`; this module reads the host's facts and flags and prints the answers.

use std::path::Path;
use std::time::Duration;

use juice_agent::doctor;
use juice_fleet::{Backend, Endpoints, HostRecord, Label, Labels, Registration, Status};

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
}

/// This host's registration, when `--fleet` was given: the record is read and checked
/// now, so a bad label or lease is refused before the daemon starts anything.
pub fn registration(home: &Path, args: &JoinArgs) -> Result<Option<Registration>> {
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
    Ok(Some(Registration::new(endpoints, record, args.lease_secs)?))
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
    /// List what the fleet knows: the hosts registered now.
    Get {
        #[arg(value_enum)]
        what: FleetGetKind,
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
}

pub fn run(command: FleetCommand, format: Format) -> Result {
    match command {
        FleetCommand::Get { what, endpoints } => {
            let FleetGetKind::Hosts = what;
            get_hosts(&endpoints_or_env(endpoints)?, format)
        }
    }
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
