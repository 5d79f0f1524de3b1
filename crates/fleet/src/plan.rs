//! Placement: which host runs how many instances of which group. Pure and deterministic
//! (the same hosts, spec and previous plan give the same plan, byte for byte), so the
//! controller can recompute it at any time and write only what changed. Placements are
//! stable: [`plan_from`] first keeps each group's instances where the previous plan had
//! them, on hosts that still pass the filters, and places only the rest.
//!
//! Groups are placed in name order. For each instance the hosts are **filtered** (the
//! group's isolation backend, its label constraints, enough free CPU and memory, its
//! published ports free), then **scored**: fewest instances of the group on hosts with the
//! same value of the `spread` label, then least allocated (the larger of the CPU and memory
//! shares in use once the instance is there), then host id. A placement that cannot be
//! made is a [`PlanError`] naming the group and the field that stops it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::record::{Backend, HostId, HostRecord, Labels};
use crate::spec::{FleetSpec, GroupName, GroupSpec, Publish};

/// A host as the planner sees it: what it has, and what is already taken on it by
/// work the plan does not place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCapacity {
    pub id: HostId,
    pub labels: Labels,
    pub backends: Vec<Backend>,
    pub millicpus: u64,
    pub memory_bytes: u64,
    pub reserved: Allocation,
}

impl HostCapacity {
    /// A registered host, with nothing reserved.
    pub fn from_record(h: &HostRecord) -> HostCapacity {
        HostCapacity {
            id: h.id.clone(),
            labels: h.labels.clone(),
            backends: h.backends.clone(),
            millicpus: u64::from(h.cpus) * 1000,
            memory_bytes: h.memory_bytes,
            reserved: Allocation::default(),
        }
    }
}

/// CPU, memory and host ports in use on a host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    pub millicpus: u64,
    pub memory_bytes: u64,
    pub ports: BTreeSet<u16>,
}

/// What one host runs of one group: `assign/<host>/<group>` holds this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The group's revision: a digest of its spec, so it changes exactly when the spec does.
    pub revision: String,
    pub image: String,
    pub isolation: Backend,
    /// Instances on this host.
    pub size: u32,
    /// Each instance's reservation.
    pub millicpus: u64,
    pub memory_bytes: u64,
    #[serde(default)]
    pub ports: Vec<Publish>,
    /// The group's `rollout.health_gate` in ms, for the host's own update policy (a new
    /// instance healthy this long before the next is replaced); absent in older records,
    /// which keep the host's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_gate_ms: Option<u64>,
}

/// Assignments by host, then group. Hosts with nothing to run are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub hosts: BTreeMap<HostId, BTreeMap<GroupName, Assignment>>,
}

impl Plan {
    /// Instances of `group` in the plan, over all hosts.
    pub fn instances(&self, group: &GroupName) -> u64 {
        self.hosts
            .values()
            .filter_map(|g| g.get(group))
            .map(|a| u64::from(a.size))
            .sum()
    }
}

/// A placement that cannot be made: the group, the field of `fleet.toml` that stops it
/// (`isolation`, `constraints`, `resources.cpus`, `resources.memory`, `publish`), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("group {group}: field `{field}`: {reason}")]
pub struct PlanError {
    pub group: GroupName,
    pub field: &'static str,
    pub reason: String,
}

/// The revision of a group: the first 12 hex digits of the SHA-256 of the JSON of what its
/// instances run (image, isolation, resources, published ports). Where they run (`count`,
/// `per_host`, `constraints`, `spread`) and how a revision rolls out are not part of it, so
/// a change of count is not a new revision and never starts a rollout.
pub fn revision(spec: &GroupSpec) -> String {
    #[derive(Serialize)]
    struct Runs<'a> {
        image: &'a str,
        isolation: Backend,
        resources: &'a crate::spec::Resources,
        publish: &'a [Publish],
    }
    let runs = Runs {
        image: &spec.image,
        isolation: spec.isolation,
        resources: &spec.resources,
        publish: &spec.publish,
    };
    // Strings, numbers and lists: this cannot fail.
    let json = serde_json::to_vec(&runs).unwrap_or_default();
    hex::encode(&Sha256::digest(&json)[..6])
}

/// A host during planning: its capacity and what the plan has put on it so far.
struct Bin<'a> {
    host: &'a HostCapacity,
    used: Allocation,
}

impl Bin<'_> {
    fn free_cpu(&self) -> u64 {
        self.host.millicpus.saturating_sub(self.used.millicpus)
    }
    fn free_memory(&self) -> u64 {
        self.host
            .memory_bytes
            .saturating_sub(self.used.memory_bytes)
    }
    fn ports_free(&self, g: &GroupSpec) -> bool {
        g.publish
            .iter()
            .all(|p| !self.used.ports.contains(&p.host_port()))
    }
    fn fits(&self, g: &GroupSpec) -> bool {
        self.free_cpu() >= g.resources.millicpus()
            && self.free_memory() >= g.resources.memory.0
            && self.ports_free(g)
    }
    fn take(&mut self, g: &GroupSpec) {
        self.used.millicpus += g.resources.millicpus();
        self.used.memory_bytes += g.resources.memory.0;
        self.used
            .ports
            .extend(g.publish.iter().map(Publish::host_port));
    }
    /// The larger of the CPU and memory shares in use once `g` is added, in millionths.
    fn load_after(&self, g: &GroupSpec) -> u64 {
        let share = |used: u64, cap: u64| {
            if cap == 0 {
                return u64::MAX;
            }
            let ppm = u128::from(used) * 1_000_000 / u128::from(cap);
            u64::try_from(ppm).unwrap_or(u64::MAX)
        };
        share(
            self.used.millicpus + g.resources.millicpus(),
            self.host.millicpus,
        )
        .max(share(
            self.used.memory_bytes + g.resources.memory.0,
            self.host.memory_bytes,
        ))
    }
}

/// Places every group of `spec` on `hosts`, from scratch: [`plan_from`] with no previous plan.
pub fn plan(hosts: &[HostCapacity], spec: &FleetSpec) -> Result<Plan, PlanError> {
    plan_from(hosts, spec, &Plan::default())
}

/// Places every group of `spec` on `hosts`, keeping the instances `previous` (the
/// assignments written last) has on hosts that are still there and still pass the group's
/// filters, up to the group's count; the rest are placed as [`plan`] places them. Kept
/// instances are chosen one at a time by the same scores, so when a group shrinks the
/// worst-ranked go first. Replanning with the result as `previous` gives the same plan.
pub fn plan_from(
    hosts: &[HostCapacity],
    spec: &FleetSpec,
    previous: &Plan,
) -> Result<Plan, PlanError> {
    plan_pinned(hosts, spec, previous, &Plan::default())
}

/// [`plan_from`], where `pinned` holds assignments on hosts that are not in `hosts` (missing:
/// their lease is gone) and must stay where they are ([`crate::liveness`]): each pinned
/// group of the spec keeps its size there (in host order, never more than the group's
/// count in all; the revision and image follow the spec) and counts towards the group's
/// count, and only the rest is placed on `hosts`. Nothing new is placed on a pinned host.
/// Pins of groups no longer in the spec, and on hosts that are in `hosts`, are ignored.
pub fn plan_pinned(
    hosts: &[HostCapacity],
    spec: &FleetSpec,
    previous: &Plan,
    pinned: &Plan,
) -> Result<Plan, PlanError> {
    let mut sorted: Vec<&HostCapacity> = hosts.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut bins: Vec<Bin> = sorted
        .into_iter()
        .map(|host| Bin {
            host,
            used: host.reserved.clone(),
        })
        .collect();
    let mut out = Plan::default();
    for (name, group) in &spec.group {
        let revision = revision(group);
        let assignment = |size| Assignment {
            revision: revision.clone(),
            image: group.image.clone(),
            isolation: group.isolation,
            size,
            millicpus: group.resources.millicpus(),
            memory_bytes: group.resources.memory.0,
            ports: group.publish.clone(),
            health_gate_ms: Some(
                u64::try_from(group.rollout.health_gate.as_millis()).unwrap_or(u64::MAX),
            ),
        };
        // The pinned instances first: they are where they are.
        let mut kept = 0u32;
        for (host, groups) in &pinned.hosts {
            if bins.iter().any(|b| &b.host.id == host) {
                continue;
            }
            let Some(a) = groups.get(name) else { continue };
            let size = match group.count {
                Some(count) => a.size.min(count.saturating_sub(kept)),
                None => a.size,
            };
            if size == 0 {
                continue;
            }
            kept += size;
            out.hosts
                .entry(host.clone())
                .or_default()
                .insert(name.clone(), assignment(size));
        }
        let had: BTreeMap<usize, u32> = (0..bins.len())
            .filter_map(|i| {
                let a = previous.hosts.get(&bins[i].host.id)?.get(name)?;
                Some((i, a.size))
            })
            .collect();
        let per_host = place_group(&mut bins, name, group, &had, kept)?;
        for (i, size) in per_host {
            out.hosts
                .entry(bins[i].host.id.clone())
                .or_default()
                .insert(name.clone(), assignment(size));
        }
    }
    Ok(out)
}

/// Places one group, first keeping up to `had[i]` instances on bin `i` where they still
/// pass the filters; `pinned` instances are already placed elsewhere (on missing hosts) and
/// count towards the group's count. Returns instances per bin index.
fn place_group(
    bins: &mut [Bin],
    name: &GroupName,
    g: &GroupSpec,
    had: &BTreeMap<usize, u32>,
    pinned: u32,
) -> Result<BTreeMap<usize, u32>, PlanError> {
    let fail = |field, reason: String| PlanError {
        group: name.clone(),
        field,
        reason,
    };
    if !g.per_host && g.count.unwrap_or(0) <= pinned {
        return Ok(BTreeMap::new());
    }
    let with_backend: Vec<usize> = (0..bins.len())
        .filter(|&i| bins[i].host.backends.contains(&g.isolation))
        .collect();
    if with_backend.is_empty() {
        return Err(fail(
            "isolation",
            format!("no host can run the {} backend", g.isolation),
        ));
    }
    let matching: Vec<usize> = with_backend
        .into_iter()
        .filter(|&i| {
            g.constraints
                .iter()
                .all(|(k, v)| bins[i].host.labels.get(k) == Some(v))
        })
        .collect();
    if matching.is_empty() {
        return Err(fail(
            "constraints",
            format!(
                "no host with the {} backend has the labels {}",
                g.isolation, g.constraints
            ),
        ));
    }
    let mut placed: BTreeMap<usize, u32> = BTreeMap::new();
    if g.per_host {
        for &i in &matching {
            if !bins[i].fits(g) {
                return Err(fail(
                    blocking_field(bins, &[i], g),
                    format!(
                        "one instance per matching host, and host {} has no room for it",
                        bins[i].host.id
                    ),
                ));
            }
            bins[i].take(g);
            placed.insert(i, 1);
        }
        return Ok(placed);
    }
    let total = g.count.unwrap_or(0);
    let count = total.saturating_sub(pinned);
    // Instances of this group per value of the spread label (a host without the label
    // counts as the value "").
    let mut per_value: BTreeMap<&str, u32> = BTreeMap::new();
    let value = |i: usize, bins: &[Bin]| -> String {
        g.spread
            .as_deref()
            .and_then(|k| bins[i].host.labels.get(k))
            .unwrap_or("")
            .to_owned()
    };
    let values: Vec<String> = (0..bins.len()).map(|i| value(i, bins)).collect();
    // The best host for one more instance among those `allowed`, by the scores.
    let best = |bins: &[Bin],
                placed: &BTreeMap<usize, u32>,
                per_value: &BTreeMap<&str, u32>,
                allowed: &dyn Fn(usize) -> bool| {
        matching
            .iter()
            .copied()
            // Published ports are host ports: one instance per host.
            .filter(|&i| {
                allowed(i) && bins[i].fits(g) && (g.publish.is_empty() || !placed.contains_key(&i))
            })
            .min_by_key(|&i| {
                (
                    per_value.get(values[i].as_str()).copied().unwrap_or(0),
                    bins[i].load_after(g),
                    &bins[i].host.id,
                )
            })
    };
    let mut n = 0;
    // Keep where instances already are, one at a time by the scores.
    while n < count {
        let keep =
            |i: usize| placed.get(&i).copied().unwrap_or(0) < had.get(&i).copied().unwrap_or(0);
        let Some(i) = best(bins, &placed, &per_value, &keep) else {
            break;
        };
        bins[i].take(g);
        *placed.entry(i).or_default() += 1;
        *per_value.entry(values[i].as_str()).or_default() += 1;
        n += 1;
    }
    while n < count {
        let Some(i) = best(bins, &placed, &per_value, &|_| true) else {
            return Err(fail(
                blocking_field(bins, &matching, g),
                if pinned == 0 {
                    format!(
                        "{total} instances asked for, {n} fit on the {} matching host(s)",
                        matching.len()
                    )
                } else {
                    format!(
                        "{total} instances asked for, {pinned} kept on missing hosts and {n} fit on the {} matching host(s)",
                        matching.len()
                    )
                },
            ));
        };
        bins[i].take(g);
        *placed.entry(i).or_default() += 1;
        *per_value.entry(values[i].as_str()).or_default() += 1;
        n += 1;
    }
    Ok(placed)
}

/// Which field stops one more instance on `candidates`: CPU if none has the CPU, memory
/// if none has the memory, else the published ports.
fn blocking_field(bins: &[Bin], candidates: &[usize], g: &GroupSpec) -> &'static str {
    if candidates
        .iter()
        .all(|&i| bins[i].free_cpu() < g.resources.millicpus())
    {
        "resources.cpus"
    } else if candidates
        .iter()
        .all(|&i| bins[i].free_memory() < g.resources.memory.0)
    {
        "resources.memory"
    } else if candidates.iter().all(|&i| {
        bins[i].free_cpu() < g.resources.millicpus() || bins[i].free_memory() < g.resources.memory.0
    }) {
        "resources"
    } else {
        "publish"
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;
    use crate::record::Label;

    const GIB: u64 = 1 << 30;

    fn host(
        id: &str,
        cpus: u64,
        mem_gib: u64,
        labels: &[&str],
        backends: &[Backend],
    ) -> HostCapacity {
        HostCapacity {
            id: id.parse().unwrap(),
            labels: Labels::new(labels.iter().map(|l| l.parse::<Label>().unwrap())).unwrap(),
            backends: backends.to_vec(),
            millicpus: cpus * 1000,
            memory_bytes: mem_gib * GIB,
            reserved: Allocation::default(),
        }
    }

    fn spec(text: &str) -> FleetSpec {
        FleetSpec::parse(text, Path::new("fleet.toml")).unwrap()
    }

    fn sizes(p: &Plan, group: &str) -> BTreeMap<String, u32> {
        let g: GroupName = group.parse().unwrap();
        p.hosts
            .iter()
            .filter_map(|(h, a)| a.get(&g).map(|a| (h.to_string(), a.size)))
            .collect()
    }

    const SB: &[Backend] = &[Backend::Sandbox];
    const BOTH: &[Backend] = &[Backend::Sandbox, Backend::Microvm];

    fn three_zones() -> Vec<HostCapacity> {
        vec![
            host("a1", 4, 8, &["zone=a"], SB),
            host("a2", 4, 8, &["zone=a"], SB),
            host("b1", 4, 8, &["zone=b"], BOTH),
            host("c1", 4, 8, &["zone=c"], SB),
        ]
    }

    #[test]
    fn placement_table() {
        struct Case {
            what: &'static str,
            fleet: &'static str,
            group: &'static str,
            want: &'static [(&'static str, u32)],
        }
        let cases = [
            Case {
                what: "spread over zones first: each zone gets one before any gets two",
                fleet: "[group.web]\nimage = \"w:1\"\ncount = 3\nspread = \"zone\"\n",
                group: "web",
                want: &[("a1", 1), ("b1", 1), ("c1", 1)],
            },
            Case {
                what: "without spread, least allocated: one per host, then the id breaks ties",
                fleet: "[group.web]\nimage = \"w:1\"\ncount = 5\n",
                group: "web",
                want: &[("a1", 2), ("a2", 1), ("b1", 1), ("c1", 1)],
            },
            Case {
                what: "constraints keep the group to its zone",
                fleet: "[group.web]\nimage = \"w:1\"\ncount = 4\nconstraints = { zone = \"a\" }\n",
                group: "web",
                want: &[("a1", 2), ("a2", 2)],
            },
            Case {
                what: "microvm only where the backend is",
                fleet: "[group.vm]\nimage = \"v:1\"\ncount = 2\nisolation = \"microvm\"\n",
                group: "vm",
                want: &[("b1", 2)],
            },
            Case {
                what: "per_host: one on every matching host",
                fleet: "[group.agent]\nimage = \"n:1\"\nper_host = true\nconstraints = { zone = \"a\" }\n",
                group: "agent",
                want: &[("a1", 1), ("a2", 1)],
            },
            Case {
                what: "published ports: at most one per host",
                fleet: "[group.web]\nimage = \"w:1\"\ncount = 4\npublish = [\"80:8080\"]\n",
                group: "web",
                want: &[("a1", 1), ("a2", 1), ("b1", 1), ("c1", 1)],
            },
        ];
        for c in cases {
            let p =
                plan(&three_zones(), &spec(c.fleet)).unwrap_or_else(|e| panic!("{}: {e}", c.what));
            let want: BTreeMap<String, u32> =
                c.want.iter().map(|(h, n)| ((*h).to_owned(), *n)).collect();
            assert_eq!(sizes(&p, c.group), want, "{}", c.what);
        }
    }

    #[test]
    fn impossible_placements_name_the_group_and_field() {
        let cases = [
            (
                "[group.web]\nimage = \"w:1\"\ncount = 1\nconstraints = { zone = \"z\" }\n",
                "constraints",
                "has the labels zone=z",
            ),
            (
                "[group.web]\nimage = \"w:1\"\ncount = 17\nresources = { cpus = 1, memory = \"1GiB\" }\n",
                "resources.cpus",
                "17 instances asked for, 16 fit",
            ),
            (
                "[group.web]\nimage = \"w:1\"\ncount = 5\nresources = { cpus = 0.1, memory = \"7GiB\" }\n",
                "resources.memory",
                "5 instances asked for, 4 fit",
            ),
            (
                "[group.web]\nimage = \"w:1\"\ncount = 5\npublish = [\"80:80\"]\n",
                "publish",
                "5 instances asked for, 4 fit",
            ),
            (
                "[group.big]\nimage = \"b:1\"\nper_host = true\nresources = { cpus = 5 }\n",
                "resources.cpus",
                "host a1 has no room",
            ),
        ];
        for (fleet, field, reason) in cases {
            let e = plan(&three_zones(), &spec(fleet)).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(reason), "{e}");
            assert!(e.to_string().starts_with("group "), "{e}");
        }
        // No microVM host at all.
        let one = vec![host("a1", 4, 8, &[], SB)];
        let fleet = "[group.vm]\nimage = \"v:1\"\ncount = 1\nisolation = \"microvm\"\n";
        let e = plan(&one, &spec(fleet)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "group vm: field `isolation`: no host can run the microvm backend"
        );
        // A port clash between two groups on the only host.
        let fleet = "[group.api]\nimage = \"a:1\"\ncount = 1\npublish = [\"80:80\"]\n\
                     [group.web]\nimage = \"w:1\"\ncount = 1\npublish = [\"80:8080\"]\n";
        let e = plan(&one, &spec(fleet)).unwrap_err();
        assert_eq!((e.group.as_str(), e.field), ("web", "publish"), "{e}");
    }

    #[test]
    fn reserved_work_counts_and_the_plan_is_deterministic() {
        let mut hosts = three_zones();
        hosts[0].reserved = Allocation {
            millicpus: 4000,
            memory_bytes: 0,
            ports: BTreeSet::new(),
        };
        hosts.reverse();
        let fleet = spec("[group.web]\nimage = \"w:1\"\ncount = 3\n");
        let p = plan(&hosts, &fleet).unwrap();
        assert!(!sizes(&p, "web").contains_key("a1"));
        assert_eq!(p, plan(&three_zones()[1..], &fleet).unwrap());
        let g: GroupName = "web".parse().unwrap();
        let a = &p.hosts[&"a2".parse::<HostId>().unwrap()][&g];
        assert_eq!(a.revision, revision(&fleet.group[&g]));
        assert_eq!(a.revision.len(), 12);
    }

    /// Replanning with the previous plan as input keeps instances where they are.
    #[test]
    fn stable_placements_table() {
        type Sizes = BTreeMap<String, u32>;
        fn total(s: &Sizes) -> u32 {
            s.values().sum()
        }
        struct Case {
            what: &'static str,
            before: (Vec<HostCapacity>, &'static str),
            after: (Vec<HostCapacity>, &'static str),
            check: fn(&Sizes, &Sizes) -> bool,
        }
        let web = |count: u32, image: &str, spread: bool| {
            format!(
                "[group.db]\nimage = \"d:1\"\ncount = 2\n\
                 [group.web]\nimage = \"{image}\"\ncount = {count}\n{}",
                if spread { "spread = \"zone\"\n" } else { "" }
            )
        };
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let mut joined = three_zones();
        joined.push(host("d1", 16, 32, &["zone=d"], BOTH));
        let left: Vec<HostCapacity> = three_zones()
            .into_iter()
            .filter(|h| h.id.as_str() != "a2")
            .collect();
        let cases = [
            Case {
                what: "an unchanged spec on unchanged hosts moves nothing",
                before: (three_zones(), leak(web(5, "w:1", false))),
                after: (three_zones(), leak(web(5, "w:1", false))),
                check: |a, b| a == b,
            },
            Case {
                what: "a new host joining moves nothing",
                before: (three_zones(), leak(web(5, "w:1", false))),
                after: (joined.clone(), leak(web(5, "w:1", false))),
                check: |a, b| a == b,
            },
            Case {
                what: "scaling up keeps every existing placement",
                before: (three_zones(), leak(web(3, "w:1", true))),
                after: (three_zones(), leak(web(7, "w:1", true))),
                check: |a, b| total(b) == 7 && a.iter().all(|(h, n)| b.get(h) >= Some(n)),
            },
            Case {
                what: "scaling down keeps a subset, still spread over zones",
                before: (three_zones(), leak(web(5, "w:1", true))),
                after: (three_zones(), leak(web(2, "w:1", true))),
                check: |a, b| {
                    total(b) == 2
                        && b.iter().all(|(h, n)| a.get(h) >= Some(n))
                        && b.keys().filter(|h| h.starts_with('a')).count() <= 1
                },
            },
            Case {
                what: "a host that left loses only its own instances, which go elsewhere",
                before: (three_zones(), leak(web(5, "w:1", false))),
                after: (left.clone(), leak(web(5, "w:1", false))),
                check: |a, b| {
                    total(b) == 5
                        && !b.contains_key("a2")
                        && a.iter()
                            .filter(|(h, _)| *h != "a2")
                            .all(|(h, n)| b.get(h) >= Some(n))
                },
            },
            Case {
                what: "a changed image keeps placements",
                before: (three_zones(), leak(web(5, "w:1", true))),
                after: (three_zones(), leak(web(5, "w:2", true))),
                check: |a, b| a == b,
            },
        ];
        for c in cases {
            let (before_fleet, after_fleet) = (spec(c.before.1), spec(c.after.1));
            let before =
                plan(&c.before.0, &before_fleet).unwrap_or_else(|e| panic!("{}: {e}", c.what));
            let after = plan_from(&c.after.0, &after_fleet, &before)
                .unwrap_or_else(|e| panic!("{}: {e}", c.what));
            let (a, b) = (sizes(&before, "web"), sizes(&after, "web"));
            assert!((c.check)(&a, &b), "{}: before {a:?}, after {b:?}", c.what);
            // The other group, unchanged, stays put too, except on a host that left.
            let (da, db) = (sizes(&before, "db"), sizes(&after, "db"));
            assert!(
                da.iter()
                    .filter(|(h, _)| c.after.0.iter().any(|x| x.id.as_str() == h.as_str()))
                    .all(|(h, n)| db.get(h) == Some(n)),
                "{}: db before {da:?}, after {db:?}",
                c.what
            );
            // The revision follows the spec; the hosts do not.
            let g: GroupName = "web".parse().unwrap();
            for groups in after.hosts.values() {
                if let Some(x) = groups.get(&g) {
                    assert_eq!(x.revision, revision(&after_fleet.group[&g]), "{}", c.what);
                }
            }
            // Replanning what was planned changes nothing.
            assert_eq!(
                plan_from(&c.after.0, &after_fleet, &after).unwrap(),
                after,
                "{}",
                c.what
            );
        }
        // The joining host would have been used from scratch: the case above means something.
        let fleet = spec(&web(5, "w:1", false));
        assert!(sizes(&plan(&joined, &fleet).unwrap(), "web").contains_key("d1"));
    }

    /// Random fleets: a host is never given more than it has, ports never clash on a
    /// host, and a spec that fits on every matching host at once is always placed whole.
    fn arb_host() -> impl Strategy<Value = HostCapacity> {
        (1u64..16, 1u64..32, 0usize..3, any::<bool>(), 0u64..2000).prop_map(
            |(cpus, mem, zone, vm, reserved)| HostCapacity {
                id: "h".parse().unwrap(),
                labels: Labels::new([format!("zone={}", ["a", "b", "c"][zone])
                    .parse::<Label>()
                    .unwrap()])
                .unwrap(),
                backends: if vm { BOTH.to_vec() } else { SB.to_vec() },
                millicpus: cpus * 1000,
                memory_bytes: mem * GIB,
                reserved: Allocation {
                    millicpus: reserved.min(cpus * 1000),
                    memory_bytes: 0,
                    ports: BTreeSet::new(),
                },
            },
        )
    }

    fn arb_group() -> impl Strategy<Value = String> {
        (
            1u32..20,
            any::<bool>(),
            1u32..2000,
            1u64..4096,
            0usize..4,
            any::<bool>(),
            any::<bool>(),
            0u16..3,
        )
            .prop_map(|(count, per_host, mcpu, mem_mib, zone, spread, vm, port)| {
                let mut g = format!(
                    "image = \"x:1\"\nresources = {{ cpus = {}, memory = \"{mem_mib}MiB\" }}\n",
                    f64::from(mcpu) / 1000.0
                );
                g += &if per_host {
                    "per_host = true\n".to_owned()
                } else {
                    format!("count = {count}\n")
                };
                if zone < 3 {
                    g += &format!("constraints = {{ zone = \"{}\" }}\n", ["a", "b", "c"][zone]);
                }
                if spread {
                    g += "spread = \"zone\"\n";
                }
                if vm {
                    g += "isolation = \"microvm\"\n";
                }
                if port > 0 {
                    g += &format!("publish = [\"{}:80\"]\n", 8000 + port);
                }
                g
            })
    }

    /// A group small enough that all of them fit on any one host of [`roomy_host`].
    fn small_group() -> impl Strategy<Value = String> {
        (1u32..=10, 1u32..=200, 1u64..=256, any::<bool>()).prop_map(|(count, mcpu, mem_mib, spread)| {
            let mut g = format!(
                "image = \"x:1\"\ncount = {count}\nresources = {{ cpus = {}, memory = \"{mem_mib}MiB\" }}\n",
                f64::from(mcpu) / 1000.0
            );
            if spread {
                g += "spread = \"zone\"\n";
            }
            g
        })
    }

    fn roomy_host() -> impl Strategy<Value = HostCapacity> {
        (8u64..=16, 16u64..=32, 0usize..3).prop_map(|(cpus, mem, zone)| HostCapacity {
            id: "h".parse().unwrap(),
            labels: Labels::new([format!("zone={}", ["a", "b", "c"][zone])
                .parse::<Label>()
                .unwrap()])
            .unwrap(),
            backends: SB.to_vec(),
            millicpus: cpus * 1000,
            memory_bytes: mem * GIB,
            reserved: Allocation::default(),
        })
    }

    proptest! {
        /// When every host has room for everything, every instance is placed, and a group
        /// spread over zones has as many instances in each zone as in any other, give or take one.
        #[test]
        fn places_a_spec_that_fits_whole_and_balances_its_spread(
            mut hosts in prop::collection::vec(roomy_host(), 1..12),
            groups in prop::collection::vec(small_group(), 1..5),
        ) {
            for (i, h) in hosts.iter_mut().enumerate() {
                h.id = format!("h{i:02}").parse().unwrap();
            }
            let text: String = groups
                .iter()
                .enumerate()
                .map(|(i, g)| format!("[group.g{i}]\n{g}"))
                .collect();
            let fleet = spec(&text);
            let p = plan(&hosts, &fleet).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (name, g) in &fleet.group {
                prop_assert_eq!(p.instances(name), u64::from(g.count.unwrap_or(0)));
                if g.spread.is_none() {
                    continue;
                }
                let mut per_zone: BTreeMap<&str, u64> = hosts
                    .iter()
                    .filter_map(|h| h.labels.get("zone"))
                    .map(|z| (z, 0))
                    .collect();
                for h in &hosts {
                    let n = p.hosts.get(&h.id).and_then(|a| a.get(name)).map_or(0, |a| u64::from(a.size));
                    *per_zone.entry(h.labels.get("zone").unwrap_or("")).or_default() += n;
                }
                let (lo, hi) = (per_zone.values().min(), per_zone.values().max());
                prop_assert!(hi.zip(lo).is_some_and(|(hi, lo)| hi - lo <= 1), "group {} per zone: {:?}", name, per_zone);
            }
        }

        #[test]
        fn never_over_allocates_and_honours_counts_when_they_fit(
            mut hosts in prop::collection::vec(arb_host(), 1..12),
            groups in prop::collection::vec(arb_group(), 1..5),
        ) {
            for (i, h) in hosts.iter_mut().enumerate() {
                h.id = format!("h{i:02}").parse().unwrap();
            }
            let text: String = groups
                .iter()
                .enumerate()
                .map(|(i, g)| format!("[group.g{i}]\n{g}"))
                .collect();
            let fleet = spec(&text);
            let matches = |h: &HostCapacity, g: &GroupSpec| {
                h.backends.contains(&g.isolation)
                    && g.constraints.iter().all(|(k, v)| h.labels.get(k) == Some(v))
            };
            match plan(&hosts, &fleet) {
                Ok(p) => {
                    for h in &hosts {
                        let Some(on) = p.hosts.get(&h.id) else { continue };
                        let (mut cpu, mut mem) = (h.reserved.millicpus, h.reserved.memory_bytes);
                        let mut ports = BTreeSet::new();
                        for (name, a) in on {
                            prop_assert!(matches(h, &fleet.group[name]));
                            cpu += a.millicpus * u64::from(a.size);
                            mem += a.memory_bytes * u64::from(a.size);
                            for port in &a.ports {
                                prop_assert!(a.size == 1 && ports.insert(port.host_port()));
                            }
                        }
                        prop_assert!(cpu <= h.millicpus && mem <= h.memory_bytes, "{} over-allocated", h.id);
                    }
                    for (name, g) in &fleet.group {
                        let want = match g.count {
                            Some(n) => u64::from(n),
                            None => u64::try_from(hosts.iter().filter(|h| matches(h, g)).count()).unwrap(),
                        };
                        prop_assert_eq!(p.instances(name), want, "group {}", name);
                    }
                }
                Err(e) => {
                    // Only a spec that does not fit whole on every matching host may fail.
                    let fits_everywhere = fleet
                        .group
                        .values()
                        .all(|g| hosts.iter().any(|h| matches(h, g))) && hosts.iter().all(|h| {
                        let (mut cpu, mut mem) = (h.reserved.millicpus, 0u64);
                        let mut ports = BTreeSet::new();
                        let mut ok = true;
                        for g in fleet.group.values().filter(|g| matches(h, g)) {
                            let n = u64::from(g.count.unwrap_or(1));
                            cpu += g.resources.millicpus() * n;
                            mem += g.resources.memory.0 * n;
                            for p in &g.publish {
                                ok &= n == 1 && ports.insert(p.host_port());
                            }
                        }
                        ok && cpu <= h.millicpus && mem <= h.memory_bytes
                    });
                    prop_assert!(!fits_everywhere, "a feasible spec was refused: {}", e);
                }
            }
        }
    }

    /// Every placement of `p` passes its group's filters, no host is over-allocated and
    /// ports never clash on a host.
    fn check_fits(
        hosts: &[HostCapacity],
        fleet: &FleetSpec,
        p: &Plan,
    ) -> Result<(), TestCaseError> {
        for (id, on) in &p.hosts {
            let h = hosts.iter().find(|h| &h.id == id);
            prop_assert!(h.is_some(), "{} is not a host", id);
            let Some(h) = h else { continue };
            let (mut cpu, mut mem) = (h.reserved.millicpus, h.reserved.memory_bytes);
            let mut ports = BTreeSet::new();
            for (name, a) in on {
                let g = &fleet.group[name];
                prop_assert!(h.backends.contains(&g.isolation));
                prop_assert!(
                    g.constraints
                        .iter()
                        .all(|(k, v)| h.labels.get(k) == Some(v))
                );
                cpu += a.millicpus * u64::from(a.size);
                mem += a.memory_bytes * u64::from(a.size);
                for port in &a.ports {
                    prop_assert!(a.size == 1 && ports.insert(port.host_port()));
                }
            }
            prop_assert!(
                cpu <= h.millicpus && mem <= h.memory_bytes,
                "{} over-allocated",
                h.id
            );
        }
        Ok(())
    }

    fn fleet_of(groups: &[String]) -> FleetSpec {
        let text: String = groups
            .iter()
            .enumerate()
            .map(|(i, g)| format!("[group.g{i}]\n{g}"))
            .collect();
        spec(&text)
    }

    proptest! {
        /// Replanning with the previous plan as input gives the same plan, and after hosts
        /// leave and the spec changes every kept placement still passes the filters.
        #[test]
        fn replanning_is_idempotent_and_keeps_only_what_fits(
            mut hosts in prop::collection::vec(arb_host(), 1..12),
            groups in prop::collection::vec(arb_group(), 1..5),
            changed in prop::collection::vec(arb_group(), 1..5),
            stay in prop::collection::vec(any::<bool>(), 12),
        ) {
            for (i, h) in hosts.iter_mut().enumerate() {
                h.id = format!("h{i:02}").parse().unwrap();
            }
            let fleet = fleet_of(&groups);
            let Ok(first) = plan(&hosts, &fleet) else { return Ok(()) };
            prop_assert_eq!(&plan_from(&hosts, &fleet, &first).unwrap(), &first);
            let remaining: Vec<HostCapacity> = hosts
                .iter()
                .zip(&stay)
                .filter(|(_, s)| **s)
                .map(|(h, _)| h.clone())
                .collect();
            // The same spec on the hosts that stayed, and a changed spec on them.
            for fleet2 in [fleet.clone(), fleet_of(&changed)] {
                let Ok(second) = plan_from(&remaining, &fleet2, &first) else { continue };
                check_fits(&remaining, &fleet2, &second)?;
                for (name, g) in &fleet2.group {
                    if let Some(n) = g.count {
                        prop_assert_eq!(second.instances(name), u64::from(n));
                    }
                }
                prop_assert_eq!(&plan_from(&remaining, &fleet2, &second).unwrap(), &second);
            }
        }
    }
}
