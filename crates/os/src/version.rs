//! An OS version as an OCI image in the local store, so that `juice push`, `juice pull`,
//! signatures and the trust policy treat it exactly as they treat an appliance.
//!
//! The image has one reproducible layer holding two files, `vmlinuz` and `initrd`, and
//! its config carries the label [`LABEL`]: an [`OsConfig`] naming the version, the
//! kernel command line and the sha256 of both files. [`OsVersion::extract`] reads the
//! layer back, taking only those two names as regular files of bounded size, and checks
//! both against the label before anything is written beside the kept versions: a
//! version pulled from a registry is untrusted until then.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use juice_image::build::layer::write_layer;
use juice_image::build::tree::{Node, Source, Tree};
use juice_image::digest::Digest;
use juice_image::store::{ImageRecord, Store, StoreError, canonical_json, from_oci, open_layer};
use oci_spec::image::{
    Arch, ConfigBuilder, ImageConfigurationBuilder, MediaType, Os, RootFsBuilder,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The config label holding an OS version's [`OsConfig`] as JSON.
pub const LABEL: &str = "org.juice.os";

/// The largest kernel or initramfs a version may carry: a boot partition keeps several.
pub const FILE_MAX: u64 = 256 << 20;

/// What an OS version is: everything the boot loader and the host need besides the two files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsConfig {
    /// The operator's name for the version, such as `1.4.0`.
    pub version: String,
    /// The kernel command line (the boot loader adds the slot and trial flags).
    pub cmdline: String,
    /// The kernel's release, as `uname -r` will print it.
    pub kernel_release: String,
    /// sha256 of `vmlinuz`, hex.
    pub kernel_sha256: String,
    /// sha256 of `initrd`, hex.
    pub initrd_sha256: String,
    /// The juice version inside.
    pub juice: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] juice_image::PathError),
    #[error("{image} is not an OS version (its config has no {LABEL} label)")]
    NotOs { image: String },
    #[error("{image} is not a valid OS version: {reason}")]
    Invalid { image: String, reason: String },
    #[error("the OS version name {name:?} is not valid: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error(transparent)]
    BadCmdline(#[from] crate::grub::GrubError),
}

/// Checks an OS version name: it names directories and appears in boot records.
pub fn check_name(name: &str) -> Result<(), VersionError> {
    let bad = |reason| VersionError::BadName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("it must be 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
    {
        return Err(bad("only letters, digits and ._-+ are allowed"));
    }
    if name.starts_with(['.', '-']) {
        return Err(bad("it must start with a letter or digit"));
    }
    Ok(())
}

/// Checks a kernel command line: it is written into a GRUB script between quotes
/// ([`crate::grub::check_cmdline`]'s rule).
pub fn check_cmdline(cmdline: &str) -> Result<(), VersionError> {
    Ok(crate::grub::check_cmdline(cmdline)?)
}

/// sha256 of a file, hex, reading it in pieces.
pub fn file_sha256(path: &Path) -> Result<String, juice_image::PathError> {
    let mut f = std::fs::File::open(path).map_err(juice_image::PathError::at("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(juice_image::PathError::at("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes an OS version into `store` as `reference`, from a kernel and an initramfs on disk.
/// The same files and config give the same manifest digest.
pub fn pack(
    store: &Store,
    reference: &str,
    config: &OsConfig,
    kernel: &Path,
    initrd: &Path,
) -> Result<ImageRecord, VersionError> {
    check_name(&config.version)?;
    check_cmdline(&config.cmdline)?;
    let label =
        String::from_utf8(
            canonical_json(config).map_err(|reason| VersionError::Invalid {
                image: reference.to_owned(),
                reason,
            })?,
        )
        .map_err(|e| VersionError::Invalid {
            image: reference.to_owned(),
            reason: e.to_string(),
        })?;
    pack_labelled(
        store,
        reference,
        (LABEL, &label),
        &[("vmlinuz", kernel, 0o644), ("initrd", initrd, 0o644)],
    )
}

/// Writes an image of one reproducible layer holding `files` (name in the layer, file on
/// disk, mode) into `store` as `reference`, its config carrying one label: the shape of an
/// OS version, and of a daemon for a host update ([`crate::daemon`]).
pub(crate) fn pack_labelled(
    store: &Store,
    reference: &str,
    (key, value): (&str, &str),
    files: &[(&str, &Path, u32)],
) -> Result<ImageRecord, VersionError> {
    let invalid = |reason: String| VersionError::Invalid {
        image: reference.to_owned(),
        reason,
    };
    let mut tree = Tree::new();
    for (name, path, mode) in files {
        tree.insert(
            Path::new("/").join(name).as_path(),
            Node::File {
                source: Source::Host((*path).to_owned()),
                mode: *mode,
            },
        )
        .map_err(|e| invalid(e.to_string()))?;
    }
    let _writing = store.lock_for_writing()?;
    let mut blob = store.blob_writer()?;
    let (_, layer) = write_layer(&tree, &mut blob).map_err(|e| invalid(e.to_string()))?;
    let (layer_digest, layer_size) = blob.commit()?;

    let image_config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .labels(
                    [(key.to_owned(), value.to_owned())]
                        .into_iter()
                        .collect::<HashMap<_, _>>(),
                )
                .build()
                .map_err(|e| invalid(e.to_string()))?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![layer.diff_id.to_string()])
                .build()
                .map_err(|e| invalid(e.to_string()))?,
        )
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    let config_bytes = canonical_json(&image_config).map_err(invalid)?;
    store.put_image(reference, &config_bytes, (&layer_digest, layer_size))?;
    Ok(store.resolve(reference)?)
}

/// An OS version found in the store, its blobs checked against their digests.
#[derive(Debug, Clone)]
pub struct OsVersion {
    pub record: ImageRecord,
    pub config: OsConfig,
    layer: Digest,
    layer_media: MediaType,
}

/// The two files of an extracted version.
#[derive(Debug, Clone)]
pub struct Extracted {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

impl OsVersion {
    /// Opens `reference`, re-hashing its blobs; refuses an image that is not an OS version.
    pub fn open(store: &Store, reference: &str) -> Result<OsVersion, VersionError> {
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
            .ok_or_else(|| VersionError::NotOs {
                image: name.clone(),
            })?;
        let config: OsConfig = serde_json::from_str(label)
            .map_err(|e| invalid(format!("its label {LABEL} is not valid: {e}")))?;
        check_name(&config.version)?;
        check_cmdline(&config.cmdline)?;
        let [layer] = image.manifest.layers().as_slice() else {
            return Err(invalid(format!(
                "it has {} layers, and an OS version has one",
                image.manifest.layers().len()
            )));
        };
        Ok(OsVersion {
            layer: from_oci(layer.digest()).map_err(&invalid)?,
            layer_media: layer.media_type().clone(),
            record,
            config,
        })
    }

    /// Writes `vmlinuz` and `initrd` into `dir` (which must exist), checking each against
    /// the config's digest. Any other entry in the layer, a link, or a file over
    /// [`FILE_MAX`] is refused; names in the layer never choose where anything is written.
    pub fn extract(&self, store: &Store, dir: &Path) -> Result<Extracted, VersionError> {
        extract_checked(
            store,
            &self.record.reference,
            (&self.layer, &self.layer_media),
            dir,
            &[
                ("vmlinuz", &self.config.kernel_sha256),
                ("initrd", &self.config.initrd_sha256),
            ],
            "an OS version holds only vmlinuz and initrd",
        )?;
        Ok(Extracted {
            vmlinuz: dir.join("vmlinuz"),
            initrd: dir.join("initrd"),
        })
    }
}

/// Writes each of `wanted` (a name in the layer and its sha256) from `image`'s one layer
/// into `dir` (which must exist), each checked against its digest. Any other entry
/// (refused with `only`), a link, a name twice or missing, or a file over [`FILE_MAX`] is
/// refused; names in the layer never choose where anything is written.
pub(crate) fn extract_checked(
    store: &Store,
    image: &str,
    (layer, media): (&Digest, &MediaType),
    dir: &Path,
    wanted: &[(&'static str, &str)],
    only: &str,
) -> Result<(), VersionError> {
    let invalid = |reason: String| VersionError::Invalid {
        image: image.to_owned(),
        reason,
    };
    let path = store.blob_path(layer);
    let file = std::fs::File::open(&path).map_err(juice_image::PathError::at("open", &path))?;
    let reader = open_layer(std::io::BufReader::new(file), media)
        .map_err(|e| invalid(format!("its layer cannot be read: {e}")))?;
    let mut archive = tar::Archive::new(reader);
    let mut seen: Vec<&'static str> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("its layer is not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("its layer is damaged: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| invalid(format!("its layer has a bad name: {e}")))?
            .into_owned();
        let Some(&(which, expected)) = wanted.iter().find(|(w, _)| name.to_str() == Some(*w))
        else {
            return Err(invalid(format!(
                "its layer holds {}, and {only}",
                name.display()
            )));
        };
        if !entry.header().entry_type().is_file() {
            return Err(invalid(format!(
                "{which} in its layer is not a regular file"
            )));
        }
        if seen.contains(&which) {
            return Err(invalid(format!("its layer holds {which} twice")));
        }
        seen.push(which);
        let size = entry.size();
        if size > FILE_MAX {
            return Err(invalid(format!(
                "{which} is {size} bytes, over the limit of {FILE_MAX}"
            )));
        }
        let dest = dir.join(which);
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dest)
            .map_err(juice_image::PathError::at("create", &dest))?;
        let mut out = HashWriter {
            inner: std::io::BufWriter::new(out),
            hash: Sha256::new(),
        };
        std::io::copy(&mut (&mut entry).take(FILE_MAX), &mut out)
            .map_err(juice_image::PathError::at("write", &dest))?;
        let HashWriter { inner, hash } = out;
        let file = inner
            .into_inner()
            .map_err(|e| juice_image::PathError::at("write", &dest)(e.into_error()))?;
        file.sync_all()
            .map_err(juice_image::PathError::at("sync", &dest))?;
        let actual = hex::encode(hash.finalize());
        if actual != expected {
            return Err(invalid(format!(
                "{which} has sha256 {actual}, and its config says {expected}"
            )));
        }
    }
    for (which, _) in wanted {
        if !seen.contains(which) {
            return Err(invalid(format!("its layer has no {which}")));
        }
    }
    Ok(())
}

struct HashWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kernel: &Path, initrd: &Path) -> OsConfig {
        OsConfig {
            version: "1.0.0".into(),
            cmdline: "console=ttyS0 panic=10".into(),
            kernel_release: "6.1.0-test".into(),
            kernel_sha256: file_sha256(kernel).unwrap(),
            initrd_sha256: file_sha256(initrd).unwrap(),
            juice: "0.1.0".into(),
        }
    }

    fn files(dir: &Path) -> (PathBuf, PathBuf) {
        let k = dir.join("k");
        let i = dir.join("i");
        std::fs::write(&k, b"a kernel").unwrap();
        std::fs::write(&i, b"an initramfs").unwrap();
        (k, i)
    }

    #[test]
    fn a_packed_version_opens_and_extracts_the_same_files_and_packs_reproducibly() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = files(dir.path());
        let store = Store::open(&dir.path().join("home")).unwrap();
        let c = config(&k, &i);
        let one = pack(&store, "juice-os:1", &c, &k, &i).unwrap();
        let two = pack(&store, "juice-os:again", &c, &k, &i).unwrap();
        assert_eq!(one.digest, two.digest);
        let v = OsVersion::open(&store, "juice-os:1").unwrap();
        assert_eq!(v.config, c);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let x = v.extract(&store, &out).unwrap();
        assert_eq!(std::fs::read(x.vmlinuz).unwrap(), b"a kernel");
        assert_eq!(std::fs::read(x.initrd).unwrap(), b"an initramfs");
    }

    #[test]
    fn a_config_that_does_not_match_the_files_is_refused_at_extraction() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = files(dir.path());
        let store = Store::open(&dir.path().join("home")).unwrap();
        let mut c = config(&k, &i);
        c.initrd_sha256 = "00".repeat(32);
        pack(&store, "juice-os:lie", &c, &k, &i).unwrap();
        let v = OsVersion::open(&store, "juice-os:lie").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let e = v.extract(&store, &out).unwrap_err().to_string();
        assert!(e.contains("initrd has sha256"), "{e}");
    }

    /// An OS version whose layer is whatever `entries` writes, with a config that names
    /// the digests of `kernel` and `initrd` as a real one would.
    fn hostile(
        store: &Store,
        reference: &str,
        entries: impl FnOnce(&mut tar::Builder<Vec<u8>>),
    ) -> OsVersion {
        let mut tar = tar::Builder::new(Vec::new());
        entries(&mut tar);
        let tar = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let (layer, size) = store.put_blob(&gz.finish().unwrap()).unwrap();
        let config = OsConfig {
            version: "6.6.6".into(),
            cmdline: "console=ttyS0".into(),
            kernel_release: "6.1".into(),
            kernel_sha256: hex::encode(Sha256::digest(b"a kernel")),
            initrd_sha256: hex::encode(Sha256::digest(b"an initramfs")),
            juice: "0.1.0".into(),
        };
        let image = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {LABEL: serde_json::to_string(&config).unwrap()}},
            "rootfs": {"type": "layers", "diff_ids": [Digest::of(&tar).to_string()]},
        });
        store
            .put_image(
                reference,
                &serde_json::to_vec(&image).unwrap(),
                (&layer, size),
            )
            .unwrap();
        OsVersion::open(store, reference).unwrap()
    }

    /// Writes a hostile layer's entries.
    type Layer = Box<dyn FnOnce(&mut tar::Builder<Vec<u8>>)>;

    fn file(tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    }

    #[test]
    fn a_hostile_layer_is_refused_and_writes_nothing_outside_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("home")).unwrap();
        let cases: [(&str, Layer, &str); 5] = [
            (
                "extra",
                Box::new(|t| {
                    file(t, "vmlinuz", b"a kernel");
                    file(t, "initrd", b"an initramfs");
                    file(t, "etc/passwd", b"root::0:0::/:/bin/sh");
                }),
                "holds etc/passwd",
            ),
            (
                "link",
                Box::new(|t| {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    t.append_link(&mut h, "vmlinuz", "/etc/shadow").unwrap();
                }),
                "vmlinuz in its layer is not a regular file",
            ),
            (
                "twice",
                Box::new(|t| {
                    file(t, "vmlinuz", b"a kernel");
                    file(t, "vmlinuz", b"a kernel");
                }),
                "holds vmlinuz twice",
            ),
            (
                "missing",
                Box::new(|t| file(t, "vmlinuz", b"a kernel")),
                "has no initrd",
            ),
            (
                "swapped",
                Box::new(|t| {
                    file(t, "vmlinuz", b"an initramfs");
                    file(t, "initrd", b"a kernel");
                }),
                "vmlinuz has sha256",
            ),
        ];
        for (name, entries, why) in cases {
            let v = hostile(&store, &format!("juice-os:{name}"), entries);
            let out = dir.path().join(name);
            std::fs::create_dir(&out).unwrap();
            let e = v.extract(&store, &out).unwrap_err().to_string();
            assert!(e.contains(why), "{name}: {e}");
            // Nothing but the two names may ever be created, and only inside `out`.
            for entry in std::fs::read_dir(&out).unwrap() {
                let n = entry.unwrap().file_name();
                assert!(n == "vmlinuz" || n == "initrd", "{name}: wrote {n:?}");
            }
            assert!(!dir.path().join(name).join("etc").exists());
        }
    }

    #[test]
    fn an_appliance_is_not_an_os_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("home")).unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        file(&mut tar, "vmlinuz", b"a kernel");
        let tar = tar.into_inner().unwrap();
        let image = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [Digest::of(&tar).to_string()]},
        });
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let (layer, size) = store.put_blob(&gz.finish().unwrap()).unwrap();
        store
            .put_image(
                "app:1",
                &serde_json::to_vec(&image).unwrap(),
                (&layer, size),
            )
            .unwrap();
        let e = OsVersion::open(&store, "app:1").unwrap_err().to_string();
        assert!(e.contains("is not an OS version"), "{e}");
    }

    #[test]
    fn names_and_command_lines_that_could_escape_are_refused() {
        for bad in ["", "../x", "-v", "a b", "a\"b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("1.4.0+build-7").unwrap();
        for bad in ["a\"b", "a;b", "a$x", "a\nb", "a\\b", "a'b", "a`b"] {
            assert!(check_cmdline(bad).is_err(), "{bad:?}");
        }
        check_cmdline("console=ttyS0,115200 panic=10 juice.x=a/b:c").unwrap();
    }
}
