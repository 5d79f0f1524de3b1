//! The microVM backend, for real: QEMU's microvm machine (TCG here), Debian's
//! cloud kernel, the generated initramfs and the erofs root. Few boots, since
//! each takes seconds under emulation.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{ChildGuard, InstanceSweeper, Juice, daemon, free_port};

static SERIAL: Mutex<()> = Mutex::new(());

/// How long a boot may take under TCG on a busy 2-core machine.
const BOOT: Duration = Duration::from_secs(90);

fn require_vm_tools() {
    for tool in ["qemu-system-x86_64", "mkfs.erofs", "mkfs.ext4"] {
        common::require(tool);
    }
    let kernel = std::fs::read_dir("/boot")
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with("-cloud-amd64"));
    assert!(
        kernel || std::env::var_os("JUICE_KERNEL").is_some(),
        "this test needs linux-image-cloud-amd64 (installed by .ci/run)"
    );
}

/// `GET path` on the published port. A port follows the health the reconciler's
/// last pass saw, which can be a few milliseconds behind what `get instances`
/// shows: a refused connection is tried again for up to 5 s.
fn get(port: u16, path: &str) -> std::io::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = loop {
        match common::http_get(port, path, Duration::from_secs(5)) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other?,
        }
    };
    match body.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!("answered {body:?}"))),
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The command name of a live pid (`qemu-system-x86` for a VM).
fn comm(pid: i64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn vm_state(home: &Path, name: &str) -> Option<serde_json::Value> {
    let bytes = std::fs::read(home.join("vms").join(name).join("state.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn root_disks(home: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(home.join("vm-artefacts"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("root.erofs"))
        .filter(|p| p.is_file())
        .collect()
}

#[test]
fn juice_run_boots_hello_web_as_a_microvm_and_refuses_a_corrupt_root() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_vm_tools();
    common::hello_web_binary();
    let j = Juice::new();
    let _sweeper = InstanceSweeper(j.home.path().to_owned());
    j.ok(&["build", "examples/hello-web", "-t", "hello-web:vm"]);
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:8080");
    let run = |name: &str| {
        j.cmd()
            .args([
                "run",
                "--isolation",
                "microvm",
                "--name",
                name,
                "-p",
                &publish,
            ])
            .args(["--grace", "5", "hello-web:vm"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut guard = ChildGuard(run("vmrun"));
    let page = wait_for("the microVM to answer", BOOT, || get(port, "/").ok());
    assert!(page.contains("hello from juice (vmrun)"), "{page}");
    assert_eq!(get(port, "/visits").unwrap().trim(), "1");
    assert_eq!(get(port, "/healthz").unwrap().trim(), "ok");

    // It is a VM: the instance's process is QEMU, and the guest kernel booted.
    let state = vm_state(j.home.path(), "vmrun").expect("the VM's state");
    let pid = state["pid"].as_i64().unwrap();
    assert!(comm(pid).starts_with("qemu-system"), "{}", comm(pid));
    assert_eq!(state["accel"], "tcg", "no hardware virtualisation here");
    let console =
        std::fs::read_to_string(j.home.path().join("vms/vmrun/console.log")).unwrap_or_default();
    assert!(!console.contains("Kernel panic"), "{console}");
    // The volume is a disk beside the sandbox's directory.
    assert!(j.home.path().join("volumes/vmrun/data.ext4").is_file());

    // SIGTERM to `juice run`: the appliance gets SIGTERM inside, the VM powers off.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(guard.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_for("juice run to end", Duration::from_secs(30), || {
        guard.0.try_wait().unwrap()
    });
    let mut err = String::new();
    guard
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{err}");
    assert!(err.contains("killed by signal 15"), "{err}");
    let guest_status =
        std::fs::read_to_string(j.home.path().join("vms/vmrun/status")).unwrap_or_default();
    assert!(guest_status.contains("exit {"), "{guest_status}");
    assert!(vm_state(j.home.path(), "vmrun").is_none(), "state released");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "QEMU is gone");

    // A corrupted root disk is refused before QEMU starts.
    let disks = root_disks(j.home.path());
    assert_eq!(disks.len(), 1, "{disks:?}");
    let mut bytes = std::fs::read(&disks[0]).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&disks[0], &bytes).unwrap();
    let out = run("vmbad").wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("does not match its recorded digest") && err.contains("refusing to boot"),
        "{err}"
    );
    assert!(err.contains("root.erofs"), "names the file: {err}");
    assert!(
        !j.home.path().join("vms/vmbad/qemu.log").exists(),
        "QEMU never ran"
    );
    // Removing the damaged disk has it made again from the verified layer.
    std::fs::remove_file(&disks[0]).unwrap();
    let _again = ChildGuard(run("vmagain"));
    let page = wait_for("the rebuilt microVM to answer", BOOT, || {
        get(port, "/").ok()
    });
    assert!(page.contains("hello from juice (vmagain)"), "{page}");
}

fn write_site(j: &Juice, port: u16, isolation: &str, size: u32) -> String {
    common::write_site(
        j,
        "app",
        &common::hello_web_manifest(),
        &format!("site-{isolation}-{size}.toml"),
        &format!(
            "[group.vm]\nimage = \"./app\"\nsize = {size}\nisolation = \"{isolation}\"\npublish = [\"127.0.0.1:{port}:8080\"]\n\n[group.vm.update]\nhealth_gate = \"1s\"\n"
        ),
    )
}

fn instances(j: &Juice) -> Vec<serde_json::Value> {
    let out = j.ok(&["get", "instances", "-o", "json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The one healthy instance of revision `rev`, once it is the only one.
fn settled(j: &Juice, rev: u64) -> serde_json::Value {
    let deadline = Instant::now() + BOOT;
    loop {
        let all = instances(j);
        if all.len() == 1 && all[0]["revision"] == rev && all[0]["health"] == "healthy" {
            return all[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for revision {rev} alone and healthy: {all:?}\n{}",
            j.ok(&["events"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_microvm_group_heals_keeps_its_volume_and_moves_between_backends() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_vm_tools();
    let j = Juice::new();
    let port = free_port();
    let _sweeper = InstanceSweeper(j.home.path().to_owned());
    let mut d = daemon(&j);

    // A volume disk holds one VM at a time: two instances sharing it are refused up front.
    let err = j.fails(&["apply", "-f", &write_site(&j, port, "microvm", 2)]);
    assert!(err.contains("vm") && err.contains("size = 1"), "{err}");
    assert!(instances(&j).is_empty());

    // With a toolbox in the store, each VM carries it as a disk for debug sessions.
    j.ok(&[
        "build",
        common::workspace()
            .join("examples/toolbox")
            .to_str()
            .unwrap(),
    ]);
    let site = write_site(&j, port, "microvm", 1);
    j.ok(&["apply", "-f", &site]);
    let first = settled(&j, 1);
    let pid = first["pid"].as_i64().unwrap();
    assert!(comm(pid).starts_with("qemu-system"), "{}", comm(pid));
    assert!(
        get(port, "/")
            .unwrap()
            .contains(first["name"].as_str().unwrap())
    );
    assert_eq!(get(port, "/visits").unwrap().trim(), "1");
    assert_eq!(get(port, "/visits").unwrap().trim(), "2");
    debug_in_the_guest(&j, first["name"].as_str().unwrap());

    // Kill QEMU: the group is healed with a new VM, and the volume's data is still there.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let healed = wait_for("a replacement VM", BOOT, || {
        let all = instances(&j);
        (all.len() == 1 && all[0]["name"] != first["name"] && all[0]["health"] == "healthy")
            .then(|| all[0].clone())
    });
    assert_eq!(get(port, "/visits").unwrap().trim(), "3");
    let events = j.ok(&["events"]);
    assert!(
        events.contains(&format!(
            "instance {} ended: killed by signal 9",
            first["name"].as_str().unwrap()
        )),
        "{events}"
    );

    // The daemon dies; the VM keeps serving; a new daemon adopts it through its QMP socket.
    let _ = d.0.kill();
    let _ = d.0.wait();
    assert!(
        get(port, "/healthz").is_ok(),
        "the published port (DNAT rules) outlives the daemon"
    );
    let address = healed["address"].as_str().unwrap().to_owned();
    let direct = {
        let mut s = std::net::TcpStream::connect((address.as_str(), 8080)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    };
    assert!(
        direct.contains(healed["name"].as_str().unwrap()),
        "{direct}"
    );
    d = daemon(&j);
    let adopted = settled(&j, 1);
    assert_eq!(adopted["name"], healed["name"]);
    assert_eq!(adopted["pid"], healed["pid"]);
    assert!(j.ok(&["events"]).contains("adopted running instance"));

    // Same image, other backend: a rollout to sandbox isolation...
    j.ok(&["apply", "-f", &write_site(&j, port, "sandbox", 1)]);
    let sandboxed = settled(&j, 2);
    let spid = sandboxed["pid"].as_i64().unwrap();
    assert_eq!(comm(spid), "juice-init");
    assert!(
        get(port, "/")
            .unwrap()
            .contains(sandboxed["name"].as_str().unwrap())
    );
    // ...and back. The microVM's disk kept its count through the sandbox's turn.
    j.ok(&["apply", "-f", &site]);
    let back = settled(&j, 3);
    assert!(comm(back["pid"].as_i64().unwrap()).starts_with("qemu-system"));
    assert_eq!(get(port, "/visits").unwrap().trim(), "4");

    j.ok(&["delete", "vm"]);
    wait_for("the group's VM to stop", Duration::from_secs(30), || {
        instances(&j).is_empty().then_some(())
    });
    assert!(!Path::new(&format!("/proc/{}", back["pid"])).exists());
    drop(d);
}

/// `juice debug` into a microVM: the toolbox runs inside the guest, beside the
/// appliance, and leaves no process or mount in it.
fn debug_in_the_guest(j: &Juice, name: &str) {
    let debug = |args: &[&str]| common::debug(j, name, args);
    let pid1_mounts = || {
        let (out, err, code) = debug(&["sh", "-c", "wc -l < /proc/1/mounts"]);
        assert_eq!(code, 0, "{out}{err}");
        out.trim().to_owned()
    };
    let mounts_before = pid1_mounts();
    let (out, err, code) = debug(&["ps"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("/usr/bin/hello-web"), "{out}");
    let (out, _, code) = debug(&["cat", "/app/etc/passwd"]);
    assert_eq!(code, 0);
    assert!(out.contains("app:x:1000:1000"), "{out}");
    let (out, err, code) = debug(&["touch", "/app/usr/bin/x"]);
    assert_ne!(code, 0, "a write to /app succeeded: {out}{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(debug(&["sh", "-c", "exit 4"]).2, 4);
    // Earlier sessions are gone: only this one's own process, and the appliance's
    // mounts (PID 1's namespace) are as they were.
    let (out, _, _) = debug(&["ps"]);
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("juice-guest debug"))
            .count(),
        1,
        "{out}"
    );
    assert_eq!(pid1_mounts(), mounts_before);
}
