//! The glue between a host's fleet work (`juice_fleet::host`) and its agent, in-process:
//! assignments become the agent's groups named `fleet-NAME`, and the agent's view of them
//! becomes the reports.

use std::collections::BTreeMap;
use std::sync::Arc;

use juice_agent::agent::{Agent, GroupView};
use juice_agent::site::{self, Site};
use juice_fleet::host::{LocalHost, fleet_name, local_name};
use juice_fleet::spec::GroupName;
use juice_fleet::{Assignment, Backend, LocalGroup};

/// The host's agent, as the fleet sees it.
pub struct AgentHost(pub Arc<Agent>);

/// The host's site of fleet groups for `assignments`: each assigned group as `fleet-NAME`
/// with the assignment's image, size, isolation and published ports, and the agent's
/// default update policy with the fleet's health gate (when the assignment carries one), and
/// the assignment's CPU share and memory in place of the image's.
pub fn site_of(assignments: &BTreeMap<GroupName, Assignment>) -> Result<Site, String> {
    let mut site = Site::default();
    for (group, a) in assignments {
        let name = site::GroupName::try_from(local_name(group))?;
        site.group.insert(
            name,
            site::GroupSpec {
                image: a.image.clone(),
                size: a.size,
                isolation: match a.isolation {
                    Backend::Sandbox => site::Isolation::Sandbox,
                    Backend::Microvm => site::Isolation::Microvm,
                },
                publish: a.ports.iter().map(|p| site::Publish(p.0)).collect(),
                links: Vec::new(),
                update: match a.health_gate_ms {
                    Some(ms) => site::UpdatePolicy {
                        health_gate: std::time::Duration::from_millis(ms),
                        ..site::UpdatePolicy::default()
                    },
                    None => site::UpdatePolicy::default(),
                },
                resources: Some(juice_image::manifest::Resources {
                    // Thousandths of a CPU, at least one (the spec checked it): in range.
                    cpus: juice_image::manifest::Cpus::try_from(a.millicpus as f64 / 1000.0).ok(),
                    memory: Some(juice_image::manifest::Size(a.memory_bytes)),
                    pids: None,
                }),
                critical: false,
            },
        );
    }
    Ok(site)
}

/// The fleet groups among the agent's, by fleet name.
pub fn local_groups(groups: &[GroupView]) -> BTreeMap<GroupName, LocalGroup> {
    groups
        .iter()
        .filter_map(|g| {
            let name = fleet_name(&g.name)?;
            Some((
                name,
                LocalGroup {
                    size: g.size,
                    ready: u32::try_from(g.ready).unwrap_or(u32::MAX),
                    status: g.status.to_string(),
                    restarts: g.restarts,
                },
            ))
        })
        .collect()
}

impl LocalHost for AgentHost {
    fn apply(
        &self,
        assignments: &BTreeMap<GroupName, Assignment>,
    ) -> juice_fleet::Result<BTreeMap<GroupName, String>> {
        let host = |reason: String| juice_fleet::Error::Host { reason };
        let site = site_of(assignments).map_err(host)?;
        let applied = self.0.apply_fleet(&site).map_err(|e| host(e.to_string()))?;
        Ok(applied
            .failed
            .into_iter()
            .filter_map(|(name, why)| Some((fleet_name(name.as_str())?, why)))
            .collect())
    }

    fn groups(&self) -> juice_fleet::Result<BTreeMap<GroupName, LocalGroup>> {
        let groups = self.0.groups().map_err(|e| juice_fleet::Error::Host {
            reason: e.to_string(),
        })?;
        Ok(local_groups(&groups))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(size: u32, ports: &[&str]) -> Assignment {
        Assignment {
            revision: "aaaaaaaaaaaa".into(),
            image: "hello-web:0.1.0".into(),
            isolation: Backend::Sandbox,
            size,
            millicpus: 100,
            memory_bytes: 64 << 20,
            ports: ports
                .iter()
                .map(|p| juice_fleet::spec::Publish(p.parse().unwrap()))
                .collect(),
            health_gate_ms: None,
        }
    }

    #[test]
    fn an_assignment_becomes_a_fleet_group_of_the_host_with_its_image_size_and_ports() {
        let assigned = [
            (
                "web".parse().unwrap(),
                assignment(2, &["127.0.0.1:8080:80"]),
            ),
            (
                "a-name-of-18-chars".parse().unwrap(),
                Assignment {
                    isolation: Backend::Microvm,
                    ..assignment(1, &[])
                },
            ),
        ]
        .into();
        let site = site_of(&assigned).unwrap();
        let names: Vec<&str> = site.group.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["fleet-a-name-of-18-chars", "fleet-web"]);
        let web = &site.group[&site::GroupName::try_from("fleet-web".to_owned()).unwrap()];
        assert_eq!((web.image.as_str(), web.size), ("hello-web:0.1.0", 2));
        assert_eq!(web.isolation, site::Isolation::Sandbox);
        assert_eq!(String::from(web.publish[0]), "127.0.0.1:8080:80");
        assert!(web.links.is_empty() && !web.critical);
        // What the planner counted is what the instances get.
        let r = web.resources.as_ref().unwrap();
        assert_eq!(r.cpus.map(|c| c.get()), Some(0.1));
        assert_eq!(r.memory.map(|m| m.0), Some(64 << 20));
        assert_eq!(r.pids, None);
        let long = site.group.values().next().unwrap();
        assert_eq!(long.isolation, site::Isolation::Microvm);
        // The same assignments always give the same site: applying again changes nothing.
        assert_eq!(site_of(&assigned).unwrap(), site);
        assert!(site_of(&BTreeMap::new()).unwrap().group.is_empty());
        // The fleet's health gate becomes the host's update policy's; without one, the default.
        assert_eq!(web.update, site::UpdatePolicy::default());
        let gated: BTreeMap<GroupName, Assignment> = [(
            "web".parse().unwrap(),
            Assignment {
                health_gate_ms: Some(2500),
                ..assignment(1, &[])
            },
        )]
        .into();
        let site = site_of(&gated).unwrap();
        let update = &site.group.values().next().unwrap().update;
        assert_eq!(update.health_gate, std::time::Duration::from_millis(2500));
        assert_eq!(update.max_unavailable, 1);
    }

    #[test]
    fn only_fleet_groups_are_reported_under_their_fleet_names() {
        let view = |name: &str, ready| {
            serde_json::from_value::<GroupView>(serde_json::json!({
                "name": name, "size": 2, "running": 2, "ready": ready, "revision": 1,
                "image": "hello-web:0.1.0", "rollout": {"state": "stable"}, "restarts": 4,
                "status": "ok",
            }))
            .unwrap()
        };
        let groups = [view("fleet-web", 1), view("web", 2), view("fleet-", 2)];
        let local = local_groups(&groups);
        assert_eq!(local.len(), 1, "{local:?}");
        let web = &local[&"web".parse::<GroupName>().unwrap()];
        assert_eq!(
            (web.size, web.ready, web.status.as_str(), web.restarts),
            (2, 1, "ok", 4)
        );
    }
}
