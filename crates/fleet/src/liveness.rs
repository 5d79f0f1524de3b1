//! A dead host's work moving: which hosts are missing, since when, which of their groups
//! move now, and the brake.
//!
//! A host is **missing** when it has assignments but no record (its lease ran out: it is
//! dead, or cut off from etcd). The leader notes the moment it first saw it missing, in
//! its own memory: a new leader starts every clock at its election, which can only delay
//! a move. Until the group's `reschedule_after` has passed, the missing host's
//! assignments of that group are **pinned**: they stay as they are, across spec changes
//! too ([`crate::plan::plan_pinned`]), so a host that is only slow or briefly cut off
//! comes back to the work it had. After the delay the group is planned without that host:
//! its assignment is deleted and its instances placed on live hosts, everything else
//! staying where it is.
//!
//! **The brake**: when more hosts are missing at once than the fleet's `max_missing`
//! allows (counted over the hosts that have assignments), nothing moves at all: every
//! missing host's assignments stay pinned. Many hosts vanishing together is more likely
//! the controller's side of a partition, or a rack losing power, than many independent
//! deaths, and moving all that work at once would overload the hosts that are left.
//! The leader records the brake in `controller/brake` ([`BRAKE`]) while it holds.
//!
//! [`Liveness::observe`] is the pure core: the hosts registered now, the stored
//! assignments, the spec and the time in, the verdict out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, PutOptions, SortOrder, SortTarget, TxnOp};
use serde::{Deserialize, Serialize};

use crate::controller::Leadership;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::record::HOSTS;
use crate::record::HostId;
use crate::spec::{FleetSpec, GroupName};
use crate::store::Store;

/// The brake's record, written by the leader (fenced, under its lease) while the brake
/// holds, and deleted when it releases.
pub const BRAKE: &str = "/juice/v1/controller/brake";

/// A host missing, and since when (the leader's wall clock, in ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingHost {
    pub host: HostId,
    pub since_ms: u64,
}

/// The brake as recorded: the missing hosts, the hosts with assignments they are counted
/// over, the setting, and the limit it gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrakeRecord {
    pub missing: Vec<MissingHost>,
    pub hosts: usize,
    pub max_missing: String,
    pub limit: usize,
}

/// What the leader should do now about missing hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Assignments on missing hosts that stay as they are.
    pub pinned: Plan,
    /// Groups of missing hosts whose delay has passed: planned without that host now.
    pub moving: BTreeMap<HostId, Vec<GroupName>>,
    /// Set while the brake holds (then nothing moves).
    pub brake: Option<BrakeRecord>,
    /// When the next pinned assignment's delay runs out, if one is pinned by its delay.
    pub next: Option<Instant>,
}

/// When the leader first saw a host missing.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    wall_ms: u64,
}

/// The leader's memory of missing hosts.
#[derive(Debug, Default)]
pub struct Liveness {
    missing: BTreeMap<HostId, Seen>,
}

impl Liveness {
    /// Hosts this leader sees missing now, and since when.
    pub fn missing(&self) -> impl Iterator<Item = (&HostId, Instant)> {
        self.missing.iter().map(|(h, s)| (h, s.at))
    }

    /// Notes which hosts are missing (`assigned` has them, `registered` does not) at `now`
    /// (`wall_ms` is the same moment on the wall clock, for the brake's record), forgets the
    /// ones that came back or have nothing assigned any more, and says what moves.
    pub fn observe(
        &mut self,
        registered: &BTreeSet<HostId>,
        assigned: &Plan,
        spec: &FleetSpec,
        now: Instant,
        wall_ms: u64,
    ) -> Verdict {
        let missing: BTreeSet<&HostId> = assigned
            .hosts
            .iter()
            .filter(|(h, groups)| !groups.is_empty() && !registered.contains(*h))
            .map(|(h, _)| h)
            .collect();
        self.missing.retain(|h, _| missing.contains(h));
        for h in &missing {
            self.missing
                .entry((*h).clone())
                .or_insert(Seen { at: now, wall_ms });
        }
        let with_work = assigned.hosts.values().filter(|g| !g.is_empty()).count();
        let limit = spec.fleet.max_missing.limit(with_work);
        let mut verdict = Verdict::default();
        if missing.len() > limit {
            for h in &missing {
                verdict
                    .pinned
                    .hosts
                    .insert((*h).clone(), assigned.hosts[*h].clone());
            }
            verdict.brake = Some(BrakeRecord {
                missing: self
                    .missing
                    .iter()
                    .map(|(h, s)| MissingHost {
                        host: h.clone(),
                        since_ms: s.wall_ms,
                    })
                    .collect(),
                hosts: with_work,
                max_missing: spec.fleet.max_missing.to_string(),
                limit,
            });
            return verdict;
        }
        for (h, seen) in &self.missing {
            let gone_for = now.saturating_duration_since(seen.at);
            for (g, a) in &assigned.hosts[h] {
                // A group no longer in the spec goes from every host anyway.
                let Some(spec) = spec.group.get(g) else {
                    continue;
                };
                let delay = spec.reschedule_after();
                if gone_for >= delay {
                    verdict.moving.entry(h.clone()).or_default().push(g.clone());
                } else {
                    verdict
                        .pinned
                        .hosts
                        .entry(h.clone())
                        .or_default()
                        .insert(g.clone(), a.clone());
                    let due = seen.at + delay;
                    verdict.next = Some(verdict.next.map_or(due, |n| n.min(due)));
                }
            }
        }
        verdict
    }
}

/// What the leader last acted on, so a round that has nothing new to act on reads two
/// small things from etcd and writes nothing.
#[derive(Debug, Default)]
pub struct LeaderState {
    /// The spec revision last placed.
    pub placed: Option<i64>,
    /// The hosts' [`Store::hosts_fingerprint`] when last placed.
    hosts: Option<(i64, i64)>,
    /// When a pinned assignment's delay runs out next.
    next: Option<Instant>,
    /// The brake as last written (`None`: no record).
    pub brake: Option<BrakeRecord>,
    pub liveness: Liveness,
    /// Since when (ms) each rolling group's current wave has been healthy: kept in memory,
    /// so a new leader starts the gate again, which only delays.
    pub healthy: BTreeMap<GroupName, u64>,
}

impl LeaderState {
    /// Whether the leader must plan again: the spec changed, the registered hosts changed,
    /// or a missing host's delay ran out.
    pub fn due(&self, spec: i64, hosts: (i64, i64), now: Instant) -> bool {
        self.placed != Some(spec)
            || self.hosts != Some(hosts)
            || self.next.is_some_and(|n| now >= n)
    }

    /// Notes a round acted on `spec` and `hosts`, and when the next delay runs out.
    pub fn done(&mut self, spec: i64, hosts: (i64, i64), next: Option<Instant>) {
        self.placed = Some(spec);
        self.hosts = Some(hosts);
        self.next = next;
    }
}

impl Store {
    /// A cheap fingerprint of the registered hosts: how many records there are and the
    /// largest revision one was written at. A record that comes, goes or is written again
    /// changes it. One small read, whatever the number of hosts.
    pub async fn hosts_fingerprint(&self) -> Result<(i64, i64)> {
        let mut client = self.client();
        let options = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_sort(SortTarget::Mod, SortOrder::Descend)
            .with_limit(1);
        let answer = self
            .call("the list of hosts", client.get(HOSTS, Some(options)))
            .await?;
        let newest = answer
            .kvs()
            .first()
            .map_or(0, etcd_client::KeyValue::mod_revision);
        Ok((answer.count(), newest))
    }

    /// Writes the brake's record (or deletes it, with `None`), fenced on `leadership` and
    /// under its lease, so that it goes with the leader.
    pub async fn write_brake(
        &self,
        leadership: Leadership,
        brake: Option<&BrakeRecord>,
    ) -> Result<()> {
        let op = match brake {
            Some(b) => {
                // Strings and numbers: this cannot fail.
                let value = serde_json::to_vec(b).unwrap_or_default();
                TxnOp::put(
                    BRAKE,
                    value,
                    Some(PutOptions::new().with_lease(leadership.lease)),
                )
            }
            None => TxnOp::delete(BRAKE, None),
        };
        self.fenced(leadership, vec![op]).await
    }

    /// The brake's record, if the brake holds.
    pub async fn brake(&self) -> Result<Option<BrakeRecord>> {
        let mut client = self.client();
        let answer = self
            .call("the brake's record", client.get(BRAKE, None))
            .await?;
        let Some(kv) = answer.kvs().first() else {
            return Ok(None);
        };
        serde_json::from_slice(kv.value())
            .map(Some)
            .map_err(|e| Error::Record {
                key: BRAKE.into(),
                reason: e.to_string(),
            })
    }
}

/// The delay a verdict's move waited for, for the log: how long `host` has been missing.
pub fn missing_for(liveness: &Liveness, host: &HostId, now: Instant) -> Duration {
    liveness
        .missing()
        .find(|(h, _)| *h == host)
        .map_or(Duration::ZERO, |(_, at)| now.saturating_duration_since(at))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;
    use crate::plan::{Assignment, HostCapacity, plan_pinned};
    use crate::record::{Backend, Labels};
    use crate::spec::MaxMissing;

    fn spec(text: &str) -> FleetSpec {
        FleetSpec::parse(text, Path::new("fleet.toml")).unwrap()
    }

    fn id(s: &str) -> HostId {
        s.parse().unwrap()
    }

    fn g(s: &str) -> GroupName {
        s.parse().unwrap()
    }

    fn a(size: u32) -> Assignment {
        Assignment {
            revision: "r".into(),
            image: "x:1".into(),
            isolation: Backend::Sandbox,
            size,
            millicpus: 100,
            memory_bytes: 1 << 20,
            ports: Vec::new(),
            health_gate_ms: None,
        }
    }

    /// Assignments from (host, group, size).
    fn assigned(rows: &[(&str, &str, u32)]) -> Plan {
        let mut p = Plan::default();
        for (h, name, size) in rows {
            p.hosts.entry(id(h)).or_default().insert(g(name), a(*size));
        }
        p
    }

    fn registered(ids: &[&str]) -> BTreeSet<HostId> {
        ids.iter().map(|h| id(h)).collect()
    }

    const TWO_DELAYS: &str = r#"
[group.web]
image = "x:1"
count = 4
reschedule_after = "10s"

[group.db]
image = "x:1"
count = 2
reschedule_after = "60s"
"#;

    #[test]
    fn a_missing_hosts_groups_stay_pinned_until_their_own_delay_then_move() {
        let fleet = spec(TWO_DELAYS);
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let had = assigned(&[
            ("a1", "web", 2),
            ("a1", "db", 1),
            ("b1", "web", 2),
            ("b1", "db", 1),
        ]);
        let mut l = Liveness::default();
        // Everyone there: nothing pinned, nothing moves, nothing to wait for.
        let v = l.observe(&registered(&["a1", "b1"]), &had, &fleet, t0, 1000);
        assert_eq!(v, Verdict::default());
        // a1 goes at 5 s: both its groups are pinned, the next deadline is web's.
        let v = l.observe(&registered(&["b1"]), &had, &fleet, s(5), 6000);
        assert_eq!(v.pinned.hosts[&id("a1")].len(), 2, "{v:?}");
        assert!(v.moving.is_empty() && v.brake.is_none(), "{v:?}");
        assert_eq!(v.next, Some(s(15)));
        // Just before web's delay: still pinned.
        let v = l.observe(&registered(&["b1"]), &had, &fleet, s(14), 0);
        assert!(v.moving.is_empty(), "{v:?}");
        // At web's delay web moves, db stays pinned until its own.
        let v = l.observe(&registered(&["b1"]), &had, &fleet, s(15), 0);
        assert_eq!(v.moving[&id("a1")], vec![g("web")]);
        assert_eq!(
            v.pinned.hosts[&id("a1")].keys().collect::<Vec<_>>(),
            vec![&g("db")]
        );
        assert_eq!(v.next, Some(s(65)));
        // web was moved: only db is left on a1, and moves at 65 s.
        let had = assigned(&[("a1", "db", 1), ("b1", "web", 4), ("b1", "db", 1)]);
        let v = l.observe(&registered(&["b1"]), &had, &fleet, s(65), 0);
        assert_eq!(v.moving[&id("a1")], vec![g("db")]);
        assert!(v.pinned.hosts.is_empty() && v.next.is_none(), "{v:?}");
        // Its assignments gone, a1 is forgotten.
        let had = assigned(&[("b1", "web", 4), ("b1", "db", 2)]);
        let v = l.observe(&registered(&["b1"]), &had, &fleet, s(66), 0);
        assert_eq!(v, Verdict::default());
        assert_eq!(l.missing().count(), 0);
    }

    #[test]
    fn a_host_that_comes_back_is_forgotten_and_its_clock_starts_again_next_time() {
        let fleet = spec(TWO_DELAYS);
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let had = assigned(&[("a1", "web", 2), ("b1", "web", 2)]);
        let mut l = Liveness::default();
        l.observe(&registered(&["b1"]), &had, &fleet, t0, 0);
        // Back at 8 s, gone again at 9 s: the delay counts from 9 s.
        let v = l.observe(&registered(&["a1", "b1"]), &had, &fleet, s(8), 0);
        assert_eq!(v, Verdict::default());
        let v = l.observe(&registered(&["b1"]), &had, &fleet, s(9), 0);
        assert_eq!(v.next, Some(s(19)));
        let v = l.observe(&registered(&["b1"]), &had, &fleet, s(12), 0);
        assert!(v.moving.is_empty(), "{v:?}");
    }

    #[test]
    fn a_group_no_longer_in_the_spec_is_neither_pinned_nor_moved() {
        let fleet = spec("[group.web]\nimage = \"x:1\"\ncount = 1\nreschedule_after = \"0s\"\n");
        let had = assigned(&[("a1", "old", 1), ("a1", "web", 1), ("b1", "web", 1)]);
        let mut l = Liveness::default();
        let v = l.observe(&registered(&["b1"]), &had, &fleet, Instant::now(), 0);
        // A delay of 0: the group moves as soon as the host is seen missing.
        assert_eq!(v.moving[&id("a1")], vec![g("web")]);
        assert!(v.pinned.hosts.is_empty(), "{v:?}");
    }

    #[test]
    fn the_brake_limit_is_a_count_or_a_share_of_at_least_one_host() {
        let cases: &[(MaxMissing, usize, usize)] = &[
            (MaxMissing::Percent(10), 0, 1),
            (MaxMissing::Percent(10), 2, 1),
            (MaxMissing::Percent(10), 19, 1),
            (MaxMissing::Percent(10), 20, 2),
            (MaxMissing::Percent(10), 10_000, 1000),
            (MaxMissing::Percent(0), 50, 1),
            (MaxMissing::Percent(100), 7, 7),
            (MaxMissing::Hosts(0), 50, 0),
            (MaxMissing::Hosts(3), 2, 3),
        ];
        for (m, hosts, want) in cases {
            assert_eq!(m.limit(*hosts), *want, "{m} of {hosts}");
        }
    }

    #[test]
    fn the_brake_pins_every_missing_host_and_releases_when_enough_come_back() {
        // 10 hosts with work, 10% of them: one may be missing.
        let fleet = spec("[group.web]\nimage = \"x:1\"\ncount = 10\nreschedule_after = \"1s\"\n");
        let names: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
        let rows: Vec<(&str, &str, u32)> = names.iter().map(|h| (h.as_str(), "web", 1)).collect();
        let had = assigned(&rows);
        let up = |n: usize| -> BTreeSet<HostId> { names[n..].iter().map(|h| id(h)).collect() };
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut l = Liveness::default();
        // Two missing, past their delay: the brake holds, both pinned, nothing moves.
        l.observe(&up(2), &had, &fleet, t0, 1234);
        let v = l.observe(&up(2), &had, &fleet, s(30), 0);
        assert!(v.moving.is_empty(), "{v:?}");
        assert_eq!(v.pinned.hosts.len(), 2);
        let brake = v.brake.unwrap();
        assert_eq!(
            (brake.hosts, brake.limit, brake.max_missing.as_str()),
            (10, 1, "10%")
        );
        assert_eq!(
            brake.missing,
            vec![
                MissingHost {
                    host: id("h0"),
                    since_ms: 1234
                },
                MissingHost {
                    host: id("h1"),
                    since_ms: 1234
                },
            ]
        );
        // One comes back: the brake releases, and the other, long past its delay, moves.
        let v = l.observe(&up(1), &had, &fleet, s(31), 0);
        assert!(v.brake.is_none());
        assert_eq!(v.moving.keys().collect::<Vec<_>>(), vec![&id("h0")]);
        // max_missing = 0: any missing host stops every move.
        let strict = spec(
            "[fleet]\nmax_missing = 0\n[group.web]\nimage = \"x:1\"\ncount = 10\nreschedule_after = \"1s\"\n",
        );
        let v = l.observe(&up(1), &had, &strict, s(40), 0);
        assert!(v.brake.is_some() && v.moving.is_empty(), "{v:?}");
    }

    #[test]
    fn the_leader_plans_again_when_the_spec_or_the_hosts_change_or_a_delay_runs_out() {
        let t0 = Instant::now();
        let mut s = LeaderState::default();
        assert!(s.due(5, (2, 7), t0), "never placed");
        s.done(5, (2, 7), Some(t0 + Duration::from_secs(3)));
        assert!(!s.due(5, (2, 7), t0));
        assert!(s.due(6, (2, 7), t0), "a new spec");
        assert!(s.due(5, (1, 7), t0), "a host gone");
        assert!(s.due(5, (2, 9), t0), "a host written again");
        assert!(
            s.due(5, (2, 7), t0 + Duration::from_secs(3)),
            "a delay ran out"
        );
    }

    fn roomy(name: &str) -> HostCapacity {
        HostCapacity {
            id: id(name),
            labels: Labels::default(),
            backends: vec![Backend::Sandbox],
            millicpus: 64_000,
            memory_bytes: 64 << 30,
            reserved: crate::plan::Allocation::default(),
        }
    }

    proptest! {
        /// Random fleets with random hosts missing for random times: the brake holds
        /// exactly when more are missing than the limit, and then nothing moves; otherwise
        /// every group of a missing host is pinned or moving, moving exactly when its delay
        /// has passed. Planned with the verdict, pinned instances stay where they are,
        /// nothing is left on a host whose group moved, and each group has its count.
        #[test]
        fn pinned_or_moving_by_delay_unless_the_brake_holds(
            sizes in prop::collection::vec((1u32..4, 1u32..4), 1..12),
            gone in prop::collection::vec(0u64..40, 12),
            delays in (0u64..30, 0u64..30),
            max in prop_oneof![(0u32..4).prop_map(MaxMissing::Hosts), (0u8..=100).prop_map(MaxMissing::Percent)],
            seen_at in 0u64..20,
        ) {
            let fleet = spec(&format!(
                "[fleet]\nmax_missing = \"{max}\"\n\
                 [group.web]\nimage = \"x:1\"\ncount = {}\nreschedule_after = \"{}s\"\n\
                 [group.db]\nimage = \"x:1\"\ncount = {}\nreschedule_after = \"{}s\"\n",
                sizes.iter().map(|s| s.0).sum::<u32>(),
                delays.0,
                sizes.iter().map(|s| s.1).sum::<u32>(),
                delays.1,
            ));
            let names: Vec<String> = (0..sizes.len()).map(|i| format!("h{i:02}")).collect();
            let mut had = Plan::default();
            for (h, (w, d)) in names.iter().zip(&sizes) {
                let on = had.hosts.entry(id(h)).or_default();
                on.insert(g("web"), a(*w));
                on.insert(g("db"), a(*d));
            }
            // Host i is missing when gone[i] >= 20, seen so at `seen_at`; now is 40 s.
            let missing: BTreeSet<HostId> = names
                .iter()
                .zip(&gone)
                .filter(|(_, g)| **g >= 20)
                .map(|(h, _)| id(h))
                .collect();
            let live: Vec<HostCapacity> = names
                .iter()
                .filter(|h| !missing.contains(&id(h)))
                .map(|h| roomy(h))
                .collect();
            let up: BTreeSet<HostId> = live.iter().map(|h| h.id.clone()).collect();
            let t0 = Instant::now();
            let mut l = Liveness::default();
            l.observe(&up, &had, &fleet, t0 + Duration::from_secs(seen_at), 0);
            let now = t0 + Duration::from_secs(40);
            let v = l.observe(&up, &had, &fleet, now, 0);
            let limit = max.limit(names.len());
            prop_assert_eq!(v.brake.is_some(), missing.len() > limit);
            if v.brake.is_some() {
                prop_assert!(v.moving.is_empty());
                let all: BTreeSet<&HostId> = v.pinned.hosts.keys().collect();
                prop_assert_eq!(all, missing.iter().collect::<BTreeSet<_>>());
            } else {
                for h in &missing {
                    for (name, delay) in [("web", delays.0), ("db", delays.1)] {
                        let moves = v.moving.get(h).is_some_and(|gs| gs.contains(&g(name)));
                        let pinned = v.pinned.hosts.get(h).is_some_and(|gs| gs.contains_key(&g(name)));
                        prop_assert!(moves != pinned, "{} {} both or neither", h, name);
                        prop_assert_eq!(moves, 40 - seen_at >= delay, "{} {}", h, name);
                    }
                }
            }
            if live.is_empty() {
                return Ok(());
            }
            let p = plan_pinned(&live, &fleet, &had, &v.pinned)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (name, group) in &fleet.group {
                prop_assert_eq!(p.instances(name), u64::from(group.count.unwrap_or(0)));
            }
            for (h, gs) in &v.pinned.hosts {
                for (name, was) in gs {
                    prop_assert_eq!(p.hosts[h][name].size, was.size);
                }
            }
            for (h, gs) in &v.moving {
                for name in gs {
                    prop_assert!(p.hosts.get(h).is_none_or(|on| !on.contains_key(name)));
                }
            }
            // Live hosts keep at least what they had: only the missing hosts' work moved.
            for h in &live {
                for (name, was) in &had.hosts[&h.id] {
                    prop_assert!(p.hosts[&h.id][name].size >= was.size);
                }
            }
        }
    }
}
