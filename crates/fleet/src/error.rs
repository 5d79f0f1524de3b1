//! What can go wrong in the fleet crate, each with the thing that failed.

use std::path::PathBuf;

/// A fleet error. The messages are one sentence each and name what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No endpoint answered (down, wrong address, or a partition): `cause` says how.
    #[error(
        "etcd at {endpoints} is unreachable ({cause}): is it running, and are the endpoints right?"
    )]
    Unreachable { endpoints: String, cause: String },
    /// etcd answered, with an error.
    #[error("etcd at {endpoints} refused {what}: {source}")]
    Etcd {
        endpoints: String,
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// An endpoint list that cannot be used.
    #[error("fleet endpoint `{endpoint}`: {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// etcd (with `--client-cert-auth` and auth enabled) refused this certificate's user
    /// something: `action` says what ("write /juice/v1/hosts/9b1c…").
    #[error("etcd refused to let {user} {action}: permission denied")]
    Denied { user: String, action: String },
    /// The fleet's TLS files (`ca.pem`, `cert.pem`, `key.pem`) cannot be used.
    #[error("fleet TLS: {}: {reason}", .path.display())]
    Tls { path: PathBuf, reason: String },
    /// A label given to a host that is not `key=value` with allowed characters.
    #[error("label `{label}`: {reason}")]
    Label { label: String, reason: &'static str },
    /// A host id that is not what [`crate::HostId`] allows.
    #[error("host id `{id}`: {reason}")]
    HostId { id: String, reason: &'static str },
    /// A record read from etcd that is not a valid one.
    #[error("fleet record {key}: {reason}")]
    Record { key: String, reason: String },
    /// etcd no longer knows a lease (the host's, or a controller's): it heard nothing for
    /// the lease's time to live, or the lease was revoked.
    #[error("the lease {lease:x} expired before it was renewed")]
    LeaseExpired { lease: i64 },
    /// A lease time to live out of range.
    #[error("a fleet lease of {secs} s is out of range: it must be 2 to 600 s")]
    LeaseTtl { secs: u64 },
    /// A `fleet.toml` that does not parse or breaks a rule (file, line and field).
    #[error(transparent)]
    Spec(#[from] juice_image::manifest::ManifestError),
    /// A spec that cannot be placed on the hosts there are.
    #[error("the fleet cannot be placed: {0}")]
    Plan(#[from] crate::plan::PlanError),
    /// A write fenced on a leadership that is no longer held: another controller leads now.
    #[error(
        "this controller no longer leads the fleet (its leadership of revision {revision} is gone); the write was refused"
    )]
    Deposed { revision: i64 },
    /// An apply made against a spec that another apply replaced meanwhile: nothing stored.
    #[error(
        "the fleet's spec is at revision {actual}, not {expected} as this apply expected (another apply came between); nothing was stored: plan again"
    )]
    StaleSpec { expected: i64, actual: i64 },
    /// This host's agent failed to apply its assignments or to say how its groups run.
    #[error("this host's agent: {reason}")]
    Host { reason: String },
    /// A local file (the host id) could not be read or written.
    #[error("{}: {source}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
