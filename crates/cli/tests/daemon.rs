//! The host agent, for real: `juice daemon` with sandboxed instances, driven
//! through the `juice` CLI (which talks to it only through its API).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{ChildGuard, InstanceSweeper, Juice, daemon, free_port};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a test with hello-web instances starts from: its turn (they run one at a
/// time), the example program checked, a fresh home, a free port, and a sweeper that
/// kills whatever instances the test leaves behind. Fields drop in order: the
/// sweeper (after the test's daemons, declared later), then the home, then the turn.
struct Host {
    _sweeper: InstanceSweeper,
    j: Juice,
    port: u16,
    _serial: MutexGuard<'static, ()>,
}

impl Host {
    fn new() -> Host {
        let serial = serial();
        common::hello_web_binary();
        let j = Juice::new();
        Host {
            _sweeper: InstanceSweeper(j.home.path().to_owned()),
            j,
            port: free_port(),
            _serial: serial,
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the group `web` has 2 ready instances.
fn wait_ready(j: &Juice, what: &str, timeout: Duration) {
    wait_for(what, timeout, || group(j, "web")["ready"] == 2);
}

/// Applies a fresh site (`site(j, name, port, "/healthz")`) to the running daemon and
/// waits at most `timeout` for its 2 ready instances.
fn applied(j: &Juice, name: &str, port: u16, timeout: Duration) {
    j.ok(&["apply", "-f", &site(j, name, port, "/healthz")]);
    wait_ready(j, "2 ready instances", timeout);
}

/// Deletes the group `web` and waits for its instances to stop.
fn delete_web(j: &Juice) {
    j.ok(&["delete", "web"]);
    wait_for("the instances to stop", Duration::from_secs(20), || {
        instances(j).is_empty()
    });
}

/// How many instances have a state file in the home (the host's view, not the daemon's).
fn instance_records(j: &Juice) -> usize {
    std::fs::read_dir(j.home.path().join("instances"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("state.json").exists())
        .count()
}

fn json(j: &Juice, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&j.ok(&a)).unwrap()
}

fn group(j: &Juice, name: &str) -> serde_json::Value {
    json(j, &["get", "groups"])
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .cloned()
        .unwrap_or_default()
}

fn instances(j: &Juice) -> Vec<serde_json::Value> {
    json(j, &["get", "instances"]).as_array().unwrap().clone()
}

fn get(port: u16, path: &str) -> std::io::Result<String> {
    let body = common::http_get(port, path, Duration::from_secs(3))?;
    if body.starts_with("HTTP/1.1 200") {
        Ok(body)
    } else {
        Err(std::io::Error::other(format!("answered {body:?}")))
    }
}

/// A site with one hello-web group; `health` is the path its health check probes.
fn site(j: &Juice, name: &str, port: u16, health: &str) -> String {
    let manifest = common::hello_web_manifest()
        .replace("http = \"/healthz\"", &format!("http = \"{health}\""));
    common::write_site(
        j,
        &format!("app-{name}"),
        &manifest,
        &format!("{name}.toml"),
        &format!(
            "[group.web]\nimage = \"./app-{name}\"\nsize = 2\npublish = [\"127.0.0.1:{port}:8080\"]\n\n[group.web.update]\nmax_unavailable = 1\nhealth_gate = \"2s\"\non_failure = \"rollback\"\n"
        ),
    )
}

/// Sends `GET /healthz` to `port` every 50 ms (at most `max` requests, for at
/// most `limit`) until `stop`; counts answers and failures (with the last error).
struct Client {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    last_error: Arc<Mutex<String>>,
    thread: std::thread::JoinHandle<()>,
}

impl Client {
    fn start(port: u16, max: usize, limit: Duration) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let last_error = Arc::new(Mutex::new(String::new()));
        let (s, o, f, e) = (stop.clone(), ok.clone(), failed.clone(), last_error.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            for _ in 0..max {
                if s.load(Ordering::Relaxed) || start.elapsed() > limit {
                    break;
                }
                match get(port, "/healthz") {
                    Ok(_) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        *e.lock().unwrap_or_else(|p| p.into_inner()) = err.to_string();
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Client {
            stop,
            ok,
            failed,
            last_error,
            thread,
        }
    }

    /// Requests made so far (answered or not).
    fn made(&self) -> usize {
        self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
}

#[test]
fn published_ports_keep_answering_while_the_daemon_is_killed_restarted_and_upgraded() {
    let host = Host::new();
    let (j, port) = (&host.j, host.port);
    let mut d1 = daemon(j);
    applied(j, "web", port, Duration::from_secs(30));
    wait_for("the published port", Duration::from_secs(10), || {
        get(port, "/healthz").is_ok()
    });

    // At most 60 s of requests, 20 a second.
    let client = Client::start(port, 1200, Duration::from_secs(60));
    // Waits `d` and returns how many requests were made meanwhile.
    let during = |d: Duration| {
        let before = client.made();
        std::thread::sleep(d);
        client.made() - before
    };
    let mut made = vec![("with the first daemon", during(Duration::from_millis(500)))];

    // SIGKILL: nothing is cleaned up, and the port keeps answering while no daemon runs.
    d1.0.kill().unwrap();
    d1.0.wait().unwrap();
    made.push(("with no daemon", during(Duration::from_secs(1))));
    let d2 = daemon(j);
    wait_ready(
        j,
        "the second daemon to adopt both instances",
        Duration::from_secs(20),
    );
    made.push(("with the second daemon", during(Duration::from_millis(500))));

    // The upgrade: the running daemon stops, and a binary installed at another path
    // (with its juice-init) takes over the same home.
    let new = tempfile::tempdir().unwrap();
    let built = Path::new(env!("CARGO_BIN_EXE_juice"));
    for bin in ["juice", "juice-init"] {
        std::fs::copy(built.with_file_name(bin), new.path().join(bin)).unwrap();
    }
    drop(d2);
    made.push(("between the daemons", during(Duration::from_secs(1))));
    let d3 = common::ChildGuard(
        Command::new(new.path().join("juice"))
            .arg("daemon")
            .env("JUICE_HOME", j.home.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the upgraded juice daemon starts"),
    );
    wait_for(
        "the upgraded daemon's socket",
        Duration::from_secs(10),
        || std::os::unix::net::UnixStream::connect(j.home.path().join("juice.sock")).is_ok(),
    );
    wait_ready(
        j,
        "the upgraded daemon to adopt both instances",
        Duration::from_secs(20),
    );
    made.push(("with the upgraded daemon", during(Duration::from_secs(1))));
    client.stop.store(true, Ordering::Relaxed);
    let Client {
        ok,
        failed,
        last_error,
        thread,
        ..
    } = client;
    thread.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} answered, {failed} failed; requests per phase: {made:?}");
    for (phase, n) in &made {
        assert!(*n >= 5, "only {n} requests {phase}: {made:?}");
    }
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed (last: {}); per phase {made:?}",
        ok + failed,
        last_error.lock().unwrap()
    );
    assert!(
        !j.ok(&["events"]).contains("was gone"),
        "no instance was replaced"
    );

    // Deleting the group withdraws the rules: the port is refused, not held.
    j.ok(&["delete", "web"]);
    wait_for("the port to be withdrawn", Duration::from_secs(20), || {
        matches!(
            std::net::TcpStream::connect(("127.0.0.1", port)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    });
    drop(d3);
}

#[test]
fn groups_heal_roll_back_by_themselves_and_survive_the_daemon() {
    let host = Host::new();
    let (j, port) = (&host.j, host.port);
    let good = site(j, "good", port, "/healthz");
    let mut d = daemon(j);

    let plan = j.ok(&["plan", "-f", &good]);
    assert!(plan.contains("web") && plan.contains("create"), "{plan}");
    assert!(
        j.ok(&["get", "groups"]).lines().count() <= 1,
        "plan changes nothing"
    );
    j.ok(&["apply", "-f", &good]);
    wait_ready(j, "2 ready instances", Duration::from_secs(20));
    assert!(get(port, "/").unwrap().contains("hello from juice"));
    assert!(
        j.ok(&["apply", "-f", &good]).contains("nothing to do"),
        "apply is idempotent"
    );

    wait_for(
        "the first rollout to finish",
        Duration::from_secs(20),
        || group(j, "web")["status"] == "ok",
    );
    // Data in the group's volume, written now, must outlive every replacement below.
    let marker = j.home.path().join("volumes/web/data/marker");
    std::fs::write(&marker, "kept").unwrap();

    // Self-healing: kill an instance outright.
    let victim = instances(j)[0].clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(victim["pid"].as_i64().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("a replacement", Duration::from_secs(20), || {
        let now = instances(j);
        now.len() == 2
            && now
                .iter()
                .all(|i| i["name"] != victim["name"] && i["health"] == "healthy")
    });
    assert!(j.ok(&["events"]).contains(&format!(
        "instance {} ended: killed by signal 9",
        victim["name"].as_str().unwrap()
    )));

    // A revision that starts but never passes its health check rolls back by itself,
    // while a client keeps getting answers.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match get(port, "/healthz") {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let broken = site(j, "broken", port, "/no-such-page");
    let out = j.ok(&["apply", "-f", &broken]);
    assert!(
        out.contains("replace") && out.contains("revision 2"),
        "{out}"
    );
    wait_for("the automatic rollback", Duration::from_secs(30), || {
        group(j, "web")["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("rolled-back"))
    });
    wait_for(
        "2 ready instances of revision 1",
        Duration::from_secs(20),
        || {
            let i = instances(j);
            i.len() == 2
                && i.iter()
                    .all(|i| i["revision"] == 1 && i["health"] == "healthy")
        },
    );
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 20, "the client kept asking: {ok} answers");
    assert_eq!(
        failed, 0,
        "no request failed during the rollout and rollback ({ok} answered)"
    );
    let described = j.ok(&["describe", "group", "web"]);
    assert!(
        described.contains("rollout of revision 2 failed")
            && described.contains("rolling back to revision 1"),
        "{described}"
    );

    // The metrics count what happened.
    let metrics = {
        let mut s =
            std::os::unix::net::UnixStream::connect(j.home.path().join("juice.sock")).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    for expected in [
        "juice_rollouts_total{outcome=\"rolled_back\"} 1",
        "juice_rollouts_total{outcome=\"complete\"} 1",
        "juice_instance_restarts_total 1",
        "juice_instances{state=\"healthy\"} 2",
        "juice_health_probe_seconds_count",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from /metrics:\n{metrics}"
        );
    }

    // Live restore: kill -9 the daemon; the instances keep serving; a new daemon adopts them.
    let before: Vec<String> = instances(j)
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    d.0.kill().unwrap();
    d.0.wait().unwrap();
    assert!(
        get(port, "/healthz").is_ok(),
        "the published port (DNAT rules) outlives the daemon"
    );
    let running = instance_records(j);
    assert_eq!(running, 2, "the instances outlive the daemon");
    let _d2 = daemon(j);
    wait_ready(
        j,
        "the adopted instances to be ready",
        Duration::from_secs(20),
    );
    let mut after: Vec<String> = instances(j)
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after, "the same instances, no duplicates");
    assert!(j.ok(&["events"]).contains("adopted running instance"));

    // The volume survived the heal, the failed rollout, the rollback and the daemon's death,
    // and every instance sees it.
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "kept");
    for i in instances(j) {
        let init = i["pid"].as_i64().unwrap();
        let app = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap();
        let app = app.split_whitespace().next().unwrap().to_owned();
        let inside =
            std::fs::read_to_string(format!("/proc/{app}/root/var/lib/hello/marker")).unwrap();
        assert_eq!(inside, "kept", "{}", i["name"]);
    }

    // Concurrent API requests are all answered.
    let home = j.home.path().to_owned();
    let askers: Vec<_> = (0..16)
        .map(|_| {
            let home = home.clone();
            std::thread::spawn(move || {
                Command::new(env!("CARGO_BIN_EXE_juice"))
                    .env("JUICE_HOME", &home)
                    .args(["get", "instances", "-o", "json"])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for a in askers {
        let out = a.join().unwrap();
        assert!(out.status.success(), "{}", common::text(&out));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    // Logs through the API, rollback to any kept revision, and delete.
    let name = &after[0];
    assert!(j.ok(&["logs", name]).contains("listening on port 8080"));
    let err = j.fails(&["rollback", "web", "--to", "7"]);
    assert!(err.contains("revision 7 is not kept"), "{err}");
    delete_web(j);
}

#[test]
fn bad_input_and_strangers_are_refused_and_change_nothing() {
    let _s = serial();
    let j = Juice::new();
    let _d = daemon(&j);
    let sock = j.home.path().join("juice.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600,
        "the socket is owner-only"
    );

    let bad = j.home.path().join("bad.toml");
    std::fs::write(&bad, "[group.web]\nimage = \"x:1\"\nsise = 2\n").unwrap();
    let err = j.fails(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(
        err.contains("bad.toml:3:1")
            && err.contains("group.web.sise")
            && err.contains("did you mean `size`"),
        "{err}"
    );
    std::fs::write(&bad, "[group.web]\nimage = \"no-such-image:1\"\n").unwrap();
    let err = j.fails(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(
        err.contains("group web") && err.contains("no image \"no-such-image:1\""),
        "{err}"
    );
    assert_eq!(
        json(&j, &["get", "groups"]),
        serde_json::json!([]),
        "nothing was applied"
    );

    // Garbage and oversized requests get a clear refusal, and the daemon keeps answering.
    let raw = |req: &[u8]| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(req);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let garbage = raw(b"POST /v1/apply HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{{{{{");
    assert!(
        garbage.starts_with("HTTP/1.1 400") && garbage.contains("not a site"),
        "{garbage}"
    );
    let big = vec![b'a'; 2 << 20];
    let mut req = format!(
        "POST /v1/apply HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let oversized = raw(&req);
    assert!(
        oversized.starts_with("HTTP/1.1 413"),
        "{}",
        &oversized[..oversized.len().min(200)]
    );
    let nonsense = raw(b"\x00\x01\x02 not http\r\n\r\n");
    assert!(!nonsense.contains("200 OK"), "{nonsense}");
    assert!(
        j.ok(&["get", "groups"]).starts_with("GROUP"),
        "still answering"
    );

    // Another user cannot even connect.
    use std::os::unix::process::CommandExt;
    let out = Command::new(env!("CARGO_BIN_EXE_juice"))
        .env("JUICE_HOME", j.home.path())
        .args(["get", "groups"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("cannot reach the daemon")
            && err.contains("ermission denied"),
        "{err}"
    );
    assert!(Path::new(&sock).exists());
}

#[test]
fn juice_up_serves_and_tears_down_on_ctrl_c() {
    let host = Host::new();
    let (j, port) = (&host.j, host.port);
    let file = site(j, "up", port, "/healthz");
    let mut up = ChildGuard::spawn(
        j.cmd()
            .args(["up", "-f", &file])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    wait_for("juice up to serve", Duration::from_secs(30), || {
        get(port, "/").is_ok()
    });
    assert_eq!(instances(j).len(), 2, "the API answers while juice up runs");
    wait_for("the rollout", Duration::from_secs(20), || {
        group(j, "web")["status"] == "ok"
    });
    // juice up prints twice a second.
    std::thread::sleep(Duration::from_millis(1200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(up.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = up.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut out = String::new();
    up.0.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        out.contains("create")
            && out.contains("revision 1 is up")
            && out.contains("listening on port 8080")
            && out.contains("stopping"),
        "{out}"
    );
    let running = instance_records(j);
    assert_eq!(running, 0, "everything juice up started is gone");
    assert!(get(port, "/").is_err());
}

#[test]
fn a_daemon_killed_at_random_points_converges_to_exactly_the_declared_instances() {
    let host = Host::new();
    let (j, port) = (&host.j, host.port);
    let sites = [
        site(j, "a", port, "/healthz"),
        site(j, "b", port, "/healthz"),
    ];
    let mut rng = common::Rng::from_env_or_time();
    let mut d = daemon(j);
    let mut mid_rollout = 0;
    for i in 0..8 {
        // Alternate between two revisions, so every apply starts a rollout, and kill the
        // daemon somewhere in the middle of it.
        let file = &sites[i % 2];
        let _ = j.cmd().args(["apply", "-f", file]).output();
        std::thread::sleep(Duration::from_millis(rng.below(2500)));
        // Where the kill lands: the test is only worth its name if some land mid-rollout.
        if let Ok(out) = j.cmd().args(["get", "groups", "-o", "json"]).output()
            && String::from_utf8_lossy(&out.stdout).contains("rolling-out")
        {
            mid_rollout += 1;
        }
        d.0.kill().unwrap();
        d.0.wait().unwrap();
        d = daemon(j);
    }
    assert!(
        mid_rollout > 0,
        "no kill landed mid-rollout (replay with the seed printed above)"
    );
    eprintln!("{mid_rollout} of 8 kills landed mid-rollout");
    // Left alone, the host converges: exactly two healthy instances of the last revision, no more.
    let last = std::cell::RefCell::new(String::new());
    let converged = (0..600).any(|_| {
        let g = group(j, "web");
        let i = instances(j);
        *last.borrow_mut() = format!("group {g}\ninstances {i:?}");
        let done = g["status"] == "ok"
            && i.len() == 2
            && i.iter()
                .all(|x| x["health"] == "healthy" && x["revision"] == g["revision"]);
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    assert!(
        converged,
        "no convergence within 60 s; last seen:\n{}\nevents:\n{}",
        last.borrow(),
        String::from_utf8_lossy(&j.cmd().args(["events"]).output().unwrap().stdout)
    );
    let on_disk = instance_records(j);
    assert_eq!(on_disk, 2, "no orphaned instance outside the daemon's view");
    delete_web(j);
}

#[test]
fn remote_access_needs_a_client_certificate_from_our_ca() {
    let _s = serial();
    common::require("openssl");
    let j = Juice::new();
    let tls = j.home.path().join("tls");
    let other = j.home.path().join("other-ca");
    j.ok(&["certs", tls.to_str().unwrap()]);
    j.ok(&["certs", other.to_str().unwrap()]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(tls.join("client-key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _d = ChildGuard::spawn(
        j.cmd()
            .args(["daemon", "--listen", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for("the TLS port", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });

    // The juice client with the right certificates.
    let remote = |tls_dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_juice"))
            .env("JUICE_HOME", "/nonexistent")
            .env("JUICE_REMOTE", &addr)
            .env("JUICE_TLS", tls_dir)
            .args(["get", "groups", "-o", "json"])
            .output()
            .unwrap()
    };
    let ok = remote(&tls);
    assert!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).trim() == "[]",
        "{}",
        common::text(&ok)
    );
    // Certificates from another CA: refused.
    let wrong = remote(&other);
    assert!(!wrong.status.success(), "{}", common::text(&wrong));

    // No client certificate at all: the handshake ends with "certificate required", no answer.
    let s_client = |extra: &[&str]| {
        let out = common::output_with_input(
            Command::new("openssl")
                .args(["s_client", "-quiet", "-connect", &addr, "-CAfile"])
                .arg(tls.join("ca.pem"))
                .args(extra),
            b"GET /v1/groups HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_millis(500),
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let anonymous = s_client(&[]);
    assert!(
        !anonymous.contains("200 OK") && anonymous.contains("certificate required"),
        "{anonymous}"
    );
    let cert = tls.join("client.pem");
    let key = tls.join("client-key.pem");
    let with_cert = s_client(&[
        "-cert",
        cert.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ]);
    assert!(with_cert.contains("HTTP/1.1 200 OK"), "{with_cert}");
    // Plain HTTP to the TLS port gets nothing.
    assert!(get(port, "/v1/groups").is_err());

    // Strangers that never finish a handshake (the attack held 400 and ran the
    // daemon out of descriptors, and the first accept error ended the listener):
    // they are capped and timed out, and a client with a certificate still gets in.
    let idle: Vec<std::net::TcpStream> = (0..400)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(idle.len() > 300, "only {} connections opened", idle.len());
    let start = Instant::now();
    let ok = remote(&tls);
    assert!(
        ok.status.success(),
        "a real client was locked out by {} idle strangers: {}",
        idle.len(),
        common::text(&ok)
    );
    eprintln!(
        "a real client got in after {:?} with {} idle strangers",
        start.elapsed(),
        idle.len()
    );
    drop(idle);
    assert!(remote(&tls).status.success(), "the listener survived");
}

/// Every name that reaches the API may become a path under `$JUICE_HOME`: the
/// attack read `/v1/instances/..%2F..%2F.../logs` from anywhere on the host.
/// Each route gets hostile names; none may answer with a host file, and a log
/// the appliance could replace with a link is not followed.
#[test]
fn hostile_names_on_every_route_never_reach_a_host_file() {
    let _s = serial();
    let j = Juice::new();
    let _d = daemon(&j);
    let sock = j.home.path().join("juice.sock");
    // A host file shaped like an instance's log, outside JUICE_HOME.
    let outside = tempfile::tempdir().unwrap();
    let canary = "CANARY-host-file-must-not-leak";
    std::fs::create_dir_all(outside.path().join("logs")).unwrap();
    std::fs::write(outside.path().join("logs/app.log"), canary).unwrap();
    let abs = outside.path().to_str().unwrap().trim_start_matches('/');
    let climb = "..%2F".repeat(12);
    let request = |method: &str, path: &str| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let body = if method == "POST" { "{}" } else { "" };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let names = [
        format!("{climb}{}", abs.replace('/', "%2F")),
        "..".into(),
        "%2E%2E".into(),
        "a%2Fb".into(),
        "a%00b".into(),
        "UPPER".into(),
        "x".repeat(200),
        format!("..%2F..%2F{}", abs.replace('/', "%2F")),
    ];
    for name in &names {
        for (method, path) in [
            ("GET", format!("/v1/instances/{name}/logs")),
            ("GET", format!("/v1/groups/{name}")),
            ("DELETE", format!("/v1/groups/{name}")),
            ("POST", format!("/v1/groups/{name}/rollback")),
            ("GET", format!("/v1/events?group={name}")),
        ] {
            let answer = request(method, &path);
            assert!(
                answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 404"),
                "{method} {path}: {answer}"
            );
            assert!(!answer.contains(canary), "{method} {path} leaked: {answer}");
        }
    }
    // A valid name whose log is a link out (as an appliance could plant) is not followed.
    let logs = j.home.path().join("instances/planted/logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::os::unix::fs::symlink(outside.path().join("logs/app.log"), logs.join("app.log")).unwrap();
    let answer = request("GET", "/v1/instances/planted/logs");
    assert!(
        !answer.contains(canary),
        "followed a planted link: {answer}"
    );
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        j.ok(&["get", "groups"]).starts_with("GROUP"),
        "still answering"
    );
}

/// A daemon killed while `juice delete` stops a group's instances: the next
/// daemon finishes the delete, and nothing of the group is left on the host.
#[test]
fn a_delete_interrupted_by_a_dead_daemon_is_finished_by_the_next() {
    let host = Host::new();
    let (j, port) = (&host.j, host.port);
    let mut d = daemon(j);
    applied(j, "a", port, Duration::from_secs(60));
    let pids: Vec<i64> = instances(j)
        .iter()
        .filter_map(|i| i["pid"].as_i64())
        .collect();
    assert_eq!(pids.len(), 2, "{:?}", instances(j));
    j.ok(&["delete", "web"]);
    // Killed at once: the reconciler had at most begun stopping them.
    d.0.kill().unwrap();
    d.0.wait().unwrap();
    let _d = daemon(j);
    wait_for("the delete to finish", Duration::from_secs(30), || {
        instances(j).is_empty()
    });
    // Counted on the host, not only in the daemon's view.
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "instance process {pid} still runs"
        );
    }
    let left = std::fs::read_dir(j.home.path().join("instances"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("state.json").exists())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(left, 0, "instance records left on disk");
    assert_eq!(json(j, &["get", "groups"]), serde_json::json!([]));
}

#[test]
fn a_start_that_keeps_failing_backs_off_and_leaves_nothing_behind() {
    let _s = serial();
    let j = Juice::new();
    let _sweeper = InstanceSweeper(j.home.path().to_owned());
    // An appliance whose command is not executable: each start gets as far as
    // the cgroups, the address and the nftables pin before init's exec fails.
    let static_dir = j.home.path().join("app-nostart/static");
    std::fs::create_dir_all(&static_dir).unwrap();
    std::fs::write(static_dir.join("index.html"), "hi").unwrap();
    let file = common::write_site(
        &j,
        "app-nostart",
        "[appliance]\nname = \"nostart\"\nversion = \"1\"\n[build]\nfiles = [{ from = \"static/\", to = \"/srv/www\" }]\n[run]\ncommand = [\"/srv/www/index.html\"]\n",
        "nostart.toml",
        "[group.nostart]\nimage = \"./app-nostart\"\nsize = 1\n",
    );
    let _d = daemon(&j);
    j.ok(&["apply", "-f", &file]);
    // The measure: 20 s of failing starts.
    std::thread::sleep(Duration::from_secs(20));
    let events = j.ok(&["events", "-o", "json"]);
    let tries = events.matches("failed start").count();
    assert!(
        (2..=10).contains(&tries),
        "{tries} failed starts in 20 s (want a handful, backing off):\n{events}"
    );
    assert!(
        events.contains("Permission denied"),
        "the reason is in the events:\n{events}"
    );
    let g = group(&j, "nostart");
    assert!(
        g["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("cannot-start"),
        "{g}"
    );
    let described = j.ok(&["describe", "group", "nostart"]);
    assert!(described.contains("Permission denied"), "{described}");
    // Nothing left: no instance directory, address or cgroup.
    let dirs: Vec<_> = std::fs::read_dir(j.home.path().join("instances"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(dirs.is_empty(), "instance directories left: {dirs:?}");
    let allocations = std::fs::read_to_string(j.home.path().join("network/allocations.json"))
        .unwrap_or_else(|_| "{}".into());
    assert!(
        !allocations.contains("nostart"),
        "addresses left: {allocations}"
    );
    let cgroups: Vec<String> = walk_cgroups(Path::new("/sys/fs/cgroup"), 0)
        .into_iter()
        .filter(|p| p.contains("/juice/nostart-"))
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

/// `juice top -o json` against a sandbox that holds 64 MiB: the memory it reports is
/// within 10% of what the instance's cgroup says (read here straight from the
/// cgroup filesystem), and the other figures are there.
#[test]
fn top_reports_the_memory_of_a_hog_as_its_cgroup_counts_it() {
    let host = Host::new();
    let j = &host.j;
    let manifest = format!(
        "[appliance]\nname = \"hog\"\nversion = \"1\"\n\n[build]\nbinaries = [{{ from = \"{}\", to = \"/usr/bin/probe\" }}]\n\n[run]\ncommand = [\"/usr/bin/probe\", \"hold\", \"64\"]\nuser = \"0:0\"\n\n[resources]\nmemory = \"256MiB\"\npids = 16\n",
        common::workspace_binary("juice-probe").display()
    );
    let file = common::write_site(
        j,
        "app-hog",
        &manifest,
        "hog.toml",
        "[group.hog]\nimage = \"./app-hog\"\nsize = 1\n",
    );
    let _d = daemon(j);
    j.ok(&["apply", "-f", &file]);
    let name = {
        let mut name = String::new();
        wait_for(
            "the hog to hold its memory",
            Duration::from_secs(60),
            || {
                let Some(i) = instances(j).first().cloned() else {
                    return false;
                };
                name = i["name"].as_str().unwrap_or_default().to_owned();
                j.cmd()
                    .args(["logs", &name])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("holding 64 MiB"))
            },
        );
        name
    };

    let top = json(j, &["top"]);
    let reported = top["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name.as_str())
        .unwrap_or_else(|| panic!("{name} is not in {top}"))
        .clone();
    // The cgroup's own figure, read after `juice top` (the hog holds still).
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            j.home
                .path()
                .join("instances")
                .join(&name)
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let file = if state["cgroup_version"] == "v1" {
        "memory.usage_in_bytes"
    } else {
        "memory.current"
    };
    let cgroup: u64 = state["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|d| std::fs::read_to_string(Path::new(d.as_str()?).join(file)).ok())
        .unwrap_or_else(|| panic!("no {file} in {:?}", state["cgroups"]))
        .trim()
        .parse()
        .unwrap();
    let memory = reported["memory_bytes"].as_u64().unwrap();
    eprintln!("juice top: {memory} bytes; the cgroup's {file}: {cgroup} bytes");
    assert!(memory >= 64 << 20, "less than the 64 MiB held: {reported}");
    assert!(
        memory.abs_diff(cgroup) * 10 <= cgroup,
        "juice top says {memory} bytes, the cgroup {cgroup}: more than 10% apart"
    );

    // The other figures: what the manifest limits, the process, the network, the rate.
    assert_eq!(reported["backend"], "sandbox", "{reported}");
    assert_eq!(reported["group"], "hog");
    assert_eq!(reported["memory_limit_bytes"], 256u64 << 20, "{reported}");
    assert_eq!(reported["pids_limit"], 16, "{reported}");
    assert!(
        reported["pids"].as_u64().is_some_and(|p| p >= 1),
        "{reported}"
    );
    assert!(reported["cpu_cores"].as_f64().is_some(), "{reported}");
    assert!(reported["net_rx_bytes"].as_u64().is_some(), "{reported}");
    assert!(reported["net_tx_bytes"].as_u64().is_some(), "{reported}");
    assert_eq!(reported["restarts"], 0);
    let interval = top["interval_ms"].as_u64().unwrap();
    assert!((400..2000).contains(&interval), "{top}");
    let group = &top["groups"][0];
    assert_eq!(group["name"], "hog");
    assert_eq!(group["instances"], 1);
    assert_eq!(group["memory_bytes"], memory, "{top}");

    // Not a terminal: one table, then it exits.
    let table = j.ok(&["top"]);
    assert!(table.contains(&name) && table.contains("MEMORY"), "{table}");

    j.ok(&["delete", "hog"]);
    wait_for("the hog to stop", Duration::from_secs(20), || {
        instances(j).is_empty()
    });
}

/// Every directory under `dir`, a few levels deep (the cgroup hierarchies).
fn walk_cgroups(dir: &Path, depth: usize) -> Vec<String> {
    let mut out = Vec::new();
    if depth > 6 {
        return out;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(e.path().display().to_string());
            out.extend(walk_cgroups(&e.path(), depth + 1));
        }
    }
    out
}

#[test]
fn a_daemon_started_with_an_invalid_site_reports_it_and_keeps_serving_its_api() {
    let _serial = serial();
    let j = Juice::new();
    let site = j.home.path().join("site.toml");
    std::fs::write(
        &site,
        "[group.web]\nimage = \"hello-web:0.1.0\"\nsise = 2\n",
    )
    .unwrap();
    let log = j.home.path().join("daemon.log");
    let _daemon = common::daemon_with(&j, &["--site", site.to_str().unwrap()], &[], &log);
    wait_for(
        "the site's error in the log",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("not applied at start")
        },
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("site.toml:3:1: field `group.web.sise`"),
        "the event names the file, line and field: {text}"
    );
    // The API still answers.
    j.ok(&["get", "groups"]);
}
