//! Registry credentials, each for one registry.
//!
//! Credentials live in an auth file in the shape of docker's `config.json`
//! (which podman, skopeo and crane read and write too):
//!
//! ```json
//! {"auths": {"registry.example.com": {"auth": "base64(user:password)"}}}
//! ```
//!
//! The file is `--authfile PATH`, else `$REGISTRY_AUTH_FILE`, else
//! `$JUICE_HOME/auth.json`; `juice login REGISTRY` writes it (mode 0600),
//! reading the password from stdin, so no secret is ever on a command line
//! (where every user of the host can read it in the process list).
//!
//! Where a credential may go (see [`Credentials::for_registry`] and
//! [`realm_may_receive`]):
//!
//! - Only to the registry it is filed under, compared after the host is
//!   normalised ([`crate::name::normalise_host`]): `host`, `host:443` and
//!   `https://host/v1/` are one entry.
//! - Never over plain HTTP, except to a loopback registry the user named
//!   with `--insecure` (the bytes never leave the machine). A credential for
//!   any other plain-HTTP registry is an error, not a silent downgrade.
//! - A registry that answers with a bearer-token challenge names a token
//!   realm. The registry's credential goes to that realm only if the realm
//!   is on the registry's own origin (same host and port) over HTTPS (or the
//!   loopback exception above). A realm elsewhere gets the credential filed
//!   under its own host, if the auth file has one, and otherwise nothing: the
//!   token is asked for anonymously. A registry cannot send a credential to a
//!   host the user did not file it under.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::name::{is_loopback, normalise_host};
use crate::{RegistryError, io_err};

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password, even in `--debug` output.
        write!(f, "Credential({:?}, <password>)", self.username)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    /// Whatever else docker or podman keep there, written back untouched.
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AuthEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

/// The credentials of an auth file, by normalised registry host.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub path: Option<PathBuf>,
    by_host: BTreeMap<String, Credential>,
}

/// Where the auth file is: `explicit`, else `$REGISTRY_AUTH_FILE`, else `home/auth.json`.
pub fn auth_file_path(explicit: Option<&Path>, home: &Path) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_owned();
    }
    match std::env::var_os("REGISTRY_AUTH_FILE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => home.join("auth.json"),
    }
}

/// The registry an auth file's key names: `host[:port]`, or a URL such as `https://index.docker.io/v1/`.
fn key_host(key: &str) -> Result<String, String> {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest.split('/').next().unwrap_or(rest);
    normalise_host(host)
}

fn bad_file(path: &Path, reason: String) -> RegistryError {
    RegistryError::Auth {
        path: path.to_owned(),
        reason,
    }
}

impl Credentials {
    /// Reads the auth file at `path`; no file means no credentials.
    pub fn load(path: &Path) -> Result<Credentials, RegistryError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Credentials {
                    path: Some(path.to_owned()),
                    by_host: BTreeMap::new(),
                });
            }
            Err(e) => return Err(io_err("read", path)(e)),
        };
        let file: AuthFile = serde_json::from_slice(&bytes).map_err(|e| {
            bad_file(
                path,
                format!("not an auth file ({{\"auths\": {{...}}}}): {e}"),
            )
        })?;
        let mut by_host = BTreeMap::new();
        for (key, entry) in &file.auths {
            let host = key_host(key).map_err(|e| bad_file(path, format!("entry {key:?}: {e}")))?;
            let credential = entry
                .credential()
                .map_err(|e| bad_file(path, format!("entry {key:?}: {e}")))?;
            if let Some(c) = credential {
                by_host.insert(host, c);
            }
        }
        Ok(Credentials {
            path: Some(path.to_owned()),
            by_host,
        })
    }

    /// Credentials given for this command only (`--user U --password-stdin`), for one registry.
    pub fn add(&mut self, registry: &str, credential: Credential) -> Result<(), RegistryError> {
        let host = normalise_host(registry).map_err(RegistryError::Invalid)?;
        self.by_host.insert(host, credential);
        Ok(())
    }

    /// The credential filed under `registry`, if it may be used there: `Ok(None)` when
    /// there is none, an error when there is one but the registry is spoken to over plain
    /// HTTP and is not on loopback.
    pub fn for_registry(
        &self,
        registry: &str,
        plain_http: bool,
    ) -> Result<Option<&Credential>, RegistryError> {
        let Ok(host) = normalise_host(registry) else {
            return Ok(None);
        };
        let Some(c) = self.by_host.get(&host) else {
            return Ok(None);
        };
        if plain_http && !is_loopback(registry) {
            return Err(RegistryError::Remote {
                registry: registry.to_owned(),
                reason: format!(
                    "{} has a credential for it, and it is spoken to over plain HTTP (--insecure), \
                     where anyone on the path reads it; Juice sends credentials over plain HTTP \
                     only to loopback. Use HTTPS (--ca for a private CA) or remove the entry",
                    self.describe()
                ),
            });
        }
        Ok(Some(c))
    }

    /// The credential filed under exactly this host (no transport check: see [`realm_may_receive`]).
    pub fn filed_under(&self, host: &str) -> Option<&Credential> {
        normalise_host(host).ok().and_then(|h| self.by_host.get(&h))
    }

    fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "the command line".into(),
        }
    }
}

impl AuthEntry {
    fn credential(&self) -> Result<Option<Credential>, String> {
        if let Some(a) = &self.auth {
            if a.is_empty() {
                return Ok(None);
            }
            let raw = B64
                .decode(a.trim())
                .map_err(|e| format!("\"auth\" is not base64: {e}"))?;
            let text = String::from_utf8(raw).map_err(|_| "\"auth\" is not UTF-8".to_owned())?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| "\"auth\" is not base64 of USER:PASSWORD".to_owned())?;
            return Ok(Some(Credential {
                username: u.to_owned(),
                password: p.to_owned(),
            }));
        }
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => Ok(Some(Credential {
                username: u.clone(),
                password: p.clone(),
            })),
            _ => Ok(None),
        }
    }
}

/// Which credential a token realm gets when the registry `registry` (spoken to over
/// `registry_plain_http`) names `realm`: the registry's own if the realm is on the same
/// origin, the realm host's own if the auth file has one, else none.
pub fn realm_may_receive<'a>(
    credentials: &'a Credentials,
    registry: &str,
    registry_plain_http: bool,
    realm: &reqwest::Url,
) -> Result<Option<&'a Credential>, RegistryError> {
    let Some(realm_host) = realm.host_str() else {
        return Ok(None);
    };
    let realm_host = match realm.port() {
        Some(p) => format!("{realm_host}:{p}"),
        None => realm_host.to_owned(),
    };
    let realm_plain = realm.scheme() != "https";
    // Plain HTTP only to loopback, and only when the registry itself is an insecure loopback one.
    let transport_ok = !realm_plain || (registry_plain_http && is_loopback(&realm_host));
    if !transport_ok {
        return Ok(None);
    }
    let same_origin = match (normalise_host(&realm_host), normalise_host(registry)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same_origin {
        return credentials.for_registry(registry, registry_plain_http);
    }
    Ok(credentials.filed_under(&realm_host))
}

/// Adds (or replaces) the credential for `registry` in the auth file at `path`, keeping
/// every other entry and field; the file is written whole, mode 0600, then renamed.
pub fn login(path: &Path, registry: &str, credential: &Credential) -> Result<(), RegistryError> {
    let host = normalise_host(registry).map_err(RegistryError::Invalid)?;
    let mut file = read_raw(path)?;
    file.auths
        .retain(|k, _| key_host(k).ok().as_deref() != Some(host.as_str()));
    file.auths.insert(
        host,
        AuthEntry {
            auth: Some(B64.encode(format!("{}:{}", credential.username, credential.password))),
            ..Default::default()
        },
    );
    write_raw(path, &file)
}

/// Removes the credential for `registry`; whether there was one.
pub fn logout(path: &Path, registry: &str) -> Result<bool, RegistryError> {
    let host = normalise_host(registry).map_err(RegistryError::Invalid)?;
    let mut file = read_raw(path)?;
    let before = file.auths.len();
    file.auths
        .retain(|k, _| key_host(k).ok().as_deref() != Some(host.as_str()));
    if file.auths.len() == before {
        return Ok(false);
    }
    write_raw(path, &file)?;
    Ok(true)
}

fn read_raw(path: &Path) -> Result<AuthFile, RegistryError> {
    match std::fs::read(path) {
        Ok(b) => {
            serde_json::from_slice(&b).map_err(|e| bad_file(path, format!("not an auth file: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AuthFile::default()),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn write_raw(path: &Path, file: &AuthFile) -> Result<(), RegistryError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let json =
        serde_json::to_vec_pretty(file).map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // 0600 from creation: the password is never readable by others, not even for a moment.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", &tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(u: &str) -> Credential {
        Credential {
            username: u.into(),
            password: format!("{u}-secret"),
        }
    }

    #[test]
    fn a_credential_is_found_only_under_its_own_registry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"Reg.Example.com:443": {{"auth": "{}"}}, "https://index.docker.io/v1/": {{"auth": "{}"}}, "127.0.0.1:5000": {{"username": "u", "password": "p"}}}}, "credsStore": "x"}}"#,
                B64.encode("a:pa"),
                B64.encode("hub:ph")
            ),
        )
        .unwrap();
        let c = Credentials::load(&path).unwrap();
        assert_eq!(
            c.for_registry("reg.example.com", false)
                .unwrap()
                .unwrap()
                .username,
            "a"
        );
        assert_eq!(
            c.for_registry("docker.io", false)
                .unwrap()
                .unwrap()
                .username,
            "hub"
        );
        assert!(
            c.for_registry("reg.example.com:5000", false)
                .unwrap()
                .is_none()
        );
        assert!(
            c.for_registry("other.example.com", false)
                .unwrap()
                .is_none()
        );
        // Plain HTTP: loopback only.
        assert_eq!(
            c.for_registry("127.0.0.1:5000", true)
                .unwrap()
                .unwrap()
                .username,
            "u"
        );
        let e = c
            .for_registry("reg.example.com", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain HTTP") && e.contains("auth.json"), "{e}");

        // login keeps the other entries and fields, replaces its own, and is 0600.
        login(&path, "REG.example.com", &cred("b")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let c = Credentials::load(&path).unwrap();
        assert_eq!(
            c.for_registry("reg.example.com", false)
                .unwrap()
                .unwrap()
                .username,
            "b"
        );
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("credsStore")
        );
        assert!(logout(&path, "reg.example.com:443").unwrap());
        assert!(
            Credentials::load(&path)
                .unwrap()
                .for_registry("reg.example.com", false)
                .unwrap()
                .is_none()
        );
        assert!(format!("{:?}", cred("x")).contains("<password>"));
        assert!(!format!("{:?}", cred("x")).contains("x-secret"));
    }

    #[test]
    fn a_token_realm_gets_only_what_is_filed_for_it() {
        let mut c = Credentials::default();
        c.add("reg.example.com", cred("reg")).unwrap();
        c.add("auth.example.com", cred("realm")).unwrap();
        c.add("127.0.0.1:5000", cred("lo")).unwrap();
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        let who = |registry: &str, plain: bool, realm: &str| {
            realm_may_receive(&c, registry, plain, &url(realm))
                .unwrap()
                .map(|c| c.username.clone())
        };
        assert_eq!(
            who("reg.example.com", false, "https://reg.example.com/token").as_deref(),
            Some("reg")
        );
        assert_eq!(
            who("reg.example.com", false, "https://reg.example.com:443/t").as_deref(),
            Some("reg")
        );
        // Another host gets its own credential or nothing, never the registry's.
        assert_eq!(
            who("reg.example.com", false, "https://auth.example.com/t").as_deref(),
            Some("realm")
        );
        assert_eq!(
            who("reg.example.com", false, "https://evil.example.net/t"),
            None
        );
        assert_eq!(
            who("reg.example.com", false, "https://reg.example.com:8443/t"),
            None
        );
        // Never over plain HTTP, except loopback for an insecure loopback registry.
        assert_eq!(
            who("reg.example.com", false, "http://reg.example.com/t"),
            None
        );
        assert_eq!(
            who("127.0.0.1:5000", true, "http://127.0.0.1:5000/t").as_deref(),
            Some("lo")
        );
        assert_eq!(who("127.0.0.1:5000", true, "http://127.0.0.1:6000/t"), None);
    }

    #[test]
    fn a_damaged_auth_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        std::fs::write(&path, r#"{"auths": {"reg.example.com": {"auth": "%%%"}}}"#).unwrap();
        let e = Credentials::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("auth.json") && e.contains("reg.example.com"),
            "{e}"
        );
        assert!(
            Credentials::load(&dir.path().join("none.json"))
                .unwrap()
                .filed_under("x.y")
                .is_none()
        );
    }
}
