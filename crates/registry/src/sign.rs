//! Signatures: ed25519 keys, cosign's payload and layout.
//!
//! Why this scheme: cosign's layout is what registries and tools already
//! expect for detached signatures (a `sha256-<hex>.sig` tag in the image's
//! repository, one layer per signature, a "simple signing" JSON payload that
//! names the manifest digest, the signature in an annotation), so signatures
//! travel with the image through any registry and mirror. The keys are
//! ed25519 (PKCS#8 and SPKI PEM, which cosign reads for verification): small,
//! fast, and with no per-signature randomness to get wrong.
//!
//! A signature is kept locally per image, in `$JUICE_HOME/signatures/<hex>.json`;
//! `juice push` carries it to the registry and `juice pull` brings it back.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use juice_image::digest::Digest;
use serde::{Deserialize, Serialize};

use crate::name::{self, ImageName};
use crate::{RegistryError, io_err};

/// The `type` cosign gives its payloads.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";

/// One signature: the payload and the signature over it, both base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSignature {
    pub payload: String,
    pub signature: String,
}

impl StoredSignature {
    pub fn new(payload: &[u8], signature_b64: &str) -> StoredSignature {
        StoredSignature {
            payload: B64.encode(payload),
            signature: signature_b64.to_owned(),
        }
    }

    pub fn payload_bytes(&self) -> Result<Vec<u8>, RegistryError> {
        B64.decode(&self.payload)
            .map_err(|e| RegistryError::Invalid(format!("a stored signature's payload: {e}")))
    }

    /// The repository this signature is for: its payload's `docker-reference`, normalised
    /// (not verified: only [`StoredSignature::check_for`] says whether it counts).
    pub fn identity(&self) -> Result<ImageName, String> {
        let payload = B64
            .decode(&self.payload)
            .map_err(|e| format!("the payload is not base64: {e}"))?;
        let p: Payload = serde_json::from_slice(&payload)
            .map_err(|e| format!("the payload is not valid: {e}"))?;
        name::normalise(&p.critical.identity.docker_reference).map_err(|e| e.to_string())
    }

    /// Checks that this verifies under `key`, signs `digest`, and was made for `identity`: its
    /// `docker-reference`, normalised, is that repository (a tag or digest in it is ignored;
    /// the digest that counts is the payload's). A signature for one repository says nothing
    /// about the same bytes under another name.
    pub fn check_for(
        &self,
        digest: &Digest,
        identity: &ImageName,
        key: &VerifyingKey,
    ) -> Result<(), String> {
        let p = self.verified_payload(digest, key)?;
        let theirs = name::normalise(&p.critical.identity.docker_reference)
            .map_err(|e| format!("its docker-reference is not a name: {e}"))?;
        if &theirs != identity {
            return Err(format!("it is for {theirs}, not {identity}"));
        }
        Ok(())
    }

    /// Checks that this verifies under `key` and signs `digest`, whatever name it is for.
    pub fn check(&self, digest: &Digest, key: &VerifyingKey) -> Result<(), String> {
        self.verified_payload(digest, key).map(|_| ())
    }

    fn verified_payload(&self, digest: &Digest, key: &VerifyingKey) -> Result<Payload, String> {
        let payload = B64
            .decode(&self.payload)
            .map_err(|e| format!("the payload is not base64: {e}"))?;
        let sig = B64
            .decode(&self.signature)
            .map_err(|e| format!("the signature is not base64: {e}"))?;
        let sig =
            Signature::from_slice(&sig).map_err(|e| format!("not an ed25519 signature: {e}"))?;
        key.verify(&payload, &sig)
            .map_err(|_| "the signature does not verify under this key".to_owned())?;
        let p: Payload = serde_json::from_slice(&payload)
            .map_err(|e| format!("the payload is not valid: {e}"))?;
        if p.critical.kind != PAYLOAD_TYPE {
            return Err(format!("the payload's type is {:?}", p.critical.kind));
        }
        if p.critical.image.docker_manifest_digest != digest.to_string() {
            return Err(format!(
                "it signs {}, not this image",
                p.critical.image.docker_manifest_digest
            ));
        }
        Ok(p)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    critical: Critical,
    optional: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Critical {
    identity: Identity,
    image: ImageClaim,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ImageClaim {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The payload a signature covers: which image (by manifest digest) and under what name.
pub fn payload(docker_reference: &str, digest: &Digest) -> Vec<u8> {
    let p = Payload {
        critical: Critical {
            identity: Identity {
                docker_reference: docker_reference.to_owned(),
            },
            image: ImageClaim {
                docker_manifest_digest: digest.to_string(),
            },
            kind: PAYLOAD_TYPE.to_owned(),
        },
        optional: None,
    };
    // Not input: a struct of strings always serialises.
    serde_json::to_vec(&p).unwrap_or_default()
}

/// Writes `NAME.key` (private, mode 0600) and `NAME.pub`; refuses to overwrite.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf), RegistryError> {
    let private = prefix.with_extension("key");
    let public = prefix.with_extension("pub");
    for p in [&private, &public] {
        if p.exists() {
            return Err(RegistryError::Key {
                path: p.clone(),
                reason: "already exists; not overwritten".into(),
            });
        }
    }
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| RegistryError::Key {
            path: private.clone(),
            reason: e.to_string(),
        })?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .map_err(io_err("create", &private))?;
    std::io::Write::write_all(&mut f, pem.as_bytes()).map_err(io_err("write", &private))?;
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| RegistryError::Key {
            path: public.clone(),
            reason: e.to_string(),
        })?;
    std::fs::write(&public, public_pem).map_err(io_err("write", &public))?;
    Ok((private, public))
}

pub fn load_private(path: &Path) -> Result<SigningKey, RegistryError> {
    let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| RegistryError::Key {
        path: path.to_owned(),
        reason: format!("not an ed25519 private key (PKCS#8 PEM): {e}"),
    })
}

pub fn load_public(path: &Path) -> Result<VerifyingKey, RegistryError> {
    let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| RegistryError::Key {
        path: path.to_owned(),
        reason: format!("not an ed25519 public key (SPKI PEM): {e}"),
    })
}

/// Signs the image `digest` for the repository `name` (a tag or digest in it is dropped) and
/// keeps the signature locally. The signature counts only where the image is known by that
/// repository: sign for the name hosts will pull it as (`registry/repo`).
pub fn sign(
    home: &Path,
    digest: &Digest,
    name: &str,
    key: &Path,
) -> Result<StoredSignature, RegistryError> {
    // The identity is the repository, normalised, without tag or digest, as cosign writes it.
    let identity = name::normalise(name)?;
    let key = load_private(key)?;
    let payload = payload(&identity.to_string(), digest);
    let sig = key.sign(&payload);
    let stored = StoredSignature::new(&payload, &B64.encode(sig.to_bytes()));
    add_local(home, digest, &stored)?;
    Ok(stored)
}

fn local_path(home: &Path, digest: &Digest) -> PathBuf {
    home.join("signatures")
        .join(format!("{}.json", digest.hex()))
}

/// The signatures kept locally for an image.
pub fn local(home: &Path, digest: &Digest) -> Result<Vec<StoredSignature>, RegistryError> {
    let path = local_path(home, digest);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Adds a signature to an image's local set (atomically; duplicates are ignored).
pub fn add_local(home: &Path, digest: &Digest, sig: &StoredSignature) -> Result<(), RegistryError> {
    let mut all = local(home, digest)?;
    if all.contains(sig) {
        return Ok(());
    }
    all.push(sig.clone());
    let path = local_path(home, digest);
    let dir = home.join("signatures");
    std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let json =
        serde_json::to_vec_pretty(&all).map_err(|e| RegistryError::Invalid(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))
}

/// Removes the local signatures of images whose manifest is no longer in the store.
pub fn gc(store: &juice_image::store::Store) -> usize {
    let Ok(entries) = std::fs::read_dir(store.home().join("signatures")) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(hex) = name.strip_suffix(".json") else {
            continue;
        };
        let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
            continue;
        };
        if !store.has_blob(&digest) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_image_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = keygen(&dir.path().join("k")).unwrap();
        assert!(keygen(&dir.path().join("k")).is_err(), "no overwrite");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let d = Digest::of(b"manifest");
        let s = sign(dir.path(), &d, "127.0.0.1:5000/apps/hello:1", &private).unwrap();
        let key = load_public(&public).unwrap();
        s.check(&d, &key).unwrap();
        // It counts for its own repository, however spelled, and for no other.
        let for_name = |n: &str| s.check_for(&d, &name::normalise(n).unwrap(), &key);
        for_name("127.0.0.1:5000/apps/hello@sha256:0000000000000000000000000000000000000000000000000000000000000000").unwrap();
        for (other, theirs) in [
            ("127.0.0.1:5000/apps/other:1", "127.0.0.1:5000/apps/other"),
            ("127.0.0.1:5001/apps/hello:1", "127.0.0.1:5001/apps/hello"),
            ("hello:1", "hello"),
        ] {
            let e = for_name(other).unwrap_err();
            assert!(
                e.contains("it is for 127.0.0.1:5000/apps/hello") && e.contains(theirs),
                "{e}"
            );
        }
        let payload: serde_json::Value =
            serde_json::from_slice(&s.payload_bytes().unwrap()).unwrap();
        assert_eq!(
            payload["critical"]["identity"]["docker-reference"],
            "127.0.0.1:5000/apps/hello"
        );
        assert_eq!(local(dir.path(), &d).unwrap(), vec![s.clone()]);

        let other = Digest::of(b"another manifest");
        assert!(
            s.check(&other, &key)
                .unwrap_err()
                .contains("not this image")
        );
        let (_, public2) = keygen(&dir.path().join("k2")).unwrap();
        assert!(s.check(&d, &load_public(&public2).unwrap()).is_err());
        // A payload changed after signing no longer verifies.
        let mut tampered = s.clone();
        let mut p = s.payload_bytes().unwrap();
        let at = p.len() - 5;
        p[at] ^= 1;
        tampered.payload = B64.encode(&p);
        assert!(tampered.check(&d, &key).is_err());
        assert!(
            load_public(&private).is_err(),
            "a private key is not a public key"
        );
    }
}
