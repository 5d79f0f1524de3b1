//! A Juice OS host booted for real under QEMU: the cloud kernel with the initramfs
//! `build` makes from the real `juice-host`, `juice` and `juice-init`, a GPT disk made
//! here, and the hello-web appliance answering through QEMU's user network.
//!
//! Needs `cargo build --release` first (juice, juice-init and hello-web beside
//! juice-host), qemu-system-x86_64, sfdisk, mkfs.vfat, mkfs.ext4 and dumpe2fs. A missing
//! piece fails the test with what to do; nothing is skipped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use juice_microvm::kernel::Kernel;
use juice_os::build::Initramfs;

/// QEMU, stopped by its own PID when the test ends however it ends.
struct Qemu {
    child: Child,
    serial: PathBuf,
    monitor: PathBuf,
    started: Instant,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn serial(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the console shows `text`; panics with the console otherwise.
    fn wait_for_console(&mut self, text: &str, limit: Duration) -> Duration {
        let deadline = Instant::now() + limit;
        loop {
            if self.serial().contains(text) {
                return self.started.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "QEMU ended ({status}) before the console showed {text:?}:\n{}",
                    self.serial()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the console did not show {text:?} within {limit:?}:\n{}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn monitor(&self, command: &str) {
        let mut s = std::os::unix::net::UnixStream::connect(&self.monitor)
            .unwrap_or_else(|e| panic!("QEMU monitor {}: {e}", self.monitor.display()));
        s.write_all(format!("{command}\n").as_bytes())
            .expect("write to the QEMU monitor");
        std::thread::sleep(Duration::from_millis(500));
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU did not exit within {limit:?}:\n{}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        || Path::new("/usr/sbin").join(tool).is_file()
        || Path::new("/sbin").join(tool).is_file();
    assert!(found, "{tool} is needed for this test and is not installed");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sbin(tool: &str) -> Command {
    let mut c = Command::new(tool);
    c.env(
        "PATH",
        format!(
            "/usr/sbin:/sbin:{}",
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    c
}

/// The release binaries beside juice-host.
fn binary(name: &str) -> PathBuf {
    let host = PathBuf::from(env!("CARGO_BIN_EXE_juice-host"));
    let p = host.with_file_name(name);
    assert!(
        p.is_file(),
        "{} is missing: run cargo build --release first (juice, juice-init and hello-web \
         are taken from beside juice-host)",
        p.display()
    );
    p
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The initramfs of the binaries under test, in `dir`.
fn initramfs(dir: &Path) -> PathBuf {
    for b in ["juice", "juice-init"] {
        binary(b);
    }
    let kernel = Kernel::find().expect("a kernel: install linux-image-cloud-amd64");
    let i = Initramfs::beside(
        Path::new(env!("CARGO_BIN_EXE_juice-host")),
        kernel,
        "0.0.0-test",
    );
    let path = dir.join("initrd.gz");
    i.write_to(&path).expect("the initramfs");
    path
}

const MIB: u64 = 1024 * 1024;
const BOOT_START: u64 = MIB;
const BOOT_SIZE: u64 = 16 * MIB;
const DATA_START: u64 = BOOT_START + BOOT_SIZE;
const DATA_SIZE: u64 = 768 * MIB;

/// A GPT disk with `juice-boot` (FAT) and `juice-data` (ext4 made from `home`).
fn disk(dir: &Path, home: &Path) -> PathBuf {
    for t in ["sfdisk", "mkfs.vfat", "mkfs.ext4", "dumpe2fs", "debugfs"] {
        require(t);
    }
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(DATA_START + DATA_SIZE + MIB).unwrap();
    drop(f);
    let script = format!(
        "label: gpt\nstart={}, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"{}\"\nstart={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"{}\"\n",
        BOOT_START / 512,
        BOOT_SIZE / 512,
        juice_os::BOOT_PARTITION,
        DATA_START / 512,
        DATA_SIZE / 512,
        juice_os::DATA_PARTITION
    );
    let mut sf = sbin("sfdisk")
        .arg("--no-reread")
        .arg("--no-tell-kernel")
        .arg(&disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sfdisk");
    sf.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = sf.wait_with_output().unwrap();
    assert!(out.status.success(), "sfdisk: {out:?}");

    let boot = dir.join("boot.img");
    run(sbin("mkfs.vfat")
        .args(["-n", juice_os::BOOT_LABEL, "-C"])
        .arg(&boot)
        .arg((BOOT_SIZE / 1024).to_string()));
    let data = dir.join("data.img");
    run(sbin("mkfs.ext4")
        .args(["-q", "-F", "-L", "juice-data", "-d"])
        .arg(home)
        .arg(&data)
        .arg(format!("{}M", DATA_SIZE / MIB)));
    place(&disk, &boot, BOOT_START);
    place(&disk, &data, DATA_START);
    disk
}

/// Copies `part` into `disk` at `offset`, keeping holes as holes.
fn place(disk: &Path, part: &Path, offset: u64) {
    use std::io::{Seek, SeekFrom};
    let mut from = std::fs::File::open(part).unwrap();
    let mut to = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = offset;
    loop {
        let n = from.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            to.seek(SeekFrom::Start(at)).unwrap();
            to.write_all(&buf[..n]).unwrap();
        }
        at += u64::try_from(n).unwrap();
    }
}

/// The data partition of `disk`, copied out for dumpe2fs.
fn data_partition(disk: &Path, dir: &Path) -> PathBuf {
    use std::io::{Seek, SeekFrom};
    let out = dir.join("data-after.img");
    let mut from = std::fs::File::open(disk).unwrap();
    from.seek(SeekFrom::Start(DATA_START)).unwrap();
    let mut to = std::fs::File::create(&out).unwrap();
    std::io::copy(&mut from.take(DATA_SIZE), &mut to).unwrap();
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// KVM only when asked for (`JUICE_ACCEL=kvm`): a nested software KVM (kvm_pvm, as on
/// this project's machines) opens /dev/kvm and then cannot boot a stock kernel, and
/// TCG boots everywhere.
fn kvm() -> bool {
    std::env::var("JUICE_ACCEL").as_deref() == Ok("kvm")
}

fn accel() -> Vec<&'static str> {
    if kvm() {
        vec!["-accel", "kvm", "-cpu", "host"]
    } else {
        vec!["-accel", "tcg,tb-size=256", "-cpu", "max"]
    }
}

fn boot(dir: &Path, initrd: &Path, disk: &Path, port: u16, append: &str) -> Qemu {
    require("qemu-system-x86_64");
    let serial = dir.join("serial.log");
    let monitor = dir.join("monitor.sock");
    let kernel = Kernel::find().expect("a kernel");
    let child = Command::new("nice")
        .args(["-n", "19", "qemu-system-x86_64"])
        .args(accel())
        .args(["-m", "1024", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 loglevel=4{}{append}",
            if kvm() { "" } else { " tsc_early_khz=1000000" }
        ))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .arg("-netdev")
        .arg(format!(
            "user,id=n,hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:8080"
        ))
        .args(["-device", "virtio-net-pci,netdev=n"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-monitor")
        .arg(format!("unix:{},server,nowait", monitor.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64");
    Qemu {
        child,
        serial,
        monitor,
        started: Instant::now(),
    }
}

fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

const HOST_TOML: &str = r#"version = 2
hostname = "juice-test"

[network]
addresses = ["10.0.2.15/24"]
gateway = "10.0.2.2"
dns = ["10.0.2.3"]

[site]
file = "site.toml"

[os]
trial_deadline = "10m"
"#;

const SITE: &str = r#"[group.web]
image = "hello-web:0.1.0"
size = 1
isolation = "sandbox"
publish = ["8080:8080"]
"#;

/// A JUICE_HOME with the hello-web image in its store, host.toml and site.toml.
fn home_with_hello_web(dir: &Path) -> PathBuf {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let example = workspace().join("examples/hello-web");
    let manifest = std::fs::read_to_string(example.join("juice.toml"))
        .expect("examples/hello-web/juice.toml")
        .replace(
            "../../target/x86_64-unknown-linux-musl/release/hello-web",
            binary("hello-web").to_str().unwrap(),
        )
        .replace("\"static/\"", &format!("\"{}/static/\"", example.display()));
    let app = dir.join("hello-web");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("juice.toml"), manifest).unwrap();
    run(Command::new(binary("juice"))
        .arg("build")
        .arg(&app)
        .env("JUICE_HOME", &home));
    std::fs::write(home.join("host.toml"), HOST_TOML).unwrap();
    std::fs::write(home.join("site.toml"), SITE).unwrap();
    home
}

#[test]
fn a_host_boots_from_its_initramfs_serves_its_site_and_shuts_down_clean_on_ctrl_alt_del() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let initrd = initramfs(dir.path());
    let home = home_with_hello_web(dir.path());
    let disk = disk(dir.path(), &home);
    eprintln!(
        "initramfs {} bytes (gzip), kernel {} bytes; made with the disk in {:?}",
        std::fs::metadata(&initrd).unwrap().len(),
        std::fs::metadata(Kernel::find().unwrap().image)
            .unwrap()
            .len(),
        t0.elapsed()
    );
    let port = free_port();
    let mut vm = boot(dir.path(), &initrd, &disk, port, "");

    let api = vm.wait_for_console("\"msg\":\"juice daemon started\"", Duration::from_secs(240));
    eprintln!("the daemon's API was up {api:?} after QEMU started");
    let limit = Duration::from_secs(300);
    let deadline = Instant::now() + limit;
    let answer = loop {
        if let Ok(text) = http_get(port)
            && text.contains("hello from juice")
        {
            break text;
        }
        if let Ok(Some(status)) = vm.child.try_wait() {
            panic!(
                "QEMU ended ({status}) before hello-web answered:\n{}",
                vm.serial()
            );
        }
        assert!(
            Instant::now() < deadline,
            "hello-web did not answer on the forwarded port within {limit:?}:\n{}",
            vm.serial()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let answered = vm.started.elapsed();
    eprintln!("hello-web answered {answered:?} after QEMU started: {answer:?}");
    let console = vm.serial();
    for step in [
        "juice-host: moving the root out of the initramfs into a tmpfs",
        "juice-host: mounted /proc, /sys, /dev, /run, /tmp and cgroup2",
        "kernel modules loaded",
        "at /var/lib/juice",
        "juice-host: hostname juice-test",
        "juice-host: network: eth0 up with 10.0.2.15/24, default route via 10.0.2.2",
        "juice-host: the root is read-only",
        "juice-host: watchdog /dev/watchdog armed",
        "juice-host: started the daemon",
    ] {
        assert!(
            console.contains(step),
            "the console shows {step:?}:\n{console}"
        );
    }
    assert!(
        !console.contains("not loaded"),
        "every module loads:\n{console}"
    );

    vm.monitor("sendkey ctrl-alt-delete");
    let status = vm.wait_exit(Duration::from_secs(120));
    let console = vm.serial();
    eprintln!(
        "QEMU exited ({status}) {:?} after start",
        vm.started.elapsed()
    );
    for step in [
        "juice-host: SIGINT: rebooting",
        "juice-host: stopping the daemon",
        "juice-host: the daemon stopped",
        "juice-host: sending SIGTERM to every process",
        "juice-host: syncing disks",
        "juice-host: unmounted /var/lib/juice",
        "juice-host: unmounted /boot",
        "juice-host: watchdog disarmed",
        "juice-host: rebooting",
    ] {
        assert!(
            console.contains(step),
            "the console shows {step:?}:\n{console}"
        );
    }
    let part = data_partition(&disk, dir.path());
    let out = sbin("dumpe2fs").arg("-h").arg(&part).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let state = text
        .lines()
        .find(|l| l.starts_with("Filesystem state:"))
        .unwrap_or("(no state)");
    assert!(
        state.ends_with(" clean"),
        "the data partition is clean after the shutdown: {state}\n{text}"
    );
}

#[test]
fn an_invalid_host_toml_is_shown_on_the_console_and_a_trial_without_verdict_is_recorded_and_rebooted()
 {
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path());
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join("host.toml"),
        HOST_TOML.replace("gateway =", "gatway ="),
    )
    .unwrap();
    let disk = disk(dir.path(), &home);
    // A trial boot too: no daemon here gives a verdict, so PID 1 records why and reboots.
    let mut vm = boot(
        dir.path(),
        &initrd,
        &disk,
        free_port(),
        " juice.os.trial=1 juice.os.slot=b juice.os.deadline=20",
    );
    vm.wait_for_console(
        "juice-host: /var/lib/juice/host.toml:6:1: field `network.gatway`",
        Duration::from_secs(180),
    );
    let at = vm.wait_for_console(
        "host.toml is invalid: going on with the defaults, loopback only",
        Duration::from_secs(30),
    );
    vm.wait_for_console("juice-host: started the daemon", Duration::from_secs(30));
    assert!(
        vm.serial().contains("did you mean `gateway`"),
        "{}",
        vm.serial()
    );
    eprintln!("the error was on the console {at:?} after QEMU started");
    vm.wait_for_console(
        "juice-host: trial of slot b failed: no verdict within 20 s",
        Duration::from_secs(120),
    );
    vm.wait_exit(Duration::from_secs(120));
    assert!(
        vm.serial().contains("juice-host: rebooting"),
        "{}",
        vm.serial()
    );
    let part = data_partition(&disk, dir.path());
    let out = sbin("debugfs")
        .args(["-R", "cat /os/history.jsonl"])
        .arg(&part)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let record: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("one JSON line in history.jsonl ({e}): {text:?}"));
    assert_eq!(record["event"], "failed");
    assert_eq!(record["slot"], "b");
    assert_eq!(
        record["reason"],
        "no verdict within 20 s of the boot (PID 1's deadline)"
    );
}
