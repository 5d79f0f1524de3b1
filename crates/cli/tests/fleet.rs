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

use common::fleet::{host_id, local_instances};
use common::{
    ChildGuard, Etcd, EtcdCluster, EtcdEndpoints, InstanceSweeper, Juice, NetnsHost, local_groups,
    until_local,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A short lease, so death is seen in seconds (the default is 10 s).
const LEASE_SECS: u64 = 3;

/// `juice fleet get hosts -o json` against `etcd`: the hosts as JSON values.
fn hosts(j: &Juice, etcd: &impl EtcdEndpoints) -> Vec<serde_json::Value> {
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
    etcd: &impl EtcdEndpoints,
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
fn get(j: &Juice, etcd: &impl EtcdEndpoints, what: &str) -> serde_json::Value {
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
    etcd: &impl EtcdEndpoints,
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
    let planned: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(planned["spec_revision"], 0, "no spec stored yet: {planned}");
    let plan = planned["plan"].clone();
    let both = [(id1.clone(), 1), (id2.clone(), 1)].into_iter().collect();
    assert_eq!(
        sizes(&plan, "web"),
        both,
        "web is spread over the zones: {plan}"
    );
    assert_eq!(sizes(&plan, "agent"), both, "one agent per host: {plan}");
    let table = j1.ok(&["fleet", "plan", "-f", file, "--endpoints", &etcd.endpoint()]);
    assert!(
        table.starts_with("planned against the fleet's spec at revision 0")
            && table.contains("\nHOST")
            && table.contains("8080:8080"),
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
    // dead host's assignments are deleted (at once: its groups' reschedule_after is 0).
    until(jl, &etcd, limit, |h| h.len() == 1);
    let now = FLEET
        .replace("count = 2", "count = 1\nreschedule_after = \"0s\"")
        .replace(
            "per_host = true",
            "per_host = true\nreschedule_after = \"0s\"",
        );
    std::fs::write(file, now).unwrap();
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

    // A stale revision: `plan` says which spec it planned against; an apply that expects
    // another stores nothing, and so does one that another apply overtook.
    std::fs::write(&file, FLEET.replace("count = 2", "count = 1")).unwrap();
    let plan = j.ok(&["fleet", "plan", "-f", path, "--endpoints", &endpoint]);
    assert!(
        plan.contains("planned against the fleet's spec at revision 0"),
        "{plan}"
    );
    let e = j.fails(&[
        "fleet",
        "apply",
        "-f",
        path,
        "--endpoints",
        &endpoint,
        "--expect-revision",
        "7",
    ]);
    assert!(
        e.contains("the fleet's spec is at revision 0, not 7") && e.contains("nothing was stored"),
        "{e}"
    );
    let out = j.ok(&[
        "fleet",
        "apply",
        "-f",
        path,
        "--endpoints",
        &endpoint,
        "--expect-revision",
        "0",
    ]);
    let stored_at: i64 = out
        .split("revision ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no revision in: {out}"));
    let e = j.fails(&[
        "fleet",
        "apply",
        "-f",
        path,
        "--endpoints",
        &endpoint,
        "--expect-revision",
        "0",
    ]);
    assert!(
        e.contains(&format!(
            "the fleet's spec is at revision {stored_at}, not 0"
        )),
        "{e}"
    );
    let (spec_revision, count) = rt.block_on(async {
        let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .unwrap();
        let got = c.get("/juice/v1/spec", None).await.unwrap();
        let kv = &got.kvs()[0];
        let spec: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
        (kv.mod_revision(), spec["group"]["web"]["count"].clone())
    });
    assert_eq!((spec_revision, count), (stored_at, serde_json::json!(1)));

    // An unknown host is one sentence; a host is found by its id, an id prefix or hostname.
    let e = j.fails(&[
        "fleet",
        "describe",
        "host",
        "0000ffff",
        "--endpoints",
        &endpoint,
    ]);
    assert!(
        e.contains("no host `0000ffff` in the fleet") && e.contains("1 known"),
        "{e}"
    );
    let id = host_id(&j);
    for name in [id.as_str(), &id[..6]] {
        let out = j.ok(&["fleet", "describe", "host", name, "--endpoints", &endpoint]);
        assert!(out.contains(&format!("Host:       {id}")), "{out}");
        assert!(out.contains("zone=a"), "{out}");
    }
    let json: serde_json::Value = serde_json::from_str(&j.ok(&[
        "fleet",
        "describe",
        "host",
        &id,
        "--endpoints",
        &endpoint,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["registered"], true, "{json}");
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

/// `juice fleet get groups -o json`: the group `web`'s summary, if listed.
fn fleet_web(j: &Juice, etcd: &impl EtcdEndpoints) -> Option<serde_json::Value> {
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
    etcd: &impl EtcdEndpoints,
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

/// Two daemons, each in a network namespace of its own with `hello-web:0.1.0` built into
/// its home: host 1 in zone `a` stands as the controller, host 2 is in zone `b`.
/// `endpoints(addr)` gives the daemons' `--fleet` from their namespace's way out.
struct TwoHosts {
    _d1: ChildGuard,
    d2: Option<ChildGuard>,
    _sweepers: (InstanceSweeper, InstanceSweeper),
    j1: Juice,
    j2: Juice,
    _n1: NetnsHost,
    n2: NetnsHost,
    e2: String,
}

impl TwoHosts {
    fn start(
        scratch: &std::path::Path,
        n1: NetnsHost,
        n2: NetnsHost,
        e1: &str,
        e2: &str,
    ) -> TwoHosts {
        let (j1, j2) = (Juice::new(), Juice::new());
        let sweepers = (
            InstanceSweeper(j1.home.path().to_owned()),
            InstanceSweeper(j2.home.path().to_owned()),
        );
        let app =
            common::write_appliance(&scratch.join("hello-web"), &common::hello_web_manifest());
        for j in [&j1, &j2] {
            j.ok(&["build", &app]);
        }
        let lease = LEASE_SECS.to_string();
        let d1 = n1.daemon(
            &j1,
            &[
                "--fleet",
                e1,
                "--fleet-lease",
                &lease,
                "--fleet-controller",
                "--label",
                "zone=a",
            ],
            &j1.home.path().join("daemon.log"),
        );
        let mut hosts = TwoHosts {
            _d1: d1,
            d2: None,
            _sweepers: sweepers,
            j1,
            j2,
            _n1: n1,
            n2,
            e2: e2.to_owned(),
        };
        hosts.start_host2("daemon.log");
        hosts
    }

    /// Starts host 2's daemon (again), its log in `log` in its home.
    fn start_host2(&mut self, log: &str) {
        let lease = LEASE_SECS.to_string();
        self.d2 = Some(self.n2.daemon(
            &self.j2,
            &[
                "--fleet",
                &self.e2,
                "--fleet-lease",
                &lease,
                "--label",
                "zone=b",
            ],
            &self.j2.home.path().join(log),
        ));
    }

    /// SIGKILLs host 2's daemon (its instances run on, as through an upgrade).
    fn kill_host2(&mut self) {
        if let Some(mut d) = self.d2.take() {
            let _ = d.0.kill();
            let _ = d.0.wait();
        }
    }

    /// `juice fleet apply` of `text` against `etcd`, from host 1's CLI.
    fn apply(&self, scratch: &std::path::Path, etcd: &impl EtcdEndpoints, text: &str) -> Instant {
        let file = scratch.join("fleet.toml");
        std::fs::write(&file, text).unwrap();
        self.j1.ok(&[
            "fleet",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--endpoints",
            &etcd.endpoint(),
        ]);
        Instant::now()
    }
}

/// Whether process `pid` is alive.
fn alive(pid: i64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `web`'s stored assignments: instances per host id.
fn web_assigned(j: &Juice, etcd: &impl EtcdEndpoints) -> std::collections::BTreeMap<String, u64> {
    sizes(&get(j, etcd, "assignments"), "web")
}

#[test]
fn a_dead_hosts_work_moves_after_its_delay_and_the_host_stops_it_when_it_comes_back() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let (n1, n2) = (NetnsHost::new(1), NetnsHost::new(2));
    let etcd = Etcd::start_also_on(&scratch.path().join("etcd"), &[n1.outside, n2.outside]);
    let (e1, e2) = (etcd.endpoint_at(n1.outside), etcd.endpoint_at(n2.outside));
    let mut h = TwoHosts::start(scratch.path(), n1, n2, &e1, &e2);
    let (id1, id2) = (host_id(&h.j1), host_id(&h.j2));
    until(&h.j1, &etcd, Duration::from_secs(10), |x| x.len() == 2);
    until_get(&h.j1, &etcd, "controller", Duration::from_secs(10), |l| {
        l["host"] == id1.as_str()
    });
    // web: one instance per zone, moved 2 s after its host is missing.
    let fleet = HELLO_FLEET.replace("count = 2\n", "count = 2\nreschedule_after = \"2s\"\n");
    h.apply(scratch.path(), &etcd, &fleet);
    until_local(&h.j1, 1, Duration::from_secs(60));
    until_local(&h.j2, 1, Duration::from_secs(60));
    let on1 = local_instances(&h.j1, "fleet-web");
    let on2 = local_instances(&h.j2, "fleet-web");
    assert_eq!(
        web_assigned(&h.j1, &etcd),
        [(id1.clone(), 1), (id2.clone(), 1)].into()
    );

    // Host 2's daemon dies. Its lease runs out (3 s), then web's delay (2 s): host 1
    // runs both instances, its own first one untouched.
    h.kill_host2();
    let killed = Instant::now();
    until(&h.j1, &etcd, Duration::from_secs(LEASE_SECS + 3), |x| {
        x.len() == 1
    });
    let gone = killed.elapsed();
    until_local(&h.j1, 2, Duration::from_secs(60));
    let moved = killed.elapsed();
    eprintln!(
        "host 2 SIGKILLed: its record gone after {gone:?}, its web instance ready on host 1 after {moved:?}"
    );
    assert!(
        moved >= Duration::from_secs(LEASE_SECS),
        "moved before the lease could run out: {moved:?}"
    );
    assert_eq!(web_assigned(&h.j1, &etcd), [(id1.clone(), 2)].into());
    let now1 = local_instances(&h.j1, "fleet-web");
    assert!(
        on1.iter().all(|i| now1.contains(i)),
        "host 1's own instance was restarted: {on1:?} -> {now1:?}"
    );
    // The dead daemon's instance runs on without it (as through an upgrade): the
    // controller cannot tell a dead host from a cut-off one.
    assert!(
        alive(on2[0].1),
        "host 2's instance {on2:?} died with its daemon"
    );
    let log = std::fs::read_to_string(h.j1.home.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("a missing host's groups placed elsewhere") && log.contains(&id2),
        "{log}"
    );

    // Host 2 comes back: it reads its assignments (none left) and stops its fleet-web.
    // Nothing is placed back on it, and nothing on host 1 restarts.
    h.start_host2("daemon-again.log");
    let back = Instant::now();
    until(&h.j1, &etcd, Duration::from_secs(10), |x| x.len() == 2);
    until_local(&h.j2, 0, Duration::from_secs(30));
    let start = Instant::now();
    while alive(on2[0].1) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "host 2's moved instance {on2:?} still runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "host 2 back: its moved instance stopped {:?} after its daemon started",
        back.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(web_assigned(&h.j1, &etcd), [(id1.clone(), 2)].into());
    assert_eq!(local_instances(&h.j1, "fleet-web"), now1);
    until_local(&h.j2, 0, Duration::from_secs(1));
    let (_, web) = until_web(&h.j1, &etcd, Duration::from_secs(20), |w| {
        w["ready_now"] == 2 && w["not_reporting"] == serde_json::json!([])
    });
    assert_eq!(web["placed"], 2, "{web}");
}

#[test]
fn a_cut_off_host_keeps_serving_nothing_moves_before_the_delay_and_the_brake_holds_moves() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let (n1, n2) = (NetnsHost::new(1), NetnsHost::new(2));
    let etcd = Etcd::start_also_on(&scratch.path().join("etcd"), &[n1.outside, n2.outside]);
    let (e1, e2) = (etcd.endpoint_at(n1.outside), etcd.endpoint_at(n2.outside));
    let h = TwoHosts::start(scratch.path(), n1, n2, &e1, &e2);
    let (id1, id2) = (host_id(&h.j1), host_id(&h.j2));
    until(&h.j1, &etcd, Duration::from_secs(10), |x| x.len() == 2);
    until_get(&h.j1, &etcd, "controller", Duration::from_secs(10), |l| {
        l["host"] == id1.as_str()
    });
    let fleet = HELLO_FLEET.replace("count = 2\n", "count = 2\nreschedule_after = \"60s\"\n");
    h.apply(scratch.path(), &etcd, &fleet);
    until_local(&h.j1, 1, Duration::from_secs(60));
    until_local(&h.j2, 1, Duration::from_secs(60));
    let running = (
        local_instances(&h.j1, "fleet-web"),
        local_instances(&h.j2, "fleet-web"),
    );
    let both = [(id1.clone(), 1), (id2.clone(), 1)].into();
    assert_eq!(web_assigned(&h.j1, &etcd), both);
    // Host 2's instance answers inside its namespace.
    let address = {
        let out = h.j2.ok(&["get", "instances", "-o", "json"]);
        let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let web = all.iter().find(|i| i["group"] == "fleet-web").unwrap();
        web["address"].as_str().expect("an address").to_owned()
    };
    let serves = || {
        let out = h.n2.run(
            "curl",
            &["-fsS", "-m", "2", &format!("http://{address}:8080/healthz")],
        );
        out.status.success()
    };
    assert!(serves(), "host 2's web does not answer before the cut");

    // The cut: host 2 loses etcd (and everything outside its namespace).
    h.n2.cut();
    let cut = Instant::now();
    let (gone, _) = until(&h.j1, &etcd, Duration::from_secs(LEASE_SECS + 3), |x| {
        x.len() == 1
    });
    eprintln!("host 2 cut off: its record gone after {gone:?}");
    // Cut for the lease and 4 s more, well short of the 60 s delay: nothing moves, and
    // the cut host serves on.
    while cut.elapsed() < Duration::from_secs(LEASE_SECS + 4) {
        assert!(serves(), "host 2's web stopped answering while cut off");
        assert_eq!(
            web_assigned(&h.j1, &etcd),
            both,
            "work moved during the cut"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // A spec change meanwhile keeps the cut host's instance where it is.
    h.apply(
        scratch.path(),
        &etcd,
        &fleet.replace("reschedule_after = \"60s\"", "reschedule_after = \"50s\""),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        web_assigned(&h.j1, &etcd),
        both,
        "a spec change dropped the cut host's work"
    );
    h.n2.heal();
    let healed = Instant::now();
    until(&h.j1, &etcd, Duration::from_secs(15), |x| x.len() == 2);
    eprintln!(
        "link back: host 2 registered again after {:?}",
        healed.elapsed()
    );
    until_web(&h.j1, &etcd, Duration::from_secs(20), |w| {
        w["ready_now"] == 2 && w["not_reporting"] == serde_json::json!([])
    });
    let after = (
        local_instances(&h.j1, "fleet-web"),
        local_instances(&h.j2, "fleet-web"),
    );
    assert_eq!(after, running, "an instance was restarted");
    assert_eq!(web_assigned(&h.j1, &etcd), both);

    // The brake: with max_missing = 0 any missing host stops rescheduling. Same revision
    // of web (when it moves is not what it runs): nothing restarts on the apply.
    let braked = format!(
        "[fleet]\nmax_missing = 0\n{}",
        fleet.replace("reschedule_after = \"60s\"", "reschedule_after = \"1s\"")
    );
    h.apply(scratch.path(), &etcd, &braked);
    h.n2.cut();
    let (_, controller) = until_get(
        &h.j1,
        &etcd,
        "controller",
        Duration::from_secs(LEASE_SECS + 5),
        |c| {
            c["brake"]["missing"]
                .as_array()
                .is_some_and(|m| m.len() == 1)
        },
    );
    assert_eq!(
        controller["brake"]["missing"][0]["host"],
        id2.as_str(),
        "{controller}"
    );
    assert_eq!(
        (
            controller["brake"]["limit"].clone(),
            controller["brake"]["hosts"].clone()
        ),
        (0.into(), 2.into()),
        "{controller}"
    );
    let table = h.j1.ok(&[
        "fleet",
        "get",
        "controller",
        "--endpoints",
        &etcd.endpoint(),
    ]);
    assert!(
        table.contains("brake: 1 of 2 hosts") && table.contains(&id2),
        "{table}"
    );
    // Well past web's 1 s delay, nothing has moved.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        web_assigned(&h.j1, &etcd),
        both,
        "work moved while the brake held"
    );
    assert!(serves(), "host 2's web stopped answering while cut off");
    h.n2.heal();
    until(&h.j1, &etcd, Duration::from_secs(15), |x| x.len() == 2);
    until_get(&h.j1, &etcd, "controller", Duration::from_secs(5), |c| {
        c.get("brake").is_none()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(web_assigned(&h.j1, &etcd), both);
    assert_eq!(
        (
            local_instances(&h.j1, "fleet-web"),
            local_instances(&h.j2, "fleet-web"),
        ),
        running,
        "an instance was restarted"
    );
    let log = std::fs::read_to_string(h.j1.home.path().join("daemon.log")).unwrap();
    assert_eq!(
        log.matches("too many hosts missing; nothing is rescheduled")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("the brake is released"), "{log}");
    assert!(
        !log.contains("a missing host's groups placed elsewhere"),
        "{log}"
    );
}

#[test]
fn a_three_member_etcd_losing_its_leader_keeps_hosts_registered_and_the_controller_placing() {
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let (n1, n2) = (NetnsHost::new(1), NetnsHost::new(2));
    let mut etcd = EtcdCluster::start(&scratch.path().join("etcd"), &[n1.outside, n2.outside]);
    let (e1, e2) = (etcd.endpoints_at(n1.outside), etcd.endpoints_at(n2.outside));
    let h = TwoHosts::start(scratch.path(), n1, n2, &e1, &e2);
    let id1 = host_id(&h.j1);
    until(&h.j1, &etcd, Duration::from_secs(10), |x| x.len() == 2);
    until_get(&h.j1, &etcd, "controller", Duration::from_secs(10), |l| {
        l["host"] == id1.as_str()
    });
    h.apply(scratch.path(), &etcd, HELLO_FLEET);
    until_local(&h.j1, 1, Duration::from_secs(60));
    until_local(&h.j2, 1, Duration::from_secs(60));
    let running = (
        local_instances(&h.j1, "fleet-web"),
        local_instances(&h.j2, "fleet-web"),
    );
    let records: Vec<i64> = hosts(&h.j1, &etcd)
        .iter()
        .map(|x| x["started_ms"].as_i64().unwrap_or_default())
        .collect();

    // etcd's leader is SIGKILLed; two members of three keep a quorum.
    let leader = etcd.leader();
    etcd.kill(leader);
    let killed = Instant::now();
    eprintln!("etcd member {leader} (the leader) SIGKILLed");
    // For three leases, both hosts are always registered: their leases are kept alive
    // through the new etcd leader. While the members elect one (about a second) etcd
    // answers "leader changed" and the query fails; every answer it gives has both hosts.
    let (mut answers, mut refused) = (0, Vec::new());
    while killed.elapsed() < Duration::from_secs(3 * LEASE_SECS) {
        let out =
            h.j1.cmd()
                .args([
                    "fleet",
                    "get",
                    "hosts",
                    "-o",
                    "json",
                    "--endpoints",
                    &etcd.endpoint(),
                ])
                .output()
                .unwrap();
        if out.status.success() {
            let now: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(now.len(), 2, "a host's record went: {now:?}");
            answers += 1;
        } else {
            let e = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(e.contains("is unreachable"), "{e}");
            refused.push(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{answers} answers, all with both hosts; refused at {refused:?} after the kill");
    assert!(answers >= 10, "etcd answered {answers} times");
    let new_leader = etcd.leader();
    assert_ne!(new_leader, leader);
    // The controller still places a new spec; the running instances stay.
    let applied = h.apply(
        scratch.path(),
        &etcd,
        &HELLO_FLEET.replace("count = 2", "count = 4"),
    );
    until_local(&h.j1, 2, Duration::from_secs(60));
    until_local(&h.j2, 2, Duration::from_secs(60));
    eprintln!(
        "after etcd's leader died, count 2 -> 4 placed and ready in {:?}",
        applied.elapsed()
    );
    let (now1, now2) = (
        local_instances(&h.j1, "fleet-web"),
        local_instances(&h.j2, "fleet-web"),
    );
    assert!(
        running.0.iter().all(|i| now1.contains(i)) && running.1.iter().all(|i| now2.contains(i)),
        "an instance was restarted: {running:?} -> {now1:?} {now2:?}"
    );
    let again: Vec<i64> = hosts(&h.j1, &etcd)
        .iter()
        .map(|x| x["started_ms"].as_i64().unwrap_or_default())
        .collect();
    assert_eq!(again, records, "a daemon restarted");
}

// ---- Rollouts in waves -------------------------------------------------------------------

/// Two hosts (zones a and b, role app), each in a network namespace of its own with
/// `hello-web:0.1.0` built into its home (and `0.2.0` where asked), and `controllers`
/// controller candidates (role ctl, in this namespace: they run no instances). Fields drop
/// in order: daemons first, then the sweepers, homes, etcd and namespaces.
struct RolloutFleet {
    controllers: Vec<ChildGuard>,
    _hosts: Vec<ChildGuard>,
    _sweepers: Vec<InstanceSweeper>,
    control: Vec<Juice>,
    /// The hosts, in host id order (the order waves take them in).
    homes: Vec<Juice>,
    ids: Vec<String>,
    etcd: Etcd,
    _netns: Vec<NetnsHost>,
    scratch: tempfile::TempDir,
}

/// The example appliance at version `version`, written under `dir`.
fn hello_at(dir: &std::path::Path, version: &str) -> String {
    let manifest = common::hello_web_manifest()
        .replace("version = \"0.1.0\"", &format!("version = \"{version}\""));
    assert!(manifest.contains(&format!("version = \"{version}\"")));
    common::write_appliance(&dir.join(format!("hello-web-{version}")), &manifest)
}

impl RolloutFleet {
    /// `candidates` controller candidates; `first_only_has_new`: `hello-web:0.2.0` is built
    /// only on the host that sorts first by id (else on both).
    /// The namespaces are numbered `ns` and `ns + 1`, apart from other tests'.
    fn start(ns: u8, candidates: usize, first_only_has_new: bool) -> RolloutFleet {
        let scratch = tempfile::tempdir().unwrap();
        let netns = vec![NetnsHost::new(ns), NetnsHost::new(ns + 1)];
        let outside: Vec<_> = netns.iter().map(|n| n.outside).collect();
        let etcd = Etcd::start_also_on(&scratch.path().join("etcd"), &outside);
        let homes = vec![Juice::new(), Juice::new()];
        let sweepers = homes
            .iter()
            .map(|j| InstanceSweeper(j.home.path().to_owned()))
            .collect();
        let (v1, v2) = (
            hello_at(scratch.path(), "0.1.0"),
            hello_at(scratch.path(), "0.2.0"),
        );
        for j in &homes {
            j.ok(&["build", &v1]);
        }
        let lease = LEASE_SECS.to_string();
        let mut hosts = Vec::new();
        for (i, (n, j)) in netns.iter().zip(&homes).enumerate() {
            let endpoint = etcd.endpoint_at(n.outside);
            let zone = format!("zone={}", ["a", "b"][i]);
            hosts.push(n.daemon(
                j,
                &[
                    "--fleet",
                    &endpoint,
                    "--fleet-lease",
                    &lease,
                    "--label",
                    &zone,
                    "--label",
                    "role=app",
                ],
                &j.home.path().join("daemon.log"),
            ));
        }
        let mut homes: Vec<(String, Juice)> = homes.into_iter().map(|j| (host_id(&j), j)).collect();
        homes.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (_, j)) in homes.iter().enumerate() {
            if !first_only_has_new || i == 0 {
                j.ok(&["build", &v2]);
            }
        }
        let control: Vec<Juice> = (0..candidates).map(|_| Juice::new()).collect();
        let controllers = control
            .iter()
            .map(|j| controller_daemon(j, &etcd, &["role=ctl"]))
            .collect();
        let (ids, homes): (Vec<String>, Vec<Juice>) = homes.into_iter().unzip();
        let fleet = RolloutFleet {
            controllers,
            _hosts: hosts,
            _sweepers: sweepers,
            control,
            homes,
            ids,
            etcd,
            _netns: netns,
            scratch,
        };
        until(&fleet.homes[0], &fleet.etcd, Duration::from_secs(10), |h| {
            h.len() == 2 + candidates
        });
        until_get(
            &fleet.homes[0],
            &fleet.etcd,
            "controller",
            Duration::from_secs(10),
            |l| l["host"].is_string(),
        );
        fleet
    }

    fn juice(&self) -> &Juice {
        &self.homes[0]
    }

    /// Applies web with `image`, two instances spread over the zones, waves `["1", "100%"]`.
    fn apply(&self, image: &str, gate: &str) -> Instant {
        let file = self.scratch.path().join("fleet.toml");
        std::fs::write(
            &file,
            format!(
                "[group.web]\nimage = \"{image}\"\ncount = 2\nspread = \"zone\"\n\
                 constraints = {{ role = \"app\" }}\n\
                 resources = {{ cpus = 0.1, memory = \"64MiB\" }}\n\
                 rollout = {{ waves = [\"1\", \"100%\"], health_gate = \"{gate}\", deadline = \"90s\" }}\n"
            ),
        )
        .unwrap();
        self.juice().ok(&[
            "fleet",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--endpoints",
            &self.etcd.endpoint(),
        ]);
        Instant::now()
    }

    fn rollout(&self, verb: &str) -> String {
        self.juice().ok(&[
            "fleet",
            "rollout",
            verb,
            "web",
            "--endpoints",
            &self.etcd.endpoint(),
        ])
    }

    fn status(&self) -> serde_json::Value {
        let out = self.juice().ok(&[
            "fleet",
            "rollout",
            "status",
            "web",
            "-o",
            "json",
            "--endpoints",
            &self.etcd.endpoint(),
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// Polls `rollout status` until `done`, for at most `limit`; checks `each` on every
    /// host at every poll.
    fn until_status(
        &self,
        limit: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(start.elapsed() < limit, "not so after {limit:?}: {s:#}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The revision each host (in id order) is assigned for web.
    fn assigned(&self) -> Vec<String> {
        let a = get(self.juice(), &self.etcd, "assignments");
        self.ids
            .iter()
            .map(|h| {
                a["hosts"][h]["web"]["revision"]
                    .as_str()
                    .unwrap_or("-")
                    .to_owned()
            })
            .collect()
    }

    /// Both hosts run web's one instance, ready, reported `ok` at one revision.
    fn until_settled(&self, limit: Duration) -> String {
        let (_, web) = until_web(self.juice(), &self.etcd, limit, |w| {
            w["ready_now"] == 2 && w["ready"].as_object().is_some_and(|m| m.len() == 1)
        });
        self.until_status(limit, |s| {
            s["hosts"]
                .as_array()
                .is_some_and(|h| h.len() == 2 && h.iter().all(|h| h["report"]["status"] == "ok"))
        });
        web["revision"].as_str().unwrap().to_owned()
    }
}

/// Every change under `/juice/v1/` as a watch from the test sees it, with when it was seen:
/// (seen, key, value or None for a delete).
type Seen = std::sync::Arc<Mutex<Vec<(Instant, String, Option<serde_json::Value>)>>>;

/// Watches `/juice/v1/` from now on, on a thread of its own, until the test ends (or etcd).
fn watch_all(etcd: &Etcd) -> Seen {
    let seen: Seen = Default::default();
    let out = seen.clone();
    let endpoint = etcd.endpoint();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut c = etcd_client::Client::connect([endpoint], None)
                .await
                .unwrap();
            let mut stream = c
                .watch(
                    "/juice/v1/",
                    Some(etcd_client::WatchOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            let _ = ready_tx.send(());
            while let Ok(Some(answer)) = stream.message().await {
                let now = Instant::now();
                for e in answer.events() {
                    let Some(kv) = e.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let value = match e.event_type() {
                        etcd_client::EventType::Put => serde_json::from_slice(kv.value()).ok(),
                        etcd_client::EventType::Delete => None,
                    };
                    out.lock().unwrap().push((now, key, value));
                }
            }
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the test's watch on etcd started");
    seen
}

/// The puts of `assign/<host>/web` in `seen` that give a revision, in order: (when, host, revision).
fn web_assignments(seen: &Seen, ids: &[String]) -> Vec<(Instant, usize, String)> {
    seen.lock()
        .unwrap()
        .iter()
        .filter_map(|(t, k, v)| {
            let host = k.strip_prefix("/juice/v1/assign/")?.strip_suffix("/web")?;
            let i = ids.iter().position(|h| h == host)?;
            Some((*t, i, v.as_ref()?["revision"].as_str()?.to_owned()))
        })
        .collect()
}

/// When host `i`'s report on web first said `ok` at `revision`.
fn first_ok(seen: &Seen, ids: &[String], i: usize, revision: &str) -> Option<Instant> {
    let key = format!("/juice/v1/reports/{}/web", ids[i]);
    seen.lock().unwrap().iter().find_map(|(t, k, v)| {
        let v = v.as_ref()?;
        (k == &key && v["revision"] == revision && v["status"] == "ok" && v["ready"] == v["size"])
            .then_some(*t)
    })
}

/// The checks of a waved rollout of web from `old` to `new` over the two hosts, from what
/// the watch saw: each host given `new` once, host 0 first, host 1 only once host 0 had
/// reported `ok` at `new` for the gate; and no rollout record ever went back a wave.
fn check_waves(seen: &Seen, ids: &[String], old: &str, new: &str, gate: Duration) {
    let given = web_assignments(seen, ids);
    let to_new: Vec<&(Instant, usize, String)> = given.iter().filter(|g| g.2 == new).collect();
    let order: Vec<usize> = to_new.iter().map(|g| g.1).collect();
    assert_eq!(
        order,
        [0, 1],
        "each host gets the new revision once, in id order: {given:?}"
    );
    assert!(
        given.iter().all(|g| g.2 == new || g.2 == old),
        "only the two revisions: {given:?}"
    );
    let ok0 = first_ok(seen, ids, 0, new).expect("host 0 reported ok at the new revision");
    let held = to_new[1].0.duration_since(ok0);
    eprintln!(
        "host 0 given {new} at +0; reported ok {:?} later; host 1 given it {held:?} after that",
        ok0.duration_since(to_new[0].0)
    );
    assert!(
        held >= gate - Duration::from_millis(100),
        "wave 2 started {held:?} after wave 1 was healthy, gate {gate:?}"
    );
    let waves: Vec<(u64, usize, String)> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, k, _)| k == "/juice/v1/rollouts/web")
        .filter_map(|(_, _, v)| {
            let v = v.as_ref()?;
            Some((
                v["wave"].as_u64()?,
                v["touched"].as_array()?.len(),
                v["state"].as_str()?.to_owned(),
            ))
        })
        .collect();
    assert!(
        waves
            .windows(2)
            .all(|w| w[1].0 >= w[0].0 && w[1].1 >= w[0].1),
        "a wave went back, or touched hosts were forgotten: {waves:?}"
    );
    assert_eq!(
        waves.last().map(|w| w.2.as_str()),
        Some("done"),
        "{waves:?}"
    );
}

#[test]
fn a_new_revision_rolls_out_in_waves_over_real_daemons_each_gated_on_health() {
    let _turn = serial();
    let fleet = RolloutFleet::start(3, 1, false);
    let gate = Duration::from_secs(2);
    fleet.apply("hello-web:0.1.0", "2s");
    until_local(&fleet.homes[0], 1, Duration::from_secs(60));
    until_local(&fleet.homes[1], 1, Duration::from_secs(60));
    let old = fleet.until_settled(Duration::from_secs(30));
    assert_eq!(
        fleet.status()["rollout"],
        serde_json::Value::Null,
        "a new group is placed at once"
    );
    let seen = watch_all(&fleet.etcd);

    let applied = fleet.apply("hello-web:0.2.0", "2s");
    // First exactly one host (the first by id) has the new revision.
    let s = fleet.until_status(Duration::from_secs(10), |s| {
        s["rollout"]["state"] == "rolling"
    });
    let new = s["rollout"]["to"]["revision"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(fleet.assigned(), [new.clone(), old.clone()]);
    let table = fleet.rollout("status");
    assert!(
        table.contains("rolling (wave 1 of 2, target 1 of 2 hosts"),
        "{table}"
    );
    let web = fleet_web(fleet.juice(), &fleet.etcd).unwrap();
    assert!(
        web["rollout"].as_str().unwrap().starts_with("rolling "),
        "fleet get groups shows the rollout: {web}"
    );
    // Until it is done, neither host ever runs fewer than one ready instance of web.
    let start = Instant::now();
    loop {
        for j in &fleet.homes {
            let g = local_groups(j);
            let ready = g
                .get("fleet-web")
                .and_then(|g| g["ready"].as_u64())
                .unwrap_or(0);
            assert!(ready >= 1, "a host dropped below its count: {g:?}");
        }
        let s = fleet.status();
        if s["rollout"]["state"] == "done" {
            break;
        }
        assert_eq!(s["rollout"]["state"], "rolling", "{s:#}");
        assert!(start.elapsed() < Duration::from_secs(90), "not done: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("apply to rollout done: {:?}", applied.elapsed());
    assert_eq!(fleet.assigned(), [new.clone(), new.clone()]);
    for j in &fleet.homes {
        until_local(j, 1, Duration::from_secs(30));
        assert_eq!(local_groups(j)["fleet-web"]["image"], "hello-web:0.2.0");
    }
    check_waves(&seen, &fleet.ids, &old, &new, gate);
    assert_eq!(
        fleet_web(fleet.juice(), &fleet.etcd).unwrap()["rollout"],
        "done"
    );
    let table = fleet.rollout("status");
    assert!(table.contains("Rollout:   done"), "{table}");
}

#[test]
fn a_revision_that_fails_on_a_later_wave_host_rolls_every_touched_host_back() {
    let _turn = serial();
    // hello-web:0.2.0 exists only on the host that sorts first: the second cannot apply it.
    let fleet = RolloutFleet::start(5, 1, true);
    fleet.apply("hello-web:0.1.0", "2s");
    until_local(&fleet.homes[0], 1, Duration::from_secs(60));
    until_local(&fleet.homes[1], 1, Duration::from_secs(60));
    let old = fleet.until_settled(Duration::from_secs(30));
    let seen = watch_all(&fleet.etcd);

    fleet.apply("hello-web:0.2.0", "2s");
    let s = fleet.until_status(Duration::from_secs(60), |s| {
        s["rollout"]["state"] == "failed"
    });
    let failed = Instant::now();
    let new = s["rollout"]["to"]["revision"].as_str().unwrap().to_owned();
    let reason = s["rollout"]["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.starts_with(&format!("host {} (", fleet.ids[1]))
            && reason.contains(&format!("cannot-apply revision {new}")),
        "{reason}"
    );
    // Both touched hosts were given the new revision, then both the old one back, in one write.
    assert_eq!(fleet.assigned(), [old.clone(), old.clone()]);
    let given = web_assignments(&seen, &fleet.ids);
    let back: Vec<_> = given.iter().filter(|g| g.2 == old).collect();
    assert_eq!(
        given
            .iter()
            .map(|g| (g.1, g.2.as_str()))
            .collect::<Vec<_>>(),
        [
            (0, new.as_str()),
            (1, new.as_str()),
            (0, old.as_str()),
            (1, old.as_str())
        ],
        "{given:?}"
    );
    assert_eq!(
        back[0].0, back[1].0,
        "both went back in one transaction (one watch answer)"
    );
    let report_key = format!("/juice/v1/reports/{}/web", fleet.ids[1]);
    let reported = seen
        .lock()
        .unwrap()
        .iter()
        .find_map(|(t, k, v)| {
            (k == &report_key && v.as_ref()?["status"] == "cannot-apply").then_some(*t)
        })
        .expect("the second host reported that it cannot apply the revision");
    eprintln!(
        "the failure reported to both hosts assigned the old revision: {:?}",
        back[0].0.duration_since(reported)
    );
    // The hosts run the old image again, ready; status says why, naming the host.
    for j in &fleet.homes {
        until_local(j, 1, Duration::from_secs(30));
        let start = Instant::now();
        while local_groups(j)["fleet-web"]["image"] != "hello-web:0.1.0" {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{:?}",
                local_groups(j)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!(
        "failure to both hosts running the old image: {:?}",
        failed.elapsed()
    );
    let table = fleet.rollout("status");
    assert!(
        table.contains("Rollout:   failed")
            && table.contains(&fleet.ids[1])
            && table.contains("cannot-apply"),
        "{table}"
    );
    // It stays failed: the spec says 0.2.0, the rollout record pins 0.1.0.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.status()["rollout"]["state"], "failed");
    assert_eq!(fleet.assigned(), [old.clone(), old.clone()]);
    let refused = fleet.juice().fails(&[
        "fleet",
        "rollout",
        "pause",
        "web",
        "--endpoints",
        &fleet.etcd.endpoint(),
    ]);
    assert!(
        refused.contains("web's rollout is failed: there is nothing to pause"),
        "{refused}"
    );
    let unknown = fleet.juice().fails(&[
        "fleet",
        "rollout",
        "status",
        "nope",
        "--endpoints",
        &fleet.etcd.endpoint(),
    ]);
    assert!(
        unknown.contains("no fleet group `nope`: the fleet's groups are web"),
        "{unknown}"
    );

    // resume starts again from wave 1: the first host gets the new revision; paused there,
    // it keeps it; undo puts it back.
    fleet.rollout("resume");
    fleet.until_status(Duration::from_secs(10), |s| {
        s["rollout"]["state"] == "rolling"
            && s["rollout"]["touched"]
                .as_array()
                .is_some_and(|t| t.len() == 1)
    });
    assert_eq!(fleet.assigned(), [new.clone(), old.clone()]);
    fleet.rollout("pause");
    fleet.until_status(Duration::from_secs(10), |s| {
        s["rollout"]["state"] == "paused"
    });
    std::thread::sleep(Duration::from_secs(6));
    let s = fleet.status();
    assert_eq!(s["rollout"]["state"], "paused", "{s:#}");
    assert_eq!(
        fleet.assigned(),
        [new.clone(), old.clone()],
        "a paused rollout starts no wave"
    );
    fleet.rollout("undo");
    let s = fleet.until_status(Duration::from_secs(10), |s| {
        s["rollout"]["state"] == "undone"
    });
    assert_eq!(s["rollout"]["reason"], "undone by the operator");
    assert_eq!(fleet.assigned(), [old.clone(), old.clone()]);
    until_local(&fleet.homes[0], 1, Duration::from_secs(30));
    let start = Instant::now();
    while local_groups(&fleet.homes[0])["fleet-web"]["image"] != "hello-web:0.1.0" {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Each request (resume, pause, undo) was written, then deleted by the leader.
    let requests: Vec<bool> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, k, _)| k == "/juice/v1/requests/web")
        .map(|(_, _, v)| v.is_some())
        .collect();
    assert_eq!(requests, [true, false, true, false, true, false]);
}

#[test]
fn a_controller_killed_mid_rollout_is_followed_by_one_that_starts_no_wave_twice() {
    let _turn = serial();
    let mut fleet = RolloutFleet::start(7, 2, false);
    // A longer gate, so the leader can be killed while it holds.
    let gate = Duration::from_secs(6);
    fleet.apply("hello-web:0.1.0", "6s");
    until_local(&fleet.homes[0], 1, Duration::from_secs(60));
    until_local(&fleet.homes[1], 1, Duration::from_secs(60));
    let old = fleet.until_settled(Duration::from_secs(40));
    let seen = watch_all(&fleet.etcd);

    fleet.apply("hello-web:0.2.0", "6s");
    // Wave 1 is healthy on its host: the leader's gate is running.
    let s = fleet.until_status(Duration::from_secs(30), |s| {
        s["rollout"]["state"] == "rolling" && s["healthy_for_ms"].is_u64()
    });
    let new = s["rollout"]["to"]["revision"].as_str().unwrap().to_owned();
    assert_eq!(fleet.assigned(), [new.clone(), old.clone()]);
    let leader = get(fleet.juice(), &fleet.etcd, "controller");
    let which = fleet
        .control
        .iter()
        .position(|j| leader["host"] == host_id(j).as_str())
        .expect("one of the two candidates leads");
    fleet.controllers[which].0.kill().unwrap();
    let _ = fleet.controllers[which].0.wait();
    let killed = Instant::now();
    let (took, _) = until_get(
        fleet.juice(),
        &fleet.etcd,
        "controller",
        Duration::from_secs(LEASE_SECS + 5),
        |l| l["host"].is_string() && l["host"] != leader["host"],
    );
    eprintln!("the other candidate leads {took:?} after the leader's SIGKILL");
    fleet.until_status(Duration::from_secs(60), |s| s["rollout"]["state"] == "done");
    eprintln!("killed to done: {:?}", killed.elapsed());
    assert_eq!(fleet.assigned(), [new.clone(), new.clone()]);
    check_waves(&seen, &fleet.ids, &old, &new, gate);
    // The second wave came from the new leader, after the kill.
    let given = web_assignments(&seen, &fleet.ids);
    let second = given.iter().find(|g| g.1 == 1 && g.2 == new).unwrap();
    assert!(
        second.0 > killed,
        "the second wave was started by the new leader"
    );
}
