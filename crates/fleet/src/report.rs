//! `reports/<host-id>/<group>`: how a host runs the groups assigned to it, written by the
//! host under its own lease (so a dead host's reports go with its record), and only when
//! what it says changes. One record per host and group, never per instance.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plan::Assignment;
use crate::record::HostId;
use crate::spec::GroupName;

/// Where hosts report: `reports/<host-id>/<group>`.
pub const REPORTS: &str = "/juice/v1/reports/";

/// The status of a group the host could not apply (its image could not be had, say);
/// `error` says why.
pub const CANNOT_APPLY: &str = "cannot-apply";

/// The key of `host`'s report on `group`.
pub fn report_key(host: &HostId, group: &GroupName) -> String {
    format!("{REPORTS}{host}/{group}")
}

/// What a host says of one group assigned to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The revision of the assignment the host runs (the fleet's, 12 hex digits).
    pub revision: String,
    /// Instances the host is to run, and how many of them are ready (healthy).
    pub size: u32,
    pub ready: u32,
    /// The host agent's word for the group (`ok`, `rolling-out`, `paused`,
    /// `crash-loop (3 failures)`, ...), or [`CANNOT_APPLY`].
    pub status: String,
    /// Instances restarted on this host since the group was made here.
    pub restarts: u64,
    /// Why the assignment could not be applied, with [`CANNOT_APPLY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the host wrote it, milliseconds since 1970.
    pub written_ms: u64,
}

impl Report {
    /// Whether `self` says what `other` says (when each was written aside).
    pub fn says_the_same(&self, other: &Report) -> bool {
        Report {
            written_ms: other.written_ms,
            ..self.clone()
        } == *other
    }
}

/// A host's group as its agent has it: what a report is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalGroup {
    pub size: u32,
    pub ready: u32,
    pub status: String,
    pub restarts: u64,
}

/// The reports a host owes: one per assigned group. `applied` is the assignment revision
/// each group was last applied at, `failed` why a group could not be applied, `local`
/// the agent's groups (by fleet group name).
pub fn reports(
    assigned: &BTreeMap<GroupName, Assignment>,
    applied: &BTreeMap<GroupName, String>,
    failed: &BTreeMap<GroupName, String>,
    local: &BTreeMap<GroupName, LocalGroup>,
    now_ms: u64,
) -> BTreeMap<GroupName, Report> {
    assigned
        .iter()
        .map(|(name, a)| {
            // What runs: the revision last applied; never applied, the assigned one (with
            // nothing ready).
            let revision = applied.get(name).unwrap_or(&a.revision).clone();
            let here = local.get(name);
            let report = match failed.get(name) {
                Some(error) => Report {
                    revision,
                    size: here.map_or(0, |g| g.size),
                    ready: here.map_or(0, |g| g.ready),
                    status: CANNOT_APPLY.into(),
                    restarts: here.map_or(0, |g| g.restarts),
                    error: Some(error.clone()),
                    written_ms: now_ms,
                },
                None => match here {
                    Some(g) => Report {
                        revision,
                        size: g.size,
                        ready: g.ready,
                        status: g.status.clone(),
                        restarts: g.restarts,
                        error: None,
                        written_ms: now_ms,
                    },
                    // Applied a moment ago and not yet seen, or deleted here by hand: the
                    // next apply makes it again.
                    None => Report {
                        revision,
                        size: 0,
                        ready: 0,
                        status: "missing".into(),
                        restarts: 0,
                        error: None,
                        written_ms: now_ms,
                    },
                },
            };
            (name.clone(), report)
        })
        .collect()
}

/// One write of a host's reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportWrite {
    Put(GroupName, Report),
    Delete(GroupName),
}

/// The writes that make the stored reports (`have`, each with the lease it is held
/// under) say `want` under `lease`: a report that says something new, or is held under
/// another lease (one etcd may still expire), is put; a report on a group no longer
/// assigned is deleted; the rest is left alone.
pub fn diff(
    have: &BTreeMap<GroupName, (Report, i64)>,
    want: &BTreeMap<GroupName, Report>,
    lease: i64,
) -> Vec<ReportWrite> {
    let mut writes = Vec::new();
    for (name, r) in want {
        let same = have
            .get(name)
            .is_some_and(|(old, held)| *held == lease && old.says_the_same(r));
        if !same {
            writes.push(ReportWrite::Put(name.clone(), r.clone()));
        }
    }
    for name in have.keys().filter(|n| !want.contains_key(*n)) {
        writes.push(ReportWrite::Delete(name.clone()));
    }
    writes
}

/// A fleet group as `juice fleet get groups` shows it: what the spec wants, what the
/// controller placed, and what the hosts report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupSummary {
    pub name: GroupName,
    /// The spec's revision of the group; `None` once it left the spec (its assignments
    /// not yet deleted).
    pub revision: Option<String>,
    /// Instances the spec asks for: its `count`, or with `per_host` what was placed.
    pub desired: u64,
    /// Instances in the assignments, over all hosts.
    pub placed: u64,
    /// Ready instances by the revision their hosts run.
    pub ready: BTreeMap<String, u64>,
    /// Ready instances at the spec's revision.
    pub ready_now: u64,
    /// Hosts assigned the group.
    pub hosts: Vec<HostId>,
    /// Hosts assigned the group that have no report on it (dead, cut off, or not yet
    /// there).
    pub not_reporting: Vec<HostId>,
}

/// One summary per group of the spec, and per group still assigned though no longer in it.
pub fn summarise(
    spec: &crate::spec::FleetSpec,
    assigned: &crate::plan::Plan,
    reported: &BTreeMap<HostId, BTreeMap<GroupName, Report>>,
) -> Vec<GroupSummary> {
    let mut names: std::collections::BTreeSet<&GroupName> = spec.group.keys().collect();
    names.extend(assigned.hosts.values().flat_map(BTreeMap::keys));
    names
        .into_iter()
        .map(|name| {
            let revision = spec.group.get(name).map(crate::plan::revision);
            let placed = assigned.instances(name);
            let desired = match spec.group.get(name) {
                Some(g) => g.count.map_or(placed, u64::from),
                None => 0,
            };
            let mut ready: BTreeMap<String, u64> = BTreeMap::new();
            let mut hosts = Vec::new();
            let mut not_reporting = Vec::new();
            for (host, groups) in &assigned.hosts {
                if groups.contains_key(name) {
                    hosts.push(host.clone());
                    match reported.get(host).and_then(|r| r.get(name)) {
                        Some(r) => {
                            *ready.entry(r.revision.clone()).or_default() += u64::from(r.ready)
                        }
                        None => not_reporting.push(host.clone()),
                    }
                }
            }
            let ready_now = revision
                .as_ref()
                .and_then(|r| ready.get(r))
                .copied()
                .unwrap_or(0);
            GroupSummary {
                name: name.clone(),
                revision,
                desired,
                placed,
                ready,
                ready_now,
                hosts,
                not_reporting,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Backend;

    fn name(s: &str) -> GroupName {
        s.parse().unwrap()
    }

    fn assignment(revision: &str, size: u32) -> Assignment {
        Assignment {
            revision: revision.into(),
            image: "hello-web:0.1.0".into(),
            isolation: Backend::Sandbox,
            size,
            millicpus: 500,
            memory_bytes: 256 << 20,
            ports: vec![],
            health_gate_ms: None,
        }
    }

    fn local(size: u32, ready: u32, status: &str) -> LocalGroup {
        LocalGroup {
            size,
            ready,
            status: status.into(),
            restarts: 1,
        }
    }

    #[test]
    fn a_report_says_what_the_agent_runs_at_the_revision_last_applied() {
        let assigned = [
            (name("web"), assignment("bbbbbbbbbbbb", 2)),
            (name("api"), assignment("cccccccccccc", 1)),
            (name("new"), assignment("dddddddddddd", 1)),
        ]
        .into();
        let applied = [
            (name("web"), "aaaaaaaaaaaa".to_owned()),
            (name("api"), "cccccccccccc".to_owned()),
        ]
        .into();
        let failed = [(name("new"), "group new: pulling x: refused".to_owned())].into();
        let here = [
            (name("web"), local(2, 1, "rolling-out")),
            (name("api"), local(1, 1, "ok")),
            (name("gone"), local(1, 1, "ok")),
        ]
        .into();
        let r = reports(&assigned, &applied, &failed, &here, 7);
        assert_eq!(r.len(), 3, "one per assigned group, none for `gone`: {r:?}");
        let web = &r[&name("web")];
        assert_eq!(
            (
                web.revision.as_str(),
                web.size,
                web.ready,
                web.status.as_str()
            ),
            ("aaaaaaaaaaaa", 2, 1, "rolling-out")
        );
        assert_eq!((r[&name("api")].ready, r[&name("api")].restarts), (1, 1));
        let new = &r[&name("new")];
        assert_eq!(
            (new.status.as_str(), new.ready, new.revision.as_str()),
            (CANNOT_APPLY, 0, "dddddddddddd")
        );
        assert!(new.error.as_deref().unwrap().contains("refused"));
        assert_eq!(new.written_ms, 7);
    }

    #[test]
    fn only_what_changed_is_written_and_a_new_lease_takes_every_report_over() {
        let report = |ready, at| Report {
            revision: "aaaaaaaaaaaa".into(),
            size: 2,
            ready,
            status: "ok".into(),
            restarts: 0,
            error: None,
            written_ms: at,
        };
        let have = [
            (name("web"), (report(2, 1), 5)),
            (name("api"), (report(1, 1), 5)),
            (name("old"), (report(1, 1), 5)),
        ]
        .into();
        // Same words at a later time: nothing to write for web; api changed; old goes.
        let want = [(name("web"), report(2, 99)), (name("api"), report(2, 99))].into();
        assert_eq!(
            diff(&have, &want, 5),
            vec![
                ReportWrite::Put(name("api"), report(2, 99)),
                ReportWrite::Delete(name("old")),
            ]
        );
        // Nothing changed at all: nothing is written (no heartbeat; the lease is one).
        let same: BTreeMap<_, _> = have
            .iter()
            .map(|(n, (r, _))| (n.clone(), r.clone()))
            .collect();
        assert!(diff(&have, &same, 5).is_empty());
        // Under a new lease every report is put again, so the old lease takes none with it.
        let writes = diff(&have, &same, 6);
        assert_eq!(writes.len(), 3);
        assert!(writes.iter().all(|w| matches!(w, ReportWrite::Put(..))));
    }

    #[test]
    fn a_summary_counts_ready_instances_by_revision_and_names_the_silent_hosts() {
        let spec = crate::spec::FleetSpec::parse(
            "[group.web]\nimage = \"hello-web:0.1.0\"\ncount = 4\n",
            std::path::Path::new("fleet.toml"),
        )
        .unwrap();
        let now = crate::plan::revision(&spec.group[&name("web")]);
        let (h1, h2, h3): (HostId, HostId, HostId) = (
            "h1".parse().unwrap(),
            "h2".parse().unwrap(),
            "h3".parse().unwrap(),
        );
        let mut plan = crate::plan::Plan::default();
        for (h, size) in [(&h1, 2), (&h2, 1), (&h3, 1)] {
            plan.hosts
                .entry(h.clone())
                .or_default()
                .insert(name("web"), assignment(&now, size));
        }
        plan.hosts
            .entry(h3.clone())
            .or_default()
            .insert(name("old"), assignment("eeeeeeeeeeee", 1));
        let report = |revision: &str, ready| Report {
            revision: revision.into(),
            size: 2,
            ready,
            status: "ok".into(),
            restarts: 0,
            error: None,
            written_ms: 0,
        };
        let reported = [
            (h1.clone(), [(name("web"), report(&now, 2))].into()),
            (
                h2.clone(),
                [(name("web"), report("aaaaaaaaaaaa", 1))].into(),
            ),
        ]
        .into();
        let s = summarise(&spec, &plan, &reported);
        assert_eq!(s.len(), 2, "web, and old still assigned: {s:?}");
        let (old, web) = (&s[0], &s[1]);
        assert_eq!(
            (old.revision.as_deref(), old.desired, old.placed),
            (None, 0, 1)
        );
        assert_eq!((web.desired, web.placed, web.ready_now), (4, 4, 2));
        assert_eq!(web.ready.get("aaaaaaaaaaaa"), Some(&1));
        assert_eq!(web.hosts, [h1, h2, h3.clone()]);
        assert_eq!(web.not_reporting, [h3]);
    }

    #[test]
    fn a_report_round_trips_and_omits_an_absent_error() {
        let r = Report {
            revision: "aaaaaaaaaaaa".into(),
            size: 2,
            ready: 2,
            status: "ok".into(),
            restarts: 3,
            error: None,
            written_ms: 1,
        };
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("error").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<Report>(json).unwrap(), r);
        assert_eq!(
            report_key(&"h1".parse().unwrap(), &name("web")),
            "/juice/v1/reports/h1/web"
        );
    }
}
