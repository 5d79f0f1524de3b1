//! The fleet against a real etcd (Debian's etcd-server, started here on loopback and
//! killed by PID): a daemon started with `--fleet` registers its capabilities under a
//! lease, disappears by itself when it dies, and registers again when etcd comes back.

mod common;

use std::time::{Duration, Instant};

use common::{ChildGuard, Etcd, InstanceSweeper, Juice};

/// A short lease, so death is seen in seconds (the default is 10 s).
const LEASE_SECS: u64 = 3;

/// `juice fleet get hosts -o json` against `etcd`: the hosts as JSON values.
fn hosts(j: &Juice, etcd: &Etcd) -> Vec<serde_json::Value> {
    let out = j.ok(&[
        "fleet",
        "get",
        "hosts",
        "-o",
        "json",
        "--endpoints",
        &etcd.endpoint(),
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Polls `juice fleet get hosts` until `done` says yes, for at most `limit`; returns
/// how long it took and the last answer.
fn until(
    j: &Juice,
    etcd: &Etcd,
    limit: Duration,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> (Duration, Vec<serde_json::Value>) {
    let start = Instant::now();
    loop {
        let now = hosts(j, etcd);
        if done(&now) {
            return (start.elapsed(), now);
        }
        assert!(
            start.elapsed() < limit,
            "not so after {limit:?}; the fleet holds {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A daemon for `j` in the fleet of `etcd`, with `labels`.
fn fleet_daemon(j: &Juice, etcd: &Etcd, labels: &[&str]) -> ChildGuard {
    let (endpoint, lease) = (etcd.endpoint(), LEASE_SECS.to_string());
    let mut args = vec!["--fleet", &endpoint, "--fleet-lease", &lease];
    for l in labels {
        args.extend(["--label", l]);
    }
    common::daemon_with(j, &args, &[], &j.home.path().join("daemon.log"))
}

fn host_id(j: &Juice) -> String {
    std::fs::read_to_string(j.home.path().join("host-id"))
        .expect("the daemon wrote $JUICE_HOME/host-id")
        .trim()
        .to_owned()
}

#[test]
fn a_daemon_started_with_fleet_appears_in_fleet_get_hosts_with_its_capabilities_and_labels() {
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let j = Juice::new();
    let _sweeper = InstanceSweeper(j.home.path().to_owned());
    let _daemon = fleet_daemon(&j, &etcd, &["zone=eu-1", "juice.dev/rack=r7"]);

    let (took, now) = until(&j, &etcd, Duration::from_secs(5), |h| h.len() == 1);
    eprintln!("registered {took:?} after the daemon's socket answered");
    let h = &now[0];
    assert_eq!(h["id"], host_id(&j));
    assert_eq!(
        h["labels"],
        serde_json::json!({"zone": "eu-1", "juice.dev/rack": "r7"})
    );
    assert!(h["cpus"].as_u64().is_some_and(|n| n >= 1), "{h}");
    assert!(
        h["memory_bytes"].as_u64().is_some_and(|n| n > 1 << 20),
        "{h}"
    );
    let backends = h["backends"].as_array().expect("a list of backends");
    assert!(backends.contains(&"sandbox".into()), "{h}");
    assert_eq!(h["juice_version"], env!("CARGO_PKG_VERSION"));
    assert!(h["os"].as_str().is_some_and(|s| !s.is_empty()), "{h}");
    assert!(h["kernel"].as_str().is_some_and(|s| !s.is_empty()), "{h}");

    // The table, through JUICE_FLEET instead of --endpoints.
    let out = j
        .cmd()
        .args(["fleet", "get", "hosts"])
        .env("JUICE_FLEET", etcd.endpoint())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(table.starts_with("HOST"), "{table}");
    assert!(
        table.contains(&host_id(&j)) && table.contains("juice.dev/rack=r7,zone=eu-1"),
        "{table}"
    );
}

#[test]
fn bad_labels_and_an_unreachable_etcd_get_one_sentence_each() {
    let j = Juice::new();
    let e = j.fails(&[
        "daemon",
        "--fleet",
        "http://127.0.0.1:9",
        "--label",
        "zone=eu west",
    ]);
    assert!(
        e.contains("label `zone=eu west`: the value may hold only"),
        "{e}"
    );
    let e = j.fails(&[
        "daemon",
        "--fleet",
        "http://127.0.0.1:9",
        "--label",
        "zone=a",
        "--label",
        "zone=b",
    ]);
    assert!(e.contains("label `zone=b`: its key is given twice"), "{e}");
    let e = j.fails(&["daemon", "--fleet", "127.0.0.1:2379"]);
    assert!(
        e.contains("fleet endpoint `127.0.0.1:2379`: it must start with http://"),
        "{e}"
    );

    // Nothing listens on a port just freed: refused at once, in one sentence.
    let port = common::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let e = j.fails(&["fleet", "get", "hosts", "--endpoints", &endpoint]);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with(&format!("juice: etcd at {endpoint} is unreachable (")),
        "{e}"
    );
    let e = j.fails(&["fleet", "get", "hosts"]);
    assert!(
        e.contains("give --endpoints http://HOST:2379 or set JUICE_FLEET"),
        "{e}"
    );
}

#[test]
fn a_sigkilled_daemon_disappears_within_its_lease_and_comes_back_with_the_same_id() {
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let j = Juice::new();
    let _sweeper = InstanceSweeper(j.home.path().to_owned());
    let mut daemon = fleet_daemon(&j, &etcd, &[]);
    until(&j, &etcd, Duration::from_secs(5), |h| h.len() == 1);
    let id = host_id(&j);

    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let limit = Duration::from_secs(LEASE_SECS + 2);
    let (took, _) = until(&j, &etcd, limit, <[_]>::is_empty);
    eprintln!(
        "a SIGKILLed host was gone {took:?} after its death (lease {LEASE_SECS} s, limit {limit:?})"
    );

    // A new daemon on the same home is the same host.
    let _again = fleet_daemon(&j, &etcd, &[]);
    let (took, now) = until(&j, &etcd, Duration::from_secs(5), |h| h.len() == 1);
    eprintln!("the restarted daemon registered again in {took:?}");
    assert_eq!(now[0]["id"], id.as_str());
    assert_eq!(host_id(&j), id);
}

#[test]
fn a_daemon_keeps_running_without_etcd_and_registers_again_when_it_is_back() {
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let j = Juice::new();
    let _sweeper = InstanceSweeper(j.home.path().to_owned());
    let mut daemon = fleet_daemon(&j, &etcd, &["zone=eu-1"]);
    let (_, before) = until(&j, &etcd, Duration::from_secs(5), |h| h.len() == 1);

    // etcd goes for longer than the lease: the daemon goes on serving its API.
    let stopped = etcd.kill();
    std::thread::sleep(Duration::from_secs(LEASE_SECS + 2));
    assert!(
        matches!(daemon.0.try_wait(), Ok(None)),
        "the daemon exited when etcd went away"
    );
    j.ok(&["get", "groups"]);
    let e = j.fails(&[
        "fleet",
        "get",
        "hosts",
        "--endpoints",
        &format!("http://127.0.0.1:{}", stopped.1),
    ]);
    assert!(e.contains("is unreachable"), "{e}");

    // Back on the same data and port. etcd restores the old lease (and the record on it)
    // with a fresh time to live, so the record alone proves nothing: the daemon's log
    // says when it registered again, and the record must outlive the old lease.
    let log = j.home.path().join("daemon.log");
    let registrations = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("registered in the fleet")
            .count()
    };
    assert_eq!(registrations(), 1);
    let etcd = Etcd::restart(stopped);
    let back = Instant::now();
    while registrations() < 2 {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "the daemon did not register again within 10 s of etcd's return"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "registered again {:?} after etcd answered its health check",
        back.elapsed()
    );
    let after = hosts(&j, &etcd);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["id"], before[0]["id"]);
    assert_eq!(after[0]["started_ms"], before[0]["started_ms"]);
    assert_eq!(after[0]["labels"]["zone"], "eu-1");

    // The lease etcd restored runs out now, unrenewed; the record is on the new one.
    std::thread::sleep(Duration::from_secs(LEASE_SECS + 2));
    assert_eq!(
        hosts(&j, &etcd).len(),
        1,
        "the record went with the old lease"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("fleet registration lost; instances keep running"),
        "{log}"
    );
}
