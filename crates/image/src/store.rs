//! The local image store: an OCI image layout under `$JUICE_HOME/images`.
//!
//! Every write is crash-safe: a blob is written to `$JUICE_HOME/tmp`,
//! fsynced, and renamed to its digest; `index.json` is replaced the same way,
//! and only after the blobs it names are durable. A `kill -9` at any point
//! leaves at worst unreferenced blobs and temp files, which `gc` removes.
//!
//! Concurrency: writers (builds, pulls) hold `images.lock` shared while they
//! write blobs and take `index.lock` exclusively to change `index.json`; `gc`
//! holds `images.lock` exclusively, so it never sees a blob that a build has
//! written but not yet tagged.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType,
};

use crate::appliance::{ApplianceConfig, LABEL};
use crate::digest::{Digest, HashingReader, HashingWriter};

/// The annotation that names an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] crate::PathError),
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("no image {reference:?} in the store (see `juice images`)")]
    NotFound { reference: String },
    #[error("{reference:?} matches several images: {}", candidates.join(", "))]
    Ambiguous {
        reference: String,
        candidates: Vec<String>,
    },
    #[error("{reference:?} is not a valid image name (name:tag, lowercase, digits and . _ - / :)")]
    BadReference { reference: String },
    #[error("image {image}: blob {blob} is missing from the store")]
    MissingBlob { image: String, blob: String },
    #[error("image {image}: blob {blob} is corrupt (its content hashes to {actual})")]
    CorruptBlob {
        image: String,
        blob: String,
        actual: String,
    },
    #[error("image {image}: {what} of blob {blob} is {actual}, but the manifest says {expected}")]
    Mismatch {
        image: String,
        blob: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("image {image}: {reason}")]
    Invalid { image: String, reason: String },
    #[error(
        "blob {expected} arrived as {actual_size} bytes hashing to {actual}; it was refused and nothing was stored"
    )]
    WrongContent {
        expected: String,
        actual: String,
        actual_size: u64,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
    let at = crate::PathError::at(action, path);
    move |source| StoreError::Io(at(source))
}

/// One tagged image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageRecord {
    pub reference: String,
    pub digest: Digest,
    /// Sum of the manifest, config and layer blob sizes (what the image costs on disk and on the wire).
    pub size: u64,
}

/// An image read back from the store, every blob checked against its digest.
#[derive(Debug, Clone)]
pub struct Image {
    pub record: ImageRecord,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
    pub appliance: Option<ApplianceConfig>,
}

/// The outcome of `gc`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub temp_files_removed: usize,
    pub rootfs_removed: usize,
}

pub struct Store {
    home: PathBuf,
    layout: PathBuf,
}

/// A shared or exclusive hold on the store; released on drop.
pub struct StoreLock(#[allow(dead_code)] File);

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the store under `home`.
    pub fn open(home: &Path) -> Result<Store, StoreError> {
        let store = Store {
            home: home.to_owned(),
            layout: home.join("images"),
        };
        for dir in [
            store.layout.join("blobs/sha256"),
            store.tmp_dir(),
            store.rootfs_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        let marker = store.layout.join("oci-layout");
        if !marker.exists() {
            store.write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = store.layout.join("index.json");
        if !index.exists() {
            store.write_index(&empty_index())?;
        }
        Ok(store)
    }

    /// The OCI image layout directory (`skopeo inspect oci:<this>:<name:tag>`).
    pub fn layout(&self) -> &Path {
        &self.layout
    }
    pub fn home(&self) -> &Path {
        &self.home
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.home.join("tmp")
    }
    pub fn rootfs_dir(&self) -> PathBuf {
        self.home.join("rootfs")
    }
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.layout.join("blobs/sha256").join(digest.hex())
    }

    fn lock(&self, name: &str, exclusive: bool) -> Result<StoreLock, StoreError> {
        let path = self.home.join(name);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open lock", &path))?;
        let r = if exclusive { f.lock() } else { f.lock_shared() };
        r.map_err(io_err("lock", &path))?;
        Ok(StoreLock(f))
    }

    /// Held by anything that writes blobs it has not tagged yet.
    pub fn lock_for_writing(&self) -> Result<StoreLock, StoreError> {
        self.lock("images.lock", false)
    }

    /// A fresh private path under `tmp/`, on the same filesystem as the store.
    pub fn temp_path(&self, what: &str) -> PathBuf {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        self.tmp_dir()
            .join(format!("{what}-{}-{n}-{nanos}", std::process::id()))
    }

    /// Starts writing a blob; [`BlobWriter::commit`] makes it visible under its digest.
    pub fn blob_writer(&self) -> Result<BlobWriter<'_>, StoreError> {
        let path = self.temp_path("blob");
        let file = File::create(&path).map_err(io_err("create", &path))?;
        Ok(BlobWriter {
            store: self,
            inner: Some(HashingWriter::new(io::BufWriter::new(file))),
            path,
        })
    }

    pub fn put_blob(&self, bytes: &[u8]) -> Result<(Digest, u64), StoreError> {
        let mut w = self.blob_writer()?;
        w.write_all(bytes).map_err(io_err("write", &w.path))?;
        w.commit()
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Reads a small blob (manifest, config) whole, checking its digest.
    pub fn read_blob(&self, image: &str, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob {
                image: image.to_owned(),
                blob: digest.to_string(),
            },
            _ => io_err("read", &path)(e),
        })?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(StoreError::CorruptBlob {
                image: image.to_owned(),
                blob: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(bytes)
    }

    /// Re-hashes a blob of any size by streaming it.
    pub fn check_blob(
        &self,
        image: &str,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob {
                image: image.to_owned(),
                blob: digest.to_string(),
            },
            _ => io_err("read", &path)(e),
        })?;
        let (actual, len) = HashingReader::new(BufReader::new(file))
            .finish()
            .map_err(io_err("read", &path))?;
        if actual != *digest {
            return Err(StoreError::CorruptBlob {
                image: image.to_owned(),
                blob: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        if let Some(expected) = size.filter(|s| *s != len) {
            return Err(StoreError::Mismatch {
                image: image.to_owned(),
                blob: digest.to_string(),
                what: "the size",
                expected: expected.to_string(),
                actual: len.to_string(),
            });
        }
        Ok(())
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let tmp = self.temp_path("file");
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, dest).map_err(io_err("rename into place", dest))?;
        sync_dir(dest.parent().unwrap_or(Path::new("/")))
    }

    fn read_index(&self) -> Result<ImageIndex, StoreError> {
        let path = self.layout.join("index.json");
        let text = fs::read(&path).map_err(io_err("read", &path))?;
        serde_json::from_slice(&text).map_err(|e| StoreError::Damaged {
            path,
            reason: e.to_string(),
        })
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), StoreError> {
        let path = self.layout.join("index.json");
        let bytes = canonical_json(index).map_err(|reason| StoreError::Damaged {
            path: path.clone(),
            reason,
        })?;
        self.write_atomic(&path, &bytes)
    }

    /// Points `reference` at the manifest `digest` (whose blobs must already be committed).
    pub fn tag(&self, reference: &str, digest: &Digest, size: u64) -> Result<(), StoreError> {
        check_reference(reference)?;
        let _index = self.lock("index.lock", true)?;
        let mut index = self.read_index()?;
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| ref_name(d) != Some(reference))
            .cloned()
            .collect();
        let mut d = Descriptor::new(MediaType::ImageManifest, size, oci_digest(digest));
        d.set_annotations(Some([(REF_NAME.to_owned(), reference.to_owned())].into()));
        manifests.push(d);
        manifests.sort_by(|a, b| ref_name(a).cmp(&ref_name(b)));
        index.set_manifests(manifests);
        self.write_index(&index)
    }

    /// Removes a tag. The blobs stay until `gc`.
    pub fn untag(&self, reference: &str) -> Result<ImageRecord, StoreError> {
        let record = self.resolve(reference)?;
        let _index = self.lock("index.lock", true)?;
        let mut index = self.read_index()?;
        let manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| ref_name(d) != Some(record.reference.as_str()))
            .cloned()
            .collect();
        index.set_manifests(manifests);
        self.write_index(&index)?;
        Ok(record)
    }

    /// Tagged images, by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let index = self.read_index()?;
        let mut out = Vec::new();
        for d in index.manifests() {
            let Some(reference) = ref_name(d) else {
                continue;
            };
            let digest = from_oci(d.digest()).map_err(|reason| StoreError::Damaged {
                path: self.layout.join("index.json"),
                reason,
            })?;
            let size = self.image_size(&digest).unwrap_or(d.size());
            out.push(ImageRecord {
                reference: reference.to_owned(),
                digest,
                size,
            });
        }
        Ok(out)
    }

    fn image_size(&self, digest: &Digest) -> Option<u64> {
        let bytes = fs::read(self.blob_path(digest)).ok()?;
        let m: ImageManifest = serde_json::from_slice(&bytes).ok()?;
        Some(
            bytes.len() as u64
                + m.config().size()
                + m.layers().iter().map(|l| l.size()).sum::<u64>(),
        )
    }

    /// Finds an image by `name:tag`, by `name` when it has one tag, or by (a prefix of) its digest.
    pub fn resolve(&self, reference: &str) -> Result<ImageRecord, StoreError> {
        let all = self.list()?;
        if let Some(r) = all.iter().find(|r| r.reference == reference) {
            return Ok(r.clone());
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        let by_digest: Vec<&ImageRecord> =
            if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                all.iter()
                    .filter(|r| r.digest.hex().starts_with(hex))
                    .collect()
            } else {
                Vec::new()
            };
        let by_name: Vec<&ImageRecord> = if reference.contains(':') {
            Vec::new()
        } else {
            all.iter()
                .filter(|r| r.reference.rsplit_once(':').map(|(n, _)| n) == Some(reference))
                .collect()
        };
        let mut found: Vec<&ImageRecord> = by_digest.into_iter().chain(by_name).collect();
        found.dedup_by_key(|r| r.digest);
        let distinct: BTreeSet<Digest> = found.iter().map(|r| r.digest).collect();
        match distinct.len() {
            0 => Err(StoreError::NotFound {
                reference: reference.to_owned(),
            }),
            1 => Ok(found[0].clone()),
            _ => Err(StoreError::Ambiguous {
                reference: reference.to_owned(),
                candidates: found.iter().map(|r| r.reference.clone()).collect(),
            }),
        }
    }

    /// Writes an image's config and its manifest over one gzip'd layer already in the
    /// store, and tags it `reference`: the last steps of every image Juice makes.
    pub fn put_image(
        &self,
        reference: &str,
        config: &[u8],
        layer: (&Digest, u64),
    ) -> Result<(Digest, u64), StoreError> {
        let invalid = |reason: String| StoreError::Invalid {
            image: reference.to_owned(),
            reason,
        };
        let (config_digest, config_size) = self.put_blob(config)?;
        let manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(oci_spec::image::Descriptor::new(
                MediaType::ImageConfig,
                config_size,
                oci_digest(&config_digest),
            ))
            .layers(vec![oci_spec::image::Descriptor::new(
                MediaType::ImageLayerGzip,
                layer.1,
                oci_digest(layer.0),
            )])
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let bytes = canonical_json(&manifest).map_err(invalid)?;
        let (digest, size) = self.put_blob(&bytes)?;
        self.tag(reference, &digest, size)?;
        Ok((digest, size))
    }

    /// Reads an image's manifest and config, checking both against their digests.
    pub fn image(&self, reference: &str) -> Result<Image, StoreError> {
        let record = self.resolve(reference)?;
        let name = record.reference.clone();
        let invalid = |reason: String| StoreError::Invalid {
            image: name.clone(),
            reason,
        };
        let bytes = self.read_blob(&name, &record.digest)?;
        let manifest: ImageManifest = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("its manifest is not valid: {e}")))?;
        let config_digest = from_oci(manifest.config().digest()).map_err(invalid)?;
        let bytes = self.read_blob(&name, &config_digest)?;
        let config: ImageConfiguration = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("its config is not valid: {e}")))?;
        let appliance = match config
            .config()
            .as_ref()
            .and_then(|c| c.labels().as_ref())
            .and_then(|l| l.get(LABEL))
        {
            Some(json) => Some(
                serde_json::from_str(json)
                    .map_err(|e| invalid(format!("its label {LABEL} is not valid: {e}")))?,
            ),
            None => None,
        };
        Ok(Image {
            record,
            manifest,
            config,
            appliance,
        })
    }

    /// Re-hashes every blob of an image, and every layer's uncompressed content against its diff_id.
    pub fn verify_image(&self, reference: &str) -> Result<ImageRecord, StoreError> {
        let image = self.image(reference)?;
        let name = &image.record.reference;
        let invalid = |reason: String| StoreError::Invalid {
            image: name.clone(),
            reason,
        };
        let diff_ids = image.config.rootfs().diff_ids();
        if diff_ids.len() != image.manifest.layers().len() {
            return Err(invalid(
                "the config's diff_ids do not match the manifest's layers".into(),
            ));
        }
        for (layer, diff_id) in image.manifest.layers().iter().zip(diff_ids) {
            let digest = from_oci(layer.digest()).map_err(&invalid)?;
            self.check_blob(name, &digest, Some(layer.size()))?;
            let expected: Digest = diff_id
                .parse()
                .map_err(|e: crate::digest::BadDigest| invalid(e.to_string()))?;
            let actual = self.layer_diff_id(&digest, layer.media_type())?;
            if actual != expected {
                return Err(StoreError::Mismatch {
                    image: name.clone(),
                    blob: digest.to_string(),
                    what: "the uncompressed digest",
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok(image.record)
    }

    /// The digest of a layer's uncompressed tar stream.
    fn layer_diff_id(&self, digest: &Digest, media_type: &MediaType) -> Result<Digest, StoreError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(io_err("read", &path))?;
        let reader =
            open_layer(BufReader::new(file), media_type).map_err(|reason| StoreError::Damaged {
                path: path.clone(),
                reason,
            })?;
        let (d, _) = HashingReader::new(reader)
            .finish()
            .map_err(io_err("decompress", &path))?;
        Ok(d)
    }

    /// Re-hashes every blob file in the store, referenced or not.
    pub fn verify_all_blobs(&self) -> Result<usize, StoreError> {
        let dir = self.layout.join("blobs/sha256");
        let mut n = 0;
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest: Digest =
                format!("sha256:{name}")
                    .parse()
                    .map_err(|_| StoreError::Damaged {
                        path: entry.path(),
                        reason: "a file in blobs/sha256 that is not named after a digest".into(),
                    })?;
            self.check_blob("(any)", &digest, None)?;
            n += 1;
        }
        Ok(n)
    }

    /// Every blob some tagged image needs.
    fn referenced(&self) -> Result<(BTreeSet<Digest>, BTreeSet<String>), StoreError> {
        let mut blobs = BTreeSet::new();
        let mut diff_ids = BTreeSet::new();
        for record in self.list()? {
            blobs.insert(record.digest);
            // A damaged image keeps its blobs: gc never deletes evidence, `rmi` does.
            let Ok(bytes) = fs::read(self.blob_path(&record.digest)) else {
                continue;
            };
            let Ok(m) = serde_json::from_slice::<ImageManifest>(&bytes) else {
                continue;
            };
            for d in std::iter::once(m.config()).chain(m.layers()) {
                if let Ok(d) = from_oci(d.digest()) {
                    blobs.insert(d);
                }
            }
            if let Ok(config_digest) = from_oci(m.config().digest())
                && let Ok(bytes) = fs::read(self.blob_path(&config_digest))
                && let Ok(c) = serde_json::from_slice::<ImageConfiguration>(&bytes)
            {
                diff_ids.extend(
                    c.rootfs()
                        .diff_ids()
                        .iter()
                        .map(|d| d.trim_start_matches("sha256:").to_owned()),
                );
            }
        }
        Ok((blobs, diff_ids))
    }

    /// Removes unreferenced blobs, leftover temp files and unused root filesystems.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _all = self.lock("images.lock", true)?;
        let mut report = GcReport::default();
        let (keep, keep_roots) = self.referenced()?;

        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).map_err(io_err("list", &tmp))?.flatten() {
            let p = entry.path();
            let removed = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            removed.map_err(io_err("remove", &p))?;
            report.temp_files_removed += 1;
        }

        let dir = self.layout.join("blobs/sha256");
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let referenced = format!("sha256:{name}")
                .parse::<Digest>()
                .is_ok_and(|d| keep.contains(&d));
            if !referenced {
                report.bytes_freed += entry.metadata().map_or(0, |m| m.len());
                fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path()))?;
                report.blobs_removed += 1;
            }
        }
        sync_dir(&dir)?;

        let roots = self.rootfs_dir();
        for entry in fs::read_dir(&roots)
            .map_err(io_err("list", &roots))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep_roots.contains(&name) {
                // Rename first: a half-deleted tree must never sit under a digest name.
                let doomed = self.temp_path("rootfs-gc");
                fs::rename(entry.path(), &doomed).map_err(io_err("move", &entry.path()))?;
                fs::remove_dir_all(&doomed).map_err(io_err("remove", &doomed))?;
                report.rootfs_removed += 1;
            }
        }

        let builds = self.home.join("cache/builds");
        if let Ok(entries) = fs::read_dir(&builds) {
            for entry in entries.flatten() {
                let target = fs::read_to_string(entry.path())
                    .ok()
                    .and_then(|s| s.trim().parse::<Digest>().ok());
                if !target.is_some_and(|d| keep.contains(&d)) {
                    fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path()))?;
                }
            }
        }
        Ok(report)
    }

    /// Remembers that a build whose inputs hash to `inputs` produced `manifest`.
    pub fn remember_build(&self, inputs: &Digest, manifest: &Digest) -> Result<(), StoreError> {
        let dir = self.home.join("cache/builds");
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        self.write_atomic(&dir.join(inputs.hex()), manifest.to_string().as_bytes())
    }

    /// The image a previous build with the same inputs produced, if all its blobs are still here.
    pub fn recall_build(&self, inputs: &Digest) -> Option<(Digest, u64)> {
        let text = fs::read_to_string(self.home.join("cache/builds").join(inputs.hex())).ok()?;
        let digest: Digest = text.trim().parse().ok()?;
        let bytes = fs::read(self.blob_path(&digest)).ok()?;
        if Digest::of(&bytes) != digest {
            return None;
        }
        let m: ImageManifest = serde_json::from_slice(&bytes).ok()?;
        let all_there = std::iter::once(m.config())
            .chain(m.layers())
            .all(|d| from_oci(d.digest()).is_ok_and(|d| self.has_blob(&d)));
        all_there.then_some((digest, bytes.len() as u64))
    }

    /// The references that point at `digest`.
    pub fn references_to(&self, digest: &Digest) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| r.digest == *digest)
            .map(|r| r.reference)
            .collect())
    }
}

/// A blob being written; dropped without `commit`, it leaves only a temp file for `gc`.
pub struct BlobWriter<'a> {
    store: &'a Store,
    inner: Option<HashingWriter<io::BufWriter<File>>>,
    path: PathBuf,
}

impl BlobWriter<'_> {
    /// Like [`BlobWriter::commit`], but only if the content is the blob `expected`
    /// (and `size` bytes long, if given); otherwise the bytes are dropped unseen.
    pub fn commit_expecting(
        mut self,
        expected: &Digest,
        size: Option<u64>,
    ) -> Result<(Digest, u64), StoreError> {
        if let Some(inner) = &self.inner {
            let (digest, len) = inner.peek();
            if digest != *expected || size.is_some_and(|s| s != len) {
                let _ = fs::remove_file(&self.path);
                self.inner = None;
                return Err(StoreError::WrongContent {
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                    actual_size: len,
                });
            }
        }
        self.commit()
    }

    /// Makes the blob durable and visible under its digest.
    pub fn commit(mut self) -> Result<(Digest, u64), StoreError> {
        let Some(inner) = self.inner.take() else {
            return Err(StoreError::Damaged {
                path: self.path.clone(),
                reason: "blob committed twice".into(),
            });
        };
        let (buf, digest, len) = inner.finish();
        let file = buf
            .into_inner()
            .map_err(|e| io_err("write", &self.path)(e.into_error()))?;
        file.sync_all().map_err(io_err("sync", &self.path))?;
        let dest = self.store.blob_path(&digest);
        if dest.exists() {
            fs::remove_file(&self.path).map_err(io_err("remove", &self.path))?;
        } else {
            fs::rename(&self.path, &dest).map_err(io_err("rename into place", &dest))?;
            sync_dir(dest.parent().unwrap_or(Path::new("/")))?;
        }
        Ok((digest, len))
    }
}

impl Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Some(w) => w.write(buf),
            None => Err(io::Error::other("blob already committed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter<'_> {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

fn empty_index() -> ImageIndex {
    let mut index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .manifests(Vec::new())
        .build()
        .unwrap_or_default();
    index.set_media_type(Some(MediaType::ImageIndex));
    index
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations().as_ref()?.get(REF_NAME).map(String::as_str)
}

/// OCI ref names: components of `[A-Za-z0-9]` joined by `-._:@+/`.
fn check_reference(reference: &str) -> Result<(), StoreError> {
    let ok = !reference.is_empty()
        && reference.len() <= 255
        && reference.starts_with(|c: char| c.is_ascii_alphanumeric())
        && reference.ends_with(|c: char| c.is_ascii_alphanumeric())
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:@+/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadReference {
            reference: reference.to_owned(),
        })
    }
}

/// Our digest as oci-spec's.
pub fn oci_digest(d: &Digest) -> oci_spec::image::Digest {
    // Not input: a `Digest` always prints as `sha256:` and 64 lowercase hex characters.
    d.to_string()
        .parse()
        .expect("a sha256 digest is a valid OCI digest")
}

/// oci-spec's digest as ours; only sha256 is supported.
pub fn from_oci(d: &oci_spec::image::Digest) -> Result<Digest, String> {
    d.to_string().parse::<Digest>().map_err(|e| e.to_string())
}

/// JSON with sorted keys and no whitespace, so equal content gives equal bytes.
pub fn canonical_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, String> {
    // serde_json's Value keeps object keys in a BTreeMap: converting sorts them.
    let value = serde_json::to_value(value).map_err(|e| e.to_string())?;
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// A reader of a layer's tar stream, decompressing by media type.
pub fn open_layer<'a, R: Read + 'a>(
    reader: R,
    media_type: &MediaType,
) -> Result<Box<dyn Read + 'a>, String> {
    match media_type {
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
            Ok(Box::new(flate2::read::GzDecoder::new(reader)))
        }
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Ok(Box::new(reader)),
        MediaType::Other(s) if s == "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            Ok(Box::new(flate2::read::GzDecoder::new(reader)))
        }
        other => Err(format!("layer media type {other} is not supported")),
    }
}
