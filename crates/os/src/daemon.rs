//! A Juice daemon as an OCI image, for host updates across a fleet: one reproducible
//! layer holding one file, `juice`, and a config label [`LABEL`] naming its version and
//! sha256 ([`DaemonConfig`]). It is packed and read back as an OS version is
//! ([`crate::version`]'s layer and checks), so pulls, signatures and the trust policy treat
//! it as they treat any image; the binary is checked against the label before a host uses it.

use std::path::{Path, PathBuf};

use juice_image::digest::Digest;
use juice_image::store::{ImageRecord, Store, canonical_json, from_oci};
use oci_spec::image::MediaType;
use serde::{Deserialize, Serialize};

use crate::version::{VersionError, extract_checked, pack_labelled};

/// The config label holding a daemon image's [`DaemonConfig`] as JSON.
pub const LABEL: &str = "org.juice.daemon";

/// The name of the one file in a daemon image's layer.
pub const BINARY: &str = "juice";

/// What a daemon image promises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// What `juice --version` prints after `juice ` (checked before a host runs it).
    pub version: String,
    /// sha256 of the binary, hex.
    pub sha256: String,
}

/// Writes `binary` into `store` as `reference`, a daemon image with `config`'s label.
pub fn pack(
    store: &Store,
    reference: &str,
    config: &DaemonConfig,
    binary: &Path,
) -> Result<ImageRecord, VersionError> {
    let invalid = |reason: String| VersionError::Invalid {
        image: reference.to_owned(),
        reason,
    };
    check_version(&config.version).map_err(|r| invalid(r.into()))?;
    let label = String::from_utf8(canonical_json(config).map_err(invalid)?)
        .map_err(|e| invalid(e.to_string()))?;
    pack_labelled(
        store,
        reference,
        (LABEL, &label),
        &[(BINARY, binary, 0o755)],
    )
}

/// A version is what `--version` prints: letters, digits and `.+-_`, 1 to 64.
fn check_version(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || v.len() > 64 {
        return Err("its version must be 1 to 64 characters");
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
    {
        return Err("its version may hold only letters, digits and ._-+");
    }
    Ok(())
}

/// A daemon image found in the store, its blobs checked against their digests.
#[derive(Debug, Clone)]
pub struct DaemonImage {
    pub record: ImageRecord,
    pub config: DaemonConfig,
    layer: Digest,
    layer_media: MediaType,
}

impl DaemonImage {
    /// Opens `reference`, re-hashing its blobs; refuses an image that is not a daemon.
    pub fn open(store: &Store, reference: &str) -> Result<DaemonImage, VersionError> {
        let record = store.verify_image(reference)?;
        let image = store.image(&record.digest.to_string())?;
        let name = record.reference.clone();
        let invalid = |reason: String| VersionError::Invalid {
            image: name.clone(),
            reason,
        };
        let label = image
            .config
            .config()
            .as_ref()
            .and_then(|c| c.labels().as_ref())
            .and_then(|l| l.get(LABEL))
            .ok_or_else(|| {
                invalid(format!(
                    "it is not a Juice daemon (its config has no {LABEL} label)"
                ))
            })?;
        let config: DaemonConfig = serde_json::from_str(label)
            .map_err(|e| invalid(format!("its label {LABEL} is not valid: {e}")))?;
        check_version(&config.version).map_err(|r| invalid(r.into()))?;
        if config.sha256.len() != 64 || !config.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!(
                "its label's sha256 {:?} is not 64 hex digits",
                config.sha256
            )));
        }
        let [layer] = image.manifest.layers().as_slice() else {
            return Err(invalid(format!(
                "it has {} layers, and a daemon image has one",
                image.manifest.layers().len()
            )));
        };
        Ok(DaemonImage {
            layer: from_oci(layer.digest()).map_err(&invalid)?,
            layer_media: layer.media_type().clone(),
            record,
            config,
        })
    }

    /// Writes the binary into `dir` (which must exist) as `juice`, checked against the
    /// label's sha256; returns its path. Nothing else in the layer is accepted.
    pub fn extract(&self, store: &Store, dir: &Path) -> Result<PathBuf, VersionError> {
        extract_checked(
            store,
            &self.record.reference,
            (&self.layer, &self.layer_media),
            dir,
            &[(BINARY, &self.config.sha256)],
            "a daemon image holds only juice",
        )?;
        Ok(dir.join(BINARY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::file_sha256;

    #[test]
    fn a_packed_daemon_opens_and_extracts_the_same_binary_and_a_lie_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::write(&bin, b"#!/bin/sh\necho juice 9.9.9\n").unwrap();
        let store = Store::open(&dir.path().join("home")).unwrap();
        let good = DaemonConfig {
            version: "9.9.9".into(),
            sha256: file_sha256(&bin).unwrap(),
        };
        pack(&store, "juice-daemon:9", &good, &bin).unwrap();
        let d = DaemonImage::open(&store, "juice-daemon:9").unwrap();
        assert_eq!(d.config, good);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let x = d.extract(&store, &out).unwrap();
        assert_eq!(std::fs::read(&x).unwrap(), std::fs::read(&bin).unwrap());

        let lie = DaemonConfig {
            sha256: "00".repeat(32),
            ..good.clone()
        };
        pack(&store, "juice-daemon:lie", &lie, &bin).unwrap();
        let d = DaemonImage::open(&store, "juice-daemon:lie").unwrap();
        let out = dir.path().join("lie");
        std::fs::create_dir(&out).unwrap();
        let e = d.extract(&store, &out).unwrap_err().to_string();
        assert!(e.contains("juice has sha256"), "{e}");

        // An OS version is not a daemon, and a daemon's version is checked.
        let bad = DaemonConfig {
            version: "a b".into(),
            ..good
        };
        assert!(pack(&store, "juice-daemon:bad", &bad, &bin).is_err());
        let (k, i) = (dir.path().join("k"), dir.path().join("i"));
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        crate::version::pack(
            &store,
            "juice-os:1",
            &crate::version::OsConfig {
                version: "1".into(),
                cmdline: "console=ttyS0".into(),
                kernel_release: "6.1".into(),
                kernel_sha256: file_sha256(&k).unwrap(),
                initrd_sha256: file_sha256(&i).unwrap(),
                juice: "0.1.0".into(),
            },
            &k,
            &i,
        )
        .unwrap();
        let e = DaemonImage::open(&store, "juice-os:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a Juice daemon"), "{e}");
    }
}
