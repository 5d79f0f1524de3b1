//! `juice.toml`, the appliance manifest.
//!
//! Parsing is serde + `toml`. Every value with rules of its own is a newtype
//! validated inside deserialisation (`try_from`), so the TOML parser attaches
//! the span of the offending value to the error and we can name the file,
//! line and field without a second pass.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A manifest that could not be read or did not validate.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read at all.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid manifest.
    #[error("{path}:{line}:{column}: {field}{message}{hint}",
        field = field.as_deref().map(|f| format!("field `{f}`: ")).unwrap_or_default(),
        hint = suggestion.as_deref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        field: Option<String>,
        message: String,
        suggestion: Option<String>,
    },
}

/// The appliance manifest, as written in `juice.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub appliance: Appliance,
    /// How to assemble the image. Never carried into the image: it holds host paths.
    #[serde(default, skip_serializing)]
    pub build: Build,
    pub run: Run,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Appliance {
    pub name: Name,
    pub version: Version,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// ELF programs; each brings its interpreter and shared-library closure.
    #[serde(default)]
    pub binaries: Vec<Binary>,
    /// Shared objects loaded with `dlopen` (NSS modules, gconv, plugins); each brings its closure.
    #[serde(default)]
    pub libraries: Vec<PathBuf>,
    /// Plain files and directories copied as they are.
    #[serde(default)]
    pub files: Vec<FileCopy>,
    /// Image paths allowed to keep a setuid or setgid bit.
    #[serde(default)]
    pub setuid: Vec<ImagePath>,
}

/// A binary: either a host path (kept at the same path in the image when
/// absolute, placed in `/usr/bin` when relative) or an explicit `{ from, to }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a path string or a table { from = \"...\", to = \"/...\" }"
)]
pub enum Binary {
    Path(PathBuf),
    Placed { from: PathBuf, to: ImagePath },
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileCopy {
    pub from: PathBuf,
    pub to: ImagePath,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub command: Command,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<EnvName, String>,
    #[serde(default)]
    pub user: UserSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<ImagePath>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Linux capabilities kept in the appliance (`CAP_NET_BIND_SERVICE`, ...); all others are dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// How the host probes the appliance. Exactly one of `http` and `tcp`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "RawHealth", into = "RawHealth")]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub start_period: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// GET this path on this port; any 2xx is healthy.
    Http { path: String, port: Port },
    /// A TCP connect to this port succeeds.
    Tcp { port: Port },
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tcp: Option<Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval: Option<Interval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<Interval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start_period: Option<Interval>,
}

impl TryFrom<RawHealth> for HealthCheck {
    type Error = String;
    fn try_from(raw: RawHealth) -> Result<Self, String> {
        let probe = match (raw.http, raw.tcp, raw.port) {
            (Some(_), Some(_), _) => return Err("set either `http` or `tcp`, not both".into()),
            (Some(path), None, Some(port)) => {
                if !path.starts_with('/') {
                    return Err(format!(
                        "`http` must be a path starting with '/', got {path:?}"
                    ));
                }
                Probe::Http { path, port }
            }
            (Some(_), None, None) => return Err("`http` needs a `port` to probe".into()),
            (None, Some(port), None) => Probe::Tcp { port },
            (None, Some(tcp), Some(port)) if tcp == port => Probe::Tcp { port },
            (None, Some(_), Some(_)) => {
                return Err("`tcp` already names the port; drop `port` or make them equal".into());
            }
            (None, None, _) => return Err("a health check needs `http` or `tcp`".into()),
        };
        let retries = raw.retries.unwrap_or(3);
        if retries == 0 {
            return Err("`retries` must be at least 1".into());
        }
        Ok(HealthCheck {
            probe,
            interval: raw.interval.map_or(Duration::from_secs(1), |i| i.0),
            timeout: raw.timeout.map_or(Duration::from_secs(1), |i| i.0),
            retries,
            start_period: raw.start_period.map_or(Duration::ZERO, |i| i.0),
        })
    }
}

impl From<HealthCheck> for RawHealth {
    fn from(h: HealthCheck) -> Self {
        let (http, tcp, port) = match h.probe {
            Probe::Http { path, port } => (Some(path), None, Some(port)),
            Probe::Tcp { port } => (None, Some(port), None),
        };
        RawHealth {
            http,
            tcp,
            port,
            interval: Some(Interval(h.interval)),
            timeout: Some(Interval(h.timeout)),
            retries: Some(h.retries),
            start_period: Some(Interval(h.start_period)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: Name,
    pub path: ImagePath,
}

/// Defines a string newtype validated by `$check` (which returns an error message).
macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(&s).map(|()| $name(s))
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::try_from(s.to_owned())
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

checked_string!(
    /// An appliance or volume name: lowercase letters, digits, `.`, `_` and `-`, starting with a letter or digit.
    Name,
    |s| {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if ok {
            Ok(())
        } else {
            Err(format!("{s:?} is not a valid name (lowercase letters, digits, '.', '_' and '-', at most 128)"))
        }
    }
);

checked_string!(
    /// An appliance version: the tag part of `name:version`.
    Version,
    |s| {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if ok {
            Ok(())
        } else {
            Err(format!("{s:?} is not a valid version (letters, digits, '.', '_' and '-', at most 128)"))
        }
    }
);

checked_string!(
    /// An environment variable name.
    EnvName,
    |s| {
        if !s.is_empty() && !s.contains(['=', '\0']) {
            Ok(())
        } else {
            Err(format!("{s:?} is not a valid environment variable name"))
        }
    }
);

checked_string!(
    /// A Linux capability name such as `CAP_NET_BIND_SERVICE`.
    Capability,
    |s| {
        if s.starts_with("CAP_") && s.len() > 4 && s[4..].chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            Ok(())
        } else {
            Err(format!("{s:?} is not a capability name like CAP_NET_BIND_SERVICE"))
        }
    }
);

/// An absolute, normalised path inside the image (no `..`, no `.`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImagePath(PathBuf);

impl ImagePath {
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl TryFrom<String> for ImagePath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let p = Path::new(&s);
        if !p.is_absolute() {
            return Err(format!("{s:?} must be an absolute path inside the image"));
        }
        if s.contains('\0') {
            return Err(format!("{s:?} contains a NUL byte"));
        }
        if p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(format!("{s:?} must not contain '.' or '..'"));
        }
        Ok(ImagePath(p.components().collect()))
    }
}
impl From<ImagePath> for String {
    fn from(p: ImagePath) -> String {
        p.0.to_string_lossy().into_owned()
    }
}
impl fmt::Display for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// The command line: a non-empty list whose first element is an absolute path.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Command(Vec<String>);

impl Command {
    pub fn program(&self) -> &str {
        &self.0[0]
    }
    pub fn args(&self) -> &[String] {
        &self.0
    }
}
impl TryFrom<Vec<String>> for Command {
    type Error = String;
    fn try_from(v: Vec<String>) -> Result<Self, String> {
        match v.first() {
            None => Err("the command must not be empty".into()),
            Some(p) if !p.starts_with('/') => Err(format!(
                "the program {p:?} must be an absolute path (there is no shell or PATH search in an appliance)"
            )),
            Some(_) if v.iter().any(|a| a.contains('\0')) => {
                Err("an argument contains a NUL byte".into())
            }
            Some(_) => Ok(Command(v)),
        }
    }
}
impl From<Command> for Vec<String> {
    fn from(c: Command) -> Self {
        c.0
    }
}

/// `uid:gid`, numeric. `"1000"` means `1000:1000`. Defaults to `0:0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserSpec {
    pub uid: u32,
    pub gid: u32,
}
impl FromStr for UserSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a user spec like \"1000:1000\" (numeric uid[:gid])");
        let (u, g) = s.split_once(':').unwrap_or((s, s));
        let uid = u.parse().map_err(|_| bad())?;
        let gid = g.parse().map_err(|_| bad())?;
        Ok(UserSpec { uid, gid })
    }
}
impl TryFrom<String> for UserSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
impl From<UserSpec> for String {
    fn from(u: UserSpec) -> String {
        u.to_string()
    }
}
impl fmt::Display for UserSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// A byte size written as `"64MiB"`, `"1GB"` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "SizeRepr", into = "u64")]
pub struct Size(pub u64);

#[derive(Deserialize)]
#[serde(untagged, expecting = "a size like \"64MiB\" or a number of bytes")]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}
impl TryFrom<SizeRepr> for Size {
    type Error = String;
    fn try_from(r: SizeRepr) -> Result<Self, String> {
        match r {
            SizeRepr::Bytes(b) => Ok(Size(b)),
            SizeRepr::Text(s) => s.parse(),
        }
    }
}
impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|_| format!("{s:?} is not a size like \"64MiB\" or \"1GB\""))
    }
}
impl From<Size> for u64 {
    fn from(s: Size) -> u64 {
        s.0
    }
}
impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec_short())
    }
}

/// A duration written as `"1s"`, `"500ms"`, `"2m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
struct Interval(Duration);
impl TryFrom<String> for Interval {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        humantime::parse_duration(&s)
            .map(Interval)
            .map_err(|e| format!("{s:?} is not a duration like \"1s\" or \"500ms\": {e}"))
    }
}
impl From<Interval> for String {
    fn from(i: Interval) -> String {
        humantime::format_duration(i.0).to_string()
    }
}

/// A TCP port, 1-65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct Port(u16);
impl Port {
    pub fn get(self) -> u16 {
        self.0
    }
}
impl TryFrom<u16> for Port {
    type Error = String;
    fn try_from(p: u16) -> Result<Self, String> {
        if p == 0 {
            Err("port 0 is not a port".into())
        } else {
            Ok(Port(p))
        }
    }
}
impl From<Port> for u16 {
    fn from(p: Port) -> u16 {
        p.0
    }
}

/// A CPU share: `0.5` is half a core.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Cpus(f64);
impl Cpus {
    pub fn get(self) -> f64 {
        self.0
    }
}
impl TryFrom<f64> for Cpus {
    type Error = String;
    fn try_from(c: f64) -> Result<Self, String> {
        if c.is_finite() && c > 0.0 && c <= 4096.0 {
            Ok(Cpus(c))
        } else {
            Err(format!(
                "{c} is not a CPU share (a number above 0, e.g. 0.5)"
            ))
        }
    }
}
impl From<Cpus> for f64 {
    fn from(c: Cpus) -> f64 {
        c.0
    }
}

impl Manifest {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Manifest::parse(&text, path)
    }

    /// Parses manifest text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = parse_toml(text, path)?;
        manifest
            .check_whole()
            .map_err(|(needle, nth, msg)| error_at_key(text, path, needle, nth, &msg))?;
        Ok(manifest)
    }

    /// Rules that span several fields. On failure: the key to point at, which occurrence of it, and the message.
    fn check_whole(&self) -> Result<(), (&'static str, usize, String)> {
        let mut names = std::collections::BTreeSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            if !names.insert(&v.name) {
                return Err((
                    "volumes",
                    i,
                    format!("volume {:?} is declared twice", v.name.as_str()),
                ));
            }
        }
        let mut ports = std::collections::BTreeSet::new();
        for p in &self.run.ports {
            if !ports.insert(p) {
                return Err(("ports", 0, format!("port {} is listed twice", p.get())));
            }
        }
        Ok(())
    }

    /// `name:version`, the default tag of a build.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.appliance.name, self.appliance.version)
    }
}

/// Parses any TOML document into `T`, with errors that name the file, line, column and
/// dotted field (and a close match for an unknown field). Other Juice files (the site
/// file) use this too.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, ManifestError> {
    toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        locate(text, path, offset, e.message())
    })
}

/// An error located at the `nth` (from 0) line whose key or table header is `key`.
pub fn error_at_key(
    text: &str,
    path: &Path,
    key: &str,
    nth: usize,
    message: &str,
) -> ManifestError {
    let offset = find_key(text, key, nth).unwrap_or(0);
    locate(text, path, offset, message)
}

/// Byte offset of the `nth` (from 0) line whose key or table header is `key`.
fn find_key(text: &str, key: &str, mut nth: usize) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        let bare = t.trim_start_matches('[');
        if bare.starts_with(key) && bare[key.len()..].trim_start().starts_with(['=', ']']) {
            if nth == 0 {
                return Some(offset + (line.len() - t.len()));
            }
            nth -= 1;
        }
        offset += line.len();
    }
    None
}

/// Turns a byte offset into file, line, column and the dotted field at that place.
fn locate(text: &str, path: &Path, offset: usize, message: &str) -> ManifestError {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let message = message.trim().to_owned();
    ManifestError::Invalid {
        path: path.to_owned(),
        line,
        column,
        field: field_at(text, line_start),
        suggestion: suggest(&message),
        message,
    }
}

/// The dotted name of the field defined on the line starting at `line_start`.
fn field_at(text: &str, line_start: usize) -> Option<String> {
    let this_line = text[line_start..].lines().next().unwrap_or("").trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    if this_line.starts_with('[') {
        return Some(
            this_line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned(),
        );
    }
    let key = this_line.split('=').next()?.trim().trim_matches('"');
    if key.is_empty() {
        return table;
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

/// For serde's "unknown field `x`, expected one of `a`, `b`", the closest expected name.
fn suggest(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (got, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (strsim::damerau_levenshtein(got, cand), cand))
        .filter(|(d, cand)| *d <= 2.max(cand.len() / 3))
        .min()
        .map(|(_, c)| c.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[appliance]
name = "hello-web"
version = "1.2.0"

[build]
binaries = ["target/release/hello-web", { from = "x", to = "/usr/bin/x" }]
files = [{ from = "static/", to = "/srv/www" }]

[run]
command = ["/usr/bin/hello-web", "--port", "8080"]
env = { RUST_LOG = "info" }
user = "1000:1000"
ports = [8080]

[resources]
cpus = 0.5
memory = "64MiB"
pids = 64

[health]
http = "/healthz"
port = 8080
interval = "1s"
retries = 3

[[volumes]]
name = "data"
path = "/var/lib/hello"
"#;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, Path::new("juice.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn the_product_example_parses_into_types() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.reference(), "hello-web:1.2.0");
        assert_eq!(
            m.run.user,
            UserSpec {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(m.resources.memory, Some(Size(64 << 20)));
        let h = m.health.unwrap();
        assert_eq!(h.interval, Duration::from_secs(1));
        assert_eq!(
            h.probe,
            Probe::Http {
                path: "/healthz".into(),
                port: Port(8080)
            }
        );
        assert_eq!(m.build.binaries.len(), 2);
        assert_eq!(m.volumes[0].path.as_path(), Path::new("/var/lib/hello"));
    }

    #[test]
    fn a_typo_names_file_line_field_and_the_close_match() {
        let text = GOOD.replace("memory = ", "memroy = ");
        let msg = err(&text);
        assert!(
            msg.starts_with("juice.toml:18:1: field `resources.memroy`"),
            "{msg}"
        );
        assert!(msg.contains("did you mean `memory`?"), "{msg}");
    }

    #[test]
    fn an_unknown_section_is_refused() {
        let msg = err(&format!("{GOOD}\n[extra]\nx = 1\n"));
        assert!(msg.contains("unknown field `extra`"), "{msg}");
    }

    #[test]
    fn bad_values_name_their_field_and_line() {
        let cases = [
            (
                "memory = \"64MiB\"",
                "memory = \"lots\"",
                "resources.memory",
                "not a size",
            ),
            (
                "user = \"1000:1000\"",
                "user = \"www-data\"",
                "run.user",
                "not a user spec",
            ),
            (
                "interval = \"1s\"",
                "interval = \"soon\"",
                "health.interval",
                "not a duration",
            ),
            ("ports = [8080]", "ports = [0]", "run.ports", "port 0"),
            (
                "cpus = 0.5",
                "cpus = -1.0",
                "resources.cpus",
                "not a CPU share",
            ),
            (
                "name = \"hello-web\"",
                "name = \"Hello Web\"",
                "appliance.name",
                "not a valid name",
            ),
            (
                "path = \"/var/lib/hello\"",
                "path = \"var/lib\"",
                "volumes.path",
                "absolute",
            ),
            (
                "path = \"/var/lib/hello\"",
                "path = \"/var/../etc\"",
                "volumes.path",
                "'..'",
            ),
            (
                "command = [\"/usr/bin/hello-web\", \"--port\", \"8080\"]",
                "command = []",
                "run.command",
                "empty",
            ),
            (
                "command = [\"/usr/bin/hello-web\", \"--port\", \"8080\"]",
                "command = [\"hello\"]",
                "run.command",
                "absolute",
            ),
            ("pids = 64", "pids = -3", "resources.pids", ""),
        ];
        for (from, to, field, what) in cases {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{from} not in the example");
            let msg = err(&text);
            let line = text.lines().position(|l| l.contains(to)).unwrap() + 1;
            assert!(
                msg.starts_with(&format!("juice.toml:{line}:")),
                "{to}: {msg}"
            );
            assert!(msg.contains(&format!("field `{field}`")), "{to}: {msg}");
            assert!(msg.contains(what), "{to}: {msg}");
        }
    }

    #[test]
    fn health_needs_exactly_one_probe() {
        let msg = err(&GOOD.replace("http = \"/healthz\"", "http = \"/healthz\"\ntcp = 8080"));
        assert!(msg.contains("either `http` or `tcp`"), "{msg}");
        let msg = err(&GOOD.replace("http = \"/healthz\"\nport = 8080", ""));
        assert!(msg.contains("needs `http` or `tcp`"), "{msg}");
    }

    #[test]
    fn duplicates_are_refused_with_their_line() {
        let text = format!("{GOOD}\n[[volumes]]\nname = \"data\"\npath = \"/x\"\n");
        let msg = err(&text);
        assert!(msg.contains("declared twice"), "{msg}");
        let second = text
            .lines()
            .enumerate()
            .filter(|(_, l)| *l == "[[volumes]]")
            .last()
            .unwrap()
            .0
            + 1;
        assert!(msg.starts_with(&format!("juice.toml:{second}:")), "{msg}");
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let msg = err("[appliance]\nname = \"x\nversion = \"1\"\n");
        assert!(msg.starts_with("juice.toml:2:"), "{msg}");
    }

    #[test]
    fn the_image_copy_leaves_out_host_paths_and_reads_back() {
        let m = parse(GOOD).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("target/release"), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back.run, m.run);
        assert_eq!(back.health, m.health);
        assert_eq!(back.resources, m.resources);
    }

    #[test]
    fn tcp_health_and_numeric_sizes() {
        let text = GOOD
            .replace("http = \"/healthz\"\nport = 8080", "tcp = 8080")
            .replace("memory = \"64MiB\"", "memory = 1048576");
        let m = parse(&text).unwrap();
        assert_eq!(m.health.unwrap().probe, Probe::Tcp { port: Port(8080) });
        assert_eq!(m.resources.memory, Some(Size(1 << 20)));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Arbitrary text never panics, and every refusal has a line inside the text.
            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
                if let Err(ManifestError::Invalid { line, .. }) = parse(&text) {
                    prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1);
                }
            }

            /// Mutating one byte of a valid manifest gives a manifest or a located error.
            #[test]
            fn mutated_manifests_never_panic(pos in 0usize..GOOD.len(), byte in any::<u8>()) {
                let mut bytes = GOOD.as_bytes().to_vec();
                bytes[pos] = byte;
                if let Ok(text) = String::from_utf8(bytes) {
                    let _ = parse(&text);
                }
            }

            #[test]
            fn sizes_parse_exactly(n in 0u64..(1u64 << 40)) {
                prop_assert_eq!(format!("{n}MiB").parse::<Size>().unwrap(), Size(n << 20));
                prop_assert_eq!(format!("{n}").parse::<Size>().unwrap(), Size(n));
            }
        }
    }
}
