//! What queries and plans show: the API's view types, with the exact JSON and
//! table text scripts match on.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::site::Isolation;
use crate::state::{GroupRecord, Rollout};

/// One line of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Change {
    pub group: String,
    #[schema(inline)]
    pub action: Action,
    pub reason: String,
}

/// What apply does to a group; in JSON and tables, the lowercase word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A group new to the host.
    Create,
    /// A new revision, or the retry of a paused rollout: instances are replaced.
    Replace,
    /// Another size.
    Scale,
    /// Another update policy.
    Update,
    /// A group no longer in the site file.
    Delete,
    /// Already as declared.
    Unchanged,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Action::Create,
        Action::Replace,
        Action::Scale,
        Action::Update,
        Action::Delete,
        Action::Unchanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Replace => "replace",
            Action::Scale => "scale",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Unchanged => "unchanged",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The view `juice get instances` shows.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceView {
    pub name: String,
    pub group: String,
    pub revision: u64,
    pub pid: i32,
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub address: Option<Ipv4Addr>,
    #[schema(inline)]
    pub health: InstanceHealth,
    pub uptime_s: u64,
    pub last_error: Option<String>,
}

/// The view `juice get groups` shows.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupView {
    pub name: String,
    pub size: u32,
    pub running: usize,
    pub ready: usize,
    pub revision: u64,
    pub image: String,
    pub rollout: Rollout,
    pub restarts: u64,
    /// ok, rolling-out, paused, or with the count that explains it: crash-loop (N failures),
    /// cannot-start (N tries; see events), rolled-back (revision N failed)
    #[schema(
        value_type = String,
        pattern = r"^(ok|rolling-out|paused|crash-loop \([0-9]+ failures\)|cannot-start \([0-9]+ tries; see events\)|rolled-back \(revision [0-9]+ failed\))$"
    )]
    pub status: GroupStatus,
    /// Whether a trial OS version waits for this group to be healthy before it commits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub critical: bool,
}

/// An instance's health as queries show it; in JSON and tables, the lowercase word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceHealth {
    /// Not yet probed healthy, and never failed.
    Starting,
    Healthy,
    /// Failed its check, or was healthy once and is not now.
    Unhealthy,
    /// Being stopped: shown until it is gone.
    Stopping,
}

impl InstanceHealth {
    pub const ALL: [InstanceHealth; 4] = [
        InstanceHealth::Starting,
        InstanceHealth::Healthy,
        InstanceHealth::Unhealthy,
        InstanceHealth::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceHealth::Starting => "starting",
            InstanceHealth::Healthy => "healthy",
            InstanceHealth::Unhealthy => "unhealthy",
            InstanceHealth::Stopping => "stopping",
        }
    }
}

impl std::fmt::Display for InstanceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A group's status in one word, with the count that explains it. In JSON and tables it is
/// one string (`ok`, `crash-loop (3 failures)`, ...), the text scripts and tests match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum GroupStatus {
    /// Every instance runs the current revision, which has proven healthy.
    Ok,
    RollingOut,
    /// Instances keep ending on their own: `failures` in a row.
    CrashLoop {
        failures: u32,
    },
    /// Instances cannot be started at all: `tries` in a row (the events say why).
    CannotStart {
        tries: u32,
    },
    /// A rollout failed and the policy says pause.
    Paused,
    /// Revision `failed` failed its rollout and the group went back.
    RolledBack {
        failed: u64,
    },
}

impl std::fmt::Display for GroupStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupStatus::Ok => f.write_str("ok"),
            GroupStatus::RollingOut => f.write_str("rolling-out"),
            GroupStatus::CrashLoop { failures } => write!(f, "crash-loop ({failures} failures)"),
            GroupStatus::CannotStart { tries } => {
                write!(f, "cannot-start ({tries} tries; see events)")
            }
            GroupStatus::Paused => f.write_str("paused"),
            GroupStatus::RolledBack { failed } => {
                write!(f, "rolled-back (revision {failed} failed)")
            }
        }
    }
}

impl From<GroupStatus> for String {
    fn from(s: GroupStatus) -> String {
        s.to_string()
    }
}

/// A status string that is none of [`GroupStatus`]'s forms.
#[derive(Debug, thiserror::Error)]
#[error("unknown group status {0:?}")]
pub struct UnknownStatus(String);

impl std::str::FromStr for GroupStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownStatus(s.to_owned());
        // The text between a prefix and a suffix: the number Display wrote there.
        let between = |prefix: &str, suffix: &str| {
            s.strip_prefix(prefix).and_then(|r| r.strip_suffix(suffix))
        };
        Ok(match s {
            "ok" => GroupStatus::Ok,
            "rolling-out" => GroupStatus::RollingOut,
            "paused" => GroupStatus::Paused,
            _ => {
                if let Some(n) = between("crash-loop (", " failures)") {
                    GroupStatus::CrashLoop {
                        failures: n.parse().map_err(|_| unknown())?,
                    }
                } else if let Some(n) = between("cannot-start (", " tries; see events)") {
                    GroupStatus::CannotStart {
                        tries: n.parse().map_err(|_| unknown())?,
                    }
                } else if let Some(n) = between("rolled-back (revision ", " failed)") {
                    GroupStatus::RolledBack {
                        failed: n.parse().map_err(|_| unknown())?,
                    }
                } else {
                    return Err(unknown());
                }
            }
        })
    }
}

impl TryFrom<String> for GroupStatus {
    type Error = UnknownStatus;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// One sample of resource use (`GET /v1/stats`, `juice top`): every live
/// instance, and the sums per group.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Stats {
    /// When the sample was taken, in milliseconds since the Unix epoch.
    pub taken_unix_ms: u64,
    pub instances: Vec<InstanceStats>,
    pub groups: Vec<GroupStats>,
}

/// One instance's resource use. A figure that cannot be read (an instance
/// without cgroups, one that just ended) is null.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceStats {
    pub name: String,
    pub group: String,
    pub revision: u64,
    /// sandbox or microvm
    pub backend: Isolation,
    /// CPU time used since the instance started, in nanoseconds: a counter, not
    /// a rate. The daemon keeps no earlier reading: a client takes two samples
    /// and divides the difference by the time between them (`juice top`), so
    /// two clients sampling at once do not disturb each other's rates. A
    /// sandbox's from its cgroup (v1 `cpuacct.usage`, v2 `cpu.stat`), a
    /// microVM's from its QEMU process (utime + stime).
    pub cpu_ns: Option<u64>,
    /// A sandbox: the memory charged to its cgroup, page cache included, the
    /// figure its limit is enforced against (v1 `memory.usage_in_bytes`, v2
    /// `memory.current`). A microVM: QEMU's resident set, the VM's whole
    /// footprint on the host (guest memory it has touched, and QEMU's own).
    pub memory_bytes: Option<u64>,
    /// A sandbox's cgroup limit; a microVM's guest memory.
    pub memory_limit_bytes: Option<u64>,
    /// Tasks in a sandbox's cgroup (`pids.current`); null for a microVM.
    pub pids: Option<u64>,
    pub pids_limit: Option<u64>,
    /// Bytes the instance received and sent, counted on the host end of its
    /// veth or tap (whose own rx is the instance's tx); null without a network.
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
    /// Its group's restarts: instances that ended on their own and were replaced.
    pub restarts: u64,
}

impl InstanceStats {
    pub fn new(
        name: String,
        group: String,
        revision: u64,
        backend: Isolation,
        usage: juice_runtime::Usage,
        restarts: u64,
    ) -> InstanceStats {
        InstanceStats {
            name,
            group,
            revision,
            backend,
            cpu_ns: usage.cpu_ns,
            memory_bytes: usage.memory_bytes,
            memory_limit_bytes: usage.memory_limit_bytes,
            pids: usage.pids,
            pids_limit: usage.pids_limit,
            net_rx_bytes: usage.net.map(|n| n.rx_bytes),
            net_tx_bytes: usage.net.map(|n| n.tx_bytes),
            restarts,
        }
    }
}

/// A group's sums over its live instances (figures that could not be read count as 0).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupStats {
    pub name: String,
    pub instances: usize,
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    pub pids: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub restarts: u64,
}

impl Stats {
    /// The sample of `instances`, with a line for every group in `restarts`
    /// (each group's restart count), running instances or not.
    pub fn new(
        taken_unix_ms: u64,
        instances: Vec<InstanceStats>,
        restarts: &BTreeMap<String, u64>,
    ) -> Stats {
        let mut groups: BTreeMap<&str, GroupStats> = restarts
            .iter()
            .map(|(name, r)| {
                let g = GroupStats {
                    name: name.clone(),
                    restarts: *r,
                    ..GroupStats::default()
                };
                (name.as_str(), g)
            })
            .collect();
        for i in &instances {
            let g = groups.entry(&i.group).or_insert_with(|| GroupStats {
                name: i.group.clone(),
                restarts: i.restarts,
                ..GroupStats::default()
            });
            g.instances += 1;
            let add = |sum: &mut u64, v: Option<u64>| *sum = sum.saturating_add(v.unwrap_or(0));
            add(&mut g.cpu_ns, i.cpu_ns);
            add(&mut g.memory_bytes, i.memory_bytes);
            add(&mut g.pids, i.pids);
            add(&mut g.net_rx_bytes, i.net_rx_bytes);
            add(&mut g.net_tx_bytes, i.net_tx_bytes);
        }
        let groups = groups.into_values().collect();
        Stats {
            taken_unix_ms,
            instances,
            groups,
        }
    }
}

/// `juice describe group`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupDescription {
    pub group: GroupRecord,
    pub instances: Vec<InstanceView>,
    pub events: Vec<crate::state::Event>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON and table text of actions, health and status is what scripts match on:
    /// each value serialises to exactly its old string, and reads back.
    #[test]
    fn api_enums_keep_their_exact_text() {
        let cases: [(serde_json::Value, &str); 16] = [
            (serde_json::to_value(Action::Create).unwrap(), "create"),
            (serde_json::to_value(Action::Replace).unwrap(), "replace"),
            (serde_json::to_value(Action::Scale).unwrap(), "scale"),
            (serde_json::to_value(Action::Update).unwrap(), "update"),
            (serde_json::to_value(Action::Delete).unwrap(), "delete"),
            (
                serde_json::to_value(Action::Unchanged).unwrap(),
                "unchanged",
            ),
            (
                serde_json::to_value(InstanceHealth::Starting).unwrap(),
                "starting",
            ),
            (
                serde_json::to_value(InstanceHealth::Healthy).unwrap(),
                "healthy",
            ),
            (
                serde_json::to_value(InstanceHealth::Unhealthy).unwrap(),
                "unhealthy",
            ),
            (
                serde_json::to_value(InstanceHealth::Stopping).unwrap(),
                "stopping",
            ),
            (serde_json::to_value(GroupStatus::Ok).unwrap(), "ok"),
            (
                serde_json::to_value(GroupStatus::RollingOut).unwrap(),
                "rolling-out",
            ),
            (
                serde_json::to_value(GroupStatus::CrashLoop { failures: 3 }).unwrap(),
                "crash-loop (3 failures)",
            ),
            (
                serde_json::to_value(GroupStatus::CannotStart { tries: 12 }).unwrap(),
                "cannot-start (12 tries; see events)",
            ),
            (serde_json::to_value(GroupStatus::Paused).unwrap(), "paused"),
            (
                serde_json::to_value(GroupStatus::RolledBack { failed: 4 }).unwrap(),
                "rolled-back (revision 4 failed)",
            ),
        ];
        for (json, text) in cases {
            assert_eq!(json, serde_json::Value::String(text.into()));
        }
        for a in Action::ALL {
            assert_eq!(a.to_string(), serde_json::to_value(a).unwrap());
            assert_eq!(
                serde_json::from_value::<Action>(a.as_str().into()).unwrap(),
                a
            );
        }
        for h in InstanceHealth::ALL {
            assert_eq!(h.to_string(), serde_json::to_value(h).unwrap());
            assert_eq!(
                serde_json::from_value::<InstanceHealth>(h.as_str().into()).unwrap(),
                h
            );
        }
        for st in [
            GroupStatus::Ok,
            GroupStatus::RollingOut,
            GroupStatus::CrashLoop { failures: 3 },
            GroupStatus::CannotStart { tries: 1 },
            GroupStatus::Paused,
            GroupStatus::RolledBack { failed: 17 },
        ] {
            assert_eq!(st.to_string(), serde_json::to_value(st).unwrap());
            let back: GroupStatus = serde_json::from_value(st.to_string().into()).unwrap();
            assert_eq!(back, st);
        }
        for bad in [
            "",
            "OK",
            "crash-loop",
            "crash-loop (x failures)",
            "rolled-back (revision -1 failed)",
        ] {
            assert!(
                serde_json::from_value::<GroupStatus>(bad.into()).is_err(),
                "{bad}"
            );
        }
    }

    fn instance(name: &str, group: &str, memory: Option<u64>) -> InstanceStats {
        let usage = juice_runtime::Usage {
            cpu_ns: Some(1_000),
            memory_bytes: memory,
            pids: Some(2),
            net: Some(juice_runtime::NetBytes {
                rx_bytes: 10,
                tx_bytes: 20,
            }),
            ..Default::default()
        };
        InstanceStats::new(name.into(), group.into(), 1, Isolation::Sandbox, usage, 3)
    }

    #[test]
    fn group_stats_sum_their_instances_and_keep_idle_groups() {
        let restarts = BTreeMap::from([("web".to_owned(), 3), ("idle".to_owned(), 5)]);
        let stats = Stats::new(
            7,
            vec![
                instance("web-1", "web", Some(100)),
                instance("web-2", "web", None),
            ],
            &restarts,
        );
        assert_eq!(
            stats.groups,
            vec![
                GroupStats {
                    name: "idle".into(),
                    restarts: 5,
                    ..GroupStats::default()
                },
                GroupStats {
                    name: "web".into(),
                    instances: 2,
                    cpu_ns: 2_000,
                    memory_bytes: 100,
                    pids: 4,
                    net_rx_bytes: 20,
                    net_tx_bytes: 40,
                    restarts: 3,
                },
            ]
        );
        let json = serde_json::to_value(&stats.instances[0]).unwrap();
        assert_eq!(json["backend"], "sandbox");
        assert_eq!(json["net_rx_bytes"], 10);
        assert_eq!(json["memory_limit_bytes"], serde_json::Value::Null);
    }

    /// The OpenAPI document lists exactly the values the enums serialise to.
    #[test]
    fn the_openapi_enums_are_the_types_values() {
        let doc: serde_json::Value = serde_json::from_str(crate::api::OPENAPI).unwrap();
        let schemas = &doc["components"]["schemas"];
        let listed = |schema: &str, field: &str| -> Vec<String> {
            let values = schemas[schema]["properties"][field]["enum"].as_array();
            let values = values.unwrap_or_else(|| panic!("{schema}.{field} has no enum"));
            values
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        let actions: Vec<String> = Action::ALL.iter().map(|a| a.to_string()).collect();
        assert_eq!(listed("Change", "action"), actions);
        let health: Vec<String> = InstanceHealth::ALL.iter().map(|h| h.to_string()).collect();
        assert_eq!(listed("InstanceView", "health"), health);
    }
}
