//! Distribution and trust for Juice images.
//!
//! - [`remote`]: push and pull through any OCI distribution registry (basic
//!   and bearer-token auth, TLS by default, plain HTTP only for hosts named as
//!   insecure). A pull resolves the tag once, checks the trust policy before
//!   any layer moves, then fetches by digest, every read bounded. Every blob is
//!   checked against its digest before it enters the store; a partial
//!   download is never visible.
//! - [`auth`]: credentials, each filed for one registry, in docker's
//!   `config.json` shape; where each may be sent.
//! - [`name`]: image names normalised for trust decisions.
//! - [`sign`]: ed25519 keys, signatures in cosign's layout (a simple-signing
//!   payload naming the manifest digest, stored in the registry under the tag
//!   `sha256-<hex>.sig` next to the image), and a local copy per image.
//! - [`policy`]: `$JUICE_HOME/policy.toml`, which keys are trusted for which
//!   images and whether unsigned images may run.
//! - [`import`]: container images (`docker save` archives, OCI layouts and
//!   archives, registry references) flattened into appliances, optionally
//!   pruned to the ELF closure of their entrypoint.
//! - [`export`]: an image as an OCI archive for other tools.
//! - [`progress`]: how far a push or pull has got, reported to a callback the
//!   caller chooses; the library itself never draws.
//!
//! The registry protocol, HTTP, TLS, signatures and tar come from crates;
//! what is written here is Juice's own: which blobs move when, the store
//! invariants, the trust decisions and the flattening and pruning rules.

pub mod auth;
pub mod export;
pub mod import;
pub mod name;
pub mod policy;
pub mod progress;
pub mod reference;
pub mod remote;
pub mod sign;
mod transport;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Io(#[from] juice_image::PathError),
    #[error(transparent)]
    Store(#[from] juice_image::store::StoreError),
    #[error(transparent)]
    Build(#[from] juice_image::build::BuildError),
    #[error(
        "{0:?} is not a registry reference like registry.example.com/team/app:1.0 (name the registry)"
    )]
    BadReference(String),
    #[error("registry {registry}: {reason}")]
    Remote { registry: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{0}")]
    Untrusted(String),
    #[error("{reason}")]
    Policy { path: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    Import { what: String, reason: String },
    #[error("{path}: {reason}")]
    Auth { path: PathBuf, reason: String },
    #[error(transparent)]
    Name(#[from] name::NameError),
}

pub(crate) fn io_err(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> RegistryError + use<> {
    let at = juice_image::PathError::at(action, path);
    move |source| RegistryError::Io(at(source))
}
