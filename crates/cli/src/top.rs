//! `juice top`: live resource use per instance and per group, from the daemon's
//! `GET /v1/stats` (so it works remotely too).
//!
//! The daemon reports CPU as a counter and keeps no earlier reading; the rate
//! is taken here, from two samples: `-o json` takes them [`JSON_INTERVAL`]
//! apart and prints one result; the table redraws every second from the
//! previous sample. Two `juice top`s at once each get their own rate.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use juice_agent::agent::{GroupStats, InstanceStats, Stats};
use juice_agent::client::Client;
use juice_agent::site::Isolation;
use serde::Serialize;

use crate::output::{self, Format};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How long `-o json` measures CPU over.
pub const JSON_INTERVAL: Duration = Duration::from_millis(500);
/// How often the table is redrawn.
const REFRESH: Duration = Duration::from_secs(1);

/// What `juice top -o json` prints: one sample, with CPU as a rate over `interval_ms`.
#[derive(Debug, Serialize)]
pub struct Top {
    /// The time CPU was measured over, between the daemon's two readings.
    pub interval_ms: u64,
    pub taken_unix_ms: u64,
    pub instances: Vec<InstanceTop>,
    pub groups: Vec<GroupTop>,
}

#[derive(Debug, Serialize)]
pub struct InstanceTop {
    #[serde(flatten)]
    pub stats: InstanceStats,
    /// CPU cores used on average over the interval (1.0 is one core busy);
    /// null if the instance was not there at both readings.
    pub cpu_cores: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct GroupTop {
    #[serde(flatten)]
    pub stats: GroupStats,
    /// The sum of its instances' `cpu_cores`.
    pub cpu_cores: f64,
}

/// The rates between `before` and `after`, two samples of the same daemon.
pub fn between(before: &Stats, after: Stats) -> Top {
    let interval_ms = after.taken_unix_ms.saturating_sub(before.taken_unix_ms);
    let earlier: BTreeMap<&str, &InstanceStats> = before
        .instances
        .iter()
        .map(|i| (i.name.as_str(), i))
        .collect();
    let instances: Vec<InstanceTop> = after
        .instances
        .into_iter()
        .map(|i| {
            let was = earlier.get(i.name.as_str()).and_then(|e| e.cpu_ns);
            let cpu_cores = match (was, i.cpu_ns) {
                // A counter that went back is another instance of the same name.
                (Some(a), Some(b)) if b >= a && interval_ms > 0 => {
                    Some((b - a) as f64 / (interval_ms as f64 * 1e6))
                }
                _ => None,
            };
            InstanceTop {
                stats: i,
                cpu_cores,
            }
        })
        .collect();
    let groups = after
        .groups
        .into_iter()
        .map(|g| {
            let cpu_cores = instances
                .iter()
                .filter(|i| i.stats.group == g.name)
                .filter_map(|i| i.cpu_cores)
                .sum();
            GroupTop {
                stats: g,
                cpu_cores,
            }
        })
        .collect();
    Top {
        interval_ms,
        taken_unix_ms: after.taken_unix_ms,
        instances,
        groups,
    }
}

pub fn top(format: Format) -> Result {
    let client = Client::new(&crate::juice_home())?;
    let mut before = client.stats()?;
    std::thread::sleep(JSON_INTERVAL);
    if format == Format::Json {
        return output::json(&between(&before, client.stats()?));
    }
    let live = std::io::stdout().is_terminal();
    loop {
        let after = client.stats()?;
        let text = table(&between(&before, after.clone()));
        before = after;
        let mut out = std::io::stdout().lock();
        if live {
            // Home and clear: plain ANSI, as `watch` does.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        writeln!(out, "{text}")?;
        out.flush()?;
        if !live {
            return Ok(());
        }
        drop(out);
        std::thread::sleep(REFRESH);
    }
}

fn cores(c: Option<f64>) -> String {
    c.map_or_else(|| "-".into(), |c| format!("{c:.2}"))
}

fn bytes(b: Option<u64>) -> String {
    b.map_or_else(|| "-".into(), output::size)
}

fn of(v: Option<u64>, limit: Option<u64>, show: impl Fn(Option<u64>) -> String) -> String {
    match limit {
        Some(_) => format!("{} / {}", show(v), show(limit)),
        None => show(v),
    }
}

fn count(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The two tables: instances, then groups. Network columns are the instance's
/// view (RX is what it received).
pub fn table(top: &Top) -> String {
    let mut t = output::table([
        "INSTANCE", "GROUP", "REVISION", "BACKEND", "CPU", "MEMORY", "PIDS", "NET RX", "NET TX",
        "RESTARTS",
    ]);
    for i in &top.instances {
        let s = &i.stats;
        t.add_row([
            s.name.clone(),
            s.group.clone(),
            s.revision.to_string(),
            match s.backend {
                Isolation::Sandbox => "sandbox".into(),
                Isolation::Microvm => "microvm".into(),
            },
            cores(i.cpu_cores),
            of(s.memory_bytes, s.memory_limit_bytes, bytes),
            of(s.pids, s.pids_limit, count),
            bytes(s.net_rx_bytes),
            bytes(s.net_tx_bytes),
            s.restarts.to_string(),
        ]);
    }
    let mut g = output::table([
        "GROUP",
        "INSTANCES",
        "CPU",
        "MEMORY",
        "PIDS",
        "NET RX",
        "NET TX",
        "RESTARTS",
    ]);
    for group in &top.groups {
        let s = &group.stats;
        g.add_row([
            s.name.clone(),
            s.instances.to_string(),
            cores(Some(group.cpu_cores)),
            output::size(s.memory_bytes),
            s.pids.to_string(),
            output::size(s.net_rx_bytes),
            output::size(s.net_tx_bytes),
            s.restarts.to_string(),
        ]);
    }
    format!(
        "{t}\n\n{g}\n\nCPU in cores over {} ms; network from each instance's side.",
        top.interval_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, cpu_ns: u64) -> Stats {
        let usage = juice_runtime::Usage {
            cpu_ns: Some(cpu_ns),
            memory_bytes: Some(64 << 20),
            ..Default::default()
        };
        let i = InstanceStats::new(
            "web-1".into(),
            "web".into(),
            1,
            Isolation::Sandbox,
            usage,
            0,
        );
        Stats::new(at_ms, vec![i], &BTreeMap::from([("web".to_owned(), 0)]))
    }

    #[test]
    fn cpu_is_the_counter_over_the_interval() {
        let top = between(&sample(1_000, 0), sample(1_500, 250_000_000));
        assert_eq!(top.interval_ms, 500);
        assert_eq!(top.instances[0].cpu_cores, Some(0.5));
        assert_eq!(top.groups[0].cpu_cores, 0.5);
        // Another instance of the same name since: no rate rather than a wrong one.
        let top = between(&sample(1_000, 900), sample(1_500, 100));
        assert_eq!(top.instances[0].cpu_cores, None);
        let json = serde_json::to_value(&top).unwrap();
        assert_eq!(json["instances"][0]["memory_bytes"], 64 << 20);
        assert_eq!(json["instances"][0]["backend"], "sandbox");
        assert!(table(&top).contains("64.0 MiB"));
    }
}
