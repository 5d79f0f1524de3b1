//! `juice doctor`, and the daemon's refusal to start on a host that lacks a
//! prerequisite. Nothing here makes a bridge, a table or an instance.

mod common;

use std::time::{Duration, Instant};

use common::{Juice, text};

/// Runs `cmd` to its end; one that is still running after `timeout` (a daemon that
/// started after all) is killed and fails the test.
fn output_within(cmd: &mut std::process::Command, timeout: Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("juice runs");
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("juice ends");
            panic!("still running after {timeout:?}:\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("juice ends")
}

/// `juice doctor -o json` run by `cmd` (a `juice` command): its output, and its report,
/// which must be JSON whatever the exit code.
fn doctor_json(cmd: &mut std::process::Command) -> (std::process::Output, serde_json::Value) {
    let out = cmd
        .args(["doctor", "-o", "json"])
        .output()
        .expect("juice runs");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&out)));
    (out, report)
}

#[test]
fn doctor_reports_every_check_as_json() {
    let j = Juice::new();
    let (out, report) = doctor_json(&mut j.cmd());
    let verdicts = ["ok", "missing", "warning"];
    for backend in ["sandbox", "microvm"] {
        assert!(
            verdicts.contains(&report[backend].as_str().unwrap_or("")),
            "{backend}: {report}"
        );
    }
    // The exit code follows the sandbox backend's verdict.
    assert_eq!(
        out.status.code(),
        Some(i32::from(report["sandbox"] == "missing")),
        "{}",
        text(&out)
    );
    let checks = report["checks"].as_array().expect("a list of checks");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for expected in [
        "root",
        "namespaces",
        "cgroups",
        "nft",
        "bridge",
        "seccomp",
        "openat2",
        "open_tree",
        "juice-init",
        "qemu",
        "guest kernel",
        "mkfs.erofs",
        "mkfs.ext4",
        "tun",
        "kvm",
    ] {
        assert!(
            names.contains(&expected),
            "no {expected} check in {names:?}"
        );
    }
    for c in checks {
        assert!(
            ["sandbox", "microvm"].contains(&c["backend"].as_str().unwrap_or("")),
            "{c}"
        );
        let result = c["result"].as_str().unwrap_or("");
        assert!(verdicts.contains(&result), "{c}");
        assert!(!c["needs"].as_str().unwrap_or("").is_empty(), "{c}");
        assert!(!c["detail"].as_str().unwrap_or("").is_empty(), "{c}");
        // Anything not ok says how to fix it; package is a name or null.
        assert_eq!(result == "ok", c["fix"].is_null(), "{c}");
        assert!(c["package"].is_null() || c["package"].is_string(), "{c}");
    }
    // The table has the same checks, and a line per backend.
    let table = j.cmd().arg("doctor").output().expect("juice runs");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("CHECK"), "{table}");
    assert!(table.contains("DETAIL / FIX"), "{table}");
    assert!(
        table.contains("\nsandbox: ") && table.contains("\nmicrovm: "),
        "{table}"
    );
}

#[test]
fn doctor_names_the_package_of_a_missing_program() {
    let j = Juice::new();
    let (out, report) = doctor_json(j.cmd().env("PATH", "/nonexistent").env_remove("JUICE_QEMU"));
    let check = |name: &str| {
        report["checks"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .cloned()
            .unwrap_or_default()
    };
    for (name, package) in [
        ("nft", "nftables"),
        ("qemu", "qemu-system-x86"),
        ("mkfs.erofs", "erofs-utils"),
        ("mkfs.ext4", "e2fsprogs"),
    ] {
        let c = check(name);
        assert_eq!(c["result"], "missing", "{c}");
        assert_eq!(c["package"], package, "{c}");
        assert_eq!(c["fix"], format!("apt-get install {package}"), "{c}");
    }
    assert_eq!(report["sandbox"], "missing");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn the_daemon_refuses_to_start_without_nft_and_makes_nothing() {
    let j = Juice::new();
    // It must end by itself: the old daemon said "serving" and retried forever
    // (the guard's limit only keeps a regression from hanging the suite).
    let out = output_within(
        j.cmd().arg("daemon").env("PATH", "/nonexistent"),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out));
    // One line: "juice: cannot start: nft is missing from the PATH (apt-get install nftables)".
    assert_eq!(stderr.lines().count(), 1, "{}", text(&out));
    assert!(stderr.starts_with("juice: cannot start: "), "{stderr}");
    assert!(
        stderr.contains("nft is missing from the PATH (apt-get install nftables)"),
        "{stderr}"
    );
    // Nothing was made: no database, no socket, no instance directory.
    let made: Vec<_> = std::fs::read_dir(j.home.path())
        .expect("JUICE_HOME")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(made.is_empty(), "the daemon made {made:?} before failing");
}

#[test]
fn up_refuses_to_start_without_nft() {
    let j = Juice::new();
    let site = j.home.path().join("site.toml");
    std::fs::write(&site, "[group.web]\nimage = \"hello-web:0.1.0\"\n").unwrap();
    let out = output_within(
        j.cmd()
            .args(["up", "-f"])
            .arg(&site)
            .env("PATH", "/nonexistent"),
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr.contains("cannot start: ") && stderr.contains("(apt-get install nftables)"),
        "{}",
        text(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("serving"),
        "{}",
        text(&out)
    );
    let made: Vec<_> = std::fs::read_dir(j.home.path())
        .expect("JUICE_HOME")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "site.toml")
        .collect();
    assert!(made.is_empty(), "juice up made {made:?} before failing");
}
