//! What the boot tests and the floor bench share: a fake OS version (the host kernel and
//! a one-line busybox init) and QEMU runs that are stopped by PID when dropped.
#![allow(dead_code)] // each user takes what it needs

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use juice_os::disk::VersionFiles;

/// The line the test init prints first; the tests and the bench look for it.
pub const MARK: &str = "JUICE-TEST booted";
/// The kernel command line of every test version (GRUB appends slot and trial).
pub const CMDLINE: &str = "console=ttyS0 quiet panic=1";

/// What the fake OS does once the kernel runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Print `JUICE-TEST booted slot=<slot> trial=<trial>` and power off.
    Report,
    /// Exit at once: the kernel panics ("Attempted to kill init") and, with panic=1, reboots.
    Exit,
}

/// A kernel to boot: `$JUICE_TEST_KERNEL`, or the newest `/boot/vmlinuz-*`.
pub fn kernel() -> PathBuf {
    if let Some(k) = std::env::var_os("JUICE_TEST_KERNEL") {
        return PathBuf::from(k);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    found.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("vmlinuz-"))
    });
    found.sort();
    found.pop().expect(
        "no kernel to boot: set JUICE_TEST_KERNEL or install one (Debian package linux-image-cloud-amd64)",
    )
}

/// Checks that a program or file the boot tests need is there, failing the test if not.
pub fn require(path: &str, package: &str) {
    let found = if path.starts_with('/') {
        Path::new(path).exists()
    } else {
        let dirs = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&dirs)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(path).is_file())
    };
    assert!(
        found,
        "{path} is missing: the OS boot tests need Debian package {package}"
    );
}

/// Checks every tool the boot tests use.
pub fn require_all() {
    require("qemu-system-x86_64", "qemu-system-x86");
    require("/bin/busybox", "busybox-static");
    require("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf");
    require("/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf");
    require("grub-mkimage", "grub-common");
    require("/usr/lib/grub/i386-pc/boot.img", "grub-pc-bin");
    require("/usr/lib/grub/x86_64-efi/kernel.img", "grub-efi-amd64-bin");
    require("mkfs.ext4", "e2fsprogs");
}

/// Writes an initramfs whose /init is a busybox script doing `init`.
pub fn initramfs(path: &Path, init: Init) {
    use cpio::newc::Builder;
    let script = match init {
        Init::Report => concat!(
            "#!/bin/busybox sh\n",
            "/bin/busybox mount -t proc proc /proc\n",
            "for w in $(/bin/busybox cat /proc/cmdline); do case $w in juice.os.slot=*) s=${w#*=};; juice.os.trial=*) t=${w#*=};; esac; done\n",
            "echo \"JUICE-TEST booted slot=$s trial=$t\"\n",
            "/bin/busybox poweroff -f\n",
        ),
        Init::Exit => "#!/bin/busybox sh\necho JUICE-TEST init exits\nexit 1\n",
    };
    let busybox =
        std::fs::read("/bin/busybox").expect("read /bin/busybox (Debian package busybox-static)");
    let entries: Vec<(Builder, Vec<u8>)> = vec![
        (Builder::new("bin").mode(0o040755).nlink(2), Vec::new()),
        (Builder::new("proc").mode(0o040755).nlink(2), Vec::new()),
        (Builder::new("dev").mode(0o040755).nlink(2), Vec::new()),
        // The kernel gives init /dev/console as stdout only if the node exists.
        (
            Builder::new("dev/console")
                .mode(0o020600)
                .nlink(1)
                .rdev_major(5)
                .rdev_minor(1),
            Vec::new(),
        ),
        (Builder::new("bin/busybox").mode(0o100755).nlink(1), busybox),
        (
            Builder::new("init").mode(0o100755).nlink(1),
            script.as_bytes().to_vec(),
        ),
    ];
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create initramfs"));
    for (i, (b, data)) in entries.into_iter().enumerate() {
        let ino = u32::try_from(i + 1).expect("few entries");
        let len = u32::try_from(data.len()).expect("small files");
        let mut w = b.ino(ino).write(&mut out, len);
        w.write_all(&data).expect("write initramfs");
        w.finish().expect("write initramfs");
    }
    cpio::newc::trailer(&mut out).expect("write initramfs");
    out.flush().expect("write initramfs");
}

/// A test OS version in `slot`, its files under `dir`.
pub fn version(dir: &Path, slot: &str, init: Init) -> VersionFiles {
    let initrd = dir.join(format!("initrd-{slot}.cpio"));
    initramfs(&initrd, init);
    VersionFiles {
        slot: slot.to_string(),
        vmlinuz: kernel(),
        initrd,
        os_json: format!("{{\"version\":\"test-{slot}\"}}").into_bytes(),
        cmdline: CMDLINE.to_string(),
    }
}

/// The firmware QEMU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, QEMU's default: GRUB from the MBR and the BIOS boot partition.
    SeaBios,
    /// OVMF (UEFI): GRUB from /EFI/BOOT/BOOTX64.EFI.
    Ovmf,
}

/// `-accel kvm -accel tcg` (KVM, falling back to TCG when /dev/kvm is absent) where the
/// CPU shows vmx or svm, else TCG alone: a nested software KVM opens /dev/kvm but hangs a
/// stock kernel (measured here), the same rule as `juice-microvm`'s `Accel::detect`.
/// `JUICE_ACCEL=kvm|tcg` overrides.
pub fn accel_args() -> Vec<&'static str> {
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    match std::env::var("JUICE_ACCEL").as_deref() {
        Ok("tcg") => vec!["-accel", "tcg"],
        Ok("kvm") => vec!["-accel", "kvm"],
        _ if hw => vec!["-accel", "kvm", "-accel", "tcg"],
        _ => vec!["-accel", "tcg"],
    }
}

/// A running QEMU; dropping it kills that process (by its PID, nothing else).
pub struct Qemu {
    child: Child,
    /// The serial console, as a file.
    pub log: PathBuf,
    /// When QEMU was started.
    pub started: Instant,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// Starts QEMU on `disk` (raw, virtio) with the serial console in `log`.
    /// No `-no-reboot`: a panicking kernel reboots into GRUB, as on a real host.
    pub fn start(disk: &Path, firmware: Firmware, log: &Path) -> Qemu {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(accel_args())
            .args(["-m", "512", "-nographic", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", disk.display()));
        if firmware == Firmware::Ovmf {
            let vars = disk.with_extension("ovmf-vars.fd");
            std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
                .expect("copy OVMF_VARS_4M.fd (Debian package ovmf)");
            cmd.args([
                "-drive",
                "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            ])
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = cmd
            .spawn()
            .expect("start qemu-system-x86_64 (Debian package qemu-system-x86)");
        Qemu {
            child,
            log: log.to_path_buf(),
            started,
        }
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits until QEMU exits (the guest powered off) or `done` holds for the console.
    /// Returns the console; fails the test with the console's tail on timeout.
    pub fn wait(&mut self, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.child.try_wait().expect("wait for qemu").is_some();
            let console = self.console();
            if exited || done(&console) {
                return console;
            }
            // GRUB's shell means it met an error: fail now, not at the timeout.
            if console.contains("grub> ") || console.contains("grub rescue> ") {
                panic!("GRUB stopped at its shell; console:\n{console}");
            }
            if Instant::now() > deadline {
                let tail: String = console
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("QEMU did not finish within {timeout:?}; console tail:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `slot=... trial=...` lines the test init printed, in order.
pub fn booted(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.find(MARK).map(|i| l[i + MARK.len()..].trim().to_string()))
        .collect()
}
