//! `juice debug`, for real: a toolbox (examples/toolbox) beside a running
//! sandboxed instance, through the daemon's API.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{InstanceSweeper, Juice};

/// The processes on the host whose command line is `juice-init debug`.
fn debug_processes() -> Vec<String> {
    debug_pids().into_iter().map(|(_, c)| c).collect()
}

/// Their pids and command lines.
fn debug_pids() -> Vec<(String, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), c))
        })
        .filter(|(_, c)| {
            c.split(|b| *b == 0).nth(1) == Some(b"debug")
                && c.windows(10).any(|w| w == b"juice-init")
        })
        .map(|(p, c)| (p, String::from_utf8_lossy(&c).replace('\0', " ")))
        .collect()
}

/// Cgroup directories of debug sessions into `instance`, anywhere in the host's hierarchies.
fn debug_cgroups(instance: &str) -> Vec<String> {
    walkdir::WalkDir::new("/sys/fs/cgroup")
        .max_depth(8)
        .into_iter()
        .flatten()
        .filter(|e| {
            e.file_type().is_dir()
                && e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{instance}.debug."))
        })
        .map(|e| e.path().display().to_string())
        .collect()
}

fn mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

use common::debug;

#[test]
fn a_debug_session_sees_the_appliance_changes_nothing_and_leaves_nothing_behind() {
    for tool in ["busybox", "strace", "tcpdump"] {
        assert!(
            Path::new("/bin").join(tool).exists() || Path::new("/usr/bin").join(tool).exists(),
            "this test needs {tool} (busybox-static, strace, tcpdump: installed by .ci/run)"
        );
    }
    let j = Juice::new();
    let _sweeper = InstanceSweeper(j.home.path().to_owned());
    j.ok(&[
        "build",
        common::workspace()
            .join("examples/toolbox")
            .to_str()
            .unwrap(),
    ]);
    let site = common::write_site(
        &j,
        "app",
        &common::hello_web_manifest(),
        "site.toml",
        "[group.web]\nimage = \"./app\"\nsize = 1\n",
    );
    // The daemon also listens for remote clients with mutual TLS.
    let tls = j.home.path().join("tls");
    j.ok(&["certs", tls.to_str().unwrap()]);
    let addr = format!("127.0.0.1:{}", common::free_port());
    let _daemon = common::ChildGuard::spawn(
        j.cmd()
            .args(["daemon", "--listen", &addr])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err()
        || std::os::unix::net::UnixStream::connect(j.home.path().join("juice.sock")).is_err()
    {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    j.ok(&["apply", "-f", &site]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let name = loop {
        let all: serde_json::Value =
            serde_json::from_str(&j.ok(&["get", "instances", "-o", "json"])).unwrap();
        if let Some(i) = all.as_array().and_then(|a| a.first())
            && i["health"] == "healthy"
        {
            break i["name"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the instance never became healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mounts_before = mounts();
    let image_before = j.ok(&["get", "instances", "-o", "json"]);

    // The toolbox sees the appliance's processes: its init as PID 1, the appliance beside it.
    let (out, err, code) = debug(&j, &name, &["ps"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("/usr/bin/hello-web"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().next() == Some("1") && l.contains("juice-init")),
        "{out}"
    );
    // And its network: the appliance's listening socket.
    let (out, err, code) = debug(&j, &name, &["netstat", "-ltn"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(":8080"), "{out}");
    // The appliance's root is there, read-only.
    let (out, _, code) = debug(&j, &name, &["cat", "/app/etc/passwd"]);
    assert_eq!(code, 0);
    assert!(out.contains("app:x:1000:1000"), "{out}");
    let (out, err, code) = debug(&j, &name, &["touch", "/app/usr/bin/x"]);
    assert_ne!(code, 0, "a write to /app succeeded: {out}{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    // The program's exit code and its input pass through.
    assert_eq!(debug(&j, &name, &["sh", "-c", "exit 7"]).2, 7);
    let out = common::output_with_input(
        j.cmd().args(["debug", &name, "--", "cat"]),
        b"through the session\n",
        Duration::from_millis(200),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "through the session"
    );
    // Without a grant, strace runs without CAP_SYS_PTRACE and cannot attach...
    let (_, err, code) = debug(&j, &name, &["strace", "-p", "2"]);
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    // ...and with one it can.
    std::fs::write(
        j.home.path().join("policy.toml"),
        "[[grant]]\nimages = \"juice-toolbox\"\ncapabilities = [\"CAP_SYS_PTRACE\", \"CAP_NET_RAW\", \"CAP_NET_ADMIN\"]\n",
    )
    .unwrap();
    let (out, err, code) = debug(&j, &name, &["sh", "-c", "timeout 1 strace -p 2; true"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("attached"), "{err}");

    // The same through the remote API, as the client certificate's holder.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_juice"))
        .env("JUICE_HOME", "/nonexistent")
        .env("JUICE_REMOTE", &addr)
        .env("JUICE_TLS", &tls)
        .args(["debug", &name, "--", "ps"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/usr/bin/hello-web"));

    // The session's own process (which relays) built the toolbox root and left the
    // host's mounts before it joined the instance: it is in a mount namespace of its
    // own, and in the host's pid namespace, out of the appliance's sight. So its
    // program is never visible to the appliance while it could reach the host.
    let mut long = common::ChildGuard::spawn(
        j.cmd()
            .args(["debug", &name, "--", "sleep", "2"])
            .stdout(std::process::Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let relay = loop {
        if let Some((pid, _)) = debug_pids().into_iter().next() {
            break pid;
        }
        assert!(Instant::now() < deadline, "no session process appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    assert_ne!(ns(&relay, "mnt"), ns("self", "mnt"));
    assert_eq!(ns(&relay, "pid"), ns("self", "pid"));
    assert_eq!(long.0.wait().unwrap().code(), Some(0));

    // On a terminal: an interactive shell whose size follows the window and
    // where Ctrl-C interrupts the program in front, not the session.
    terminal_session(&j, &name);

    // Nothing is left: no session process, cgroup or mount on the host; the instance
    // and its image are as they were.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(debug_processes().is_empty() && debug_cgroups(&name).is_empty()) {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?} {:?}",
            debug_processes(),
            debug_cgroups(&name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mounts(), mounts_before);
    assert_eq!(
        j.ok(&["get", "instances", "-o", "json"]).len(),
        image_before.len()
    );
    let (out, err, code) = debug(&j, &name, &["ls", "/app/usr/bin"]);
    assert_eq!((out.trim(), code), ("hello-web", 0), "{err}");

    // Every session is an event: who, which toolbox, how it ended.
    let events = j.ok(&["events"]);
    assert!(
        events.contains("debug session by uid 0 on the local socket: juice-toolbox:1"),
        "{events}"
    );
    assert!(events.contains("ended with exit code 7"), "{events}");
    assert!(
        events.contains("debug session by certificate \"juice operator\""),
        "{events}"
    );

    // A name that is not an instance, and a toolbox the policy refuses, say so.
    let err = j.fails(&["debug", "nope-1", "--", "ps"]);
    assert!(err.contains("no instance \"nope-1\""), "{err}");
    let keys = j.home.path().join("ci");
    j.ok(&["keygen", keys.to_str().unwrap()]);
    std::fs::write(
        j.home.path().join("policy.toml"),
        "[keys]\nci = \"ci.pub\"\n\n[[trust]]\nimages = \"juice-*\"\nkeys = [\"ci\"]\n",
    )
    .unwrap();
    let err = j.fails(&["debug", &name, "--", "ps"]);
    assert!(
        err.contains("requires a signature by ci for \"juice-*\"") && err.contains("juice-toolbox"),
        "{err}"
    );
}

/// `juice debug NAME` on a terminal the test holds the other end of.
fn terminal_session(j: &Juice, name: &str) {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let size = |rows: u16, cols: u16| libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size(30, 100)), None).unwrap();
    let slave = || std::process::Stdio::from(pty.slave.try_clone().unwrap());
    let mut session = common::ChildGuard::spawn(
        j.cmd()
            .args(["debug", name])
            .stdin(slave())
            .stdout(slave())
            .stderr(slave()),
    );
    let mut master = std::fs::File::from(pty.master);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        let seen = seen.clone();
        let mut reader = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if seen.lock().unwrap().contains(what) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {what:?}: {}",
                seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("# ");
    master.write_all(b"stty size\n").unwrap();
    wait_for("30 100");
    // The window grows: the session's terminal follows.
    // SAFETY: TIOCSWINSZ on our own terminal, reading one valid winsize.
    unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCSWINSZ, &size(40, 120)) };
    std::thread::sleep(Duration::from_millis(600));
    master.write_all(b"stty size\n").unwrap();
    wait_for("40 120");
    // Ctrl-C ends the sleep, not the session.
    master.write_all(b"sleep 60; echo slept\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    master.write_all(&[3]).unwrap();
    master.write_all(b"echo $((6 * 7))\n").unwrap();
    wait_for("42");
    // (The terminal echoes the command line; the program would have printed on a line of its own.)
    assert!(!seen.lock().unwrap().contains("\nslept"));
    master.write_all(b"exit 3\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = session.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the session did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3));
}
