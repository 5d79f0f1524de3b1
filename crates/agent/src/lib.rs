//! The Juice host agent: `juice daemon` and `juice up`.
//!
//! Groups are declared in a site file ([`site`]); each change to a group's
//! template is a numbered revision kept in an embedded database ([`state`]).
//! The reconciler ([`agent`]) keeps every group at its size and revision, by
//! rules kept apart as a pure function of the group and the time ([`planner`]):
//! it replaces dead instances (with a crash-loop back-off), replaces old
//! revisions in batches that must pass a health gate ([`health`]), and rolls
//! back by itself when a new revision crashes, fails its health check or never
//! becomes healthy. Instances are sandboxes started without a shim, so they
//! keep running when the daemon stops or is killed, and a new daemon adopts
//! them. The API ([`api`]) is HTTP/JSON on a unix socket readable by its owner only;
//! [`client`] is its typed client.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use juice_agent::{agent::Agent, site::Site};
//! let agent = Agent::open("/var/lib/juice".as_ref())?;
//! let site = Site::load("site.toml".as_ref())?;
//! for change in agent.apply(&site, true)? {
//!     println!("{}: {} ({})", change.group, change.action, change.reason);
//! }
//! # Ok(()) }
//! ```

pub mod agent;
pub mod api;
pub mod backend;
pub mod client;
pub mod doctor;
pub mod health;
pub use juice_runtime::limits;
pub mod metrics;
pub mod os;
pub mod planner;
mod releaser;
pub mod site;
pub mod state;
pub mod tls;

use std::path::Path;
use std::sync::Arc;

/// Runs the agent: the reconciler in its own thread and the API on the socket,
/// until `shutdown` resolves. Instances keep running afterwards.
pub async fn serve(
    agent: Arc<agent::Agent>,
    remote: Option<(std::net::SocketAddr, Arc<rustls::ServerConfig>)>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let socket = agent.home().join("juice.sock");
    // The instances an earlier daemon started are in every answer from the first.
    if let Err(e) = agent.adopt() {
        eprintln!("juice: adopting running instances: {e}");
    }
    let listener = api::bind(&socket)?;
    let reconciler = agent.clone();
    std::thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || reconciler.run_reconciler())?;
    if let Some((addr, config)) = remote {
        let router = api::router(agent.clone());
        tokio::spawn(async move {
            if let Err(e) = tls::serve_tls(addr, config, router).await {
                eprintln!("juice: the remote API on {addr} stopped: {e}");
            }
        });
    }
    let app = api::router(agent.clone()).into_make_service_with_connect_info::<api::Peer>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(&socket);
    // Ended instances' cgroups and addresses are freed before the daemon goes.
    agent.settle();
    result
}

/// Where the socket is.
pub fn socket(home: &Path) -> std::path::PathBuf {
    home.join("juice.sock")
}
