//! Push and pull through an OCI distribution registry.
//!
//! A pull fetches the manifest, then every blob the store lacks, each
//! streamed into a private temp file and committed only if its digest and
//! size are the manifest's; the tag is written last, after every blob is in.
//! A push skips the blobs the registry has, then writes the manifest's exact
//! bytes, so the image keeps its digest. Signatures travel in cosign's
//! layout (see [`crate::sign`]).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use juice_image::digest::Digest;
use juice_image::store::{Store, from_oci};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageIndex, ImageManifest};
use serde::Serialize;

use crate::reference::{self, local_name, signature_tag, with_digest, with_tag};
use crate::sign::{self, StoredSignature};
use crate::{RegistryError, io_err};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ACCEPTED: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
/// Blobs up to this size are pushed in one request; larger ones are streamed.
const MONOLITHIC_MAX: u64 = 16 << 20;
/// The piece of a streamed blob read (and sent) at a time.
const CHUNK: usize = 4 << 20;
/// cosign's media type for a signed payload, and the annotation with the signature.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP. Everything else is HTTPS.
    pub insecure: Vec<String>,
    /// Basic credentials; the client trades them for a bearer token when the registry asks.
    pub credentials: Option<(String, String)>,
    /// PEM files of extra CAs to trust (a private registry's).
    pub ca_files: Vec<PathBuf>,
    /// Progress bars on stderr (only drawn when it is a terminal).
    pub progress: bool,
}

impl RemoteOptions {
    /// `JUICE_INSECURE_REGISTRIES` (comma-separated), `JUICE_REGISTRY_USER` and
    /// `JUICE_REGISTRY_PASSWORD`, `JUICE_REGISTRY_CA` (PEM files, colon-separated).
    pub fn from_env() -> RemoteOptions {
        let list = |var: &str, sep: char| -> Vec<String> {
            std::env::var(var)
                .map(|v| {
                    v.split(sep)
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let credentials = match (
            std::env::var("JUICE_REGISTRY_USER"),
            std::env::var("JUICE_REGISTRY_PASSWORD"),
        ) {
            (Ok(u), Ok(p)) => Some((u, p)),
            _ => None,
        };
        RemoteOptions {
            insecure: list("JUICE_INSECURE_REGISTRIES", ','),
            credentials,
            ca_files: list("JUICE_REGISTRY_CA", ':')
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            progress: false,
        }
    }
}

/// A registry client for one command.
pub struct Remote {
    client: Client,
    auth: RegistryAuth,
    rt: tokio::runtime::Runtime,
    progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    pub reference: String,
    pub digest: String,
    /// Blobs sent or fetched, and their bytes.
    pub moved: usize,
    pub moved_bytes: u64,
    /// Blobs the other side already had.
    pub skipped: usize,
    pub signatures: usize,
}

fn remote_err(r: &Reference, e: impl std::fmt::Display) -> RegistryError {
    let mut reason = e.to_string();
    if reason.contains("InvalidContentType") {
        reason
            .push_str(" (it answered in plain HTTP: name it with --insecure if that is intended)");
    }
    RegistryError::Remote {
        registry: r.registry().to_owned(),
        reason,
    }
}

/// An error with its causes, which is where HTTP clients put the reason (a certificate, a refusal).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

impl Remote {
    pub fn new(options: &RemoteOptions) -> Result<Remote, RegistryError> {
        // reqwest's rustls uses the process's provider: ring, as everywhere in Juice.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut extra = Vec::new();
        for f in &options.ca_files {
            extra.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data: std::fs::read(f).map_err(io_err("read", f))?,
            });
        }
        let config = ClientConfig {
            protocol: if options.insecure.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(options.insecure.clone())
            },
            use_monolithic_push: true,
            extra_root_certificates: extra,
            ..Default::default()
        };
        let client = Client::try_from(config).map_err(|e| RegistryError::Remote {
            registry: "(client)".into(),
            reason: e.to_string(),
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RegistryError::Invalid(format!("async runtime: {e}")))?;
        Ok(Remote {
            client,
            auth: match &options.credentials {
                Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
                None => RegistryAuth::Anonymous,
            },
            rt,
            progress: options.progress && std::io::stderr().is_terminal(),
        })
    }

    fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:24} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec}",
        ) {
            pb.set_style(style);
        }
        pb.set_message(what.to_owned());
        pb
    }

    /// Pushes a local image to `target`, with its local signatures.
    pub fn push(
        &self,
        store: &Store,
        image: &str,
        target: &str,
    ) -> Result<Transfer, RegistryError> {
        let target = reference::parse(target)?;
        let img = store.image(image)?;
        let name = img.record.reference.clone();
        let digest = img.record.digest;
        let manifest_bytes = store.read_blob(&name, &digest)?;
        let mut out = Transfer {
            reference: target.whole(),
            digest: digest.to_string(),
            moved: 0,
            moved_bytes: 0,
            skipped: 0,
            signatures: 0,
        };
        let blobs = std::iter::once(img.manifest.config().clone())
            .chain(img.manifest.layers().iter().cloned());
        self.rt.block_on(async {
            self.client
                .auth(&target, &self.auth, oci_client::RegistryOperation::Push)
                .await
                .map_err(|e| remote_err(&target, chain(&e)))?;
            for d in blobs {
                let blob = from_oci(d.digest()).map_err(RegistryError::Invalid)?;
                let exists = self
                    .client
                    .blob_exists(&target, &blob.to_string())
                    .await
                    .map_err(|e| remote_err(&target, chain(&e)))?;
                if exists {
                    out.skipped += 1;
                    continue;
                }
                let len = d.size();
                let pb = self.bar(len, &format!("push {}", blob.short()));
                if len <= MONOLITHIC_MAX {
                    // Small enough to hold: read (and re-verify) it whole, send it in one request.
                    let data = store.read_blob(&name, &blob)?;
                    self.client
                        .push_blob(&target, data, &blob.to_string())
                        .await
                        .map_err(|e| {
                            remote_err(&target, format!("pushing blob {blob}: {}", chain(&e)))
                        })?;
                } else {
                    // Streamed in chunks, so memory stays bounded; the registry checks the
                    // digest the upload is closed with, so a damaged local copy is refused there.
                    let path = store.blob_path(&blob);
                    let file = std::fs::File::open(&path).map_err(io_err("open", &path))?;
                    let progress = pb.clone();
                    let chunks = futures::stream::unfold(file, move |mut f| {
                        let progress = progress.clone();
                        async move {
                            let mut buf = vec![0u8; CHUNK];
                            match std::io::Read::read(&mut f, &mut buf) {
                                Ok(0) => None,
                                Ok(n) => {
                                    buf.truncate(n);
                                    progress.inc(n as u64);
                                    Some((Ok(bytes::Bytes::from(buf)), f))
                                }
                                Err(e) => Some((Err(e.into()), f)),
                            }
                        }
                    });
                    self.client
                        .push_blob_stream(&target, chunks, &blob.to_string())
                        .await
                        .map_err(|e| {
                            remote_err(&target, format!("pushing blob {blob}: {}", chain(&e)))
                        })?;
                }
                pb.finish_and_clear();
                out.moved += 1;
                out.moved_bytes += len;
            }
            self.client
                .push_manifest_raw(
                    &target,
                    manifest_bytes,
                    reqwest::header::HeaderValue::from_static(OCI_MANIFEST),
                )
                .await
                .map_err(|e| remote_err(&target, format!("pushing the manifest: {}", chain(&e))))?;
            let sigs = sign::local(store.home(), &digest)?;
            if !sigs.is_empty() {
                out.signatures = self.push_signatures(&target, &digest, &sigs).await?;
            }
            Ok::<(), RegistryError>(())
        })?;
        Ok(out)
    }

    /// Writes `sigs` (with any the registry already holds) as the image's cosign signature manifest.
    async fn push_signatures(
        &self,
        target: &Reference,
        digest: &Digest,
        sigs: &[StoredSignature],
    ) -> Result<usize, RegistryError> {
        let mut all: Vec<StoredSignature> = self
            .fetch_signatures(target, digest)
            .await
            .unwrap_or_default();
        for s in sigs {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        let sig_ref = with_tag(target, &signature_tag(&digest.to_string()));
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for s in &all {
            let payload = s.payload_bytes()?;
            let d = Digest::of(&payload);
            if !self
                .client
                .blob_exists(&sig_ref, &d.to_string())
                .await
                .map_err(|e| remote_err(target, e))?
            {
                self.client
                    .push_blob(&sig_ref, payload.clone(), &d.to_string())
                    .await
                    .map_err(|e| remote_err(target, format!("pushing a signature: {e}")))?;
            }
            diff_ids.push(d.to_string());
            layers.push(serde_json::json!({
                "mediaType": SIMPLE_SIGNING,
                "digest": d.to_string(),
                "size": payload.len(),
                "annotations": { SIGNATURE_ANNOTATION: s.signature },
            }));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let config_digest = Digest::of(&config);
        self.client
            .push_blob(&sig_ref, config.clone(), &config_digest.to_string())
            .await
            .map_err(|e| remote_err(target, format!("pushing a signature: {e}")))?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.to_string(),
                "size": config.len(),
            },
            "layers": layers,
        }))
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        self.client
            .push_manifest_raw(
                &sig_ref,
                manifest,
                reqwest::header::HeaderValue::from_static(OCI_MANIFEST),
            )
            .await
            .map_err(|e| remote_err(target, format!("pushing the signature manifest: {e}")))?;
        Ok(all.len())
    }

    /// The signatures stored next to an image in the registry (none if there is no `.sig` tag).
    async fn fetch_signatures(
        &self,
        source: &Reference,
        digest: &Digest,
    ) -> Result<Vec<StoredSignature>, RegistryError> {
        let sig_ref = with_tag(source, &signature_tag(&digest.to_string()));
        let Ok((bytes, _)) = self
            .client
            .pull_manifest_raw(&sig_ref, &self.auth, &[OCI_MANIFEST])
            .await
        else {
            return Ok(Vec::new());
        };
        let manifest: OciManifestDoc = serde_json::from_slice(&bytes)
            .map_err(|e| remote_err(source, format!("the signature manifest is not valid: {e}")))?;
        let mut out = Vec::new();
        for layer in manifest.layers {
            if layer.media_type != SIMPLE_SIGNING || layer.size > 1 << 20 {
                continue;
            }
            let Some(signature) = layer
                .annotations
                .as_ref()
                .and_then(|a| a.get(SIGNATURE_ANNOTATION))
            else {
                continue;
            };
            let mut payload = Vec::new();
            self.client
                .pull_blob(&sig_ref, &layer, &mut payload)
                .await
                .map_err(|e| remote_err(source, format!("fetching a signature: {e}")))?;
            out.push(StoredSignature::new(&payload, signature));
        }
        Ok(out)
    }

    /// Pulls `source` into the store (tagged as written), with its signatures.
    pub fn pull(&self, store: &Store, source: &str) -> Result<Transfer, RegistryError> {
        let source = reference::parse(source)?;
        self.pull_as(store, &source, &local_name(&source))
    }

    /// Pulls `source` and tags it `local` in the store.
    pub fn pull_as(
        &self,
        store: &Store,
        source: &Reference,
        local: &str,
    ) -> Result<Transfer, RegistryError> {
        // gc must not take blobs that are in but not yet tagged.
        let _writing = store.lock_for_writing()?;
        self.rt.block_on(async {
            let (manifest_bytes, digest) = self.fetch_manifest(source).await?;
            let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
                remote_err(
                    source,
                    format!("the manifest of {} is not valid: {e}", source.whole()),
                )
            })?;
            let mut out = Transfer {
                reference: local.to_owned(),
                digest: digest.to_string(),
                moved: 0,
                moved_bytes: 0,
                skipped: 0,
                signatures: 0,
            };
            let blobs =
                std::iter::once(manifest.config().clone()).chain(manifest.layers().iter().cloned());
            for d in blobs {
                let blob = from_oci(d.digest()).map_err(RegistryError::Invalid)?;
                if store.has_blob(&blob) {
                    out.skipped += 1;
                    continue;
                }
                let size = d.size();
                self.fetch_blob(store, source, &blob, size, d.media_type().to_string())
                    .await?;
                out.moved += 1;
                out.moved_bytes += size;
            }
            let (stored, size) = store.put_blob(&manifest_bytes)?;
            if stored != digest {
                return Err(RegistryError::Invalid(format!(
                    "the manifest stored as {stored}, not {digest}"
                )));
            }
            let sigs = self.fetch_signatures(source, &digest).await?;
            for s in &sigs {
                sign::add_local(store.home(), &digest, s)?;
            }
            out.signatures = sigs.len();
            store.tag(local, &digest, size)?;
            Ok(out)
        })
    }

    /// The image manifest of `source` (for an index: its linux/amd64 entry), checked against its digest.
    async fn fetch_manifest(&self, source: &Reference) -> Result<(Vec<u8>, Digest), RegistryError> {
        let mut current = source.clone();
        for _ in 0..2 {
            let (bytes, _) = self
                .client
                .pull_manifest_raw(&current, &self.auth, ACCEPTED)
                .await
                .map_err(|e| remote_err(source, format!("{}: {}", source.whole(), chain(&e))))?;
            let bytes = bytes.to_vec();
            let digest = Digest::of(&bytes);
            if let Some(want) = current.digest()
                && want != digest.to_string()
            {
                return Err(remote_err(
                    source,
                    format!("asked for manifest {want}, got content hashing to {digest}; refused"),
                ));
            }
            let media: MediaTypeOnly = serde_json::from_slice(&bytes).map_err(|e| {
                remote_err(
                    source,
                    format!("the manifest of {} is not JSON: {e}", source.whole()),
                )
            })?;
            match media.media_type.as_deref() {
                Some(OCI_INDEX) | Some(DOCKER_LIST) => {
                    let index: ImageIndex = serde_json::from_slice(&bytes)
                        .map_err(|e| remote_err(source, format!("the index is not valid: {e}")))?;
                    let pick = index
                        .manifests()
                        .iter()
                        .find(|m| {
                            m.platform().as_ref().is_some_and(|p| {
                                p.os().to_string() == "linux"
                                    && p.architecture().to_string() == "amd64"
                            })
                        })
                        .ok_or_else(|| {
                            remote_err(
                                source,
                                format!("{} has no linux/amd64 image", source.whole()),
                            )
                        })?;
                    current = with_digest(source, pick.digest().as_ref());
                }
                _ => return Ok((bytes, digest)),
            }
        }
        Err(remote_err(
            source,
            "an index inside an index is not supported",
        ))
    }

    /// Streams one blob into a temp file of the store; commits it only if it is the blob asked for.
    async fn fetch_blob(
        &self,
        store: &Store,
        source: &Reference,
        blob: &Digest,
        size: u64,
        media_type: String,
    ) -> Result<(), RegistryError> {
        let desc = OciDescriptor {
            media_type,
            digest: blob.to_string(),
            size: size as i64,
            urls: None,
            annotations: None,
        };
        let pb = self.bar(size, &format!("pull {}", blob.short()));
        let mut stream = self
            .client
            .pull_blob_stream(source, &desc)
            .await
            .map_err(|e| remote_err(source, format!("fetching blob {blob}: {}", chain(&e))))?;
        let mut w = store.blob_writer()?;
        let mut got: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                remote_err(
                    source,
                    format!(
                        "fetching blob {blob}: {e} after {got} of {size} bytes; nothing was stored"
                    ),
                )
            })?;
            got += chunk.len() as u64;
            if got > size {
                return Err(remote_err(
                    source,
                    format!(
                        "blob {blob} is longer than the {size} bytes its manifest says; refused"
                    ),
                ));
            }
            w.write_all(&chunk)
                .map_err(|e| RegistryError::Invalid(format!("writing blob {blob}: {e}")))?;
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        if got < size {
            return Err(remote_err(
                source,
                format!("blob {blob} ended after {got} of {size} bytes; nothing was stored"),
            ));
        }
        w.commit_expecting(blob, Some(size))
            .map_err(|e| remote_err(source, e))?;
        Ok(())
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct MediaTypeOnly {
    media_type: Option<String>,
}

#[derive(serde::Deserialize)]
struct OciManifestDoc {
    layers: Vec<OciDescriptor>,
}

/// Pulls into a throwaway store under `dir` (for `juice import` of a registry reference).
pub fn pull_to_layout(
    options: &RemoteOptions,
    source: &str,
    dir: &Path,
) -> Result<(PathBuf, String), RegistryError> {
    let store = Store::open(dir)?;
    let r = reference::parse(source)?;
    let remote = Remote::new(options)?;
    let t = remote.pull_as(&store, &r, &local_name(&r))?;
    Ok((store.layout().to_owned(), t.reference))
}
