//! Mutual TLS to the fleet's etcd, on the command line: `juice certs fleet init|etcd|host`
//! (the fleet's CA and the certificates it signs), `juice fleet id` (a host's id, to issue
//! its certificate) and `juice fleet auth setup|host|remove` (etcd's users and roles, so
//! that a host can write only its own records). The rules are in `juice_fleet::certs`,
//! `juice_fleet::auth` and `juice_fleet::tls`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use juice_fleet::{Endpoints, HostId};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// A client's TLS directory under `$JUICE_HOME` when none is given.
pub const DEFAULT_DIR: &str = "fleet-tls";

/// The `--tls` of this `juice fleet` command, set once (the CLI runs one command).
static DIR: OnceLock<PathBuf> = OnceLock::new();

/// `given`, else `$JUICE_FLEET_TLS`, else `home/fleet-tls`.
pub fn dir_or_default(given: Option<PathBuf>, home: &Path) -> PathBuf {
    given
        .or_else(|| {
            std::env::var_os("JUICE_FLEET_TLS")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| home.join(DEFAULT_DIR))
}

/// Remembers `juice fleet --tls DIR` for every connection the command makes.
pub fn use_dir(given: Option<PathBuf>) {
    let _ = DIR.set(dir_or_default(given, &crate::juice_home()));
}

/// The TLS directory of this command: `--tls`, else `$JUICE_FLEET_TLS`, else
/// `$JUICE_HOME/fleet-tls`.
pub fn dir() -> PathBuf {
    DIR.get()
        .cloned()
        .unwrap_or_else(|| dir_or_default(None, &crate::juice_home()))
}

/// `juice certs fleet ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// The fleet's certificates for etcd: its CA, etcd's, the operator's and each host's.
    Fleet {
        #[command(subcommand)]
        command: FleetCerts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCerts {
    /// Make the fleet's CA in DIR (ca.pem, ca-key.pem) and the operator's certificate
    /// (DIR/operator, user `root` in etcd).
    Init { dir: PathBuf },
    /// Make etcd's certificate (DIR/etcd), valid for the names and addresses given.
    Etcd {
        dir: PathBuf,
        /// A DNS name or IP address clients reach etcd by (repeatable).
        #[arg(long = "san", value_name = "NAME|IP", required = true)]
        sans: Vec<String>,
    },
    /// Make a host's certificate (DIR/host-ID, user `host-ID` in etcd); copy that
    /// directory to the host's $JUICE_HOME/fleet-tls.
    Host {
        dir: PathBuf,
        /// The host's id (`juice fleet id` on the host prints it).
        #[arg(long = "id", value_name = "HOSTID")]
        id: HostId,
    },
}

/// `juice fleet auth ...`.
#[derive(Debug, clap::Subcommand)]
pub enum AuthCommand {
    /// Make etcd's `root` user and the `controller` role, and enable auth (run once,
    /// with the operator's certificate, before hosts join).
    Setup {
        /// etcd's endpoints (comma-separated https://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
    /// Let one host write its own records (and with --controller, stand as controller).
    Host {
        /// The host's id (`juice fleet id` on the host prints it).
        id: HostId,
        /// Also the role `controller`: everything under /juice/v1/, for a daemon started
        /// with --fleet-controller.
        #[arg(long)]
        controller: bool,
        /// etcd's endpoints (comma-separated https://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
    /// Take a host's user and role away: its certificate can then do nothing in etcd.
    Remove {
        id: HostId,
        /// etcd's endpoints (comma-separated https://HOST:PORT; default: $JUICE_FLEET).
        #[arg(long, value_name = "ENDPOINTS")]
        endpoints: Option<Endpoints>,
    },
}

pub fn certs(CertsCommand::Fleet { command }: CertsCommand) -> Result {
    match command {
        FleetCerts::Init { dir } => {
            let operator = juice_fleet::certs::init(&dir)?;
            println!(
                "wrote {0}/ca.pem, {0}/ca-key.pem (keep it: it signs every fleet certificate) and the operator's certificate in {1} (etcd user `root`)",
                dir.display(),
                operator.display()
            );
            println!(
                "next: juice certs fleet etcd {} --san ETCD-ADDRESS",
                dir.display()
            );
        }
        FleetCerts::Etcd { dir, sans } => {
            let out = juice_fleet::certs::etcd(&dir, &sans)?;
            println!(
                "wrote {0}/ca.pem, {0}/cert.pem, {0}/key.pem (names: {1})",
                out.display(),
                sans.join(", ")
            );
            println!(
                "etcd: --client-cert-auth --trusted-ca-file {0}/ca.pem --cert-file {0}/cert.pem --key-file {0}/key.pem",
                out.display()
            );
        }
        FleetCerts::Host { dir, id } => {
            let out = juice_fleet::certs::host(&dir, &id)?;
            println!(
                "wrote {0}/ca.pem, {0}/cert.pem, {0}/key.pem (etcd user `{1}`)",
                out.display(),
                juice_fleet::certs::host_user(&id)
            );
            println!(
                "copy {} to the host's $JUICE_HOME/{DEFAULT_DIR}, then: juice fleet auth host {id}",
                out.display()
            );
        }
    }
    Ok(())
}

/// `juice fleet id`: this host's id, made now if it has none.
pub fn print_id() -> Result {
    let home = crate::juice_home();
    std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
    println!("{}", juice_fleet::facts::host_id(&home.join("host-id"))?);
    Ok(())
}

pub fn auth(
    command: AuthCommand,
    endpoints_or_env: impl Fn(Option<Endpoints>) -> Result<Endpoints>,
) -> Result {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timeout = std::time::Duration::from_secs(5);
    match command {
        AuthCommand::Setup { endpoints } => {
            let endpoints = endpoints_or_env(endpoints)?;
            rt.block_on(async {
                juice_fleet::Store::connect(&endpoints, timeout)
                    .await?
                    .auth_setup()
                    .await
            })?;
            println!(
                "etcd's auth is enabled: `root` may do anything; add each host with `juice fleet auth host ID`"
            );
        }
        AuthCommand::Host {
            id,
            controller,
            endpoints,
        } => {
            let endpoints = endpoints_or_env(endpoints)?;
            rt.block_on(async {
                juice_fleet::Store::connect(&endpoints, timeout)
                    .await?
                    .auth_host(&id, controller)
                    .await
            })?;
            println!(
                "{} may write its own records{}",
                juice_fleet::certs::host_user(&id),
                if controller {
                    ", and as controller everything under /juice/v1/"
                } else {
                    ""
                }
            );
        }
        AuthCommand::Remove { id, endpoints } => {
            let endpoints = endpoints_or_env(endpoints)?;
            rt.block_on(async {
                juice_fleet::Store::connect(&endpoints, timeout)
                    .await?
                    .auth_remove(&id)
                    .await
            })?;
            println!(
                "{} can no longer do anything in etcd",
                juice_fleet::certs::host_user(&id)
            );
        }
    }
    Ok(())
}
