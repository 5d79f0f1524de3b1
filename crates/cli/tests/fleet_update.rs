//! Host updates across the fleet against a real etcd and real daemons, each in a network
//! namespace of its own (as in tests/fleet.rs): the daemons update their own binary a few
//! at a time through the update slots, their instances running on; a host killed while
//! it holds a slot frees it with its lease; a daemon that fails its check is refused,
//! recorded, and pauses the update.
//!
//! Each daemon runs from a copy of `juice` (and `juice-init`) in a temp dir, which the
//! update replaces: the built binaries are never touched.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::fleet::{host_id, local_instances};
use common::{ChildGuard, Etcd, InstanceSweeper, Juice, NetnsHost};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Long enough for a daemon to re-execute itself and take its lease over (it renews it
/// just before), short enough that a dead host's slot comes back soon.
const LEASE_SECS: u64 = 6;

/// One instance of hello-web on every host.
const FLEET: &str = r#"
[group.web]
image = "hello-web:0.1.0"
per_host = true
resources = { cpus = 0.1, memory = "64MiB" }
"#;

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success(), "{}", common::text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A host: its namespace, home, binary directory and daemon.
struct Host {
    j: Juice,
    ns: NetnsHost,
    bin: PathBuf,
    daemon: Option<ChildGuard>,
    _sweeper: InstanceSweeper,
}

impl Host {
    fn exe(&self) -> PathBuf {
        self.bin.join("juice")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.j.home.path().join("daemon.log")).unwrap_or_default()
    }
}

/// `n` hosts in the fleet of a new etcd, the first a controller candidate, each running
/// one ready instance of the fleet's web.
struct Fleet {
    hosts: Vec<Host>,
    etcd: Etcd,
    scratch: tempfile::TempDir,
    old_sha: String,
}

impl Fleet {
    fn start(n: u8) -> Fleet {
        let scratch = tempfile::tempdir().unwrap();
        let namespaces: Vec<NetnsHost> = (1..=n).map(NetnsHost::new).collect();
        let outside: Vec<_> = namespaces.iter().map(|h| h.outside).collect();
        let etcd = Etcd::start_also_on(&scratch.path().join("etcd"), &outside);
        let app = common::write_appliance(
            &scratch.path().join("hello-web"),
            &common::hello_web_manifest(),
        );
        let built = Path::new(env!("CARGO_BIN_EXE_juice"));
        let mut hosts = Vec::new();
        for (i, ns) in namespaces.into_iter().enumerate() {
            let j = Juice::new();
            let sweeper = InstanceSweeper(j.home.path().to_owned());
            j.ok(&["build", &app]);
            let bin = scratch.path().join(format!("bin{i}"));
            std::fs::create_dir(&bin).unwrap();
            for b in ["juice", "juice-init"] {
                std::fs::copy(built.with_file_name(b), bin.join(b)).unwrap();
            }
            hosts.push(Host {
                j,
                ns,
                bin,
                daemon: None,
                _sweeper: sweeper,
            });
        }
        let old_sha = sha256(&hosts[0].exe());
        let lease = LEASE_SECS.to_string();
        for (i, h) in hosts.iter_mut().enumerate() {
            let endpoint = etcd.endpoint_at(h.ns.outside);
            let mut args = vec!["--fleet", &endpoint, "--fleet-lease", &lease];
            if i == 0 {
                args.push("--fleet-controller");
            }
            h.daemon =
                Some(h.ns.daemon_from(&h.exe(), &h.j, &args, &h.j.home.path().join("daemon.log")));
        }
        let fleet = Fleet {
            hosts,
            etcd,
            scratch,
            old_sha,
        };
        fleet.until(
            "every host registered with its binary's sha256",
            Duration::from_secs(20),
            |s| {
                s["hosts"].as_array().is_some_and(|h| {
                    h.len() == usize::from(n)
                        && h.iter()
                            .all(|h| h["sha256"].as_str().is_some_and(|x| x.len() == 64))
                })
            },
        );
        let file = fleet.scratch.path().join("fleet.toml");
        std::fs::write(&file, FLEET).unwrap();
        fleet.hosts[0].j.ok(&[
            "fleet",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--endpoints",
            &fleet.etcd.endpoint(),
        ]);
        for h in &fleet.hosts {
            let start = Instant::now();
            while !common::local_groups(&h.j)
                .get("fleet-web")
                .is_some_and(|g| g["ready"] == 1 && g["size"] == 1)
            {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "{} runs no ready fleet-web after 60 s:\n{}",
                    h.j.home.path().display(),
                    h.log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        fleet
    }

    /// `juice fleet update status -o json`.
    fn status(&self) -> serde_json::Value {
        let out = self.hosts[0].j.ok(&[
            "fleet",
            "update",
            "status",
            "-o",
            "json",
            "--endpoints",
            &self.etcd.endpoint(),
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    fn until(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> (Duration, serde_json::Value) {
        let start = Instant::now();
        loop {
            let s = self.status();
            if done(&s) {
                return (start.elapsed(), s);
            }
            if start.elapsed() > limit {
                let logs: Vec<String> = self.hosts.iter().map(Host::log).collect();
                panic!(
                    "not so after {limit:?}: {what}; status {s:#}\nlogs:\n{}",
                    logs.join("\n----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Packs `binary` as `tag` in every host's store (the same bytes give the same
    /// image), with `version` if given.
    fn pack(&self, binary: &Path, tag: &str, version: Option<&str>) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        for h in &self.hosts {
            let mut args = vec![
                "fleet",
                "update",
                "pack",
                "--binary",
                binary.to_str().unwrap(),
                "--tag",
                tag,
                "-o",
                "json",
            ];
            if let Some(v) = version {
                args.extend(["--version", v]);
            }
            last = serde_json::from_str(&h.j.ok(&args)).unwrap();
        }
        last
    }

    fn update(&self, tag: &str, slots: &str, gate: &str) {
        self.update_with(tag, slots, gate, &[]);
    }

    fn update_with(&self, tag: &str, slots: &str, gate: &str, more: &[&str]) {
        let endpoint = self.etcd.endpoint();
        let mut args = vec![
            "fleet",
            "update",
            "daemon",
            tag,
            "--slots",
            slots,
            "--gate",
            gate,
            "--endpoints",
            &endpoint,
        ];
        args.extend(more);
        self.hosts[0].j.ok(&args);
    }
}

/// Every state of `update/slots/` etcd went through, watched from the test: at each
/// change, the holder of each slot.
struct SlotWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlotWatch {
    fn start(endpoint: String) -> SlotWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let prefix = "/juice/v1/update/slots/";
                let mut c = etcd_client::Client::connect([endpoint], None)
                    .await
                    .unwrap();
                let now = c
                    .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                    .await
                    .unwrap();
                let mut held: BTreeMap<String, String> = BTreeMap::new();
                for kv in now.kvs() {
                    held.insert(kv.key_str().unwrap().to_owned(), holder(kv.value()));
                }
                v.lock().unwrap().push(held.clone());
                let from = now.header().unwrap().revision() + 1;
                let (_w, mut stream) = c
                    .watch(
                        prefix,
                        Some(
                            etcd_client::WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(from),
                        ),
                    )
                    .await
                    .unwrap()
                    .split();
                ready_tx.send(()).unwrap();
                while !s.load(Ordering::Relaxed) {
                    let Ok(message) =
                        tokio::time::timeout(Duration::from_millis(200), stream.message()).await
                    else {
                        continue;
                    };
                    // etcd stopped (the test ends or failed): what was seen stands.
                    let Ok(Some(answer)) = message else { break };
                    for e in answer.events() {
                        let kv = e.kv().unwrap();
                        let key = kv.key_str().unwrap().to_owned();
                        match e.event_type() {
                            etcd_client::EventType::Put => {
                                held.insert(key, holder(kv.value()));
                            }
                            etcd_client::EventType::Delete => {
                                held.remove(&key);
                            }
                        }
                        v.lock().unwrap().push(held.clone());
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the watch on the slots started");
        SlotWatch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Stops the watch: every state seen.
    fn finish(mut self) -> Vec<BTreeMap<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the watch thread did not panic");
        }
        self.seen.lock().unwrap().clone()
    }

    fn now(&self) -> BTreeMap<String, String> {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for SlotWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn holder(value: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(value).unwrap();
    v["host"].as_str().unwrap().to_owned()
}

/// A different daemon: the same juice with bytes appended (an ELF with trailing bytes
/// still runs), so its sha256 differs.
fn different_juice(dir: &Path) -> PathBuf {
    let p = dir.join("juice-next");
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_juice")).unwrap();
    bytes.extend_from_slice(b"\njuice host update test build\n");
    std::fs::write(&p, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn the_update_semaphore_is_never_exceeded_and_every_host_ends_on_the_new_daemon_with_its_instances()
{
    let _turn = serial();
    let fleet = Fleet::start(3);
    let new = different_juice(fleet.scratch.path());
    let packed = fleet.pack(&new, "juice-daemon:next", None);
    let new_sha = sha256(&new);
    assert_eq!(packed["sha256"], new_sha.as_str(), "{packed}");
    assert_eq!(packed["version"], env!("CARGO_PKG_VERSION"), "{packed}");
    assert_ne!(new_sha, fleet.old_sha);

    let before: Vec<Vec<(String, i64)>> = fleet
        .hosts
        .iter()
        .map(|h| local_instances(&h.j, "fleet-web"))
        .collect();
    let daemons: Vec<u32> = fleet
        .hosts
        .iter()
        .map(|h| h.daemon.as_ref().unwrap().0.id())
        .collect();
    for b in &before {
        assert_eq!(b.len(), 1, "{before:?}");
    }
    let watch = SlotWatch::start(fleet.etcd.endpoint());
    let started = Instant::now();
    fleet.update("juice-daemon:next", "1", "3s");
    let (took, status) = {
        let start = Instant::now();
        loop {
            // The instances keep running through every daemon's re-execution.
            for (i, b) in before.iter().enumerate() {
                assert!(
                    pid_alive(b[0].1),
                    "host {i}'s instance {:?} died during the update",
                    b[0]
                );
            }
            let s = fleet.status();
            assert_eq!(
                s["failed"],
                serde_json::json!([]),
                "logs:\n{}",
                fleet
                    .hosts
                    .iter()
                    .map(Host::log)
                    .collect::<Vec<_>>()
                    .join("\n----\n")
            );
            let done = s["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["sha256"] == new_sha.as_str())
                && s["slots"].as_array().unwrap().is_empty();
            if done {
                break (start.elapsed(), s);
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "not every host updated after 180 s: {s:#}\nlogs:\n{}",
                fleet
                    .hosts
                    .iter()
                    .map(Host::log)
                    .collect::<Vec<_>>()
                    .join("\n----\n")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let seen = watch.finish();
    eprintln!(
        "3 hosts updated one at a time (gate 3 s) in {took:?} ({:?} since the command); {} slot states watched",
        started.elapsed(),
        seen.len()
    );
    let most = seen.iter().map(BTreeMap::len).max().unwrap_or(0);
    assert!(most <= 1, "{most} slots held at once: {seen:?}");
    let holders: BTreeSet<&String> = seen.iter().flat_map(BTreeMap::values).collect();
    let ids: BTreeSet<String> = fleet.hosts.iter().map(|h| host_id(&h.j)).collect();
    assert_eq!(
        holders.into_iter().cloned().collect::<BTreeSet<_>>(),
        ids,
        "each host held the slot once: {seen:?}"
    );
    assert_eq!(status["paused"], false, "{status:#}");
    assert!(
        status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["updated"] == true),
        "{status:#}"
    );

    for (i, h) in fleet.hosts.iter().enumerate() {
        // The same process (re-executed in place), running the new binary; the old one kept.
        let pid = daemons[i];
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(exe, h.exe(), "host {i}'s daemon runs {}", exe.display());
        assert_eq!(sha256(&h.exe()), new_sha, "host {i}");
        assert_eq!(sha256(&h.bin.join("juice.prev")), fleet.old_sha, "host {i}");
        // Live restore: the same instances, ready.
        assert_eq!(local_instances(&h.j, "fleet-web"), before[i], "host {i}");
        assert_eq!(
            common::local_groups(&h.j)["fleet-web"]["ready"],
            1,
            "host {i}"
        );
        let log = h.log();
        assert!(
            log.contains("host update done; slot given back"),
            "host {i}:\n{log}"
        );
        assert!(
            !h.j.home.path().join("fleet/update.json").exists(),
            "host {i}"
        );
    }
    // The fleet's group stayed placed and ready.
    let groups = fleet.hosts[0].j.ok(&[
        "fleet",
        "get",
        "groups",
        "-o",
        "json",
        "--endpoints",
        &fleet.etcd.endpoint(),
    ]);
    let groups: serde_json::Value = serde_json::from_str(&groups).unwrap();
    assert_eq!(groups[0]["ready_now"], 3, "{groups:#}");
}

#[test]
fn a_host_killed_while_it_holds_a_slot_frees_it_with_its_lease_and_the_others_go_on() {
    let _turn = serial();
    let mut fleet = Fleet::start(3);
    let new = different_juice(fleet.scratch.path());
    fleet.pack(&new, "juice-daemon:next", None);
    let new_sha = sha256(&new);
    let watch = SlotWatch::start(fleet.etcd.endpoint());
    fleet.update("juice-daemon:next", "1", "5s");
    let start = Instant::now();
    let first = loop {
        if let Some(h) = watch.now().values().next() {
            break h.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no host took the slot in 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let victim = fleet
        .hosts
        .iter()
        .position(|h| host_id(&h.j) == first)
        .expect("a host of the fleet holds the slot");
    let mut daemon = fleet.hosts[victim].daemon.take().unwrap();
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let killed = Instant::now();
    eprintln!("host {victim} SIGKILLed while holding the slot");
    // The slot goes with the dead host's lease, and another host takes it.
    let freed = loop {
        let now = watch.now();
        if !now.values().any(|h| *h == first) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE_SECS + 2),
            "the dead host's slot still held {:?} after its death",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("the dead host's slot was free {freed:?} after its death (lease {LEASE_SECS} s)");
    let others: Vec<String> = fleet
        .hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, h)| host_id(&h.j))
        .collect();
    let (took, _) = fleet.until(
        "the two live hosts on the new daemon, no slot held",
        Duration::from_secs(180),
        |s| {
            let hosts = s["hosts"].as_array().unwrap();
            hosts.len() == 2
                && hosts.iter().all(|h| {
                    h["sha256"] == new_sha.as_str()
                        && others.iter().any(|o| h["host"] == o.as_str())
                })
                && s["slots"].as_array().unwrap().is_empty()
        },
    );
    eprintln!("the two others updated {took:?} after the slot came back");
    let seen = watch.finish();
    let most = seen.iter().map(BTreeMap::len).max().unwrap_or(0);
    assert!(most <= 1, "{most} slots held at once: {seen:?}");
    for o in &others {
        assert!(
            seen.iter().any(|s| s.values().any(|h| h == o)),
            "{o} never held the slot: {seen:?}"
        );
    }
}

#[test]
fn a_daemon_that_fails_its_check_is_refused_recorded_and_no_second_host_starts() {
    let _turn = serial();
    let fleet = Fleet::start(3);
    // /bin/false as the daemon: it answers nothing and exits 1.
    let bad = fleet.scratch.path().join("false");
    std::fs::copy("/bin/false", &bad).unwrap();
    fleet.pack(&bad, "juice-daemon:bad", Some(env!("CARGO_PKG_VERSION")));
    let watch = SlotWatch::start(fleet.etcd.endpoint());
    fleet.update("juice-daemon:bad", "1", "1s");
    let (took, status) = fleet.until("a failure recorded", Duration::from_secs(60), |s| {
        s["failed"].as_array().is_some_and(|f| !f.is_empty())
    });
    eprintln!("the bad daemon was refused and recorded {took:?} after the update was asked for");
    let failed = status["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{status:#}");
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("refused by its check") && reason.contains("exited with"),
        "{reason}"
    );
    assert_eq!(status["paused"], true, "{status:#}");
    // Paused: for a few more seconds (more than the rounds of every host), nobody starts.
    std::thread::sleep(Duration::from_secs(4));
    let status = fleet.status();
    assert_eq!(status["failed"].as_array().unwrap().len(), 1, "{status:#}");
    assert!(status["slots"].as_array().unwrap().is_empty(), "{status:#}");
    let seen = watch.finish();
    let holders: BTreeSet<&String> = seen.iter().flat_map(BTreeMap::values).collect();
    assert_eq!(
        holders.len(),
        1,
        "only the first host may have started: {seen:?}"
    );
    assert_eq!(
        holders.into_iter().next().unwrap(),
        failed[0]["host"].as_str().unwrap()
    );
    // Nothing was replaced anywhere.
    for (i, h) in fleet.hosts.iter().enumerate() {
        assert_eq!(sha256(&h.exe()), fleet.old_sha, "host {i}");
        assert!(!h.bin.join("juice.prev").exists(), "host {i}");
        assert!(
            h.daemon
                .as_ref()
                .is_some_and(|d| pid_alive(i64::from(d.0.id()))),
            "host {i}'s daemon"
        );
    }
    let table = fleet.hosts[0].j.ok(&[
        "fleet",
        "update",
        "status",
        "--endpoints",
        &fleet.etcd.endpoint(),
    ]);
    assert!(
        table.contains("FAILED on") && table.contains("the update is paused"),
        "{table}"
    );

    // Resumed: the failure is cleared, and the next host to try fails (and pauses) again.
    let watch = SlotWatch::start(fleet.etcd.endpoint());
    let out = fleet.hosts[0].j.ok(&[
        "fleet",
        "update",
        "resume",
        "--endpoints",
        &fleet.etcd.endpoint(),
    ]);
    assert!(out.starts_with("1 failure(s) cleared"), "{out}");
    fleet.until("a failure recorded again", Duration::from_secs(60), |s| {
        s["failed"].as_array().is_some_and(|f| f.len() == 1)
    });
    let seen = watch.finish();
    assert!(
        seen.iter().map(BTreeMap::len).max().unwrap_or(0) <= 1,
        "{seen:?}"
    );
}

/// The slots `juice os update` takes on a fleet host, against a real etcd through the
/// fleet crate's own calls (the daemon's OS update needs a Juice OS boot, which this
/// test has not): an OS slot counts against the daemon update's slots, is held under a
/// lease of its own that outlives the host's, is given back only as an OS slot, and is
/// refused while all are held or a failure is recorded.
#[test]
fn an_os_update_takes_a_slot_of_the_same_semaphore_under_a_lease_that_outlives_the_reboot() {
    use juice_fleet::update::{Desired, Failure, Step, next_step};
    let _turn = serial();
    let scratch = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&scratch.path().join("etcd"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoints: juice_fleet::Endpoints = etcd.endpoint().parse().unwrap();
        let store = juice_fleet::Store::connect(&endpoints, Duration::from_secs(3))
            .await
            .unwrap();
        let (a, b): (juice_fleet::HostId, juice_fleet::HostId) =
            ("aaaa".parse().unwrap(), "bbbb".parse().unwrap());
        store
            .put_desired(&Desired {
                image: "juice-daemon:next".into(),
                version: "0.2.0".into(),
                sha256: "bb".repeat(32),
                slots: 1,
                gate_ms: 1000,
                deadline_ms: 60_000,
                written_ms: 1,
            })
            .await
            .unwrap();
        let ttl = Duration::from_secs(900);
        let got = store.acquire_os_slot(&a, ttl, "1.2.0").await.unwrap();
        assert_eq!(got, Ok(0));
        // The one slot is A's: B's OS update is refused, naming who holds it, and B's
        // daemon update waits.
        let refused = store.acquire_os_slot(&b, ttl, "1.2.0").await.unwrap();
        let why = refused.unwrap_err();
        assert!(
            why.contains("all 1 update slot(s) of the fleet are held (by aaaa (os 1.2.0))"),
            "{why}"
        );
        let state = store.update_state().await.unwrap();
        assert!(
            matches!(next_step(&b, "aa", &state, false), Step::Wait(w) if w.contains("all 1")),
            "{state:?}"
        );
        // A keeps its OS slot (its daemon update, if it needs one, waits for the verdict).
        assert!(
            matches!(next_step(&a, "aa", &state, false), Step::Wait(w) if w.contains("OS update"))
        );
        // The slot's lease is its own, long enough for a reboot and the trial.
        let (_, slot, lease) = state.held_by(&a).unwrap();
        assert_eq!(slot.what, "os 1.2.0");
        let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        let left = c.lease_time_to_live(lease, None).await.unwrap().ttl();
        assert!(left > 800, "the OS slot's lease has {left} s left");
        // Only an OS slot is given back by the verdict's release.
        assert_eq!(
            store
                .release_slot_if(&b, juice_fleet::update::Slot::is_os)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .release_slot_if(&a, juice_fleet::update::Slot::is_os)
                .await
                .unwrap(),
            Some(0)
        );
        assert_eq!(
            store.acquire_os_slot(&b, ttl, "1.2.0").await.unwrap(),
            Ok(0)
        );
        // A daemon slot is not an OS slot.
        assert_eq!(store.release_slot(&b).await.unwrap(), Some(0));
        let lease = c.lease_grant(30, None).await.unwrap().id();
        assert_eq!(
            store
                .acquire_slot(&b, lease, 1, "daemon 0.2.0 bb")
                .await
                .unwrap(),
            Some(0)
        );
        // A host never holds two: asking again gives the one it has.
        assert_eq!(
            store
                .acquire_slot(&b, lease, 1, "daemon 0.2.0 bb")
                .await
                .unwrap(),
            Some(0)
        );
        assert_eq!(
            store
                .release_slot_if(&b, juice_fleet::update::Slot::is_os)
                .await
                .unwrap(),
            None
        );
        assert_eq!(store.release_slot(&b).await.unwrap(), Some(0));
        // A recorded failure pauses OS updates too.
        store
            .put_failure(&Failure {
                host: b.clone(),
                sha256: "bb".into(),
                version: "0.2.0".into(),
                reason: "test".into(),
                at_ms: 1,
            })
            .await
            .unwrap();
        let why = store
            .acquire_os_slot(&a, ttl, "1.2.0")
            .await
            .unwrap()
            .unwrap_err();
        assert!(why.contains("paused: failed on bbbb"), "{why}");
        assert_eq!(store.clear_failures().await.unwrap(), 1);
        assert_eq!(
            store.acquire_os_slot(&a, ttl, "1.2.0").await.unwrap(),
            Ok(0)
        );
    });
}

/// A new daemon that is not healthy for its gate within the deadline goes back to the
/// previous binary (re-executed in place), which records the failure; the update pauses.
/// The deadline (1 s) is shorter than the gate (60 s) here, so the new daemon cannot pass.
#[test]
fn a_new_daemon_not_healthy_within_its_deadline_goes_back_to_the_previous_one_and_pauses_the_update()
 {
    let _turn = serial();
    let fleet = Fleet::start(2);
    let new = different_juice(fleet.scratch.path());
    fleet.pack(&new, "juice-daemon:next", None);
    let before: Vec<Vec<(String, i64)>> = fleet
        .hosts
        .iter()
        .map(|h| local_instances(&h.j, "fleet-web"))
        .collect();
    let watch = SlotWatch::start(fleet.etcd.endpoint());
    fleet.update_with("juice-daemon:next", "1", "60s", &["--deadline", "1s"]);
    let (took, status) = fleet.until("a failure recorded", Duration::from_secs(60), |s| {
        s["failed"].as_array().is_some_and(|f| !f.is_empty())
            && s["slots"].as_array().is_some_and(Vec::is_empty)
    });
    eprintln!(
        "the new daemon was undone and its failure recorded {took:?} after the update was asked for"
    );
    let failed = &status["failed"][0];
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("were not all ready for 1m within 1s"),
        "{reason}"
    );
    let i = fleet
        .hosts
        .iter()
        .position(|h| failed["host"] == host_id(&h.j).as_str())
        .expect("a host of the fleet failed");
    let h = &fleet.hosts[i];
    // The previous binary is back in place, run by the same process, with the same instances.
    assert_eq!(sha256(&h.exe()), fleet.old_sha);
    assert!(!h.bin.join("juice.prev").exists());
    let pid = h.daemon.as_ref().unwrap().0.id();
    assert_eq!(
        sha256(Path::new(&format!("/proc/{pid}/exe"))),
        fleet.old_sha
    );
    let log = h.log();
    assert!(
        log.contains("host update failed; going back to the previous daemon"),
        "{log}"
    );
    assert!(log.contains("host update failed and was undone"), "{log}");
    assert_eq!(
        log.matches("juice daemon started").count(),
        3,
        "old, new, old again:\n{log}"
    );
    fleet.until(
        "the host's record says the old binary again",
        Duration::from_secs(20),
        |s| {
            s["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["sha256"] == fleet.old_sha.as_str())
        },
    );
    for (j, h) in fleet.hosts.iter().enumerate() {
        assert_eq!(local_instances(&h.j, "fleet-web"), before[j], "host {j}");
    }
    std::thread::sleep(Duration::from_secs(3));
    let seen = watch.finish();
    let holders: BTreeSet<&String> = seen.iter().flat_map(BTreeMap::values).collect();
    assert_eq!(holders.len(), 1, "no second host may start: {seen:?}");
}

/// A new daemon that dies during its trial and is started again (as a supervisor would)
/// from the same path, i.e. the new binary, goes back to `.prev` at that start; the
/// previous daemon records the failure and gives the slot back.
#[test]
fn a_new_daemon_that_dies_during_its_trial_goes_back_to_the_previous_one_at_its_next_start() {
    let _turn = serial();
    let mut fleet = Fleet::start(2);
    let new = different_juice(fleet.scratch.path());
    let new_sha = sha256(&new);
    fleet.pack(&new, "juice-daemon:next", None);
    fleet.update("juice-daemon:next", "1", "10m");
    // The first host to run the new binary, on trial (its gate is long).
    let (_, status) = fleet.until("a host on the new daemon", Duration::from_secs(60), |s| {
        s["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["sha256"] == new_sha.as_str())
    });
    let id = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["sha256"] == new_sha.as_str())
        .unwrap()["host"]
        .as_str()
        .unwrap()
        .to_owned();
    let i = fleet
        .hosts
        .iter()
        .position(|h| host_id(&h.j) == id)
        .unwrap();
    let before = local_instances(&fleet.hosts[i].j, "fleet-web");
    let mut daemon = fleet.hosts[i].daemon.take().unwrap();
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    // Started again from the same path, as a supervisor would.
    let h = &mut fleet.hosts[i];
    let endpoint = fleet.etcd.endpoint_at(h.ns.outside);
    let lease = LEASE_SECS.to_string();
    h.daemon = Some(h.ns.daemon_from(
        &h.exe(),
        &h.j,
        &["--fleet", &endpoint, "--fleet-lease", &lease],
        &h.j.home.path().join("daemon.log"),
    ));
    let (took, status) = fleet.until("the failure recorded", Duration::from_secs(30), |s| {
        s["failed"].as_array().is_some_and(|f| f.len() == 1)
    });
    eprintln!("the restarted new daemon went back and its failure was recorded in {took:?}");
    let h = &fleet.hosts[i];
    let reason = status["failed"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("stopped before it was healthy"), "{reason}");
    assert_eq!(status["failed"][0]["host"], id.as_str());
    assert_eq!(sha256(&h.exe()), fleet.old_sha);
    let pid = h.daemon.as_ref().unwrap().0.id();
    assert_eq!(
        sha256(Path::new(&format!("/proc/{pid}/exe"))),
        fleet.old_sha
    );
    assert_eq!(local_instances(&h.j, "fleet-web"), before);
    fleet.until("the slot given back", Duration::from_secs(10), |s| {
        s["slots"].as_array().is_some_and(Vec::is_empty)
    });
}
