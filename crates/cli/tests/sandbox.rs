//! The sandbox runtime, for real: namespaces, cgroups, seccomp, nftables and
//! veths on this host, as root. Each test drives `juice run` (or the runtime
//! library where a test needs groups and links) and a probe appliance that
//! tries to break out and reports what happened.
//!
//! The tests share the host's bridge and nftables tables, so they run one at a time.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{ChildGuard, Juice, free_port, probe, probe_line as line, workspace_binary};
use juice_image::store::Store;
use juice_image::unpack::materialise;
use juice_runtime::Limits;
use juice_runtime::{Handle, InstanceSpec, NetworkSpec};
use juice_sandbox::Runtime;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A test's turn, and a fresh home with the probe image `probe:TAG` built (see [`probe_image`]).
fn probed(tag: &str, resources: &str) -> (std::sync::MutexGuard<'static, ()>, Juice) {
    let s = serial();
    let j = Juice::new();
    probe_image(&j, tag, resources);
    (s, j)
}

/// Builds the probe appliance (run as root inside, no capabilities) with these resources.
fn probe_image(j: &Juice, tag: &str, resources: &str) {
    common::probe_image_with(
        j,
        tag,
        &format!("\n[resources]\n{resources}\n\n[[volumes]]\nname = \"data\"\npath = \"/data\""),
    );
}

#[test]
fn escape_attempts_from_inside_fail() {
    let (_s, j) = probed("1", "pids = 64");
    // Only the instance's own processes: init (1) and the probe (2).
    assert_eq!(line(&j, "1", &["pids"]), "pids [1, 2]");
    let ro = line(&j, "1", &["write", "/etc/passwd"]);
    assert!(
        ro.starts_with("denied") && ro.contains("Read-only file system"),
        "{ro}"
    );
    assert!(line(&j, "1", &["write", "/usr/bin/probe"]).starts_with("denied"));
    assert!(
        line(&j, "1", &["write", "/tmp/scratch"]).starts_with("ok"),
        "/tmp is writable"
    );
    for (probe_name, what) in [
        ("mount", "mount"),
        ("ptrace", "ptrace"),
        ("module", "finit_module"),
        ("settime", "clock_settime"),
        ("unshare", "unshare"),
    ] {
        let out = line(&j, "1", &[probe_name]);
        assert_eq!(
            out,
            format!("denied {what}: Operation not permitted (os error 1)"),
            "{probe_name}"
        );
    }
    let who = line(&j, "1", &["whoami"]);
    for expected in [
        "uid 0 gid 0",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        assert!(who.contains(expected), "{expected:?} missing from {who}");
    }
    let (out, _, _) = probe(
        &j,
        "1",
        &["--network", "none", "--name", "probe-host"],
        &["whoami"],
    );
    assert!(
        out.contains("host probe-host "),
        "the hostname is the instance name: {out}"
    );
}

/// The seccomp filters, for real. Each probe runs twice: under `juice run`
/// with the default filters, and as a control through the runtime library
/// with `seccomp = false` (same namespaces, no capabilities, no_new_privs),
/// where the kernel alone answers. A refusal that the control does not get
/// is the filter's doing, not the kernel's configuration.
///
/// On this host (6.18, `# CONFIG_X86_X32_ABI is not set`) the kernel itself
/// answers any x32 number with ENOSYS, so an x32 probe only proves the filter
/// because the filter kills (SIGSYS) where the kernel would say ENOSYS; on a
/// kernel with x32 the control's x32 `unshare` would succeed. `AF_ALG` is
/// compiled out here (no CONFIG_CRYPTO_USER_API), so its refusal matches the
/// kernel's; `AF_VSOCK` and io_uring are built in and enabled.
#[test]
fn seccomp_refuses_what_the_kernel_allows() {
    let (_s, j) = probed("sc", "pids = 16");
    let eperm = "Operation not permitted (os error 1)";
    let eafnosupport = "Address family not supported by protocol (os error 97)";
    let sigsys = "killed by signal 31 (SIGSYS)";
    // (probe arguments, the answer under the filters, whether the kernel alone allows it everywhere)
    let cases: &[(&[&str], String, bool)] = &[
        (
            &["io_uring"],
            format!("denied io_uring_setup: {eperm}"),
            false,
        ),
        (
            &["pidfd_getfd"],
            format!("denied pidfd_getfd: {eperm}"),
            true,
        ),
        // READ_IMPLIES_EXEC, PER_BSD
        (
            &["personality", "0x0400000"],
            format!("denied personality 0x0400000: {eperm}"),
            true,
        ),
        (
            &["personality", "6"],
            format!("denied personality 6: {eperm}"),
            true,
        ),
        // AF_ALG (SOCK_SEQPACKET), AF_VSOCK (SOCK_STREAM), AF_KEY (SOCK_RAW, PF_KEY_V2),
        // AF_NETLINK with NETLINK_GENERIC and NETLINK_AUDIT
        (
            &["socket", "38", "5", "0"],
            format!("denied socket 38: {eafnosupport}"),
            false,
        ),
        (
            &["socket", "40", "1", "0"],
            format!("denied socket 40: {eafnosupport}"),
            false,
        ),
        (
            &["socket", "15", "3", "2"],
            format!("denied socket 15: {eafnosupport}"),
            false,
        ),
        (
            &["socket", "16", "3", "16"],
            format!("denied socket 16: {eafnosupport}"),
            true,
        ),
        (
            &["socket", "16", "3", "9"],
            format!("denied socket 16: {eafnosupport}"),
            false,
        ),
        // x32 getpid (39) and x32 unshare(CLONE_NEWUSER) (272): killed, not ENOSYS.
        (&["x32", "39"], format!("denied x32 39: {sigsys}"), false),
        (
            &["x32", "272", "0x10000000"],
            format!("denied x32 272: {sigsys}"),
            false,
        ),
        // getpid through int 0x80: another architecture.
        (&["i386"], format!("denied i386 getpid: {sigsys}"), false),
        // What appliances need still works.
        (
            &["personality", "0xffffffff"],
            "ok personality 0xffffffff".into(),
            true,
        ),
        (&["personality", "0"], "ok personality 0".into(), true),
        (&["socket", "1", "1", "0"], "ok socket 1".into(), true),
        (&["socket", "2", "1", "0"], "ok socket 2".into(), true),
        (&["socket", "10", "2", "0"], "ok socket 10".into(), true),
        (&["socket", "16", "3", "0"], "ok socket 16".into(), true),
    ];
    let store = Store::open(j.home.path()).unwrap();
    let root = materialise(&store, "probe:sc").unwrap().path;
    let rt = runtime(&j);
    for (i, (args, expected)) in cases.iter().map(|(a, e, _)| (a, e)).enumerate() {
        assert_eq!(
            &line(&j, "sc", args),
            expected,
            "{args:?} under the filters"
        );
        let name = format!("control-{i}");
        let mut argv = vec!["/usr/bin/probe".to_owned()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let mut s = InstanceSpec::new(&name, &root, argv);
        s.seccomp = false;
        let report = rt.spawn(&s).unwrap().wait();
        assert_eq!(report.code, Some(0), "{args:?}: {report}");
        let control = std::fs::read_to_string(rt.log_path(&name))
            .unwrap()
            .trim()
            .to_owned();
        let kernel_allows = cases[i].2;
        if kernel_allows {
            assert!(
                control.starts_with("ok "),
                "{args:?} without the filters: {control}"
            );
        } else {
            eprintln!("{args:?} without the filters: {control}");
        }
        assert!(
            !control.contains("SIGSYS"),
            "only the filters kill: {control}"
        );
    }
}

#[test]
fn limits_hold_and_are_reported() {
    let (_s, j) = probed("lim", "cpus = 0.5\nmemory = \"32MiB\"\npids = 32");
    let fork = line(&j, "lim", &["forkbomb"]);
    let n: u32 = fork
        .strip_prefix("denied fork after ")
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u32::MAX);
    assert!(
        n < 32 && fork.contains("Resource temporarily unavailable"),
        "the fork bomb stops at the pids limit: {fork}"
    );

    let (out, err, code) = probe(&j, "lim", &["--network", "none"], &["hog", "512"]);
    assert_eq!(code, 137, "the hog is killed: {out}{err}");
    assert!(
        err.contains("killed by the OOM killer"),
        "and reported as OOM: {err}"
    );
    assert!(!out.contains("ok hog"), "{out}");
    // The cpu quota is checked as the kernel holds it (below); how much cpu two
    // spinning threads actually get is a measurement: bench/cpu-share.sh.
}

#[test]
fn pid_1_reaps_orphans() {
    let (_s, j) = probed("z", "pids = 128");
    assert_eq!(line(&j, "z", &["zombies"]), "zombies 0");
}

#[test]
fn volumes_are_writable_and_outlive_the_instance() {
    let (_s, j) = probed("v", "pids = 16");
    let args = ["--network", "none", "--name", "keeper"];
    let (out, err, code) = probe(&j, "v", &args, &["write", "/data/kept"]);
    assert_eq!((out.trim(), code), ("ok write /data/kept", 0), "{err}");
    let on_host = j.home.path().join("volumes/keeper/data/kept");
    assert_eq!(std::fs::read_to_string(&on_host).unwrap(), "x");
    // A new instance with the same name sees it; the rest of the root stays read-only.
    let (out, _, _) = probe(&j, "v", &args, &["write", "/data/again"]);
    assert!(out.starts_with("ok"), "{out}");
    assert!(on_host.exists());
}

fn get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn state(j: &Juice, name: &str) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(
            j.home
                .path()
                .join("instances")
                .join(name)
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap()
}

#[test]
fn hello_web_serves_on_a_published_port_with_limits_in_the_cgroup() {
    let _s = serial();
    common::hello_web_binary();
    let j = Juice::new();
    j.ok(&["build", "examples/hello-web"]);
    let port = free_port();
    let mut guard = ChildGuard::spawn(
        j.cmd()
            .args([
                "run",
                "hello-web:0.1.0",
                "--name",
                "web-test",
                "-p",
                &format!("127.0.0.1:{port}:8080"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    wait_for("hello-web on the published port", || {
        get(port, "/healthz").is_ok_and(|b| b.ends_with("ok\n"))
    });
    let page = get(port, "/").unwrap();
    assert!(page.contains("hello from juice (web-test)"), "{page}");

    // The limits from juice.toml, as the kernel holds them.
    let st = state(&j, "web-test");
    let dirs: Vec<PathBuf> = st["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect();
    let read = |file: &str| -> Option<String> {
        dirs.iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .map(|s| s.trim().to_owned())
    };
    if st["cgroup_version"] == "v1" {
        assert_eq!(read("memory.limit_in_bytes").as_deref(), Some("67108864"));
        assert_eq!(read("cpu.cfs_quota_us").as_deref(), Some("50000"));
        assert_eq!(read("cpu.cfs_period_us").as_deref(), Some("100000"));
    } else {
        assert_eq!(read("memory.max").as_deref(), Some("67108864"));
        assert_eq!(read("cpu.max").as_deref(), Some("50000 100000"));
    }
    assert_eq!(read("pids.max").as_deref(), Some("64"));
    let init = st["pid"].as_i64().unwrap().to_string();
    assert!(dirs.iter().all(|d| {
        std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap()
            .lines()
            .any(|p| p == init)
    }));

    // Ctrl-C: SIGTERM reaches the appliance, and everything is released.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(guard.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = guard.0.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "hello-web ends by SIGTERM");
    let log =
        std::fs::read_to_string(j.home.path().join("instances/web-test/logs/app.log")).unwrap();
    assert!(log.contains("listening on port 8080"), "{log}");
    assert!(!j.home.path().join("instances/web-test/state.json").exists());
    assert!(dirs.iter().all(|d| !d.exists()), "cgroups removed");
    assert!(
        matches!(
            std::net::TcpStream::connect(("127.0.0.1", port)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        ),
        "the port is refused"
    );
    assert!(
        juice_net::publish::current(j.home.path()).is_empty(),
        "its DNAT rules are withdrawn"
    );
}

/// The runtime library directly, for groups and links.
fn spec(rootfs: &Path, name: &str, group: &str, links: &[&str], argv: &[&str]) -> InstanceSpec {
    let mut s = InstanceSpec::new(name, rootfs, argv.iter().map(|a| a.to_string()).collect());
    let mut net = NetworkSpec::new(group);
    net.links = links.iter().map(|l| l.to_string()).collect();
    s.network = Some(net);
    s.limits = Limits {
        pids: Some(64),
        ..Limits::default()
    };
    s
}

fn runtime(j: &Juice) -> Runtime {
    // SAFETY: every test in this file holds `serial()` for its whole run, so no other test
    // thread of this process is reading the environment while it is written (std's own reads,
    // as in `Command::spawn`, also take std's environment lock); the value is always the same.
    unsafe { std::env::set_var("JUICE_INIT", workspace_binary("juice-init")) };
    Runtime::new(j.home.path()).unwrap()
}

#[test]
fn traffic_between_instances_is_denied_unless_declared() {
    let _s = serial();
    common::hello_web_binary();
    let j = Juice::new();
    j.ok(&["build", "examples/hello-web"]);
    probe_image(&j, "net", "pids = 16");
    let store = Store::open(j.home.path()).unwrap();
    let web_root = materialise(&store, "hello-web:0.1.0").unwrap().path;
    let probe_root = materialise(&store, "probe:net").unwrap().path;
    let rt = runtime(&j);

    let mut server = rt
        .spawn(&spec(
            &web_root,
            "srv",
            "web",
            &[],
            &["/usr/bin/hello-web", "--port", "8080"],
        ))
        .unwrap();
    let ip = server.state().network.as_ref().unwrap().address.to_string();
    wait_for("the server", || {
        std::net::TcpStream::connect_timeout(
            &format!("{ip}:8080").parse().unwrap(),
            Duration::from_millis(200),
        )
        .is_ok()
    });

    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port().to_string();
    let gateway = server
        .state()
        .network
        .as_ref()
        .unwrap()
        .subnet
        .gateway()
        .to_string();

    let attempt = |name: &str, group: &str, links: &[&str], target: &str, port: &str| -> String {
        let mut c = rt
            .spawn(&spec(
                &probe_root,
                name,
                group,
                links,
                &["/usr/bin/probe", "connect", target, port],
            ))
            .unwrap();
        let report = c.wait();
        assert_eq!(report.code, Some(0), "{name}: {report}");
        std::fs::read_to_string(rt.log_path(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let same_group = attempt("peer", "web", &[], &ip, "8080");
    assert!(
        same_group.starts_with("ok connect"),
        "same group: {same_group}"
    );
    let linked = attempt("linked", "app", &["web"], &ip, "8080");
    assert!(linked.starts_with("ok connect"), "declared link: {linked}");
    let stranger = attempt("stranger", "other", &[], &ip, "8080");
    assert!(
        stranger.starts_with("denied connect"),
        "other group: {stranger}"
    );
    let to_host = attempt("to-host", "web", &[], &gateway, &host_port);
    assert!(
        to_host.starts_with("denied connect"),
        "the host is not reachable from inside: {to_host}"
    );

    // An appliance that takes a web member's address and MAC (as one with
    // CAP_NET_ADMIN could; the host does it here with nsenter) still cannot
    // reach the group: its port is pinned to its own address and MAC.
    let sleeper = |name: &str, group: &str| {
        rt.spawn(&spec(
            &probe_root,
            name,
            group,
            &[],
            &["/usr/bin/probe", "sleep", "60"],
        ))
        .unwrap()
    };
    let mut victim = sleeper("victim", "web");
    let mut attacker = sleeper("attacker", "other");
    let victim_ip = victim.state().network.as_ref().unwrap().address;
    let o = victim_ip.octets();
    let victim_mac = format!("02:4a:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    let pid = attacker.state().pid.to_string();
    let inside = |args: &[&str]| {
        Command::new("nsenter")
            .args(["-t", &pid, "-n", "--"])
            .args(args)
            .output()
            .unwrap()
    };
    for step in [
        vec!["ip", "link", "set", "eth0", "down"],
        vec!["ip", "link", "set", "eth0", "address", &victim_mac],
        vec!["ip", "link", "set", "eth0", "up"],
        vec![
            "ip",
            "addr",
            "add",
            &format!("{victim_ip}/32"),
            "dev",
            "eth0",
        ],
    ] {
        let out = inside(&step);
        assert!(out.status.success(), "{step:?}: {}", common::text(&out));
    }
    let spoofed = inside(&[
        "curl",
        "-s",
        "-m",
        "3",
        "--interface",
        &victim_ip.to_string(),
        &format!("http://{ip}:8080/healthz"),
    ]);
    assert!(
        !spoofed.status.success(),
        "a spoofed address and MAC reached another group: {}",
        common::text(&spoofed)
    );
    victim.stop(Duration::from_secs(5));
    attacker.stop(Duration::from_secs(5));

    server.stop(Duration::from_secs(5));
}

/// What this home's instances left on the host; `veths` are the host ends they had.
fn leftovers(home: &Path, veths: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let links = Command::new("ip").args(["-br", "link"]).output().unwrap();
    for l in String::from_utf8_lossy(&links.stdout).lines() {
        if veths
            .iter()
            .any(|v| l.starts_with(&format!("{v}@")) || l.starts_with(&format!("{v} ")))
        {
            found.push(format!("veth {l}"));
        }
    }
    // This home's rules only: the tables are the host's, shared with other homes
    // (other tests' daemons) whose sets are theirs to remove.
    let table = Command::new("nft")
        .args(["list", "table", "bridge", "juice"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    for veth in veths {
        if table.contains(&format!("\"{veth}\"")) {
            found.push(format!("nft pin of {veth}: {table}"));
        }
    }
    let sets: Vec<String> = std::fs::read(home.join("network/nft-sets.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for set in sets {
        if table.contains(&format!("set {set} ")) {
            found.push(format!("nft group set {set}: {table}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    if mounts.contains(home.to_str().unwrap()) {
        found.push("mounts under JUICE_HOME".into());
    }
    // Cgroups of this home's instances, in every hierarchy.
    let names: Vec<String> = std::fs::read_dir(home.join("instances"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let cgroup_dirs = Command::new("find")
        .args(["/sys/fs/cgroup", "-type", "d", "-path", "*/juice/*"])
        .output()
        .unwrap();
    for dir in String::from_utf8_lossy(&cgroup_dirs.stdout).lines() {
        if names.iter().any(|n| dir.ends_with(&format!("/juice/{n}"))) {
            found.push(format!("cgroup {dir}"));
        }
    }
    if let Ok(a) = std::fs::read_to_string(home.join("network/allocations.json"))
        && a.trim() != "{}"
    {
        found.push(format!("addresses {a}"));
    }
    found
}

#[test]
fn a_killed_caller_leaves_nothing_behind_after_the_next_start() {
    let (_s, j) = probed("c", "pids = 16");
    let mut guard = ChildGuard::spawn(
        j.cmd()
            .args(["run", "probe:c", "--name", "orphan", "--", "sleep", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for("the instance", || {
        j.home.path().join("instances/orphan/state.json").exists()
    });
    let st = state(&j, "orphan");
    let init = i32::try_from(st["pid"].as_i64().unwrap()).unwrap();
    let veths = vec![st["network"]["veth"].as_str().unwrap().to_owned()];
    guard.0.kill().unwrap(); // SIGKILL, no chance to clean up
    guard.0.wait().unwrap();
    // The instance dies with its caller (it was started in the foreground)...
    wait_for("the instance to die with its caller", || {
        !Path::new(&format!("/proc/{init}")).exists()
    });
    // ... its veth goes with its network namespace, and the next start sweeps the rest.
    let (out, err, code) = probe(&j, "c", &["--network", "none"], &["true"]);
    assert_eq!(code, 0, "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = leftovers(j.home.path(), &veths);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_instance_is_found_again_by_another_process() {
    let (_s, j) = probed("a", "pids = 16");
    let mut guard = ChildGuard::spawn(
        j.cmd()
            .args([
                "run",
                "probe:a",
                "--network",
                "none",
                "--name",
                "adoptee",
                "--",
                "sleep",
                "60",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    wait_for("the instance", || {
        j.home.path().join("instances/adoptee/state.json").exists()
    });
    let rt = runtime(&j);
    let mut found = rt.adopt("adoptee").unwrap();
    assert!(found.is_running());
    let report = found.stop(Duration::from_secs(5));
    assert_eq!(report.signal, Some(15), "{report}");
    assert_eq!(guard.0.wait().unwrap().code(), Some(128 + 15));
    assert!(rt.adopt("adoptee").is_err(), "its state is gone");
}

#[test]
fn user_namespace_maps_root_to_an_unprivileged_host_uid() {
    let (_s, j) = probed("u", "pids = 16");
    let _guard = ChildGuard::spawn(
        j.cmd()
            .args([
                "run",
                "probe:u",
                "--network",
                "none",
                "--userns",
                "200000",
                "--name",
                "mapped",
                "--",
                "sleep",
                "60",
            ])
            .stdout(Stdio::null()),
    );
    wait_for("the instance", || {
        j.home.path().join("instances/mapped/state.json").exists()
    });
    let init = state(&j, "mapped")["pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{init}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "200000"),
        "init runs as host uid 200000: {uid_line}"
    );
    let who = line(&j, "u", &["whoami"]);
    assert!(who.starts_with("uid 0 gid 0"), "{who}");
    let (out, _, _) = probe(
        &j,
        "u",
        &["--network", "none", "--userns", "200000"],
        &["mount"],
    );
    assert!(out.starts_with("denied mount"), "{out}");
    // Dropping the guard stops `juice run` with SIGTERM, so the instance is released.
}

#[test]
fn logs_rotate_by_size() {
    let _s = serial();
    common::hello_web_binary();
    let j = Juice::new();
    probe_image(&j, "log", "pids = 16");
    let store = Store::open(j.home.path()).unwrap();
    let root = materialise(&store, "probe:log").unwrap().path;
    let rt = runtime(&j);
    let mut s = InstanceSpec::new(
        "chatty",
        &root,
        vec!["/usr/bin/probe".into(), "spam".into(), "400".into()],
    );
    s.log_max_bytes = 4096;
    s.log_keep = 2;
    let report = rt.spawn(&s).unwrap().wait();
    assert_eq!(report.code, Some(0), "{report}");
    let logs = rt.log_path("chatty").parent().unwrap().to_owned();
    let mut names: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["app.log", "app.log.1", "app.log.2"]);
    for n in &names {
        assert!(
            std::fs::metadata(logs.join(n)).unwrap().len() <= 4096,
            "{n} is over the limit"
        );
    }
    assert!(
        std::fs::read_to_string(logs.join("app.log"))
            .unwrap()
            .contains("ok spam 400")
    );
}

#[test]
fn rootless_mode_runs_without_root() {
    use std::os::unix::process::CommandExt;
    let _s = serial();
    let j = Juice::new();
    std::os::unix::fs::chown(j.home.path(), Some(65534), Some(65534)).unwrap();
    let as_nobody = |args: &[&str]| {
        common::outcome(&j.cmd().args(args).uid(65534).gid(65534).output().unwrap())
    };
    let dir = common::write_appliance(
        &j.home.path().join("src"),
        &format!(
            "[appliance]\nname = \"rl\"\nversion = \"1\"\n[build]\nbinaries = [{{ from = \"{}\", to = \"/usr/bin/probe\" }}]\n[run]\ncommand = [\"/usr/bin/probe\"]\n[resources]\npids = 8\n",
            workspace_binary("juice-probe").display()
        ),
    );
    let (_, err, code) = as_nobody(&["build", &dir]);
    assert_eq!(code, Some(0), "{err}");
    let (out, err, code) = as_nobody(&["run", "rl:1", "--", "whoami"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("uid 0 gid 0") && out.contains("CapEff:\t0000000000000000"),
        "{out}"
    );
    assert!(
        err.contains("limits are not enforced"),
        "the missing limits are said out loud: {err}"
    );
    for (probe_args, expected) in [
        (&["mount"][..], "denied mount"),
        (&["write", "/x"][..], "denied write /x: Read-only"),
        (&["pids"][..], "pids [1, 2]"),
    ] {
        let mut args = vec!["run", "-q", "rl:1", "--"];
        args.extend_from_slice(probe_args);
        let (out, err, code) = as_nobody(&args);
        assert_eq!(code, Some(0), "{err}");
        assert!(out.starts_with(expected), "{probe_args:?}: {out}");
    }
    let (_, err, code) = as_nobody(&["run", "rl:1", "-p", "8080:80", "--", "true"]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("rootless: publishing ports needs root"),
        "{err}"
    );
}

#[test]
fn an_init_that_fails_before_the_start_is_reported_with_its_own_reason() {
    let (_s, j) = probed("f", "pids = 16");
    // An init that gives up at once and says why on its status descriptor (4),
    // before the runtime has sent its config, made the cgroups or the network:
    // the runtime's own writes then fail (a broken pipe, a vanished process),
    // and it used to report those instead of the reason.
    let init = j.home.path().join("failing-init");
    std::fs::write(
        &init,
        "#!/bin/sh\necho 'failed the test init gives up' >&4\nexit 125\n",
    )
    .unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for network in ["bridge", "none"] {
        let out = j
            .cmd()
            .env("JUICE_INIT", &init)
            .args(["run", "-q", "probe:f", "--network", network, "--", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(
            err.contains("the test init gives up"),
            "--network {network}: {err}"
        );
    }
}
