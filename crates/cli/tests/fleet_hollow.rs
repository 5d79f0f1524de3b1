//! The hollow hosts of the fleet's benchmark (bench/fleet-hollow: the real host-side fleet
//! code over an in-memory backend) against a real etcd (started here on loopback, killed
//! by PID) and a real controller daemon in a network namespace of its own: they register,
//! are given their assignments, report them ready, can be killed and can fail a revision.
//! The benchmark itself (bench/fleet.sh) is not run here.

mod common;

use std::time::{Duration, Instant};

use common::{Etcd, Juice, NetnsHost};
use juice_bench_fleet_hollow::{
    Config, HollowFleet, client, fail, kill, registered, rollout, settled,
};
use juice_fleet::{FleetSpec, GroupName, Store};

const HOSTS: usize = 20;
const LEASE_SECS: u64 = 3;

fn spec(roll_image: &str) -> FleetSpec {
    let text = format!(
        r#"
[group.agent]
image = "hollow/agent:1"
per_host = true
constraints = {{ hollow = "yes" }}

[group.web]
image = "hollow/web:1"
count = 30
spread = "zone"
constraints = {{ hollow = "yes" }}

[group.roll]
image = "{roll_image}"
per_host = true
constraints = {{ rollout = "yes" }}
"#
    );
    FleetSpec::parse(&text, std::path::Path::new("fleet.toml")).unwrap()
}

#[test]
fn twenty_hollow_hosts_register_run_what_a_real_controller_assigns_and_report_it() {
    let scratch = tempfile::tempdir().unwrap();
    let ns = NetnsHost::new(1);
    let etcd = Etcd::start_also_on(&scratch.path().join("etcd"), &[ns.outside]);
    let j = Juice::new();
    let lease = LEASE_SECS.to_string();
    let _controller = ns.daemon(
        &j,
        &[
            "--fleet",
            &etcd.endpoint_at(ns.outside),
            "--fleet-lease",
            &lease,
            "--fleet-controller",
            "--label",
            "role=controller",
        ],
        &j.home.path().join("daemon.log"),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let endpoints: juice_fleet::Endpoints = etcd.endpoint().parse().unwrap();
        let mut fleet = HollowFleet::new(Config {
            endpoints: endpoints.clone(),
            ttl_secs: LEASE_SECS,
            pool: 2,
            ready_after: Duration::from_millis(300),
            rollout_hosts: 5,
            rate: 200,
        })
        .await
        .unwrap();
        fleet.start(0, HOSTS).await.unwrap();
        let mut c = client(&endpoints).await.unwrap();
        let start = Instant::now();
        // The hollow hosts and the controller's own host.
        while registered(&mut c).await.unwrap() < i64::try_from(HOSTS + 1).unwrap() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "not all registered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let store = Store::connect(&endpoints, Duration::from_secs(5))
            .await
            .unwrap();
        store.apply_spec(&spec("hollow/roll:1")).await.unwrap();
        let applied = Instant::now();
        loop {
            let (ok, total) = settled(&store).await.unwrap();
            // agent on 20, web 30 over 20, roll on 5: 45 assignments at least.
            if total >= HOSTS + 20 + 5 && ok == total {
                break;
            }
            assert!(
                applied.elapsed() < Duration::from_secs(20),
                "{ok} of {total} assignments ready"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("apply to every assignment ready: {:?}", applied.elapsed());

        // What any reader of the fleet sees: every group ready at the spec's revision.
        let out = j.ok(&[
            "fleet",
            "get",
            "groups",
            "-o",
            "json",
            "--endpoints",
            &etcd.endpoint(),
        ]);
        let groups: serde_json::Value = serde_json::from_str(&out).unwrap();
        let ready: Vec<(String, u64, u64)> = groups
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["name"].as_str().unwrap().to_owned(),
                    g["ready_now"].as_u64().unwrap(),
                    g["desired"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ready,
            vec![
                ("agent".into(), 20, 20),
                ("roll".into(), 5, 5),
                ("web".into(), 30, 30)
            ],
            "{out}"
        );

        // A new revision reaches the 5 rollout hosts.
        let roll: GroupName = "roll".parse().unwrap();
        let targets = fleet.rollout_hosts();
        assert_eq!(targets.len(), 5);
        let r = rollout(
            &fleet,
            &store,
            &spec("hollow/roll:2"),
            &roll,
            &targets,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert!(
            r.end_to_end.is_some(),
            "{} hosts missing",
            r.per_host.missing
        );
        eprintln!("roll:2 on 5 hosts: {:?}", r.end_to_end);
        // Its last wave's gate: only a rollout that is done is what a failure goes back to.
        let waited = std::time::Instant::now();
        loop {
            let rollouts = store.rollouts().await.unwrap();
            if rollouts
                .get(&roll)
                .is_some_and(|r| r.state == juice_fleet::rollout::State::Done)
            {
                break;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(20),
                "the rollout of roll:2 is not done: {rollouts:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A revision the hollow hosts are told to fail fails on the first wave's host, and
        // every touched host goes back to the old revision.
        let old = juice_fleet::plan::revision(&spec("hollow/roll:2").group[&roll]);
        let f = fail(
            &fleet,
            &store,
            &spec("hollow/roll:bad"),
            &roll,
            &old,
            &targets,
            Duration::from_secs(4),
            false,
        )
        .await
        .unwrap();
        assert!(f.first_failure.is_some());
        assert_eq!(
            f.touched, 1,
            "waves [\"1\", \"100%\"]: the first wave is one host"
        );
        assert!(f.back.is_some(), "the touched host is not back on {old}");
        let assigned = store.assignments().await.unwrap();
        for h in &targets {
            assert_eq!(assigned.hosts[h][&roll].revision, old, "{h}");
        }
        let rollouts = store.rollouts().await.unwrap();
        assert_eq!(rollouts[&roll].state, juice_fleet::rollout::State::Failed);

        // Three hosts killed (no revoke) are gone within the lease + 2 s.
        let victims: Vec<_> = fleet.hosts.keys().rev().take(3).cloned().collect();
        let l = kill(&mut fleet, &victims, Duration::from_secs(LEASE_SECS + 2))
            .await
            .unwrap();
        assert_eq!(l.missing, 0, "{}", l.lines("kill"));
        eprintln!("{}", l.lines("kill"));
        assert_eq!(
            registered(&mut c).await.unwrap(),
            i64::try_from(HOSTS + 1 - 3).unwrap()
        );
    });
}
