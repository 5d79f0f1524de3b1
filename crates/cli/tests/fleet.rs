//! The fleet against a real etcd (Debian's etcd-server, started here on loopback and
//! killed by PID): a daemon started with `--fleet` registers its capabilities under a
//! lease, disappears by itself when it dies, and registers again when etcd comes back;
//! hosts run what the controller assigns them and report it.
//!
//! The tests take turns (SERIAL): daemons on one machine share its `juice0` bridge and
//! nftables tables, so the ones that run instances each get a network namespace.

mod common;

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::fleet::{host_id, local_groups, local_instances};
use common::{ChildGuard, Etcd, InstanceSweeper, Juice, NetnsHost};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

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

#[test]
fn a_daemon_started_with_fleet_appears_in_fleet_get_hosts_with_its_capabilities_and_labels() {
    let _turn = serial();
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
    let _turn = serial();
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
    let _turn = serial();
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
    let _turn = serial();
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

/// A daemon for `j` in the fleet of `etcd` that also stands as the fleet's controller.
fn controller_daemon(j: &Juice, etcd: &Etcd, labels: &[&str]) -> ChildGuard {
    let (endpoint, lease) = (etcd.endpoint(), LEASE_SECS.to_string());
    let mut args = vec![
        "--fleet",
        &endpoint,
        "--fleet-lease",
        &lease,
        "--fleet-controller",
    ];
    for l in labels {
        args.extend(["--label", l]);
    }
    common::daemon_with(j, &args, &[], &j.home.path().join("daemon.log"))
}

/// `juice fleet get WHAT -o json` against `etcd`.
fn get(j: &Juice, etcd: &Etcd, what: &str) -> serde_json::Value {
    let out = j.ok(&[
        "fleet",
        "get",
        what,
        "-o",
        "json",
        "--endpoints",
        &etcd.endpoint(),
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Polls `juice fleet get WHAT` until `done`, for at most `limit`; how long it took and the answer.
fn until_get(
    j: &Juice,
    etcd: &Etcd,
    what: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> (Duration, serde_json::Value) {
    let start = Instant::now();
    loop {
        let now = get(j, etcd, what);
        if done(&now) {
            return (start.elapsed(), now);
        }
        assert!(
            start.elapsed() < limit,
            "not so after {limit:?}: {what} is {now}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Instances of `group` per host in a plan printed as JSON.
fn sizes(plan: &serde_json::Value, group: &str) -> std::collections::BTreeMap<String, u64> {
    plan["hosts"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(h, groups)| groups[group]["size"].as_u64().map(|n| (h.clone(), n)))
        .collect()
}

const FLEET: &str = r#"
[group.web]
image = "hello-web:1.2.0"
count = 2
spread = "zone"
publish = ["8080:8080"]
resources = { cpus = 0.1, memory = "16MiB" }

[group.agent]
image = "node-agent:3"
per_host = true
resources = { cpus = 0.1, memory = "16MiB" }
"#;

#[test]
fn two_controllers_elect_one_which_places_the_applied_spec_and_the_other_takes_over_when_it_is_sigkilled()
 {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let (j1, j2) = (Juice::new(), Juice::new());
    let _sweepers = (
        InstanceSweeper(j1.home.path().to_owned()),
        InstanceSweeper(j2.home.path().to_owned()),
    );
    let mut d1 = Some(controller_daemon(&j1, &etcd, &["zone=a"]));
    let mut d2 = Some(controller_daemon(&j2, &etcd, &["zone=b"]));
    let (id1, id2) = (host_id(&j1), host_id(&j2));
    until(&j1, &etcd, Duration::from_secs(5), |h| h.len() == 2);
    let (_, leader) = until_get(&j1, &etcd, "controller", Duration::from_secs(5), |l| {
        l["host"].is_string()
    });
    let first = leader["host"].as_str().unwrap().to_owned();
    assert!(first == id1 || first == id2, "{leader}");

    // plan shows the placement and changes nothing.
    let file = scratch.path().join("fleet.toml");
    std::fs::write(&file, FLEET).unwrap();
    let file = file.to_str().unwrap();
    let out = j1.ok(&[
        "fleet",
        "plan",
        "-f",
        file,
        "-o",
        "json",
        "--endpoints",
        &etcd.endpoint(),
    ]);
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    let both = [(id1.clone(), 1), (id2.clone(), 1)].into_iter().collect();
    assert_eq!(
        sizes(&plan, "web"),
        both,
        "web is spread over the zones: {plan}"
    );
    assert_eq!(sizes(&plan, "agent"), both, "one agent per host: {plan}");
    let table = j1.ok(&["fleet", "plan", "-f", file, "--endpoints", &etcd.endpoint()]);
    assert!(
        table.starts_with("HOST") && table.contains("8080:8080"),
        "{table}"
    );
    assert_eq!(
        get(&j1, &etcd, "assignments"),
        serde_json::json!({"hosts": {}})
    );

    // apply stores the spec; the leader writes what plan showed.
    let out = j1.ok(&[
        "fleet",
        "apply",
        "-f",
        file,
        "--endpoints",
        &etcd.endpoint(),
    ]);
    assert!(out.starts_with("fleet spec stored at revision "), "{out}");
    let (took, assigned) = until_get(&j1, &etcd, "assignments", Duration::from_secs(5), |a| {
        sizes(a, "web").len() == 2
    });
    eprintln!("the leader placed the applied spec {took:?} after apply returned");
    assert_eq!(assigned["hosts"], plan["hosts"]);

    // The leader dies; the other is elected within the lease, and places the next spec.
    let (leader_guard, survivor, jl) = if first == id1 {
        (&mut d1, id2.clone(), &j2)
    } else {
        (&mut d2, id1.clone(), &j1)
    };
    let mut dead = leader_guard.take().unwrap();
    dead.0.kill().unwrap();
    dead.0.wait().unwrap();
    let limit = Duration::from_secs(LEASE_SECS + 2);
    let (took, leader) = until_get(jl, &etcd, "controller", limit, |l| {
        l["host"] == survivor.as_str()
    });
    eprintln!(
        "the standby led {took:?} after the leader's SIGKILL (lease {LEASE_SECS} s, limit {limit:?})"
    );
    assert!(leader["revision"].as_i64() > Some(0), "{leader}");
    let log = std::fs::read_to_string(jl.home.path().join("daemon.log")).unwrap();
    assert!(log.contains("elected fleet controller"), "{log}");

    // Once the dead host's record is gone, a new spec lands only on the survivor, and the
    // dead host's assignments are deleted.
    until(jl, &etcd, limit, |h| h.len() == 1);
    std::fs::write(file, FLEET.replace("count = 2", "count = 1")).unwrap();
    let out = jl.ok(&[
        "fleet",
        "apply",
        "-f",
        file,
        "-o",
        "json",
        "--endpoints",
        &etcd.endpoint(),
    ]);
    let applied: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        applied["revision"].as_i64() > leader["revision"].as_i64(),
        "{applied}"
    );
    let only = [(survivor.clone(), 1)].into_iter().collect();
    let (_, assigned) = until_get(jl, &etcd, "assignments", Duration::from_secs(5), |a| {
        sizes(a, "web") == only && sizes(a, "agent") == only
    });
    assert_eq!(assigned["hosts"], applied["plan"]["hosts"]);
}

#[test]
fn a_write_fenced_on_a_stale_leadership_is_refused() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let endpoints: juice_fleet::Endpoints = etcd.endpoint().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = juice_fleet::Store::connect(&endpoints, Duration::from_secs(3))
            .await
            .unwrap();
        let mut etcd_client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        let (a, b): (juice_fleet::HostId, juice_fleet::HostId) =
            ("host-a".parse().unwrap(), "host-b".parse().unwrap());
        let lease_a = etcd_client.lease_grant(60, None).await.unwrap().id();
        let lease_b = etcd_client.lease_grant(60, None).await.unwrap().id();

        let old = store.campaign(&a, lease_a).await.unwrap().expect("a leads");
        assert_eq!(
            store.campaign(&b, lease_b).await.unwrap(),
            None,
            "one leader at a time"
        );
        assert_eq!(
            store.campaign(&a, lease_a).await.unwrap(),
            Some(old),
            "a still leads"
        );
        let put = |k: &str| vec![etcd_client::TxnOp::put(k, "x", None)];
        store
            .fenced(old, put("/juice/v1/assign/h/one"))
            .await
            .unwrap();

        // a's lease ends (as when it is paused past its time to live); b is elected.
        etcd_client.lease_revoke(lease_a).await.unwrap();
        let new = store.campaign(&b, lease_b).await.unwrap().expect("b leads");
        assert!(new.revision > old.revision);
        let e = store
            .fenced(old, put("/juice/v1/assign/h/two"))
            .await
            .unwrap_err();
        assert!(matches!(e, juice_fleet::Error::Deposed { .. }), "{e}");
        assert!(e.to_string().contains("no longer leads the fleet"), "{e}");
        let two = etcd_client
            .get("/juice/v1/assign/h/two", None)
            .await
            .unwrap();
        assert!(
            two.kvs().is_empty(),
            "the deposed leader's write was applied"
        );
        store
            .fenced(new, put("/juice/v1/assign/h/two"))
            .await
            .unwrap();
        let leader = store.leader().await.unwrap().unwrap();
        assert_eq!((leader.host, leader.lease), (b, lease_b));
    });
}

#[test]
fn a_bad_or_impossible_fleet_file_is_an_error_naming_the_field_and_nothing_is_stored() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let j = Juice::new();
    let _sweeper = InstanceSweeper(j.home.path().to_owned());
    let _daemon = fleet_daemon(&j, &etcd, &["zone=a"]);
    until(&j, &etcd, Duration::from_secs(5), |h| h.len() == 1);
    let file = scratch.path().join("fleet.toml");
    let path = file.to_str().unwrap();
    let endpoint = etcd.endpoint();

    std::fs::write(&file, FLEET.replace("count = 2", "cont = 2")).unwrap();
    let e = j.fails(&["fleet", "plan", "-f", path, "--endpoints", &endpoint]);
    assert!(
        e.contains("fleet.toml:4:1: field `group.web.cont`") && e.contains("did you mean `count`"),
        "{e}"
    );
    std::fs::write(
        &file,
        FLEET.replace("spread = \"zone\"", "constraints = { zone = \"z\" }"),
    )
    .unwrap();
    for verb in ["plan", "apply"] {
        let e = j.fails(&["fleet", verb, "-f", path, "--endpoints", &endpoint]);
        assert!(e.contains("group web: field `constraints`: no host"), "{e}");
    }
    // Two web instances with a published port need two hosts; there is one.
    std::fs::write(&file, FLEET).unwrap();
    let e = j.fails(&["fleet", "apply", "-f", path, "--endpoints", &endpoint]);
    assert!(
        e.contains("group web: field `publish`: 2 instances asked for, 1 fit"),
        "{e}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stored = rt.block_on(async {
        let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .unwrap();
        c.get("/juice/v1/spec", None).await.unwrap().kvs().len()
    });
    assert_eq!(stored, 0, "a refused spec was stored");
}

/// The controller's next event, within the lease + 2 s.
async fn next(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<juice_fleet::controller::Event>,
) -> Result<Option<juice_fleet::controller::Event>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(LEASE_SECS + 2), events.recv()).await
}

#[test]
fn a_controller_whose_lease_is_taken_away_sees_it_and_is_elected_again() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let endpoints: juice_fleet::Endpoints = etcd.endpoint().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let controller = juice_fleet::Controller {
            endpoints: endpoints.clone(),
            host: "host-a".parse().unwrap(),
            ttl: Duration::from_secs(LEASE_SECS),
        };
        let task = tokio::spawn(controller.run(move |e| {
            let _ = tx.send(e);
        }));
        let Ok(Some(juice_fleet::controller::Event::Elected { revision: first })) =
            next(&mut events).await
        else {
            panic!("the only candidate was not elected");
        };
        let store = juice_fleet::Store::connect(&endpoints, Duration::from_secs(3))
            .await
            .unwrap();
        let lease = store.leader().await.unwrap().unwrap().lease;
        let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        c.lease_revoke(lease).await.unwrap();
        let revoked = Instant::now();
        match next(&mut events).await {
            Ok(Some(juice_fleet::controller::Event::Lost { error, .. })) => {
                eprintln!(
                    "the controller saw its loss in {:?}: {error}",
                    revoked.elapsed()
                );
            }
            other => panic!("expected the loss to be reported, got {other:?}"),
        }
        match next(&mut events).await {
            Ok(Some(juice_fleet::controller::Event::Elected { revision })) => {
                assert!(revision > first);
                eprintln!("elected again {:?} after the revocation", revoked.elapsed());
            }
            other => panic!("expected a new election, got {other:?}"),
        }
        task.abort();
    });
}

/// Waits until `j` runs `size` ready instances of `fleet-web` (and no other size), or
/// none at all when `size` is 0.
fn until_local(j: &Juice, size: u64, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let groups = local_groups(j);
        let done = match groups.get("fleet-web") {
            None => size == 0,
            Some(g) => size > 0 && g["size"] == size && g["ready"] == size && g["running"] == size,
        };
        if done {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{} does not run {size} ready fleet-web after {limit:?}: {groups:?}",
            j.home.path().display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `juice fleet get groups -o json`: the group `web`'s summary, if listed.
fn fleet_web(j: &Juice, etcd: &Etcd) -> Option<serde_json::Value> {
    get(j, etcd, "groups")
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "web")
        .cloned()
}

/// Polls `juice fleet get groups` until web's summary satisfies `done`, for at most
/// `limit`; how long it took and that summary.
fn until_web(
    j: &Juice,
    etcd: &Etcd,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> (Duration, serde_json::Value) {
    let start = Instant::now();
    loop {
        let web = fleet_web(j, etcd).unwrap_or_default();
        if done(&web) {
            return (start.elapsed(), web);
        }
        assert!(
            start.elapsed() < limit,
            "not so after {limit:?}: web is {web}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const HELLO_FLEET: &str = r#"
[group.web]
image = "hello-web:0.1.0"
count = 2
spread = "zone"
resources = { cpus = 0.1, memory = "64MiB" }
"#;

#[test]
fn hosts_run_what_they_are_assigned_report_it_and_keep_it_while_etcd_is_away() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    // Each daemon in a network namespace of its own, reaching etcd through a veth.
    let (n1, n2) = (NetnsHost::new(1), NetnsHost::new(2));
    let etcd = Etcd::start_also_on(&scratch.path().join("etcd"), &[n1.outside, n2.outside]);
    let (j1, j2) = (Juice::new(), Juice::new());
    let _sweepers = (
        InstanceSweeper(j1.home.path().to_owned()),
        InstanceSweeper(j2.home.path().to_owned()),
    );
    // hello-web:0.1.0 is built into each host's home before its daemon starts.
    let app = common::write_appliance(
        &scratch.path().join("hello-web"),
        &common::hello_web_manifest(),
    );
    for j in [&j1, &j2] {
        j.ok(&["build", &app]);
    }
    let lease = LEASE_SECS.to_string();
    let (e1, e2) = (etcd.endpoint_at(n1.outside), etcd.endpoint_at(n2.outside));
    let _d1 = n1.daemon(
        &j1,
        &[
            "--fleet",
            &e1,
            "--fleet-lease",
            &lease,
            "--fleet-controller",
            "--label",
            "zone=a",
        ],
        &j1.home.path().join("daemon.log"),
    );
    let _d2 = n2.daemon(
        &j2,
        &["--fleet", &e2, "--fleet-lease", &lease, "--label", "zone=b"],
        &j2.home.path().join("daemon.log"),
    );
    let id1 = host_id(&j1);
    until(&j1, &etcd, Duration::from_secs(10), |h| h.len() == 2);
    until_get(&j1, &etcd, "controller", Duration::from_secs(10), |l| {
        l["host"] == id1.as_str()
    });

    // The operator's own group on host 1, applied locally.
    let mine = scratch.path().join("mine.toml");
    std::fs::write(
        &mine,
        "[group.mine]\nimage = \"hello-web:0.1.0\"\nsize = 1\n",
    )
    .unwrap();
    j1.ok(&["apply", "-f", mine.to_str().unwrap()]);

    // The fleet's web: one instance in each zone.
    let file = scratch.path().join("fleet.toml");
    let path = file.to_str().unwrap().to_owned();
    let apply = |etcd: &Etcd, text: &str| {
        std::fs::write(&file, text).unwrap();
        j1.ok(&[
            "fleet",
            "apply",
            "-f",
            &path,
            "--endpoints",
            &etcd.endpoint(),
        ]);
        Instant::now()
    };
    let applied = apply(&etcd, HELLO_FLEET);
    until_local(&j1, 1, Duration::from_secs(60));
    until_local(&j2, 1, Duration::from_secs(60));
    let (_, web) = until_web(&j1, &etcd, Duration::from_secs(20), |w| w["ready_now"] == 2);
    eprintln!("apply to 2/2 ready and reported: {:?}", applied.elapsed());
    assert_eq!(
        (web["desired"].clone(), web["placed"].clone()),
        (2.into(), 2.into()),
        "{web}"
    );
    assert_eq!(web["not_reporting"], serde_json::json!([]), "{web}");
    let table = j1.ok(&["fleet", "get", "groups", "--endpoints", &etcd.endpoint()]);
    assert!(
        table.starts_with("GROUP") && table.contains("2/2"),
        "{table}"
    );
    // The operator's group is untouched by the fleet's.
    assert_eq!(local_groups(&j1)["mine"]["ready"], 1);
    assert!(!local_groups(&j2).contains_key("mine"));

    // A local apply of other groups neither deletes nor is deleted by the fleet's; a
    // site that names a fleet group is refused.
    let before = local_instances(&j1, "fleet-web");
    std::fs::write(
        &mine,
        "[group.other]\nimage = \"hello-web:0.1.0\"\nsize = 1\n",
    )
    .unwrap();
    let out = j1.ok(&["apply", "-f", mine.to_str().unwrap()]);
    assert!(out.contains("mine") && !out.contains("fleet-web"), "{out}");
    std::fs::write(
        &mine,
        "[group.fleet-web]\nimage = \"hello-web:0.1.0\"\nsize = 3\n",
    )
    .unwrap();
    let e = j1.fails(&["apply", "-f", mine.to_str().unwrap()]);
    assert!(
        e.contains("fleet-web") && e.contains("belong to groups the fleet assigns"),
        "{e}"
    );
    let groups = local_groups(&j1);
    assert!(
        groups.contains_key("other") && !groups.contains_key("mine"),
        "{groups:?}"
    );
    assert_eq!(local_instances(&j1, "fleet-web"), before);

    // A fleet group deleted by hand is made again: the fleet owns it.
    j2.ok(&["delete", "fleet-web"]);
    let took = until_local(&j2, 1, Duration::from_secs(30));
    eprintln!("fleet-web deleted by hand on host 2, back and ready in {took:?}");

    // Applying the same fleet file again changes nothing on the hosts.
    apply(&etcd, HELLO_FLEET);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(local_instances(&j1, "fleet-web"), before);
    assert_eq!(local_groups(&j1)["fleet-web"]["revision"], 1);

    // describe: each host with its assignment, report and labels; an unknown group is one sentence.
    // A new group is `rolling-out` until its health gate (10 s) passes, then `ok`: the
    // reports follow the change.
    let describe = || -> serde_json::Value {
        let out = j1.ok(&[
            "fleet",
            "describe",
            "group",
            "web",
            "-o",
            "json",
            "--endpoints",
            &etcd.endpoint(),
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let start = Instant::now();
    let described = loop {
        let d = describe();
        if d["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["report"]["status"] == "ok")
        {
            break d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not ok after 30 s: {d}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "both reports said ok {:?} after the first apply",
        applied.elapsed()
    );
    let hosts = described["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{described}");
    for h in hosts {
        let zone = if h["host"] == id1.as_str() { "a" } else { "b" };
        assert_eq!(h["labels"]["zone"], zone, "{h}");
        assert_eq!(h["assignment"]["size"], 1, "{h}");
        assert_eq!(h["report"]["ready"], 1, "{h}");
        assert_eq!(h["report"]["status"], "ok", "{h}");
        assert_eq!(h["report"]["revision"], h["assignment"]["revision"], "{h}");
    }
    let table = j1.ok(&[
        "fleet",
        "describe",
        "group",
        "web",
        "--endpoints",
        &etcd.endpoint(),
    ]);
    assert!(
        table.contains("zone=a") && table.contains("zone=b"),
        "{table}"
    );
    let e = j1.fails(&[
        "fleet",
        "describe",
        "group",
        "nope",
        "--endpoints",
        &etcd.endpoint(),
    ]);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("no fleet group `nope`: the fleet's groups are web"),
        "{e}"
    );

    // Twice as many: each host converges on two.
    let applied = apply(&etcd, &HELLO_FLEET.replace("count = 2", "count = 4"));
    until_local(&j1, 2, Duration::from_secs(60));
    until_local(&j2, 2, Duration::from_secs(60));
    until_web(&j1, &etcd, Duration::from_secs(20), |w| {
        w["ready_now"] == 4 && w["desired"] == 4
    });
    eprintln!(
        "count 2 -> 4, to 4/4 ready and reported: {:?}",
        applied.elapsed()
    );

    // etcd goes for longer than the lease: the hosts keep their instances, the same ones.
    let running = (
        local_instances(&j1, "fleet-web"),
        local_instances(&j2, "fleet-web"),
    );
    let stopped = etcd.kill();
    std::thread::sleep(Duration::from_secs(LEASE_SECS + 3));
    until_local(&j1, 2, Duration::from_secs(1));
    until_local(&j2, 2, Duration::from_secs(1));
    assert_eq!(
        (
            local_instances(&j1, "fleet-web"),
            local_instances(&j2, "fleet-web")
        ),
        running,
        "instances changed while etcd was away"
    );
    for (pid, j) in running
        .0
        .iter()
        .map(|i| (i.1, &j1))
        .chain(running.1.iter().map(|i| (i.1, &j2)))
    {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "instance {pid} of {} died",
            j.home.path().display()
        );
    }

    // etcd is back: the reports come back under the hosts' new leases, and a new count
    // is applied.
    let etcd = Etcd::restart(stopped);
    let back = Instant::now();
    until(&j1, &etcd, Duration::from_secs(15), |h| h.len() == 2);
    std::thread::sleep(Duration::from_secs(LEASE_SECS + 1));
    until_web(&j1, &etcd, Duration::from_secs(20), |w| {
        w["ready_now"] == 4 && w["not_reporting"] == serde_json::json!([])
    });
    eprintln!(
        "etcd back, the old leases run out (a {} s wait), 4/4 reported under the new ones: {:?}",
        LEASE_SECS + 1,
        back.elapsed()
    );
    let applied = apply(&etcd, HELLO_FLEET);
    until_local(&j1, 1, Duration::from_secs(60));
    until_local(&j2, 1, Duration::from_secs(60));
    until_web(&j1, &etcd, Duration::from_secs(20), |w| {
        w["ready_now"] == 2 && w["desired"] == 2
    });
    eprintln!(
        "after etcd's return, count 4 -> 2 converged in {:?}",
        applied.elapsed()
    );

    // A spec without web: the hosts delete their fleet-web, and its reports go.
    let applied = apply(&etcd, "");
    until_local(&j1, 0, Duration::from_secs(60));
    until_local(&j2, 0, Duration::from_secs(60));
    until_get(&j1, &etcd, "groups", Duration::from_secs(20), |g| {
        g.as_array().is_some_and(Vec::is_empty)
    });
    eprintln!(
        "web removed from the spec, gone from both hosts in {:?}",
        applied.elapsed()
    );
    assert!(
        local_groups(&j1).contains_key("other"),
        "the operator's group went too"
    );
    // The hosts' reports on web are deleted with their assignments.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now();
    loop {
        let left = rt.block_on(async {
            let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
                .await
                .unwrap();
            let prefix = etcd_client::GetOptions::new().with_prefix();
            c.get("/juice/v1/reports/", Some(prefix))
                .await
                .unwrap()
                .kvs()
                .len()
        });
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{left} reports left after 5 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(j2.home.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("fleet assignments not watched; groups keep running as they are"),
        "{log}"
    );
}
