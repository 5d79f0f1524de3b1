//! Juice OS under QEMU: a disk made by `juice os disk` boots a host that serves an
//! appliance, updates itself from a registry on loopback, commits a trial only when the
//! host is healthy, falls back by itself from a kernel that panics and from a userspace
//! that never gets healthy, rolls back to an older kept version, and refuses unsigned
//! and tampered versions before writing anything. One QEMU process runs the whole
//! story: every reboot happens inside it (no `-no-reboot`), as on a real machine.
//! Afterwards the disk itself is read (its grubenv) to check what the host left.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ChildGuard, Juice, Registry, free_port, http_get};

/// How long one boot may take to serve, generous for TCG on a loaded CI machine.
const BOOT: Duration = Duration::from_secs(240);

struct Host {
    _qemu: ChildGuard,
    serial: PathBuf,
    web: u16,
    api: u16,
}

impl Host {
    fn boot(disk: &Path, dir: &Path) -> Host {
        common::require("qemu-system-x86_64");
        let serial = dir.join("serial.log");
        let (web, api) = (free_port(), free_port());
        let mut cmd = Command::new("qemu-system-x86_64");
        // TCG even where KVM exists: the `pc` machine under KVM on these (nested) hosts
        // hangs the cloud kernel before its first line, and CI may have no KVM at all.
        // One vCPU: multi-threaded TCG on QEMU 7.2 stalled a guest once here.
        cmd.args(["-accel", "tcg", "-m", "1024", "-smp", "1"])
            .args(["-nographic", "-monitor", "none", "-serial"])
            .arg(format!("file:{}", serial.display()))
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", disk.display()))
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{web}-10.0.2.15:8080,hostfwd=tcp:127.0.0.1:{api}-10.0.2.15:7443"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Host {
            _qemu: ChildGuard::spawn(&mut cmd),
            serial,
            web,
            api,
        }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Kernels started so far (each prints its banner once).
    fn boots(&self) -> usize {
        self.log().matches("Linux version ").count()
    }

    fn fail(&self, what: &str) -> ! {
        // Whether the daemon still answers tells a stuck daemon from a stuck guest.
        let api = match std::net::TcpStream::connect(("127.0.0.1", self.api)) {
            Ok(mut s) => {
                use std::io::Read;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"\x16\x03\x01\x00\x00");
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(n) => format!("the API port answered ({n} byte(s) to a bad hello)"),
                    Err(e) => format!("the API port accepted but said nothing: {e}"),
                }
            }
            Err(e) => format!("the API port refused: {e}"),
        };
        let log = self.log();
        let tail: String = log
            .lines()
            .rev()
            .take(80)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        panic!("{what}; {api}\n--- the last of the serial console ---\n{tail}");
    }

    /// Waits until `boots` kernels have started and hello-web answers.
    fn serving(&self, boots: usize) -> String {
        let deadline = Instant::now() + BOOT;
        loop {
            if self.boots() >= boots
                && let Ok(answer) = http_get(self.web, "/", Duration::from_secs(5))
                && answer.contains("hello from juice")
            {
                return answer;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "boot {boots} did not serve hello-web within {BOOT:?} ({} kernels started)",
                    self.boots()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn starts(&self) -> Vec<String> {
        let answer = http_get(self.web, "/starts", Duration::from_secs(5)).unwrap();
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        body.lines().map(str::to_owned).collect()
    }
}

/// `juice` talking to the booted host's daemon over mutual TLS: whether it succeeded,
/// and what it printed (stdout, then stderr).
fn remote(j: &Juice, host: &Host, tls: &Path, args: &[&str]) -> (bool, String) {
    let out = j
        .cmd()
        .env("JUICE_REMOTE", format!("127.0.0.1:{}", host.api))
        .env("JUICE_TLS", tls)
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr, _) = common::outcome(&out);
    (out.status.success(), format!("{stdout}{stderr}"))
}

/// `juice os update REGISTRY/juice-os:VERSION [--reboot]` on the host.
fn update(
    j: &Juice,
    host: &Host,
    tls: &Path,
    registry: &str,
    version: &str,
    reboot: bool,
) -> (bool, String) {
    let reference = format!("{registry}/juice-os:{version}");
    let mut args = vec!["os", "update", reference.as_str()];
    if reboot {
        args.push("--reboot");
    }
    remote(j, host, tls, &args)
}

/// `juice -o json os status` on the host, once its API answers.
fn status(j: &Juice, host: &Host, tls: &Path) -> serde_json::Value {
    let deadline = Instant::now() + BOOT;
    loop {
        let out = j
            .cmd()
            .env("JUICE_REMOTE", format!("127.0.0.1:{}", host.api))
            .env("JUICE_TLS", tls)
            .args(["-o", "json", "os", "status"])
            .output()
            .unwrap();
        let (stdout, stderr, _) = common::outcome(&out);
        if out.status.success()
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(stdout.trim())
        {
            return v;
        }
        let out = format!("{stdout}{stderr}");
        if Instant::now() > deadline {
            host.fail(&format!("os status never answered: {out}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until the host's status satisfies `ok`.
fn wait_status(
    j: &Juice,
    host: &Host,
    tls: &Path,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + BOOT;
    loop {
        let s = status(j, host, tls);
        if ok(&s) {
            return s;
        }
        if Instant::now() > deadline {
            host.fail(&format!("{what}: the status stayed {s:#}"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn slot_of<'a>(s: &'a serde_json::Value, version: &str) -> &'a serde_json::Value {
    s["versions"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["version"] == version))
        .unwrap_or_else(|| panic!("no version {version} in {s:#}"))
}

fn booted_version(s: &serde_json::Value) -> String {
    s["versions"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["booted"] == true))
        .and_then(|x| x["version"].as_str())
        .unwrap_or("")
        .to_owned()
}

#[test]
fn the_host_os_updates_commits_only_when_healthy_falls_back_and_rolls_back() {
    common::require("grub-mkimage");
    common::require("mkfs.ext4");
    let j = Juice::new();
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start(&j, false);
    let guest_registry = format!("10.0.2.2:{}", reg.port);

    // The versions, built from Juice's own parts. 3 has a kernel that cannot find its
    // init and panics; 4 boots, but its kernel refuses the veth driver, so the critical
    // appliance can never start.
    let cmdline = juice_cmdline();
    for (version, line) in [
        ("1", cmdline.clone()),
        ("2", cmdline.clone()),
        ("3", format!("{cmdline} rdinit=/no-such-init panic=1")),
        ("4", format!("{cmdline} module_blacklist=veth")),
    ] {
        j.ok(&["os", "build", "--version", version, "--cmdline", &line]);
    }
    // Reproducible: the same inputs give the same digest.
    let digest = |image: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&j.ok(&["-o", "json", "inspect", image])).unwrap();
        v["digest"].as_str().unwrap().to_owned()
    };
    j.ok(&["os", "build", "--version", "2", "-t", "juice-os:2-again"]);
    assert_eq!(digest("juice-os:2"), digest("juice-os:2-again"));
    // A version nobody signs.
    j.ok(&["os", "build", "--version", "5"]);

    // Keys, and versions pushed signed for the name the host will pull.
    let keys = work.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    j.ok(&["keygen", keys.join("os").to_str().unwrap()]);
    let key = keys.join("os.key");
    let insecure = [("JUICE_INSECURE_REGISTRIES", reg.host())];
    let push = |local: &str, remote_tag: &str, sign: bool| {
        if sign {
            j.ok(&[
                "sign",
                local,
                "--key",
                key.to_str().unwrap(),
                "--identity",
                &format!("{guest_registry}/juice-os"),
            ]);
        }
        let out = j
            .cmd()
            .envs(insecure.iter().map(|(k, v)| (*k, v.as_str())))
            .args([
                "push",
                local,
                &reg.reference(&format!("juice-os:{remote_tag}")),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::text(&out));
    };
    for v in ["2", "3", "4", "1"] {
        push(&format!("juice-os:{v}"), v, true);
    }
    push("juice-os:5", "unsigned", false);

    // The data partition: the appliance in the store, the site, host.toml, the policy,
    // the API's certificates.
    let data = work.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let host_home = Juice {
        home: tempfile::tempdir_in(work.path()).unwrap(),
    };
    let app = common::write_appliance(
        &host_home.home.path().join("app"),
        &common::hello_web_manifest(),
    );
    host_home.ok(&["build", &app, "-t", "hello-web:os"]);
    let tls = host_home.home.path().join("tls");
    host_home.ok(&["certs", tls.to_str().unwrap(), "--host", "127.0.0.1"]);
    let _ = std::fs::remove_dir_all(host_home.home.path().join("app"));
    std::fs::copy(keys.join("os.pub"), host_home.home.path().join("os.pub")).unwrap();
    std::fs::write(
        host_home.home.path().join("policy.toml"),
        format!(
            "unsigned = \"allow\"\n\n[keys]\nos = \"os.pub\"\n\n[[trust]]\nimages = \"{guest_registry}/juice-os\"\nkeys = [\"os\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        host_home.home.path().join("site.toml"),
        "[group.web]\nimage = \"hello-web:os\"\ncritical = true\npublish = [\"8080:8080\"]\n",
    )
    .unwrap();
    std::fs::write(
        host_home.home.path().join("host.toml"),
        format!(
            "version = 2\nhostname = \"juice-os-test\"\n\n[network]\naddresses = [\"10.0.2.15/24\"]\ngateway = \"10.0.2.2\"\n\n[daemon]\nlisten = \"0.0.0.0:7443\"\ntls = \"tls\"\n\n[registries]\ninsecure = [\"{guest_registry}\"]\n\n[site]\nfile = \"site.toml\"\n\n[os]\nstability = \"5s\"\ntrial_deadline = \"60s\"\n"
        ),
    )
    .unwrap();
    let disk = work.path().join("disk.img");
    let out = j.ok(&[
        "os",
        "disk",
        "juice-os:1",
        disk.to_str().unwrap(),
        "--size",
        "2GiB",
        "--data",
        host_home.home.path().to_str().unwrap(),
    ]);
    assert!(out.contains("committed in slot s1"), "{out}");

    let host = Host::boot(&disk, work.path());
    host.serving(1);
    let s = status(&j, &host, &tls);
    assert_eq!(booted_version(&s), "1", "{s:#}");
    assert_eq!(slot_of(&s, "1")["committed"], true);

    // (f) Refused before anything is written: unsigned, then tampered.
    let (ok, out) = update(&j, &host, &tls, &guest_registry, "unsigned", false);
    assert!(!ok && out.contains("refused"), "{out}");
    assert!(out.contains("signature"), "{out}");
    let layer = tampered_layer(&j, &reg, "juice-os:4");
    let (ok, out) = update(&j, &host, &tls, &guest_registry, "4", false);
    assert!(!ok && out.contains("refused"), "{out}");
    restore(&layer);
    let s = status(&j, &host, &tls);
    assert_eq!(s["versions"].as_array().unwrap().len(), 1, "{s:#}");

    // (a) A good update: a trial that commits, and stays committed across a reboot.
    let (ok, out) = update(&j, &host, &tls, &guest_registry, "2", true);
    assert!(ok, "{out}");
    host.serving(2);
    let s = wait_status(&j, &host, &tls, "version 2 commits", |s| {
        booted_version(s) == "2" && slot_of(s, "2")["committed"] == true
    });
    assert_eq!(s["booted"]["trial"], true, "{s:#}");
    let (ok, out) = remote(&j, &host, &tls, &["os", "reboot"]);
    assert!(ok, "{out}");
    host.serving(3);
    let s = status(&j, &host, &tls);
    assert_eq!(booted_version(&s), "2");
    assert_eq!(
        s["booted"]["trial"], false,
        "a committed version boots as itself: {s:#}"
    );

    // (b) A kernel that panics falls back by itself.
    let (ok, out) = update(&j, &host, &tls, &guest_registry, "3", true);
    assert!(ok, "{out}");
    host.serving(5);
    let s = wait_status(&j, &host, &tls, "version 3 is settled as bad", |s| {
        slot_of(s, "3")["ok"] == false
    });
    assert_eq!(booted_version(&s), "2");
    assert!(
        host.log().contains("Kernel panic"),
        "version 3 never panicked"
    );

    // (c) A userspace that boots but never gets healthy falls back by itself, and says why.
    let (ok, out) = update(&j, &host, &tls, &guest_registry, "4", true);
    assert!(ok, "{out}");
    let s = wait_status(&j, &host, &tls, "version 4 fails its trial", |s| {
        booted_version(s) == "2" && slot_of(s, "4")["ok"] == false
    });
    host.serving(7);
    let reason = s["last_failure"]["reason"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        reason.contains("critical group web is not healthy"),
        "{s:#}"
    );

    // (d) A rollback to an older kept version, not only the previous one.
    let (ok, out) = remote(
        &j,
        &host,
        &tls,
        &["os", "rollback", "--to", "1", "--reboot"],
    );
    assert!(ok, "{out}");
    host.serving(8);
    let s = status(&j, &host, &tls);
    assert_eq!(booted_version(&s), "1", "{s:#}");

    // (e) The volume kept every record: one start per boot that reached the appliance
    // (1, 2, 3, 5, 7, 8; the panicked kernel and the unhealthy trial never started it).
    let starts = host.starts();
    let mut boots: Vec<&String> = starts.iter().collect();
    boots.dedup();
    assert_eq!(boots.len(), 6, "{starts:#?}");

    // The disk as the host left it.
    drop(host);
    let out = j.ok(&[
        "-o",
        "json",
        "os",
        "status",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["next"]["slot"], slot_of(&s, "1")["slot"], "{s:#}");
    assert_eq!(slot_of(&s, "2")["committed"], true);
    assert_eq!(slot_of(&s, "4")["ok"], false);
}

/// The command line the test versions boot with (the default).
fn juice_cmdline() -> String {
    "console=tty0 console=ttyS0,115200 panic=10".to_owned()
}

/// Flips a byte in the registry's copy of an image's layer; returns it for [`restore`].
fn tampered_layer(j: &Juice, reg: &Registry, image: &str) -> (PathBuf, Vec<u8>) {
    let out = j.ok(&["-o", "json", "inspect", image]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layer = v["oci_manifest"]["layers"][0]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no layer in {out}"))
        .to_owned();
    let file = reg.blob_file(&layer);
    let original = std::fs::read(&file).unwrap();
    let mut bad = original.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0xff;
    std::fs::File::create(&file)
        .unwrap()
        .write_all(&bad)
        .unwrap();
    (file, original)
}

fn restore((file, original): &(PathBuf, Vec<u8>)) {
    std::fs::write(file, original).unwrap();
}
