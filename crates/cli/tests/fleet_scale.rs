//! What the fleet needs at 10,000 hosts, against a real etcd (started here on loopback,
//! killed by PID): a prefix read larger than gRPC's 4 MiB answer limit, read in pages; and
//! a host whose calls pass their deadline (etcd paused with SIGSTOP) that keeps its lease
//! when etcd answers again instead of granting itself a new one (the lease storm of the
//! 10,000-host benchmark runs).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Etcd;
use juice_fleet::report::report_key;
use juice_fleet::{Endpoints, GroupName, HostId, Registration, Report, Status, Store};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// 1,200 reports of about 4.7 KB each (5.6 MB under `reports/`): one range answer would
/// pass gRPC's 4 MiB limit, as an unpaged read here shows; `Store::reports` reads all of
/// them, each intact.
#[test]
fn a_prefix_larger_than_grpcs_answer_limit_is_read_whole_in_pages() {
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let endpoints: Endpoints = etcd.endpoint().parse().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        let group: GroupName = "web".parse().unwrap();
        let mut written = 0usize;
        for batch in 0..12 {
            let ops: Vec<etcd_client::TxnOp> = (0..100)
                .map(|i| {
                    let host: HostId = format!("host-{batch:02}-{i:03}").parse().unwrap();
                    let report = Report {
                        revision: "0123456789ab".into(),
                        size: 1,
                        ready: 1,
                        status: "ok".into(),
                        restarts: 0,
                        error: Some(format!("{host} ").repeat(360)),
                        written_ms: 1,
                    };
                    let value = serde_json::to_vec(&report).unwrap();
                    written += value.len();
                    etcd_client::TxnOp::put(report_key(&host, &group), value, None)
                })
                .collect();
            client
                .txn(etcd_client::Txn::new().and_then(ops))
                .await
                .unwrap();
        }
        assert!(written > 5 << 20, "only {written} bytes written");

        // One range of the whole prefix is refused: the answer is over the limit.
        let whole = client
            .get(
                juice_fleet::report::REPORTS,
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await;
        let err = whole.expect_err("an unpaged read of 5.6 MB should pass gRPC's 4 MiB limit");
        println!("unpaged read: {err}");

        let store = Store::connect(&endpoints, Duration::from_secs(10))
            .await
            .unwrap();
        let reports = store.reports().await.unwrap();
        assert!(reports.malformed.is_empty(), "{:?}", reports.malformed);
        assert_eq!(reports.hosts.len(), 1200);
        for (host, groups) in &reports.hosts {
            let r = &groups[&group];
            assert_eq!(
                r.error.as_deref(),
                Some(format!("{host} ").repeat(360).as_str())
            );
        }
    });
}

/// The lease ids etcd has now, as `etcdctl lease list` prints them (hex).
fn leases(etcd: &Etcd) -> Vec<i64> {
    let out = etcd.etcdctl().args(["lease", "list"]).output().unwrap();
    assert!(out.status.success(), "etcdctl lease list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| i64::from_str_radix(l.trim(), 16).unwrap())
        .collect()
}

/// Sends `signal` to etcd by its PID.
fn signal(etcd: &Etcd, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &etcd.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal} {}", etcd.pid());
}

/// Resumes a paused etcd when dropped, so a failed assertion leaves it killable.
struct Resume<'a>(&'a Etcd);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

/// A host registered with a 6 s lease; etcd paused for 3 s, so the host's renewal passes
/// its 2 s deadline and its registration is lost; etcd resumed well within the lease.
/// The host takes its lease over (the same id, still the only lease in etcd) instead of
/// granting a new one and leaving the old one to expire.
#[test]
fn a_host_whose_renewal_timed_out_keeps_its_lease_when_etcd_answers_again() {
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let endpoints: Endpoints = etcd.endpoint().parse().unwrap();
    let record = juice_fleet::HostRecord {
        id: "kept-lease".parse().unwrap(),
        hostname: "kept-lease".into(),
        cpus: 1,
        memory_bytes: 1 << 30,
        labels: Default::default(),
        backends: vec![juice_fleet::Backend::Sandbox],
        juice_version: "test".into(),
        os: "test".into(),
        kernel: "test".into(),
        started_ms: 0,
        binary_sha256: String::new(),
    };
    let rt = runtime();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let registration = Registration::new(endpoints, record, 6).unwrap();
    let task = rt.spawn(registration.run(move |s| {
        let line = match s {
            Status::Registered { lease, .. } => format!("registered {lease}"),
            Status::Lost { error, .. } => format!("lost {error}"),
        };
        let _ = tx.send(line);
    }));
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let lease: i64 = first
        .strip_prefix("registered ")
        .unwrap_or_else(|| panic!("first status: {first}"))
        .parse()
        .unwrap();
    assert_eq!(leases(&etcd), vec![lease]);

    // Pause etcd past a renewal's deadline (a third of the lease, 2 s), within the lease.
    signal(&etcd, "-STOP");
    let resume = Resume(&etcd);
    let paused = Instant::now();
    let lost = rx.recv_timeout(Duration::from_secs(8)).unwrap();
    assert!(lost.starts_with("lost "), "{lost}");
    println!("after {:?} paused: {lost}", paused.elapsed());
    drop(resume);

    let again = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        again,
        format!("registered {lease}"),
        "the lease was not kept"
    );
    assert_eq!(leases(&etcd), vec![lease], "a second lease was granted");
    task.abort();
}
