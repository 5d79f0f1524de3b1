//! `host.toml`: the host's own settings, typed and versioned.
//!
//! The file lives on the data partition at `/var/lib/juice/host.toml`; the operator
//! writes it, `juice-host` only reads it. Every error names the file, line and field,
//! as the site file's errors do.
//!
//! ```toml
//! version = 2
//! hostname = "edge-1"
//!
//! [network]
//! interface = "eth0"             # the default
//! addresses = ["10.0.2.15/24"]
//! gateway = "10.0.2.2"
//! dns = ["10.0.2.3"]
//!
//! [daemon]
//! listen = "0.0.0.0:7443"        # remote API, mutual TLS only
//! tls = "tls"                    # relative paths resolve under /var/lib/juice
//!
//! [site]
//! file = "site.toml"             # applied by the daemon at every start
//!
//! [registries]
//! insecure = ["10.0.2.2:5000"]   # plain HTTP (a lab's registry on loopback)
//! ca = ["certs/registry-ca.pem"] # extra CAs for registries; relative to /var/lib/juice
//!
//! [os]
//! trial_deadline = "5m"
//! stability = "30s"
//! ```
//!
//! ## Versions
//! - **1**: `[network] address = "CIDR"`, a single address.
//! - **2** (current): `[network] addresses = [...]`, a list, so a host can carry a
//!   second address (a service address, or an IPv4 beside a later IPv6) without a
//!   new schema. A version 1 file is migrated in memory (`address` becomes
//!   `addresses = [address]`) and [`Loaded::migrated_from`] says so; the file on disk
//!   is never rewritten, so the operator's file stays theirs.
//!
//! Addressing is static today. `[network] mode` is there so that `"dhcp"` can be
//! added later without breaking a written file: a static file keeps meaning static.
//!
//! There is no `[trust]` table: the daemon takes no policy argument, it reads
//! `$JUICE_HOME/policy.toml`, which on a Juice OS host is `/var/lib/juice/policy.toml`
//! on the same data partition as this file.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use juice_image::manifest::{ManifestError, error_at_key, parse_toml};
use serde::{Deserialize, Deserializer};

/// The schema version this build writes in its examples and reads natively.
pub const CURRENT_VERSION: u32 = 2;
/// Where the daemon's home, and so this file, is on a Juice OS host.
pub const HOME: &str = "/var/lib/juice";
/// The file's name under [`HOME`].
pub const FILE: &str = "host.toml";

/// Why `host.toml` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read (absent is not an error for the host: see [`Settings::load_if_present`]).
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a valid `host.toml`; the message names file, line and field.
    #[error(transparent)]
    Invalid(#[from] ManifestError),
}

/// The host's settings, at the current schema version. The default is a host with
/// loopback only, no remote API and no site.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub hostname: Option<String>,
    pub network: Option<Network>,
    pub daemon: Daemon,
    pub site: Option<SiteSettings>,
    pub os: OsSettings,
    pub registries: Registries,
}

/// What [`Settings::load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub settings: Settings,
    /// The file's own version when it was older than [`CURRENT_VERSION`] and migrated in memory.
    pub migrated_from: Option<u32>,
}

/// How the host's interface gets its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The addresses, gateway and DNS servers in the file.
    #[default]
    Static,
}

/// The host's one configured interface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default = "default_interface")]
    pub interface: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub addresses: Vec<Cidr>,
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<IpAddr>,
}

/// The daemon's remote API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Daemon {
    /// Also serve the API here, to mutual-TLS clients only.
    pub listen: Option<SocketAddr>,
    /// Certificates for `listen`; relative to [`HOME`]. Default: the daemon's own (`tls`).
    pub tls: Option<PathBuf>,
}

/// How the daemon reaches registries (for appliances and OS updates).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registries {
    /// Registries spoken to over plain HTTP, as `HOST:PORT`.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// CA certificates trusted for registries besides the bundle; relative to [`HOME`].
    #[serde(default)]
    pub ca: Vec<PathBuf>,
}

/// A site file the daemon applies at every start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSettings {
    /// Relative to [`HOME`].
    pub file: PathBuf,
}

/// The trial of a new OS version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsSettings {
    /// PID 1 reboots a trial that has no verdict by then.
    #[serde(default = "default_deadline", deserialize_with = "duration")]
    pub trial_deadline: Duration,
    /// How long the host must stay healthy before the daemon commits a trial.
    #[serde(default = "default_stability", deserialize_with = "duration")]
    pub stability: Duration,
}

impl Default for OsSettings {
    fn default() -> OsSettings {
        OsSettings {
            trial_deadline: default_deadline(),
            stability: default_stability(),
        }
    }
}

/// An IPv4 address with its prefix length, written `10.0.2.15/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = |why: &str| format!("bad CIDR `{s}`: {why} (expected like 10.0.2.15/24)");
        let (addr, prefix) = s.split_once('/').ok_or_else(|| bad("no /prefix"))?;
        let address = addr
            .parse()
            .map_err(|_| bad("not an IPv4 address before the /"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| bad("the prefix is not 0 to 32"))?;
        Ok(Cidr { address, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("bad duration `{s}`: {e} (expected like 30s or 5m)"))
    })
}

fn default_interface() -> String {
    "eth0".into()
}
fn default_deadline() -> Duration {
    Duration::from_secs(300)
}
fn default_stability() -> Duration {
    Duration::from_secs(30)
}

/// Only the version, read first to pick the schema.
#[derive(Deserialize)]
struct Versioned {
    version: Option<toml::Value>,
}

/// Version 2, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV2 {
    #[allow(dead_code)]
    version: u32,
    hostname: Option<String>,
    network: Option<Network>,
    #[serde(default)]
    daemon: Daemon,
    site: Option<SiteSettings>,
    #[serde(default)]
    os: OsSettings,
    #[serde(default)]
    registries: Registries,
}

/// Version 1: a single `network.address`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV1 {
    #[allow(dead_code)]
    version: u32,
    hostname: Option<String>,
    network: Option<NetworkV1>,
    #[serde(default)]
    daemon: Daemon,
    site: Option<SiteSettings>,
    #[serde(default)]
    os: OsSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkV1 {
    #[serde(default = "default_interface")]
    interface: String,
    address: Option<Cidr>,
    gateway: Option<Ipv4Addr>,
    #[serde(default)]
    dns: Vec<IpAddr>,
}

impl From<FileV1> for FileV2 {
    /// The migration from version 1: the single address becomes a list of one.
    fn from(v1: FileV1) -> FileV2 {
        FileV2 {
            version: CURRENT_VERSION,
            hostname: v1.hostname,
            network: v1.network.map(|n| Network {
                interface: n.interface,
                mode: Mode::Static,
                addresses: n.address.into_iter().collect(),
                gateway: n.gateway,
                dns: n.dns,
            }),
            daemon: v1.daemon,
            site: v1.site,
            os: v1.os,
            registries: Registries::default(),
        }
    }
}

impl Settings {
    /// Reads and checks `path`, migrating an older version in memory.
    pub fn load(path: &Path) -> Result<Loaded, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Settings::parse(&text, path)
    }

    /// As [`Settings::load`], with `Ok(None)` when the file does not exist.
    pub fn load_if_present(path: &Path) -> Result<Option<Loaded>, SettingsError> {
        match Settings::load(path) {
            Err(SettingsError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    /// Parses and checks the text of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Loaded, SettingsError> {
        let at = |key: &str, msg: &str| error_at_key(text, path, key, 0, msg);
        let versioned: Versioned = parse_toml(text, path)?;
        let version = match versioned.version {
            None => {
                return Err(at(
                    "",
                    &format!("`version` is missing: write `version = {CURRENT_VERSION}` first"),
                )
                .into());
            }
            Some(toml::Value::Integer(v)) => v,
            Some(_) => return Err(at("version", "`version` must be a number").into()),
        };
        let (file, migrated_from) = match version {
            2 => (parse_toml::<FileV2>(text, path)?, None),
            1 => (FileV2::from(parse_toml::<FileV1>(text, path)?), Some(1)),
            v => {
                return Err(at(
                    "version",
                    &format!(
                        "unknown version {v}: this juice-host reads versions 1 to {CURRENT_VERSION}"
                    ),
                )
                .into());
            }
        };
        if let Some(h) = &file.hostname
            && !valid_hostname(h)
        {
            return Err(at(
                "hostname",
                &format!("hostname `{h}` is not 1 to 64 letters, digits, `-` and `.`"),
            )
            .into());
        }
        if let Some(n) = &file.network {
            if n.interface.is_empty()
                || n.interface.len() > 15
                || n.interface.contains(['/', ' ', '\0'])
            {
                return Err(at(
                    "interface",
                    &format!("interface `{}` is not a Linux interface name", n.interface),
                )
                .into());
            }
            if n.gateway.is_some() && n.addresses.is_empty() {
                return Err(at("gateway", "a gateway needs at least one address").into());
            }
        }
        Ok(Loaded {
            settings: Settings {
                hostname: file.hostname,
                network: file.network,
                daemon: file.daemon,
                site: file.site,
                os: file.os,
                registries: file.registries,
            },
            migrated_from,
        })
    }

    /// The daemon's certificate directory, resolved under `home` when relative.
    pub fn tls_dir(&self, home: &Path) -> Option<PathBuf> {
        self.daemon.tls.as_deref().map(|p| home.join(p))
    }

    /// The site file to apply at start, resolved under `home` when relative.
    pub fn site_file(&self, home: &Path) -> Option<PathBuf> {
        self.site.as_ref().map(|s| home.join(&s.file))
    }

    /// `/etc/resolv.conf` for the DNS servers, if any.
    pub fn resolv_conf(&self) -> Option<String> {
        let n = self.network.as_ref()?;
        if n.dns.is_empty() {
            return None;
        }
        Some(n.dns.iter().map(|d| format!("nameserver {d}\n")).collect())
    }
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = r#"version = 2
hostname = "edge-1"

[network]
addresses = ["10.0.2.15/24"]
gateway = "10.0.2.2"
dns = ["10.0.2.3"]

[daemon]
listen = "0.0.0.0:7443"
tls = "tls"

[site]
file = "site.toml"

[os]
trial_deadline = "2m"
"#;

    fn parse(text: &str) -> Result<Loaded, SettingsError> {
        Settings::parse(text, Path::new("host.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_current_file_parses_with_defaults_filled_in() {
        let l = parse(V2).unwrap();
        assert_eq!(l.migrated_from, None);
        let s = l.settings;
        assert_eq!(s.hostname.as_deref(), Some("edge-1"));
        let n = s.network.as_ref().unwrap();
        assert_eq!(n.interface, "eth0");
        assert_eq!(n.addresses[0].to_string(), "10.0.2.15/24");
        assert_eq!(s.os.trial_deadline, Duration::from_secs(120));
        assert_eq!(s.os.stability, Duration::from_secs(30));
        let home = Path::new(HOME);
        assert_eq!(s.tls_dir(home).unwrap(), Path::new("/var/lib/juice/tls"));
        assert_eq!(
            s.site_file(home).unwrap(),
            Path::new("/var/lib/juice/site.toml")
        );
        assert_eq!(s.resolv_conf().unwrap(), "nameserver 10.0.2.3\n");
    }

    #[test]
    fn an_absent_file_is_none_and_defaults_are_loopback_only() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            Settings::load_if_present(&dir.path().join("host.toml"))
                .unwrap()
                .is_none()
        );
        let d = Settings::default();
        assert!(d.network.is_none());
        assert_eq!(d.os.trial_deadline, Duration::from_secs(300));
    }

    #[test]
    fn an_unknown_field_names_file_line_and_field() {
        let msg = err(&V2.replace("gateway =", "gatewy ="));
        assert!(
            msg.starts_with("host.toml:6:1: field `network.gatewy`")
                && msg.contains("did you mean `gateway`"),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_cidr_is_located() {
        let msg = err(&V2.replace("10.0.2.15/24", "10.0.2.15/33"));
        assert!(
            msg.starts_with("host.toml:5:") && msg.contains("bad CIDR `10.0.2.15/33`"),
            "{msg}"
        );
        let msg = err(&V2.replace("10.0.2.15/24", "10.0.2.15"));
        assert!(msg.contains("no /prefix"), "{msg}");
    }

    #[test]
    fn a_bad_duration_is_located() {
        let msg = err(&V2.replace("\"2m\"", "\"two minutes\""));
        assert!(
            msg.starts_with("host.toml:17:") && msg.contains("bad duration `two minutes`"),
            "{msg}"
        );
    }

    #[test]
    fn an_unknown_or_missing_version_is_refused() {
        let msg = err(&V2.replace("version = 2", "version = 7"));
        assert!(
            msg.starts_with("host.toml:1:1: field `version`: unknown version 7"),
            "{msg}"
        );
        let msg = err(&V2.replace("version = 2", "version = \"2\""));
        assert!(msg.contains("must be a number"), "{msg}");
        let msg = err(&V2.replace("version = 2\n", ""));
        assert!(msg.contains("`version` is missing"), "{msg}");
    }

    #[test]
    fn version_1_migrates_its_single_address_in_memory() {
        let v1 = V2.replace("version = 2", "version = 1").replace(
            "addresses = [\"10.0.2.15/24\"]",
            "address = \"10.0.2.15/24\"",
        );
        let l = parse(&v1).unwrap();
        assert_eq!(l.migrated_from, Some(1));
        assert_eq!(l.settings, parse(V2).unwrap().settings);
        // A version 1 file cannot use version 2's fields, and the reverse.
        let msg = err(&V2.replace("version = 2", "version = 1"));
        assert!(msg.contains("field `network.addresses`"), "{msg}");
        let msg = err(&v1.replace("version = 1", "version = 2"));
        assert!(msg.contains("field `network.address`"), "{msg}");
    }

    #[test]
    fn other_checks_are_located() {
        let msg = err(&V2.replace("edge-1", "edge 1"));
        assert!(msg.starts_with("host.toml:2:1: field `hostname`"), "{msg}");
        let msg = err(&V2.replace("addresses = [\"10.0.2.15/24\"]", ""));
        assert!(
            msg.contains("a gateway needs at least one address"),
            "{msg}"
        );
        let msg = err(&V2.replace("0.0.0.0:7443", "nowhere"));
        assert!(msg.starts_with("host.toml:10:"), "{msg}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_loader(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("host.toml");
            std::fs::write(&path, &bytes).unwrap();
            let _ = Settings::load(&path);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = parse(&text);
            let _ = parse(&format!("version = 1\n{text}"));
            let _ = parse(&format!("version = 2\n{text}"));
        }
    }
}
