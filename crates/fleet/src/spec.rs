//! `fleet.toml`: the fleet's declared state, groups by name. Parsed with the same located
//! errors as `juice.toml` and `site.toml` (file, line, column and dotted field), and checked
//! as a whole with errors that name the group and the field.
//!
//! ```toml
//! [group.web]
//! image = "hello-web:1.2.0"
//! count = 6                      # or per_host = true: one on every matching host
//! isolation = "sandbox"          # or "microvm"
//! constraints = { zone = "a" }   # label equality
//! spread = "rack"                # spread the instances over this label's values
//! publish = ["8080:8080"]        # [IP:]HOST:PORT
//! resources = { cpus = 0.5, memory = "256MiB" }
//! rollout = { waves = ["1", "5%", "25%", "100%"], health_gate = "10s" }
//! reschedule_after = "60s"       # a missing host's instances move after this long
//!
//! [fleet]
//! max_missing = "10%"            # or a number of hosts: more missing stops rescheduling
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use juice_image::manifest::{Cpus, ManifestError, Size, error_at_key, parse_toml};
use serde::{Deserialize, Serialize};

use crate::record::{Backend, Label, Labels};

/// The most instances one group may ask for with `count`.
pub const MAX_COUNT: u32 = 100_000;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    #[serde(default)]
    pub group: BTreeMap<GroupName, GroupSpec>,
    /// Settings for the whole fleet.
    #[serde(default)]
    pub fleet: FleetSettings,
}

/// `[fleet]`: what holds for every group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSettings {
    /// The brake: when more hosts than this are missing at once (of the hosts that have
    /// assignments), nothing is rescheduled ([`crate::liveness`]).
    #[serde(default)]
    pub max_missing: MaxMissing,
}

/// How many missing hosts the controller still reschedules from: a number of hosts, or a
/// share of the hosts that have assignments (at least one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CountOrShare", into = "String")]
pub enum MaxMissing {
    Hosts(u32),
    Percent(u8),
}

impl Default for MaxMissing {
    fn default() -> Self {
        MaxMissing::Percent(10)
    }
}

impl MaxMissing {
    /// The most hosts that may be missing, of `hosts` that have assignments, for their
    /// work to still move: a share rounds down but is never below one host.
    pub fn limit(self, hosts: usize) -> usize {
        match self {
            MaxMissing::Hosts(n) => usize::try_from(n).unwrap_or(usize::MAX),
            MaxMissing::Percent(p) => (hosts.saturating_mul(usize::from(p)) / 100).max(1),
        }
    }
}

/// `max_missing` as written: `2` or `"2"` hosts, or `"10%"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum CountOrShare {
    Count(u32),
    Text(String),
}

impl TryFrom<CountOrShare> for MaxMissing {
    type Error = String;
    fn try_from(v: CountOrShare) -> Result<Self, String> {
        let s = match v {
            CountOrShare::Count(n) => return Ok(MaxMissing::Hosts(n)),
            CountOrShare::Text(s) => s,
        };
        let bad =
            || format!("max_missing {s:?} is neither a number of hosts (2) nor a share (\"10%\")");
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(format!("max_missing {s:?}: a share is 0% to 100%"));
            }
            Ok(MaxMissing::Percent(p))
        } else {
            s.trim().parse().map(MaxMissing::Hosts).map_err(|_| bad())
        }
    }
}

impl From<MaxMissing> for String {
    fn from(m: MaxMissing) -> String {
        m.to_string()
    }
}

impl fmt::Display for MaxMissing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxMissing::Hosts(n) => write!(f, "{n}"),
            MaxMissing::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A missing host's instances move after this long unless the group says otherwise.
pub const RESCHEDULE_AFTER: Duration = Duration::from_secs(60);

/// The longest `reschedule_after` (a week): longer is a mistake, not a policy.
pub const MAX_RESCHEDULE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// One group: what to run, how many, where, and how a new revision rolls out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// `name:tag` or a `sha256:` digest, as the hosts' registries know it.
    pub image: String,
    /// How many instances across the fleet; exactly one of `count` and `per_host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// One instance on every host that passes the filters.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_host: bool,
    #[serde(default)]
    pub resources: Resources,
    /// Label equality: a host runs the group only if it has every one of these labels.
    #[serde(default)]
    pub constraints: Labels,
    /// A label whose values the instances are spread over (a zone, a rack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// Host ports each instance publishes; a host holds at most one instance of such a group.
    #[serde(default)]
    pub publish: Vec<Publish>,
    #[serde(default = "sandbox")]
    pub isolation: Backend,
    #[serde(default)]
    pub rollout: Rollout,
    /// How long a host that has this group's instances may be missing (its lease gone:
    /// dead or cut off) before they are placed elsewhere; [`RESCHEDULE_AFTER`] when absent.
    /// Not part of the group's revision: changing it restarts nothing.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration"
    )]
    pub reschedule_after: Option<Duration>,
}

impl GroupSpec {
    /// How long a missing host keeps this group's instances before they move.
    pub fn reschedule_after(&self) -> Duration {
        self.reschedule_after.unwrap_or(RESCHEDULE_AFTER)
    }
}

mod optional_duration {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    #[allow(clippy::ref_option)]
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

fn sandbox() -> Backend {
    Backend::Sandbox
}

/// What one instance reserves on its host.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "half_a_cpu")]
    pub cpus: Cpus,
    #[serde(default = "quarter_gib")]
    pub memory: Size,
}

fn half_a_cpu() -> Cpus {
    Cpus::try_from(0.5).unwrap_or_else(|_| unreachable!("0.5 is a CPU share"))
}
fn quarter_gib() -> Size {
    Size(256 << 20)
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: half_a_cpu(),
            memory: quarter_gib(),
        }
    }
}

impl Resources {
    /// CPUs in thousandths, so the planner adds integers and never rounds its way past a
    /// host's capacity.
    pub fn millicpus(&self) -> u64 {
        let milli = (self.cpus.get() * 1000.0).round();
        // Cpus is checked to be in (0, 4096], so this is in 1..=4_096_000: no truncation,
        // no sign to lose.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let milli = milli as u64;
        milli.max(1)
    }
}

/// How a new revision of the group replaces the old one across hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Cumulative waves: `"1"` is one host, `"25%"` a quarter of the group's hosts; the last is `"100%"`.
    #[serde(default = "default_waves")]
    pub waves: Vec<Wave>,
    /// Each wave's hosts must report healthy this long before the next wave starts.
    #[serde(default = "ten_seconds", with = "duration")]
    pub health_gate: Duration,
    /// A wave whose hosts are not all healthy this long after it started fails the rollout
    /// (and rolls every touched host back).
    #[serde(default = "five_minutes", with = "duration")]
    pub deadline: Duration,
}

fn default_waves() -> Vec<Wave> {
    vec![Wave::Hosts(1), Wave::Percent(100)]
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            waves: default_waves(),
            health_gate: ten_seconds(),
            deadline: five_minutes(),
        }
    }
}

mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration like \"10s\": {e}"))
        })
    }
}

/// One wave of a rollout: a number of hosts, or a share of the group's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Wave {
    Hosts(u32),
    Percent(u8),
}

impl TryFrom<String> for Wave {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad =
            || format!("wave {s:?} is neither a number of hosts (\"1\") nor a share (\"25%\")");
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.parse().map_err(|_| bad())?;
            if p == 0 || p > 100 {
                return Err(format!("wave {s:?}: a share is 1% to 100%"));
            }
            Ok(Wave::Percent(p))
        } else {
            let n: u32 = s.parse().map_err(|_| bad())?;
            if n == 0 {
                return Err(format!("wave {s:?}: a wave holds at least one host"));
            }
            Ok(Wave::Hosts(n))
        }
    }
}

impl From<Wave> for String {
    fn from(w: Wave) -> String {
        w.to_string()
    }
}

impl fmt::Display for Wave {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wave::Hosts(n) => write!(f, "{n}"),
            Wave::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A published port, `[IP:]HOST:PORT`, as `juice run --publish` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Publish(pub juice_net::PortMapping);

impl Publish {
    pub fn host_port(&self) -> u16 {
        self.0.host_port
    }
}

impl TryFrom<String> for Publish {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
            .map(Publish)
            .map_err(|e: juice_net::NetworkError| e.to_string())
    }
}

impl From<Publish> for String {
    fn from(p: Publish) -> String {
        p.to_string()
    }
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        if m.host_ip.is_unspecified() {
            write!(f, "{}:{}", m.host_port, m.port)
        } else {
            write!(f, "{}:{}:{}", m.host_ip, m.host_port, m.port)
        }
    }
}

/// A group name: lowercase letters, digits and '-', starting with a letter, at most 18.
/// A host runs the group as `fleet-NAME` ([`crate::host::local_name`]), and a host's group
/// names (`site.toml`'s rule) are at most 24.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GroupName(String);

impl GroupName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for GroupName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 18
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.ends_with('-');
        if ok {
            Ok(GroupName(s))
        } else {
            Err(format!(
                "{s:?} is not a group name (lowercase letters, digits and '-', starting with a letter, at most 18, so that a host's `fleet-NAME` fits its 24)"
            ))
        }
    }
}

impl std::str::FromStr for GroupName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        GroupName::try_from(s.to_owned())
    }
}

impl From<GroupName> for String {
    fn from(g: GroupName) -> String {
        g.0
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A rule that spans fields, broken: the group, the field (as written in the file) and why.
struct Broken {
    group: GroupName,
    field: &'static str,
    message: String,
}

impl FleetSpec {
    pub fn load(path: &Path) -> Result<FleetSpec, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        FleetSpec::parse(&text, path)
    }

    /// Parses and checks fleet text; `path` is only used in error messages, which name the
    /// file, line and field.
    pub fn parse(text: &str, path: &Path) -> Result<FleetSpec, ManifestError> {
        let spec: FleetSpec = parse_toml(text, path)?;
        spec.check().map_err(|b| {
            let message = format!("group {}: {}", b.group, b.message);
            match field_in_group(text, &b.group, b.field) {
                Some((key, nth)) => error_at_key(text, path, key, nth, &message),
                None => error_at_key(text, path, &format!("group.{}", b.group), 0, &message),
            }
        })?;
        Ok(spec)
    }

    /// The rules serde cannot say: each broken one names the group and the field.
    fn check(&self) -> Result<(), Broken> {
        for (name, g) in &self.group {
            let broken = |field, message: String| Broken {
                group: name.clone(),
                field,
                message,
            };
            if g.image.trim().is_empty() {
                return Err(broken("image", "image is empty".into()));
            }
            match (g.count, g.per_host) {
                (Some(_), true) => {
                    return Err(broken(
                        "per_host",
                        "count and per_host = true exclude each other".into(),
                    ));
                }
                (None, false) => {
                    return Err(broken(
                        "image",
                        "neither count nor per_host = true says how many instances to run".into(),
                    ));
                }
                (Some(0), _) => return Err(broken("count", "count must be at least 1".into())),
                (Some(n), _) if n > MAX_COUNT => {
                    return Err(broken("count", format!("count {n} is above {MAX_COUNT}")));
                }
                _ => {}
            }
            if let Some(key) = &g.spread
                && let Err(e) = format!("{key}=").parse::<Label>()
            {
                return Err(broken("spread", format!("spread: {e}")));
            }
            let mut ports = std::collections::BTreeSet::new();
            for p in &g.publish {
                if !ports.insert(p.host_port()) {
                    return Err(broken(
                        "publish",
                        format!("host port {} is published twice", p.host_port()),
                    ));
                }
            }
            if g.reschedule_after() > MAX_RESCHEDULE_AFTER {
                return Err(broken(
                    "reschedule_after",
                    format!(
                        "reschedule_after {} is above {}",
                        humantime::format_duration(g.reschedule_after()),
                        humantime::format_duration(MAX_RESCHEDULE_AFTER)
                    ),
                ));
            }
            if g.rollout.deadline <= g.rollout.health_gate {
                return Err(broken(
                    "deadline",
                    format!(
                        "rollout.deadline ({}) must be longer than rollout.health_gate ({}), or no wave could ever pass",
                        humantime::format_duration(g.rollout.deadline),
                        humantime::format_duration(g.rollout.health_gate)
                    ),
                ));
            }
            let waves = &g.rollout.waves;
            if waves.last() != Some(&Wave::Percent(100)) {
                return Err(broken(
                    "waves",
                    "rollout.waves must end with \"100%\", or some hosts would never get the new revision"
                        .into(),
                ));
            }
            for pair in waves.windows(2) {
                let grows = match (pair[0], pair[1]) {
                    (Wave::Hosts(a), Wave::Hosts(b)) => a < b,
                    (Wave::Percent(a), Wave::Percent(b)) => a < b,
                    // A number of hosts is followed by a share, or the reverse: which is larger
                    // depends on the fleet, and is checked when the rollout runs.
                    _ => true,
                };
                if !grows {
                    return Err(broken(
                        "waves",
                        format!(
                            "rollout.waves must grow: \"{}\" after \"{}\"",
                            pair[1], pair[0]
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Where `field` of `group` is written: the key to look for and its occurrence, counting
/// from the top of the file, so the error points at this group's line and not another's.
fn field_in_group(text: &str, group: &GroupName, field: &str) -> Option<(&'static str, usize)> {
    let header = format!("group.{group}");
    let mut in_group = false;
    let mut nth = 0;
    let is_key = |line: &str, key: &str| {
        let bare = line.trim_start().trim_start_matches('[');
        bare.starts_with(key) && bare[key.len()..].trim_start().starts_with(['=', ']'])
    };
    let key: &'static str = match field {
        "image" => "image",
        "count" => "count",
        "per_host" => "per_host",
        "spread" => "spread",
        "publish" => "publish",
        "waves" => "waves",
        "reschedule_after" => "reschedule_after",
        "deadline" => "deadline",
        _ => return None,
    };
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_group = name == header || name.starts_with(&format!("{header}."));
        }
        if is_key(line, key) {
            if in_group {
                return Some((key, nth));
            }
            nth += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = r#"
[group.web]
image = "hello-web:1.2.0"
count = 6
isolation = "sandbox"
constraints = { zone = "a" }
spread = "rack"
publish = ["8080:8080"]
resources = { cpus = 0.5, memory = "256MiB" }

[group.web.rollout]
waves = ["1", "5%", "25%", "100%"]
health_gate = "10s"

[group.agent]
image = "node-agent:3"
per_host = true
"#;

    fn err(text: &str) -> String {
        FleetSpec::parse(text, Path::new("fleet.toml"))
            .unwrap_err()
            .to_string()
    }

    fn group<'a>(spec: &'a FleetSpec, name: &str) -> &'a GroupSpec {
        &spec.group[&name.parse::<GroupName>().unwrap()]
    }

    #[test]
    fn the_example_parses_with_its_defaults() {
        let spec = FleetSpec::parse(FLEET, Path::new("fleet.toml")).unwrap();
        let web = group(&spec, "web");
        assert_eq!(web.count, Some(6));
        assert_eq!(web.constraints.get("zone"), Some("a"));
        assert_eq!(web.spread.as_deref(), Some("rack"));
        assert_eq!(web.publish[0].host_port(), 8080);
        assert_eq!(web.resources.millicpus(), 500);
        assert_eq!(web.resources.memory, Size(256 << 20));
        assert_eq!(
            web.rollout.waves,
            [
                Wave::Hosts(1),
                Wave::Percent(5),
                Wave::Percent(25),
                Wave::Percent(100)
            ]
        );
        let agent = group(&spec, "agent");
        assert!(agent.per_host && agent.count.is_none());
        assert_eq!(agent.isolation, Backend::Sandbox);
        assert_eq!(agent.resources, Resources::default());
        assert_eq!(agent.rollout, Rollout::default());
        // What apply stores is JSON of the same spec, and reads back the same.
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<FleetSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn parse_errors_name_file_line_and_field() {
        let msg = err(&FLEET.replace("count = 6", "cont = 6"));
        assert!(
            msg.starts_with("fleet.toml:4:1: field `group.web.cont`")
                && msg.contains("did you mean `count`"),
            "{msg}"
        );
        let msg = err(&FLEET.replace("\"sandbox\"", "\"jail\""));
        assert!(
            msg.starts_with("fleet.toml:5:") && msg.contains("unknown variant"),
            "{msg}"
        );
        let msg = err(&FLEET.replace("\"10s\"", "\"soon\""));
        assert!(
            msg.starts_with("fleet.toml:13:") && msg.contains("not a duration"),
            "{msg}"
        );
        let msg = err(&FLEET.replace("\"5%\"", "\"5 percent\""));
        assert!(
            msg.starts_with("fleet.toml:12:") && msg.contains("neither a number"),
            "{msg}"
        );
        let msg = err(&FLEET.replace("zone = \"a\"", "Zone = \"a\""));
        assert!(
            msg.starts_with("fleet.toml:6:") && msg.contains("label `Zone=a`"),
            "{msg}"
        );
        let msg = err(&FLEET.replace("cpus = 0.5", "cpus = -1"));
        assert!(
            msg.starts_with("fleet.toml:9:") && msg.contains("CPU share"),
            "{msg}"
        );
        let msg = err(&FLEET.replace("8080:8080", "80:0"));
        assert!(msg.starts_with("fleet.toml:8:"), "{msg}");
        let msg = err(&FLEET.replace("[group.web]", "[group.Web]"));
        assert!(msg.contains("not a group name"), "{msg}");
    }

    #[test]
    fn validation_errors_name_the_group_and_field_on_its_line() {
        let msg = err(&FLEET.replace("count = 6", "count = 0"));
        assert!(
            msg.starts_with(
                "fleet.toml:4:1: field `group.web.count`: group web: count must be at least 1"
            ),
            "{msg}"
        );
        let msg = err(&FLEET.replace("count = 6", "count = 6\nper_host = true"));
        assert!(
            msg.starts_with("fleet.toml:5:1: field `group.web.per_host`")
                && msg.contains("exclude each other"),
            "{msg}"
        );
        // The agent's per_host line is the second per_host in the file.
        let msg = err(&FLEET.replace("per_host = true", "per_host = false"));
        assert!(
            msg.starts_with("fleet.toml:16:1: field `group.agent.image`")
                && msg.contains("neither count nor per_host"),
            "{msg}"
        );
        let msg = err(&FLEET.replace("\"100%\"]", "\"50%\"]"));
        assert!(
            msg.starts_with("fleet.toml:12:1: field `group.web.rollout.waves`")
                && msg.contains("must end with \"100%\""),
            "{msg}"
        );
        let msg = err(&FLEET.replace(
            "health_gate = \"10s\"",
            "health_gate = \"10s\"\ndeadline = \"10s\"",
        ));
        assert!(
            msg.starts_with("fleet.toml:14:1: field `group.web.rollout.deadline`")
                && msg.contains(
                    "rollout.deadline (10s) must be longer than rollout.health_gate (10s)"
                ),
            "{msg}"
        );
        let msg = err(&FLEET.replace("health_gate = \"10s\"", "deadline = \"soon\""));
        assert!(msg.contains("\"soon\" is not a duration"), "{msg}");
        let msg = err(&FLEET.replace("\"25%\"", "\"5%\""));
        assert!(msg.contains("must grow: \"5%\" after \"5%\""), "{msg}");
        let msg = err(&FLEET.replace("\"8080:8080\"", "\"8080:8080\", \"8080:80\""));
        assert!(
            msg.starts_with("fleet.toml:8:1: field `group.web.publish`")
                && msg.contains("host port 8080 is published twice"),
            "{msg}"
        );
        let msg = err(&FLEET.replace("spread = \"rack\"", "spread = \"Rack!\""));
        assert!(
            msg.starts_with("fleet.toml:7:1: field `group.web.spread`"),
            "{msg}"
        );
        let msg = err(&FLEET.replace("\"node-agent:3\"", "\" \""));
        assert!(
            msg.starts_with(
                "fleet.toml:16:1: field `group.agent.image`: group agent: image is empty"
            ),
            "{msg}"
        );
    }

    #[test]
    fn reschedule_after_and_max_missing_parse_default_and_are_checked_where_written() {
        let plain = FleetSpec::parse(FLEET, Path::new("fleet.toml")).unwrap();
        assert_eq!(group(&plain, "web").reschedule_after(), RESCHEDULE_AFTER);
        assert_eq!(plain.fleet.max_missing, MaxMissing::Percent(10));
        let text = format!("[fleet]\nmax_missing = 2\n{FLEET}")
            .replace("count = 6\n", "count = 6\nreschedule_after = \"2m 30s\"\n");
        let set = FleetSpec::parse(&text, Path::new("fleet.toml")).unwrap();
        assert_eq!(
            group(&set, "web").reschedule_after(),
            Duration::from_secs(150)
        );
        assert_eq!(set.fleet.max_missing, MaxMissing::Hosts(2));
        for (written, want) in [
            ("\"3\"", MaxMissing::Hosts(3)),
            ("\"0%\"", MaxMissing::Percent(0)),
            ("\"25%\"", MaxMissing::Percent(25)),
        ] {
            let s = FleetSpec::parse(
                &format!("[fleet]\nmax_missing = {written}\n"),
                Path::new("f.toml"),
            )
            .unwrap();
            assert_eq!(s.fleet.max_missing, want, "{written}");
        }
        // The stored spec reads back the same.
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(serde_json::from_str::<FleetSpec>(&json).unwrap(), set);
        // Errors name the file, line and field.
        let e = err("[fleet]\nmax_missing = \"lots\"\n");
        assert!(
            e.contains("fleet.toml:2")
                && e.contains("max_missing")
                && e.contains("neither a number"),
            "{e}"
        );
        let e = err("[fleet]\nmax_missing = \"150%\"\n");
        assert!(
            e.contains("fleet.toml:2") && e.contains("0% to 100%"),
            "{e}"
        );
        let e = err("[group.a]\nimage = \"x\"\ncount = 1\nreschedule_after = \"soon\"\n");
        assert!(
            e.contains("fleet.toml:4")
                && e.contains("reschedule_after")
                && e.contains("not a duration"),
            "{e}"
        );
        let e = err("[group.a]\nimage = \"x\"\ncount = 1\nreschedule_after = \"30d\"\n");
        assert!(e.contains("fleet.toml:4") && e.contains("above"), "{e}");
        // Changing when instances move changes nothing they run: the revision stays.
        assert_eq!(
            crate::plan::revision(group(&plain, "web")),
            crate::plan::revision(group(&set, "web"))
        );
    }
}
