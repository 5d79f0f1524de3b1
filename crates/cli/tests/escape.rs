//! An appliance must never reach the host: the attack review's sandbox
//! escapes, mounted for real (root, namespaces, cgroups) against the release
//! binaries. Each test fails if its hole reopens.

mod common;

use std::sync::Mutex;

use common::{Juice, probe, probe_line as line};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The probe appliance, run as root inside, with extra `[run]` lines and `[resources]`.
fn probe_image(j: &Juice, tag: &str, run: &str, resources: &str) {
    common::probe_image_with(j, tag, &format!("{run}\n\n{resources}"));
}

#[test]
fn an_image_cannot_grant_itself_dangerous_capabilities() {
    let _s = serial();
    let j = Juice::new();
    probe_image(&j, "ptrace", "capabilities = [\"CAP_SYS_PTRACE\"]", "");
    let (_, err, code) = probe(&j, "ptrace", &["--network", "none"], &["true"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("asks for CAP_SYS_PTRACE") && err.contains("[[grant]]"),
        "refused, naming the capability and the rule: {err}"
    );
    // An ordinary capability needs no grant.
    probe_image(&j, "bind", "capabilities = [\"CAP_NET_BIND_SERVICE\"]", "");
    assert_eq!(line(&j, "bind", &["true"]), "");
}

/// runc's CVE-2024-21626 class: with CAP_SYS_PTRACE (granted by the host),
/// the appliance reads PID 1's descriptors. None of them may lead to the host.
#[test]
fn granted_ptrace_finds_no_host_directory_behind_pid_1() {
    let _s = serial();
    let j = Juice::new();
    std::fs::write(
        j.home.path().join("policy.toml"),
        "[[grant]]\nimages = \"probe\"\ncapabilities = [\"CAP_SYS_PTRACE\", \"CAP_MKNOD\"]\n",
    )
    .unwrap();
    probe_image(
        &j,
        "granted",
        "capabilities = [\"CAP_SYS_PTRACE\", \"CAP_MKNOD\"]",
        "",
    );
    let fds = line(&j, "granted", &["ls", "/proc/1/fd"]);
    assert!(fds.starts_with("ok ls"), "the grant works: {fds}");
    // PID 1 holds the config and status pipes, its log, and two directories: its
    // log directory and its exit directory, each a detached mount of itself.
    // Whatever an fd leads to, climbing from it shows only those directories'
    // own files, never the instance's state or the host's root.
    let own_files = |listing: &str| {
        listing
            .split(": ")
            .nth(1)
            .unwrap_or("")
            .split(' ')
            .filter(|n| !n.is_empty())
            .all(|n| n.starts_with("app.log") || n.starts_with("exit.json"))
    };
    let ids: Vec<String> = fds
        .split(": ")
        .nth(1)
        .unwrap_or("")
        .split(' ')
        .map(str::to_owned)
        .collect();
    // Nothing inherited from the caller (its terminal, log files, pipes): each
    // descriptor is /dev/null (opened before the pivot, so it names itself
    // "/null" now), a pipe, the signalfd, the log, or a detached directory
    // (which names itself "/").
    let links = line(&j, "granted", &["links", "/proc/1/fd"]);
    for link in links.split(": ").nth(1).unwrap_or("").split(' ') {
        let to = link.split_once('=').map_or("", |(_, t)| t);
        assert!(
            // Init may close one between the listing and the readlink.
            to.starts_with("(No such file")
                || to == "/null"
                || to == "/dev/null"
                || to == "/"
                || to == "/app.log"
                || to.starts_with("pipe:")
                || to.starts_with("anon_inode:"),
            "PID 1 holds {link}: {links}"
        );
    }
    for fd in ids {
        let at = format!("/proc/1/fd/{fd}");
        for path in [
            at.clone(),
            format!("{at}/.."),
            format!("{at}/../.."),
            format!("{at}/../../../../../.."),
        ] {
            let seen = line(&j, "granted", &["ls", &path]);
            if seen.starts_with("ok ls") {
                assert!(
                    own_files(&seen),
                    "{path} reached beyond init's own files: {seen}"
                );
            }
        }
    }
    // CAP_MKNOD makes a node, but /dev is nodev and the devices cgroup allows none of the host's disks.
    let node = line(&j, "granted", &["mknod", "/dev/sda-probe"]);
    assert!(node.starts_with("denied"), "{node}");
    let tmp = line(&j, "granted", &["mknod", "/tmp/sda-probe"]);
    assert!(tmp.starts_with("denied"), "{tmp}");
}

/// How many processes the fork bomb made before the kernel said no (`u32::MAX` if it never did).
fn forks(line: &str) -> u32 {
    line.strip_prefix("denied fork after ")
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u32::MAX)
}

/// An image without [resources] is held by the host's defaults: the fork bomb of
/// the attack (1,000 processes) stops at the default pids limit.
#[test]
fn an_image_without_resources_is_held_by_the_host_defaults() {
    let _s = serial();
    let j = Juice::new();
    probe_image(&j, "unbounded", "", "");
    let fork = line(&j, "unbounded", &["forkbomb"]);
    assert!(
        forks(&fork) < 256,
        "stopped by the default pids limit: {fork}"
    );
    // The host's ceiling holds an image that asks for more.
    std::fs::write(j.home.path().join("limits.toml"), "[max]\npids = 20\n").unwrap();
    probe_image(&j, "greedy", "", "[resources]\npids = 100000");
    let fork = line(&j, "greedy", &["forkbomb"]);
    assert!(forks(&fork) < 20, "held by the host ceiling: {fork}");
}

/// A uid-0 appliance in a microVM is root of its guest kernel: it had the whole
/// devtmpfs and a writable /proc/sys (it set kernel.core_pattern). It gets the
/// sandbox's view now. Boots under QEMU for real (TCG here).
#[test]
fn a_microvm_appliance_gets_the_sandbox_view_of_its_kernel() {
    let _s = serial();
    for tool in ["qemu-system-x86_64", "mkfs.erofs"] {
        common::require(tool);
    }
    let j = Juice::new();
    probe_image(&j, "guest", "", "");
    let guest = |args: &[&str]| -> String {
        let out = j
            .cmd()
            .args([
                "run",
                "-q",
                "probe:guest",
                "--isolation",
                "microvm",
                "--network",
                "none",
                "--",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "probe {args:?} in a microVM: {}",
            common::text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let core = guest(&["write", "/proc/sys/kernel/core_pattern"]);
    assert!(core.starts_with("denied"), "{core}");
    let dev = guest(&["ls", "/dev"]);
    let names: Vec<&str> = dev.split(": ").nth(1).unwrap_or("").split(' ').collect();
    for name in &names {
        assert!(
            [
                "full", "null", "random", "tty", "urandom", "zero", "pts", "shm", "ptmx", "fd",
                "stdin", "stdout", "stderr"
            ]
            .contains(name),
            "the guest's /dev has {name}: {dev}"
        );
    }
    assert!(names.contains(&"null"), "{dev}");
}
