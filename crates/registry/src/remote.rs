//! Push and pull through an OCI distribution registry.
//!
//! A pull fetches the manifest, then every blob the store lacks, each
//! streamed into a private temp file and committed only if its digest and
//! size are the manifest's; the tag is written last, after every blob is in.
//! A push skips the blobs the registry has, then writes the manifest's exact
//! bytes, so the image keeps its digest. Signatures travel in cosign's
//! layout (see [`crate::sign`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use juice_image::digest::Digest;
use juice_image::store::{Store, from_oci};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageIndex, ImageManifest};
use serde::Serialize;

use crate::auth::{Credential, Credentials};
use crate::policy::Policy;
use crate::progress::{Direction, Reporter};
use crate::reference::{self, local_name, signature_tag, with_digest, with_tag};
use crate::sign::{self, StoredSignature};
use crate::transport::{Session, Transport, chain, read_bounded};
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

/// Manifests (an image's, an index, a signature manifest) and image configs are
/// read whole into memory: past this they are refused, not read.
pub const MANIFEST_MAX: u64 = 4 << 20;
/// A signature payload is a few hundred bytes of JSON.
const SIGNATURE_MAX: u64 = 1 << 20;
/// More signatures than this on one image is not a signature set but a flood.
const SIGNATURES_MAX: usize = 64;
/// The default bound on one image's blobs together (each layer, and the whole).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 8 << 30;

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP. Everything else is HTTPS.
    pub insecure: Vec<String>,
    /// The auth file (docker's `config.json` shape, see [`crate::auth`]); none: no credentials.
    pub auth_file: Option<PathBuf>,
    /// Credentials for this command only, each for one registry (`--user U --password-stdin`).
    pub extra_credentials: Vec<(String, Credential)>,
    /// PEM files of extra CAs to trust (a private registry's).
    pub ca_files: Vec<PathBuf>,
    /// Where each blob's progress is reported (default: nowhere). The library never draws.
    pub progress: Reporter,
    /// The bound on one image's layers and config together, and so on each
    /// (default [`DEFAULT_MAX_IMAGE_BYTES`]).
    pub max_image_bytes: Option<u64>,
}

impl RemoteOptions {
    /// `JUICE_INSECURE_REGISTRIES` (comma-separated), `JUICE_REGISTRY_CA` (PEM files,
    /// colon-separated), `JUICE_MAX_IMAGE_SIZE` (bytes, or with K, M, G), and the auth file
    /// of `home` (or `$REGISTRY_AUTH_FILE`).
    pub fn from_env(home: &Path) -> Result<RemoteOptions, RegistryError> {
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
        let max_image_bytes =
            match std::env::var("JUICE_MAX_IMAGE_SIZE") {
                Ok(v) => Some(parse_size(&v).map_err(|e| {
                    RegistryError::Invalid(format!("JUICE_MAX_IMAGE_SIZE={v:?}: {e}"))
                })?),
                Err(_) => None,
            };
        Ok(RemoteOptions {
            insecure: list("JUICE_INSECURE_REGISTRIES", ','),
            auth_file: Some(crate::auth::auth_file_path(None, home)),
            extra_credentials: Vec::new(),
            ca_files: list("JUICE_REGISTRY_CA", ':')
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            progress: Reporter::silent(),
            max_image_bytes,
        })
    }
}

/// `1234`, `512K`, `100M`, `8G` (powers of 1024; a trailing `B` or `iB` is allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| "not a size like 8G, 500M or 1048576".to_owned())?;
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| "not a size above 0 that fits in 64 bits".to_owned())
}

/// A registry client for one command.
pub struct Remote {
    client: Client,
    transport: Transport,
    rt: tokio::runtime::Runtime,
    progress: Reporter,
    max_image_bytes: u64,
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
    /// Of the local signatures pushed, how many name the target repository
    /// (a host's policy counts only those for the name it pulls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signatures_for_target: Option<usize>,
}

fn remote_err(r: &Reference, e: impl std::fmt::Display) -> RegistryError {
    let mut reason = e.to_string();
    if reason.contains("InvalidContentType") && !reason.contains("--insecure") {
        reason
            .push_str(" (it answered in plain HTTP: name it with --insecure if that is intended)");
    }
    RegistryError::Remote {
        registry: r.registry().to_owned(),
        reason,
    }
}

impl Remote {
    pub fn new(options: &RemoteOptions) -> Result<Remote, RegistryError> {
        // One credential for every registry leaked it to all of them; it is not read any more.
        for var in ["JUICE_REGISTRY_USER", "JUICE_REGISTRY_PASSWORD"] {
            if std::env::var_os(var).is_some() {
                return Err(RegistryError::Invalid(format!(
                    "{var} is set, and Juice no longer reads it (one credential was sent to every \
                     registry); unset it and file the credential for its registry with \
                     `juice login REGISTRY`, which writes $JUICE_HOME/auth.json"
                )));
            }
        }
        // reqwest's rustls uses the process's provider: ring, as everywhere in Juice.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut extra = Vec::new();
        let mut certs = Vec::new();
        for f in &options.ca_files {
            let data = std::fs::read(f).map_err(io_err("read", f))?;
            certs.push(
                reqwest::Certificate::from_pem(&data).map_err(|e| RegistryError::Key {
                    path: f.clone(),
                    reason: format!("not a PEM certificate: {e}"),
                })?,
            );
            extra.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
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
        let mut credentials = match &options.auth_file {
            Some(p) => Credentials::load(p)?,
            None => Credentials::default(),
        };
        for (registry, c) in &options.extra_credentials {
            credentials.add(registry, c.clone())?;
        }
        let transport = Transport::new(certs, options.insecure.clone(), credentials)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RegistryError::Invalid(format!("async runtime: {e}")))?;
        Ok(Remote {
            client,
            transport,
            rt,
            progress: options.progress.clone(),
            max_image_bytes: options.max_image_bytes.unwrap_or(DEFAULT_MAX_IMAGE_BYTES),
        })
    }

    fn session(&self, r: &Reference) -> Result<Session<'_>, RegistryError> {
        self.transport.session(r.registry(), r.resolve_registry())
    }

    /// Checks that the credential filed for `registry` is accepted there (`juice login`).
    pub fn check_login(&self, registry: &str) -> Result<(), RegistryError> {
        let r = reference::parse(&format!("{registry}/juice-login-check"))?;
        self.rt
            .block_on(async { self.session(&r)?.check_login().await })
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
            signatures_for_target: None,
        };
        let blobs = std::iter::once(img.manifest.config().clone())
            .chain(img.manifest.layers().iter().cloned());
        self.rt.block_on(async {
            let mut session = self.session(&target)?;
            // The credential decision is ours (see `crate::auth`); oci-client gets only its result.
            let auth = session.oci_auth(target.repository()).await?;
            self.client
                .auth(&target, &auth, oci_client::RegistryOperation::Push)
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
                let tracker = self.progress.blob(Direction::Push, blob, len);
                if len <= MONOLITHIC_MAX {
                    // Small enough to hold: read (and re-verify) it whole, send it in one request.
                    let data = store.read_blob(&name, &blob)?;
                    self.client
                        .push_blob(&target, data, &blob.to_string())
                        .await
                        .map_err(|e| {
                            remote_err(&target, format!("pushing blob {blob}: {}", chain(&e)))
                        })?;
                    tracker.advance(len);
                } else {
                    // Streamed in chunks, so memory stays bounded; the registry checks the
                    // digest the upload is closed with, so a damaged local copy is refused there.
                    let path = store.blob_path(&blob);
                    let file = std::fs::File::open(&path).map_err(io_err("open", &path))?;
                    let advance = std::sync::Arc::new(tracker.advancer());
                    let chunks = futures::stream::unfold(file, move |mut f| {
                        let advance = advance.clone();
                        async move {
                            let mut buf = vec![0u8; CHUNK];
                            match std::io::Read::read(&mut f, &mut buf) {
                                Ok(0) => None,
                                Ok(n) => {
                                    buf.truncate(n);
                                    advance(n as u64);
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
                tracker.complete();
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
                let target_name = crate::name::normalise(&target.whole())?;
                out.signatures_for_target = Some(
                    sigs.iter()
                        .filter(|s| s.identity().is_ok_and(|n| n == target_name))
                        .count(),
                );
                out.signatures = self
                    .push_signatures(&mut session, &target, &digest, &sigs)
                    .await?;
            }
            Ok::<(), RegistryError>(())
        })?;
        Ok(out)
    }

    /// Writes `sigs` (with any the registry already holds) as the image's cosign signature manifest.
    async fn push_signatures(
        &self,
        session: &mut Session<'_>,
        target: &Reference,
        digest: &Digest,
        sigs: &[StoredSignature],
    ) -> Result<usize, RegistryError> {
        let mut all: Vec<StoredSignature> = self
            .fetch_signatures(session, target, digest)
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
        session: &mut Session<'_>,
        source: &Reference,
        digest: &Digest,
    ) -> Result<Vec<StoredSignature>, RegistryError> {
        let repo = source.repository();
        let tag = signature_tag(&digest.to_string());
        let resp = session
            .get(
                repo,
                &format!("manifests/{tag}"),
                &[OCI_MANIFEST],
                "the signatures",
            )
            .await?;
        if !resp.status().is_success() {
            // No `.sig` tag (404), or one this registry will not show: unsigned, as far as we know.
            return Ok(Vec::new());
        }
        let bytes = read_bounded(resp, MANIFEST_MAX, "the signature manifest")
            .await
            .map_err(|e| remote_err(source, e))?;
        let manifest: OciManifestDoc = serde_json::from_slice(&bytes)
            .map_err(|e| remote_err(source, format!("the signature manifest is not valid: {e}")))?;
        let mut out = Vec::new();
        for layer in manifest.layers.iter().take(SIGNATURES_MAX) {
            if layer.media_type != SIMPLE_SIGNING {
                continue;
            }
            // A negative size, or one over the bound, is no signature we will read.
            let Some(size) = u64::try_from(layer.size)
                .ok()
                .filter(|s| *s <= SIGNATURE_MAX)
            else {
                continue;
            };
            let Some(signature) = layer
                .annotations
                .as_ref()
                .and_then(|a| a.get(SIGNATURE_ANNOTATION))
            else {
                continue;
            };
            let Ok(want) = layer.digest.parse::<Digest>() else {
                continue;
            };
            let resp = session
                .get(repo, &format!("blobs/{want}"), &[], "fetching a signature")
                .await?;
            if !resp.status().is_success() {
                return Err(session.refusal("fetching a signature", resp).await);
            }
            let payload = read_bounded(resp, size, "a signature payload")
                .await
                .map_err(|e| remote_err(source, e))?;
            if Digest::of(&payload) != want {
                return Err(remote_err(
                    source,
                    format!("signature payload {want} arrived with other content; refused"),
                ));
            }
            out.push(StoredSignature::new(&payload, signature));
        }
        Ok(out)
    }

    /// Pulls `source` into the store (tagged as written), with its signatures.
    pub fn pull(&self, store: &Store, source: &str) -> Result<Transfer, RegistryError> {
        let source = reference::parse(source)?;
        self.pull_as(store, &source, &local_name(&source))
    }

    /// Pulls `source` and tags it `local` in the store, if this host's trust policy admits it.
    ///
    /// The tag is resolved once, to a manifest digest; the signatures for that digest are
    /// fetched and the policy is checked before any blob moves, so an image the policy
    /// refuses costs a manifest and never has a layer downloaded. Everything after goes by
    /// that digest, and [`Transfer::digest`] is what callers run.
    pub fn pull_as(
        &self,
        store: &Store,
        source: &Reference,
        local: &str,
    ) -> Result<Transfer, RegistryError> {
        let policy = Policy::load(store.home())?;
        // gc must not take blobs that are in but not yet tagged.
        let _writing = store.lock_for_writing()?;
        self.rt.block_on(async {
            let mut session = self.session(source)?;
            let (manifest_bytes, digest) = self.fetch_manifest(&mut session, source).await?;
            let pinned = with_digest(source, &digest.to_string());
            let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
                remote_err(
                    source,
                    format!("the manifest of {} is not valid: {e}", source.whole()),
                )
            })?;
            let mut sigs = self
                .fetch_signatures(&mut session, &pinned, &digest)
                .await?;
            if let Some(policy) = &policy {
                let mut names = store.references_to(&digest)?;
                names.push(local.to_owned());
                let mut known = sign::local(store.home(), &digest)?;
                known.extend(sigs.iter().cloned());
                policy.evaluate(
                    &format!("{local} ({})", digest.short()),
                    &digest,
                    &names,
                    &known,
                )?;
            }
            let blobs: Vec<OciDescriptor> = std::iter::once(manifest.config().clone())
                .chain(manifest.layers().iter().cloned())
                .map(|d| OciDescriptor {
                    media_type: d.media_type().to_string(),
                    digest: d.digest().to_string(),
                    size: i64::try_from(d.size()).unwrap_or(i64::MAX),
                    urls: None,
                    annotations: None,
                })
                .collect();
            self.check_sizes(source, &blobs)?;
            let mut out = Transfer {
                reference: local.to_owned(),
                digest: digest.to_string(),
                moved: 0,
                moved_bytes: 0,
                skipped: 0,
                signatures: 0,
                signatures_for_target: None,
            };
            for d in &blobs {
                let blob = d
                    .digest
                    .parse::<Digest>()
                    .map_err(|e| remote_err(source, format!("blob {}: {e}", d.digest)))?;
                if store.has_blob(&blob) {
                    out.skipped += 1;
                    continue;
                }
                // `check_sizes` has already refused negative sizes.
                let size = u64::try_from(d.size).map_err(|_| {
                    remote_err(
                        source,
                        format!("blob {} has a negative size; refused", d.digest),
                    )
                })?;
                self.fetch_blob(&mut session, store, &pinned, &blob, size)
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
            sigs.dedup();
            for s in &sigs {
                sign::add_local(store.home(), &digest, s)?;
            }
            out.signatures = sigs.len();
            store.tag(local, &digest, size)?;
            Ok(out)
        })
    }

    /// Refuses, before anything is fetched, a config over [`MANIFEST_MAX`], a blob over the
    /// image bound, or blobs over it together.
    fn check_sizes(
        &self,
        source: &Reference,
        blobs: &[OciDescriptor],
    ) -> Result<(), RegistryError> {
        let max = self.max_image_bytes;
        let mut total: u64 = 0;
        for (i, d) in blobs.iter().enumerate() {
            let what = if i == 0 { "config" } else { "layer" };
            let limit = if i == 0 { MANIFEST_MAX.min(max) } else { max };
            let size = u64::try_from(d.size).map_err(|_| {
                remote_err(
                    source,
                    format!("{what} {} has a negative size; refused", d.digest),
                )
            })?;
            if size > limit {
                return Err(remote_err(
                    source,
                    format!(
                        "{what} {} of {} is {size} bytes, over the limit of {limit} \
                         (--max-image-size or JUICE_MAX_IMAGE_SIZE); refused before download",
                        d.digest,
                        source.whole()
                    ),
                ));
            }
            total = total.saturating_add(size);
        }
        if total > max {
            return Err(remote_err(
                source,
                format!(
                    "{} is {total} bytes in all, over the limit of {max} \
                     (--max-image-size or JUICE_MAX_IMAGE_SIZE); refused before download",
                    source.whole()
                ),
            ));
        }
        Ok(())
    }

    /// The image manifest of `source` (for an index: its linux/amd64 entry), checked against its
    /// digest when asked for by one, read whole only up to [`MANIFEST_MAX`].
    async fn fetch_manifest(
        &self,
        session: &mut Session<'_>,
        source: &Reference,
    ) -> Result<(Vec<u8>, Digest), RegistryError> {
        let mut current = source.clone();
        for _ in 0..2 {
            let at = current
                .digest()
                .or(current.tag())
                .unwrap_or("latest")
                .to_owned();
            let what = format!("the manifest of {}", current.whole());
            let resp = session
                .get(
                    current.repository(),
                    &format!("manifests/{at}"),
                    ACCEPTED,
                    &what,
                )
                .await?;
            if !resp.status().is_success() {
                return Err(session.refusal(&source.whole(), resp).await);
            }
            let bytes = read_bounded(resp, MANIFEST_MAX, &what)
                .await
                .map_err(|e| remote_err(source, e))?;
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

    /// Streams one blob into a temp file of the store; commits it only if it is the blob
    /// asked for, and stops as soon as it runs past the size the manifest declares.
    async fn fetch_blob(
        &self,
        session: &mut Session<'_>,
        store: &Store,
        source: &Reference,
        blob: &Digest,
        size: u64,
    ) -> Result<(), RegistryError> {
        let what = format!("fetching blob {blob}");
        let tracker = self.progress.blob(Direction::Pull, *blob, size);
        let mut resp = session
            .get(source.repository(), &format!("blobs/{blob}"), &[], &what)
            .await?;
        if !resp.status().is_success() {
            return Err(session.refusal(&what, resp).await);
        }
        if let Some(len) = resp.content_length()
            && len > size
        {
            return Err(remote_err(
                source,
                format!("blob {blob} is {len} bytes, not the {size} its manifest says; refused"),
            ));
        }
        let mut w = store.blob_writer()?;
        let mut got: u64 = 0;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    return Err(remote_err(
                        source,
                        format!(
                            "{what}: {} after {got} of {size} bytes; nothing was stored",
                            chain(&e)
                        ),
                    ));
                }
            };
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
            tracker.advance(chunk.len() as u64);
        }
        if got < size {
            return Err(remote_err(
                source,
                format!("blob {blob} ended after {got} of {size} bytes; nothing was stored"),
            ));
        }
        w.commit_expecting(blob, Some(size))
            .map_err(|e| remote_err(source, e))?;
        tracker.complete();
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
