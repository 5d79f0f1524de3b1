//! What Juice carries in an image beyond the OCI basics.
//!
//! The standard OCI config fields (Entrypoint, Env, User, WorkingDir,
//! ExposedPorts) are filled from the manifest so other tools understand the
//! image; everything Juice needs to run it (resources, health check, volumes,
//! capabilities) and the build report (closure, size breakdown) travel as one
//! JSON document in the config label [`LABEL`]. Putting it in the config means
//! it is covered by the config digest and so by the manifest digest: it cannot
//! be changed without changing the image's identity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{ImagePath, Manifest};

/// The config label that holds [`ApplianceConfig`] as JSON.
pub const LABEL: &str = "dev.juice.appliance.v1";

/// Juice's part of an image config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    /// The manifest without its `[build]` section (which holds host paths).
    pub manifest: Manifest,
    /// Image paths that are allowed to keep a setuid/setgid bit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setuid: Vec<ImagePath>,
    /// For every ELF object in the image, the libraries its DT_NEEDED entries resolved to.
    pub closure: BTreeMap<String, Vec<String>>,
    /// Bytes (uncompressed) by where they came from.
    pub sizes: SizeBreakdown,
}

/// Uncompressed bytes of file content by origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeBreakdown {
    /// Declared binaries.
    pub binaries: u64,
    /// Interpreters and shared libraries pulled in by the closure, and declared libraries.
    pub libraries: u64,
    /// Declared files and directories.
    pub files: u64,
    /// The generated skeleton (/etc/passwd, /etc/hosts, ...).
    pub generated: u64,
}

impl SizeBreakdown {
    pub fn total(&self) -> u64 {
        self.binaries + self.libraries + self.files + self.generated
    }
}
