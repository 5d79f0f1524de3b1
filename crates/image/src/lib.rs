//! Juice appliance images: the manifest, the builder, the local OCI store,
//! verification and unpacking.
//!
//! An image is a standard OCI image (manifest, config, one gzip'd tar layer)
//! in an OCI image layout under `$JUICE_HOME/images`, so skopeo and umoci can
//! read it. What Juice adds — the closure resolver, the reproducible layer
//! writer and the hardened unpacker — is written here because no crate does
//! those jobs with the guarantees Juice needs (see each module's docs);
//! everything commodity (TOML, JSON, OCI types, ELF parsing, tar, gzip,
//! sha256) comes from well-kept crates.
//!
//! ```no_run
//! use juice_image::{build, store::Store, unpack};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::open(std::path::Path::new("/var/lib/juice"))?;
//! let built = build::build(&store, "examples/hello-web".as_ref(), &Default::default())?;
//! store.verify_image(&built.reference)?;
//! let root = unpack::materialise(&store, &built.reference)?;
//! println!("{} is unpacked at {}", built.digest, root.path.display());
//! # Ok(()) }
//! ```

pub mod appliance;
pub mod build;
pub mod closure;
pub mod confine;
pub mod digest;
pub mod manifest;
pub mod path_error;
pub mod store;
pub mod unpack;

pub use path_error::PathError;
