//! Rollout times over simulated hosts: the real controller (`juice_fleet::Controller`, the
//! rollout decision, fenced writes) against a real etcd started here (killed by its PID),
//! with N simulated hosts, each a task that registers under a lease, polls its own
//! assignments every 200 ms and writes reports as a host would: a new revision reports
//! `rolling-out` until 500 ms (its instance starting) plus the assignment's health gate
//! have passed, then `ok`; on the one bad host, the bad revision reports
//! `crash-loop (3 failures)` after 500 ms. These are not the real host agent (that is the
//! "hollow hosts" work): they measure the controller's waves, gate and rollback.
//!
//! Usage: cargo run --release -p juice-fleet --example rollout_bench -- [HOSTS] [GATE_SECS]
//! (default 100 hosts, a 10 s gate; needs `etcd` on PATH; run under /tmp/juice-heavy.lock).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};
use juice_fleet::report::{Report, report_key};
use juice_fleet::rollout::{RolloutRecord, State, rollout_key};
use juice_fleet::spec::GroupName;
use juice_fleet::{Assignment, Backend, Controller, FleetSpec, HostId, HostRecord, Labels, Store};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// etcd, killed by its PID when dropped; its data directory goes after it.
struct Etcd(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn start_etcd() -> Result<(Etcd, String), Error> {
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("etcd could not be started (is etcd-server installed?): {e}"))?;
    Ok((Etcd(child, dir), url))
}

/// One simulated host: registers, then follows its assignment of `web` and reports.
async fn host(url: String, id: HostId, bad: Option<String>) -> Result<(), Error> {
    let mut c = Client::connect([url], None).await?;
    let lease = c.lease_grant(10, None).await?.id();
    let (mut keeper, _answers) = c.lease_keep_alive(lease).await?;
    let record = HostRecord {
        id: id.clone(),
        hostname: id.to_string(),
        cpus: 8,
        memory_bytes: 16 << 30,
        labels: Labels::default(),
        backends: vec![Backend::Sandbox],
        juice_version: "bench".into(),
        os: "bench".into(),
        kernel: "bench".into(),
        started_ms: now_ms(),
        binary_sha256: String::new(),
    };
    let under = Some(PutOptions::new().with_lease(lease));
    c.put(record.key(), record.encode(), under.clone()).await?;
    let group: GroupName = "web".parse()?;
    let key = format!("/juice/v1/assign/{id}/web");
    // The revision being applied and since when; what was reported last.
    let mut applying: Option<(String, Instant)> = None;
    let mut reported: Option<(String, String)> = None;
    let mut beat = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if beat.elapsed() >= Duration::from_secs(3) {
            keeper.keep_alive().await?;
            beat = Instant::now();
        }
        let answer = c.get(key.as_str(), None).await?;
        let Some(kv) = answer.kvs().first() else {
            continue;
        };
        let a: Assignment = serde_json::from_slice(kv.value())?;
        if applying.as_ref().is_none_or(|(r, _)| *r != a.revision) {
            applying = Some((a.revision.clone(), Instant::now()));
        }
        let Some((revision, since)) = &applying else {
            continue;
        };
        let gate = Duration::from_millis(a.health_gate_ms.unwrap_or(10_000));
        let started = since.elapsed() >= Duration::from_millis(500);
        let status = if bad.as_deref() == Some(revision.as_str()) && started {
            "crash-loop (3 failures)"
        } else if since.elapsed() >= Duration::from_millis(500) + gate {
            "ok"
        } else {
            "rolling-out"
        };
        if reported.as_ref() != Some(&(revision.clone(), status.to_owned())) {
            let r = Report {
                revision: revision.clone(),
                size: a.size,
                ready: if status.starts_with("crash") {
                    0
                } else {
                    a.size
                },
                status: status.into(),
                restarts: 0,
                error: None,
                written_ms: now_ms(),
            };
            c.put(
                report_key(&id, &group),
                serde_json::to_vec(&r)?,
                under.clone(),
            )
            .await?;
            reported = Some((revision.clone(), status.to_owned()));
        }
    }
}

fn spec(image: &str, gate: u64) -> Result<FleetSpec, Error> {
    let text = format!(
        "[group.web]\nimage = \"{image}\"\nper_host = true\n\
         resources = {{ cpus = 0.1, memory = \"64MiB\" }}\n\
         rollout = {{ waves = [\"1\", \"5%\", \"25%\", \"100%\"], health_gate = \"{gate}s\", deadline = \"5m\" }}\n"
    );
    Ok(FleetSpec::parse(&text, std::path::Path::new("bench.toml"))?)
}

/// Every host's report on web: (revision, status).
async fn reports(c: &mut Client) -> Result<BTreeMap<String, (String, String)>, Error> {
    let answer = c
        .get("/juice/v1/reports/", Some(GetOptions::new().with_prefix()))
        .await?;
    let mut out = BTreeMap::new();
    for kv in answer.kvs() {
        let r: Report = serde_json::from_slice(kv.value())?;
        out.insert(
            String::from_utf8_lossy(kv.key()).into_owned(),
            (r.revision, r.status),
        );
    }
    Ok(out)
}

async fn record(c: &mut Client) -> Result<Option<RolloutRecord>, Error> {
    let group: GroupName = "web".parse()?;
    let answer = c.get(rollout_key(&group), None).await?;
    Ok(match answer.kvs().first() {
        Some(kv) => Some(serde_json::from_slice(kv.value())?),
        None => None,
    })
}

/// Waits until every one of `n` hosts reports `ok` at `revision`.
async fn until_all_ok(c: &mut Client, n: usize, revision: &str) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        let r = reports(c).await?;
        if r.len() == n && r.values().all(|(rev, s)| rev == revision && s == "ok") {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(format!("not all {n} hosts ok at {revision} after 600 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(100), |s| s.parse())?;
    let gate: u64 = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let (_etcd, url) = start_etcd()?;
    let endpoints: juice_fleet::Endpoints = url.parse()?;
    // etcd takes a moment to answer.
    let store = {
        let start = Instant::now();
        loop {
            let store = Store::connect(&endpoints, Duration::from_secs(3)).await?;
            if store.hosts().await.is_ok() {
                break store;
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err("etcd did not answer within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let v1 = juice_fleet::plan::revision(&spec("hello-web:1", gate)?.group[&"web".parse()?]);
    let v2 = juice_fleet::plan::revision(&spec("hello-web:2", gate)?.group[&"web".parse()?]);
    let v3 = juice_fleet::plan::revision(&spec("hello-web:3", gate)?.group[&"web".parse()?]);
    // The bad host: the 10th in id order, so it is in wave 3 ("25%") of the third rollout.
    let ids: Vec<HostId> = (0..n)
        .map(|i| format!("hollow-{i:05}").parse())
        .collect::<Result<_, _>>()?;
    let bad_host = ids[9.min(n - 1)].clone();
    let hosts: Vec<_> = ids
        .iter()
        .map(|id| {
            let bad = (*id == bad_host).then(|| v3.clone());
            tokio::spawn(host(url.clone(), id.clone(), bad))
        })
        .collect();
    while store.hosts().await?.hosts.len() < n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let controller = Controller {
        endpoints: endpoints.clone(),
        host: "bench-controller".parse()?,
        ttl: Duration::from_secs(10),
    };
    let leading = Arc::new(tokio::sync::Notify::new());
    let told = leading.clone();
    let control = tokio::spawn(controller.run(move |e| {
        if matches!(e, juice_fleet::controller::Event::Elected { .. }) {
            told.notify_one();
        }
    }));
    leading.notified().await;
    let mut c = Client::connect([url.clone()], None).await?;

    println!("{n} simulated hosts, waves [\"1\", \"5%\", \"25%\", \"100%\"], health gate {gate} s");
    let t = Instant::now();
    store.apply_spec(&spec("hello-web:1", gate)?).await?;
    until_all_ok(&mut c, n, &v1).await?;
    println!(
        "new group placed at once, all ok (host gate included): {:>8.1} s",
        t.elapsed().as_secs_f64()
    );

    // A good revision, wave by wave.
    let t = Instant::now();
    store.apply_spec(&spec("hello-web:2", gate)?).await?;
    let mut last_wave = None;
    loop {
        if let Some(r) = record(&mut c).await? {
            if last_wave != Some(r.wave) && r.to.revision == v2 {
                println!(
                    "  wave {} started at {:>6.1} s ({} hosts touched)",
                    r.wave + 1,
                    t.elapsed().as_secs_f64(),
                    r.touched.len()
                );
                last_wave = Some(r.wave);
            }
            if r.to.revision == v2 && r.state == State::Done {
                break;
            }
            if r.state == State::Failed {
                return Err(format!("the good rollout failed: {:?}", r.reason).into());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_all_ok(&mut c, n, &v2).await?;
    println!(
        "rollout of {n} hosts, apply to all ok at the new revision: {:>8.1} s (goal <= 90 s with a 10 s gate)",
        t.elapsed().as_secs_f64()
    );

    // A bad revision: crash-loops on the bad host, in wave 3.
    store.apply_spec(&spec("hello-web:3", gate)?).await?;
    let key = report_key(&bad_host, &"web".parse()?);
    let (reported, touched) = loop {
        let answer = c.get(key.as_str(), None).await?;
        if let Some(kv) = answer.kvs().first() {
            let r: Report = serde_json::from_slice(kv.value())?;
            if r.revision == v3 && r.status.starts_with("crash-loop") {
                let rec = record(&mut c).await?.ok_or("no rollout record")?;
                break (Instant::now(), rec.touched.len());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    loop {
        let answer = c
            .get("/juice/v1/assign/", Some(GetOptions::new().with_prefix()))
            .await?;
        let back = answer.kvs().iter().all(|kv| {
            serde_json::from_slice::<Assignment>(kv.value()).is_ok_and(|a| a.revision == v2)
        });
        if back && answer.kvs().len() == n {
            break;
        }
        if reported.elapsed() > Duration::from_secs(120) {
            return Err("the touched hosts were not back on the old revision within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rec = record(&mut c).await?.ok_or("no rollout record")?;
    println!(
        "failure report to all {touched} touched hosts back on the old revision: {:>6.2} s (goal <= gate + 15 s); state {}, reason: {}",
        reported.elapsed().as_secs_f64(),
        rec.state,
        rec.reason.unwrap_or_default()
    );
    control.abort();
    for h in hosts {
        h.abort();
    }
    Ok(())
}
