//! `juice fleet rollout status|pause|resume|undo GROUP`: a group's rollout as the leader
//! recorded it, with the hosts' reports; and the operator's requests, which the leader
//! (the only writer of assignments and rollouts) acts on and deletes.

use std::collections::BTreeMap;

use juice_fleet::rollout::{self, Action, RolloutRecord, State};
use juice_fleet::spec::GroupName;
use juice_fleet::{Endpoints, HostId, Report};

use crate::output::{self, Format};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// What `juice fleet rollout` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RolloutVerb {
    /// The rollout's state, wave, touched hosts, each host's report and the reason.
    Status,
    /// Stop after the current wave; the hosts that have the new revision keep it.
    Pause,
    /// Go on with a paused rollout; start a failed or undone one again from its first wave.
    Resume,
    /// Every host of the group back to the old revision at once.
    Undo,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One host of the group, as `rollout status` shows it.
#[derive(Debug, serde::Serialize)]
struct HostLine {
    host: HostId,
    hostname: Option<String>,
    touched: bool,
    assigned: Option<String>,
    report: Option<Report>,
}

#[derive(Debug, serde::Serialize)]
struct Status {
    group: GroupName,
    rollout: Option<RolloutRecord>,
    /// Hosts each wave reaches, over the hosts the group is placed on now.
    targets: Vec<usize>,
    /// How long every touched host has said it is healthy on the new revision (from the
    /// reports' times): the leader's gate holds at most this long.
    healthy_for_ms: Option<u64>,
    hosts: Vec<HostLine>,
}

pub fn run(verb: RolloutVerb, group: &str, endpoints: &Endpoints, format: Format) -> Result {
    let answer = crate::fleet::block_on(async {
        let store = juice_fleet::Store::connect(endpoints, crate::fleet::QUERY_TIMEOUT).await?;
        let spec = store.spec().await?.map(|s| s.spec).unwrap_or_default();
        let known: Vec<String> = spec.group.keys().map(ToString::to_string).collect();
        let Some(name) = spec.group.keys().find(|g| g.as_str() == group).cloned() else {
            return Ok(Err(if known.is_empty() {
                format!(
                    "no fleet group `{group}`: the fleet has no groups (see `juice fleet apply`)"
                )
            } else {
                format!(
                    "no fleet group `{group}`: the fleet's groups are {}",
                    known.join(", ")
                )
            }));
        };
        let record = store.rollouts().await?.remove(&name);
        if verb != RolloutVerb::Status {
            let (action, allowed) = match verb {
                RolloutVerb::Pause => (Action::Pause, &[State::Rolling][..]),
                RolloutVerb::Resume => (
                    Action::Resume,
                    &[State::Paused, State::Failed, State::Undone][..],
                ),
                _ => (
                    Action::Undo,
                    &[State::Rolling, State::Paused, State::Failed, State::Done][..],
                ),
            };
            let word = format!("{verb:?}").to_lowercase();
            let Some(r) = &record else {
                return Ok(Err(format!(
                    "group {name} has no rollout to {word}: no new revision was applied since it was placed"
                )));
            };
            if !allowed.contains(&r.state) {
                return Ok(Err(format!(
                    "group {name}'s rollout is {}: there is nothing to {word}",
                    r.state
                )));
            }
            store.request(&name, action, now_ms()).await?;
            return Ok(Ok(None));
        }
        let assigned = store.assignments().await?;
        let reports = store.reports().await?;
        let hosts = store.hosts().await?;
        let placed: Vec<HostId> = assigned
            .hosts
            .iter()
            .filter(|(_, g)| g.contains_key(&name))
            .map(|(h, _)| h.clone())
            .collect();
        let names: BTreeMap<&HostId, &str> = hosts
            .hosts
            .iter()
            .map(|h| (&h.id, h.hostname.as_str()))
            .collect();
        let report_of = |h: &HostId| reports.hosts.get(h).and_then(|g| g.get(&name)).cloned();
        let lines: Vec<HostLine> = placed
            .iter()
            .map(|h| HostLine {
                host: h.clone(),
                hostname: names.get(h).map(|n| (*n).to_owned()),
                touched: record.as_ref().is_some_and(|r| r.touched.contains(h)),
                assigned: assigned
                    .hosts
                    .get(h)
                    .and_then(|g| g.get(&name))
                    .map(|a| a.revision.clone()),
                report: report_of(h),
            })
            .collect();
        let healthy_for_ms = record.as_ref().filter(|r| r.active()).and_then(|r| {
            let mut latest = r.wave_started_ms;
            for h in &r.touched {
                let rep = report_of(h)?;
                if rep.revision != r.to.revision || rep.status != "ok" || rep.ready < rep.size {
                    return None;
                }
                latest = latest.max(rep.written_ms);
            }
            Some(now_ms().saturating_sub(latest))
        });
        let targets = rollout::targets(&spec.group[&name].rollout.waves, placed.len());
        Ok::<_, juice_fleet::Error>(Ok(Some(Status {
            group: name,
            rollout: record,
            targets,
            healthy_for_ms,
            hosts: lines,
        })))
    })???;
    let Some(status) = answer else {
        println!(
            "asked the fleet's controller to {} the rollout of {group}; it acts within a second (see `juice fleet rollout status {group}`)",
            format!("{verb:?}").to_lowercase()
        );
        return Ok(());
    };
    if format == Format::Json {
        return output::json(&status);
    }
    print_status(&status);
    Ok(())
}

fn ago(ms: u64) -> String {
    format!("{:.1}s ago", now_ms().saturating_sub(ms) as f64 / 1000.0)
}

fn print_status(s: &Status) {
    println!("Group:     {}", s.group);
    match &s.rollout {
        None => println!("Rollout:   none (no new revision since the group was placed)"),
        Some(r) => {
            let n = s.targets.len();
            let target = s.targets.get(r.wave).copied().unwrap_or(0);
            println!(
                "Rollout:   {} (wave {} of {n}, target {target} of {} hosts; started {})",
                r.state,
                r.wave + 1,
                s.hosts.len(),
                ago(r.started_ms)
            );
            println!("From:      {} ({})", r.from.revision, r.from.image);
            println!("To:        {} ({})", r.to.revision, r.to.image);
            let touched: Vec<String> = r.touched.iter().map(ToString::to_string).collect();
            println!(
                "Touched:   {}",
                if touched.is_empty() {
                    "-".into()
                } else {
                    touched.join(", ")
                }
            );
            if let Some(reason) = &r.reason {
                println!("Reason:    {reason}");
            }
            if r.active() {
                println!("Wave:      started {}", ago(r.wave_started_ms));
                match s.healthy_for_ms {
                    Some(ms) => println!(
                        "Healthy:   every touched host for {:.1}s",
                        ms as f64 / 1000.0
                    ),
                    None => println!("Healthy:   not every touched host yet"),
                }
            }
        }
    }
    println!();
    let mut t = output::table([
        "HOST", "HOSTNAME", "TOUCHED", "ASSIGNED", "REVISION", "READY", "STATUS",
    ]);
    for h in &s.hosts {
        let (revision, ready, status) = match &h.report {
            Some(r) => (
                r.revision.clone(),
                format!("{}/{}", r.ready, r.size),
                match &r.error {
                    Some(e) => format!("{}: {e}", r.status),
                    None => r.status.clone(),
                },
            ),
            None => ("-".into(), "-".into(), "not reporting".into()),
        };
        t.add_row([
            h.host.to_string(),
            h.hostname
                .clone()
                .unwrap_or_else(|| "(not registered)".into()),
            if h.touched { "yes" } else { "no" }.into(),
            h.assigned.clone().unwrap_or_else(|| "-".into()),
            revision,
            ready,
            status,
        ]);
    }
    println!("{t}");
}
