//! The records under `/juice/v1/` and their encoding: the key names the record, the value
//! is JSON. Readers ignore fields they do not know, so a newer host can add some without
//! breaking an older `juice fleet get`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The root of every fleet key; the version changes only with an incompatible layout.
pub const PREFIX: &str = "/juice/v1/";
/// Where hosts register: `hosts/<host-id>`, each under its host's lease.
pub const HOSTS: &str = "/juice/v1/hosts/";

/// A host's name in the fleet: made once, kept in `$JUICE_HOME/host-id`, so it outlives
/// daemon restarts and hostname changes. Lowercase letters, digits and `-`, 1 to 63
/// characters, starting with a letter or digit (a DNS label, so it can name things later).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostId(String);

impl HostId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of this host's record.
    pub fn key(&self) -> String {
        format!("{HOSTS}{}", self.0)
    }
}

impl FromStr for HostId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason| Error::HostId {
            id: s.to_owned(),
            reason,
        };
        if s.is_empty() || s.len() > 63 {
            return Err(bad("it must be 1 to 63 characters long"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad("it may hold only lowercase letters, digits and '-'"));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(bad("it must start and end with a letter or digit"));
        }
        Ok(HostId(s.to_owned()))
    }
}

impl TryFrom<String> for HostId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<HostId> for String {
    fn from(id: HostId) -> String {
        id.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One `key=value` label, as given on the command line (`--label zone=eu-1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub key: String,
    pub value: String,
}

impl FromStr for Label {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason| Error::Label {
            label: s.to_owned(),
            reason,
        };
        let Some((key, value)) = s.split_once('=') else {
            return Err(bad("a label is key=value"));
        };
        check_key(key).map_err(bad)?;
        check_value(value).map_err(bad)?;
        Ok(Label {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Label keys: lowercase letters, digits, `.`, `_`, `/` and `-`, 1 to 63, starting and
/// ending with a letter or digit (`zone`, `juice.dev/rack`).
fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > 63 {
        return Err("the key must be 1 to 63 characters long");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b))
    {
        return Err("the key may hold only lowercase letters, digits, '.', '_', '/' and '-'");
    }
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !edge(key.bytes().next()) || !edge(key.bytes().last()) {
        return Err("the key must start and end with a lowercase letter or digit");
    }
    Ok(())
}

/// Label values: letters, digits, `.`, `_` and `-`, at most 63 (empty is allowed), so a
/// value can be matched by constraints and shown in a table as it is.
fn check_value(value: &str) -> Result<(), &'static str> {
    if value.len() > 63 {
        return Err("the value must be at most 63 characters long");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err("the value may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// A host's labels, each key once; checked when made and when read back from etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Labels from `key=value` pairs; a key given twice is an error naming it.
    pub fn new(labels: impl IntoIterator<Item = Label>) -> Result<Labels, Error> {
        let mut map = BTreeMap::new();
        for l in labels {
            if let Some(old) = map.insert(l.key.clone(), l.value.clone()) {
                return Err(Error::Label {
                    label: format!("{}={}", l.key, l.value),
                    reason: if old == l.value {
                        "this label is given twice"
                    } else {
                        "its key is given twice with different values"
                    },
                });
            }
        }
        Ok(Labels(map))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = Error;
    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Error> {
        for (k, v) in &map {
            let label = || format!("{k}={v}");
            check_key(k)
                .and_then(|()| check_value(v))
                .map_err(|reason| Error::Label {
                    label: label(),
                    reason,
                })?;
        }
        Ok(Labels(map))
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.0
    }
}

impl fmt::Display for Labels {
    /// `rack=r1,zone=eu-1`, or `-` when there are none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        let pairs: Vec<String> = self.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&pairs.join(","))
    }
}

/// An isolation backend a host can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sandbox,
    Microvm,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sandbox => "sandbox",
            Backend::Microvm => "microvm",
        })
    }
}

/// `/juice/v1/hosts/<id>`: what a host can run, written by the host itself under its
/// lease, so the record exists exactly while the host is alive and reachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: HostId,
    pub hostname: String,
    /// CPUs this host's processes may use.
    pub cpus: u32,
    /// Total memory, bytes.
    pub memory_bytes: u64,
    #[serde(default)]
    pub labels: Labels,
    /// The isolation backends whose prerequisites this host has (what `juice doctor` checks).
    pub backends: Vec<Backend>,
    /// The daemon's version (`juice --version`).
    pub juice_version: String,
    /// `PRETTY_NAME` from /etc/os-release.
    pub os: String,
    /// The running kernel's release.
    pub kernel: String,
    /// When this daemon started, milliseconds since 1970: a restart shows as a new value.
    pub started_ms: u64,
    /// sha256 of the daemon's binary, hex (empty from a host that does not say): a host
    /// update's progress shows here.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub binary_sha256: String,
}

impl HostRecord {
    /// The key this record is stored under.
    pub fn key(&self) -> String {
        self.id.key()
    }

    /// The value stored: compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        // Every field is a string, a number, a list or a map with string keys: this cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A record read back from etcd, checked against its key: a value that does not parse,
    /// or whose id is not the one in its key, is an error naming the key.
    pub fn decode(key: &[u8], value: &[u8]) -> Result<HostRecord, Error> {
        let key_text = String::from_utf8_lossy(key).into_owned();
        let bad = |reason: String| Error::Record {
            key: key_text.clone(),
            reason,
        };
        let id = key_text
            .strip_prefix(HOSTS)
            .ok_or_else(|| bad(format!("a host record's key starts with {HOSTS}")))?;
        let id: HostId = id.parse().map_err(|e: Error| bad(e.to_string()))?;
        let record: HostRecord = serde_json::from_slice(value)
            .map_err(|e| bad(format!("its value is not a host record: {e}")))?;
        if record.id != id {
            return Err(bad(format!(
                "it holds the record of host {}, not of {id}",
                record.id
            )));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> HostRecord {
        HostRecord {
            id: "0f3a9c2e".parse().unwrap(),
            hostname: "web-7".into(),
            cpus: 8,
            memory_bytes: 16 << 30,
            labels: Labels::new(["zone=eu-1".parse().unwrap(), "rack=r7".parse().unwrap()])
                .unwrap(),
            backends: vec![Backend::Sandbox, Backend::Microvm],
            juice_version: "0.1.0".into(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel: "6.1.0-28-amd64".into(),
            started_ms: 1_800_000_000_000,
            binary_sha256: String::new(),
        }
    }

    #[test]
    fn a_record_round_trips_through_its_key_and_value() {
        let r = record();
        assert_eq!(r.key(), "/juice/v1/hosts/0f3a9c2e");
        let back = HostRecord::decode(r.key().as_bytes(), &r.encode()).unwrap();
        assert_eq!(back, r);
        let json: serde_json::Value = serde_json::from_slice(&r.encode()).unwrap();
        assert_eq!(json["labels"]["zone"], "eu-1");
        assert_eq!(json["backends"], serde_json::json!(["sandbox", "microvm"]));
    }

    #[test]
    fn fields_a_newer_host_adds_are_ignored_and_missing_labels_are_none() {
        let mut json: serde_json::Value = serde_json::from_slice(&record().encode()).unwrap();
        json["gpus"] = serde_json::json!(2);
        json.as_object_mut().unwrap().remove("labels");
        let r = HostRecord::decode(
            b"/juice/v1/hosts/0f3a9c2e",
            &serde_json::to_vec(&json).unwrap(),
        )
        .unwrap();
        assert!(r.labels.is_empty());
        assert_eq!(r.labels.to_string(), "-");
    }

    #[test]
    fn a_bad_record_is_an_error_naming_its_key() {
        let good = record().encode();
        for (key, value, reason) in [
            (
                &b"/juice/v1/hosts/0f3a9c2e"[..],
                &b"{"[..],
                "is not a host record",
            ),
            (b"/juice/v1/hosts/Other", &good[..], "lowercase"),
            (
                b"/juice/v1/hosts/abc",
                &good[..],
                "holds the record of host 0f3a9c2e, not of abc",
            ),
            (
                b"/juice/v1/hostsx",
                &good[..],
                "starts with /juice/v1/hosts/",
            ),
        ] {
            let e = HostRecord::decode(key, value).unwrap_err().to_string();
            let key = String::from_utf8_lossy(key);
            assert!(e.starts_with(&format!("fleet record {key}: ")), "{e}");
            assert!(e.contains(reason), "{e}");
        }
        let mut json: serde_json::Value = serde_json::from_slice(&good).unwrap();
        json["labels"]["bad key"] = serde_json::json!("x");
        let e = HostRecord::decode(
            b"/juice/v1/hosts/0f3a9c2e",
            &serde_json::to_vec(&json).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad key=x"), "{e}");
    }

    #[test]
    fn labels_are_checked_and_each_bad_one_is_named() {
        let l: Label = "juice.dev/rack=r-7_b".parse().unwrap();
        assert_eq!(
            (l.key.as_str(), l.value.as_str()),
            ("juice.dev/rack", "r-7_b")
        );
        assert_eq!("gpu=".parse::<Label>().unwrap().value, "");
        for (input, reason) in [
            ("zone", "a label is key=value"),
            ("=eu", "1 to 63"),
            ("Zone=eu", "lowercase"),
            ("-zone=eu", "start and end"),
            ("zone=eu west", "the value may hold only"),
            ("zone=eu=1", "the value may hold only"),
        ] {
            let e = input.parse::<Label>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("label `{input}`: ")), "{e}");
            assert!(e.contains(reason), "{input}: {e}");
        }
        let long = format!("zone={}", "a".repeat(64));
        assert!(
            long.parse::<Label>()
                .unwrap_err()
                .to_string()
                .contains("at most 63")
        );
        let twice = Labels::new(["zone=a".parse().unwrap(), "zone=b".parse().unwrap()]);
        assert!(
            twice
                .unwrap_err()
                .to_string()
                .contains("`zone=b`: its key is given twice")
        );
    }

    #[test]
    fn host_ids_are_dns_labels() {
        assert!("a1-b2".parse::<HostId>().is_ok());
        for bad in ["", "-a", "a-", "A1", "a_b", "a/b", &"a".repeat(64)] {
            assert!(bad.parse::<HostId>().is_err(), "{bad:?}");
        }
    }
}
