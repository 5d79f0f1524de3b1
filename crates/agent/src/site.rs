//! `site.toml`: the desired state of a host.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use juice_image::manifest::{ManifestError, error_at_key, parse_toml};
use juice_runtime::PortMapping;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The whole file: groups by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Site {
    #[serde(default)]
    pub group: BTreeMap<GroupName, GroupSpec>,
}

/// One group: what to run, how many, how to update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// `name:tag`, a `sha256:` digest, or a path to a directory with a juice.toml.
    pub image: String,
    #[serde(default = "one")]
    pub size: u32,
    #[serde(default)]
    pub isolation: Isolation,
    #[serde(default)]
    pub publish: Vec<Publish>,
    /// Other groups this group's instances may talk to (and be reached from).
    #[serde(default)]
    pub links: Vec<GroupName>,
    #[serde(default)]
    pub update: UpdatePolicy,
    /// Overrides the image's `[resources]` (`cpus`, `memory`, `pids`; each one given
    /// replaces the image's); the host's `limits.toml` ceilings still apply. A fleet group
    /// gets the fleet file's `resources` here, so what the planner counted is what runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub resources: Option<juice_image::manifest::Resources>,
    /// On Juice OS, a trial of a new OS version commits only once this group is healthy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub critical: bool,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    #[default]
    Sandbox,
    Microvm,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Rollback,
    Pause,
}

/// How a new revision replaces the old one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePolicy {
    /// Instances that may be missing (or extra, while a new one proves itself) at once.
    #[serde(default = "one")]
    pub max_unavailable: u32,
    /// A new instance must stay healthy this long before the next one is replaced.
    #[serde(default = "ten_seconds", with = "duration")]
    #[schema(value_type = String, example = "10s")]
    pub health_gate: Duration,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Revisions kept for rollback.
    #[serde(default = "ten")]
    pub keep_revisions: u32,
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn ten() -> u32 {
    10
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            max_unavailable: 1,
            health_gate: ten_seconds(),
            on_failure: OnFailure::Rollback,
            keep_revisions: 10,
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

/// A group name: lowercase letters, digits and '-', at most 24 (instance names add a suffix).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
pub struct GroupName(String);

/// The start of the name of every group the fleet assigns to this host (`fleet-web` runs
/// the fleet's group `web`). A site file may not use it, and `juice apply` neither changes
/// nor deletes such groups; the fleet's own apply touches nothing else.
pub const FLEET_PREFIX: &str = "fleet-";

impl GroupName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the fleet manages this group (its name starts with [`FLEET_PREFIX`]).
    pub fn is_fleet(&self) -> bool {
        self.0.starts_with(FLEET_PREFIX)
    }
}
impl TryFrom<String> for GroupName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 24
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.ends_with('-');
        if ok {
            Ok(GroupName(s))
        } else {
            Err(format!(
                "{s:?} is not a group name (lowercase letters, digits and '-', starting with a letter, at most 24)"
            ))
        }
    }
}
impl From<GroupName> for String {
    fn from(g: GroupName) -> String {
        g.0
    }
}
impl std::fmt::Display for GroupName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A published port, `[IP:]HOST:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "8080:80")]
pub struct Publish(pub PortMapping);

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
        let m = p.0;
        if m.host_ip.is_unspecified() {
            format!("{}:{}", m.host_port, m.port)
        } else {
            format!("{}:{}:{}", m.host_ip, m.host_port, m.port)
        }
    }
}

impl Site {
    pub fn load(path: &Path) -> Result<Site, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Site::parse(&text, path)
    }

    /// Parses and checks a site file; errors name the file, line and field.
    pub fn parse(text: &str, path: &Path) -> Result<Site, ManifestError> {
        let site: Site = parse_toml(text, path)?;
        let mut ports = BTreeMap::new();
        for (name, g) in &site.group {
            let at = |msg: String| error_at_key(text, path, &format!("group.{name}"), 0, &msg);
            if g.size > 1000 {
                return Err(at(format!("group {name}: size {} is above 1000", g.size)));
            }
            if g.update.max_unavailable == 0 {
                return Err(at(format!(
                    "group {name}: update.max_unavailable must be at least 1"
                )));
            }
            if g.update.keep_revisions == 0 {
                return Err(at(format!(
                    "group {name}: update.keep_revisions must be at least 1"
                )));
            }
            if g.image.trim().is_empty() {
                return Err(at(format!("group {name}: image is empty")));
            }
            for p in &g.publish {
                if let Some(other) = ports.insert(p.0.host_port, name.clone()) {
                    return Err(at(format!(
                        "group {name}: host port {} is already published by group {other}",
                        p.0.host_port
                    )));
                }
            }
        }
        Ok(site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = r#"
[group.web]
image = "hello-web:1.2.0"
size = 3
isolation = "sandbox"
publish = ["8080:8080"]

[group.web.update]
max_unavailable = 1
health_gate = "10s"
on_failure = "rollback"
"#;

    fn err(text: &str) -> String {
        Site::parse(text, Path::new("site.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_product_example_parses() {
        let site = Site::parse(SITE, Path::new("site.toml")).unwrap();
        let web = &site.group[&GroupName("web".into())];
        assert_eq!(web.size, 3);
        assert_eq!(web.update.health_gate, Duration::from_secs(10));
        assert_eq!(web.publish[0].0.host_port, 8080);
        assert_eq!(web.update.keep_revisions, 10);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let msg = err(&SITE.replace("size = 3", "sise = 3"));
        assert!(
            msg.starts_with("site.toml:4:1: field `group.web.sise`")
                && msg.contains("did you mean `size`"),
            "{msg}"
        );
        let msg = err(&SITE.replace("\"rollback\"", "\"retry\""));
        assert!(
            msg.contains("site.toml:11:") && msg.contains("unknown variant"),
            "{msg}"
        );
        let msg = err(&SITE.replace("\"10s\"", "\"soon\""));
        assert!(
            msg.contains("site.toml:10:") && msg.contains("not a duration"),
            "{msg}"
        );
        let msg = err(&SITE.replace("8080:8080", "80:0"));
        assert!(
            msg.contains("site.toml:6:") && msg.contains("port mapping"),
            "{msg}"
        );
        let msg = err(&SITE.replace("[group.web]", "[group.Web]"));
        assert!(msg.contains("not a group name"), "{msg}");
        let two = format!("{SITE}\n[group.api]\nimage = \"x:1\"\npublish = [\"8080:80\"]\n");
        let msg = err(&two);
        assert!(msg.contains("already published by group"), "{msg}");
    }
}
