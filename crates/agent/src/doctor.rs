//! The host's prerequisites, checked: `juice doctor` prints them all, and
//! `juice daemon` and `juice up` refuse to start (in one sentence naming what
//! is missing and the package that brings it) when one the sandbox backend
//! needs fails. The microVM backend's checks run when a microVM group is
//! applied, so a host without QEMU still runs sandboxes.
//!
//! Every check only looks: nothing is created, loaded or changed (the bridge
//! check asks whether `juice0` could be made, it does not make it). The
//! rules of the runtimes are reused, not restated: where `juice-init`,
//! `juice-guest`, QEMU and the guest kernel are found, and which cgroup layout
//! is used, come from `juice-sandbox` and `juice-microvm`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Something the backend needs is not there: it cannot run.
    Missing,
    /// Works, but worse, or something optional is absent.
    Warning,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Ok => "ok",
            Outcome::Missing => "missing",
            Outcome::Warning => "warning",
        })
    }
}

/// The backend a check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sandbox,
    Microvm,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sandbox => "sandbox",
            Backend::Microvm => "microvm",
        })
    }
}

/// One prerequisite and what was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short and stable: `nft`, `cgroups`, `qemu`.
    pub name: &'static str,
    pub backend: Backend,
    /// What the backend needs, in a few words.
    pub needs: &'static str,
    pub result: Outcome,
    /// One sentence: what was found, or what is missing.
    pub detail: String,
    /// What fixes it (a command), when it is not ok.
    pub fix: Option<String>,
    /// The Debian package that brings it, where one does.
    pub package: Option<&'static str>,
}

impl Check {
    fn new(name: &'static str, backend: Backend, needs: &'static str) -> Check {
        Check {
            name,
            backend,
            needs,
            result: Outcome::Ok,
            detail: String::new(),
            fix: None,
            package: None,
        }
    }

    fn ok(mut self, detail: impl Into<String>) -> Check {
        self.result = Outcome::Ok;
        self.detail = detail.into();
        self
    }

    fn missing(mut self, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        self.result = Outcome::Missing;
        self.detail = detail.into();
        self.fix = Some(fix.into());
        self
    }

    fn warning(mut self, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        self.result = Outcome::Warning;
        self.detail = detail.into();
        self.fix = Some(fix.into());
        self
    }

    /// `missing` with the fix `apt-get install PACKAGE`.
    fn not_installed(self, detail: impl Into<String>, package: &'static str) -> Check {
        let mut c = self.missing(detail, format!("apt-get install {package}"));
        c.package = Some(package);
        c
    }

    /// "nft is missing from the PATH (apt-get install nftables)".
    pub fn sentence(&self) -> String {
        match &self.fix {
            Some(fix) => format!("{} ({fix})", self.detail),
            None => self.detail.clone(),
        }
    }
}

/// Prerequisites that are missing, as one sentence.
#[derive(Debug, thiserror::Error)]
#[error("{}", .missing.iter().map(Check::sentence).collect::<Vec<_>>().join("; "))]
pub struct Missing {
    pub missing: Vec<Check>,
}

/// The checks that fail, as an error; `Ok` when none does. Warnings pass.
pub fn require(checks: Vec<Check>) -> Result<(), Missing> {
    let missing: Vec<Check> = checks
        .into_iter()
        .filter(|c| c.result == Outcome::Missing)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Missing { missing })
    }
}

/// `juice daemon` and `juice up` before anything is made: the sandbox backend's
/// checks (and the microVM backend's when `microvm`).
pub fn preflight(host: &Host, microvm: bool) -> Result<(), CannotStart> {
    let mut checks = sandbox(host);
    if microvm {
        checks.extend(self::microvm(host));
    }
    require(checks).map_err(CannotStart)
}

/// A host that lacks what the daemon needs.
#[derive(Debug, thiserror::Error)]
#[error("cannot start: {0}")]
pub struct CannotStart(pub Missing);

/// Every check, and each backend's verdict: `missing` if one of its checks is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub sandbox: Outcome,
    pub microvm: Outcome,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(host: &Host) -> Report {
        let checks = all(host);
        let verdict = |b: Backend| {
            let mine = checks.iter().filter(|c| c.backend == b);
            if mine.clone().any(|c| c.result == Outcome::Missing) {
                Outcome::Missing
            } else if mine.clone().any(|c| c.result == Outcome::Warning) {
                Outcome::Warning
            } else {
                Outcome::Ok
            }
        };
        Report {
            sandbox: verdict(Backend::Sandbox),
            microvm: verdict(Backend::Microvm),
            checks,
        }
    }
}

/// Where the checks look. [`Host::current`] is this host; tests point the
/// paths at scratch files.
#[derive(Debug, Clone)]
pub struct Host {
    /// The `PATH` programs are looked up in.
    pub path: Option<OsString>,
    /// `/proc`
    pub proc: PathBuf,
    /// `/sys`
    pub sys: PathBuf,
    /// `/dev`
    pub dev: PathBuf,
    /// `/boot` (guest kernels)
    pub boot: PathBuf,
    /// `$JUICE_HOME` (the remembered KVM probe)
    pub home: PathBuf,
    /// Effective uid 0.
    pub root: bool,
    /// Probe the syscalls the sandbox needs (`openat2`, `open_tree`) on this kernel.
    pub probe_syscalls: bool,
}

impl Host {
    pub fn current(home: &Path) -> Host {
        Host {
            path: std::env::var_os("PATH"),
            proc: "/proc".into(),
            sys: "/sys".into(),
            dev: "/dev".into(),
            boot: "/boot".into(),
            home: home.to_owned(),
            root: nix::unistd::geteuid().is_root(),
            probe_syscalls: true,
        }
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.proc.join(rel)).ok()
    }

    fn program(&self, name: &str) -> Option<PathBuf> {
        juice_runtime::process::find_program(name, self.path.as_deref())
    }

    /// The effective capability set from `/proc/self/status`.
    fn cap_eff(&self) -> Option<u64> {
        let status = self.read("self/status")?;
        status_field(&status, "CapEff").and_then(|v| u64::from_str_radix(v, 16).ok())
    }

    fn kernel_release(&self) -> String {
        self.read("sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".into())
    }

    /// Whether the kernel has `CONFIG_<option>`: from `/proc/config.gz` where it
    /// exists, else `None` (unknown).
    fn config(&self, option: &str) -> Option<bool> {
        use std::io::Read;
        let file = std::fs::File::open(self.proc.join("config.gz")).ok()?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .take(4 << 20)
            .read_to_string(&mut text)
            .ok()?;
        Some(config_has(&text, option))
    }
}

/// The value of `key:` in `/proc/self/status`.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then_some(v.trim())
    })
}

/// `CONFIG_<option>=y` or `=m` in a kernel config.
fn config_has(config: &str, option: &str) -> bool {
    let key = format!("CONFIG_{option}=");
    config
        .lines()
        .any(|l| l.strip_prefix(&key).is_some_and(|v| v == "y" || v == "m"))
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// Every check: the sandbox backend's, then the microVM backend's.
pub fn all(host: &Host) -> Vec<Check> {
    let mut checks = sandbox(host);
    checks.extend(microvm(host));
    checks
}

/// What the sandbox backend (and so `juice daemon` and `juice up`) needs.
pub fn sandbox(host: &Host) -> Vec<Check> {
    let mut checks = vec![
        root(host),
        namespaces(host),
        user_namespaces(host),
        cgroups(host),
        nft(host),
        bridge(host),
        seccomp(host),
    ];
    if host.probe_syscalls {
        checks.push(syscall(
            "openat2",
            "5.6",
            &host.kernel_release(),
            probe_openat2(),
        ));
        checks.push(syscall(
            "open_tree",
            "5.2",
            &host.kernel_release(),
            probe_open_tree(),
        ));
    }
    checks.push(init());
    checks
}

/// What the microVM backend needs.
pub fn microvm(host: &Host) -> Vec<Check> {
    vec![
        qemu(host),
        guest_kernel(host),
        guest_init(),
        tool(
            host,
            "mkfs.erofs",
            "mkfs.erofs, to make each image's root disk",
            "erofs-utils",
        ),
        tool(
            host,
            "mkfs.ext4",
            "mkfs.ext4, to make volume disks",
            "e2fsprogs",
        ),
        tun(host),
        kvm(host),
    ]
}

fn root(host: &Host) -> Check {
    let c = Check::new(
        "root",
        Backend::Sandbox,
        "root, for the bridge, nftables rules and cgroups",
    );
    let rootless = "run it as root; `juice run` works rootless, without limits or published ports";
    if !host.root {
        return c.missing("juice is not running as root", rootless);
    }
    match host.cap_eff() {
        Some(caps) if caps & (1 << CAP_SYS_ADMIN) == 0 => c.missing(
            "juice runs as root but without CAP_SYS_ADMIN (a container without privileges?)",
            "run it as root on the host, or in a privileged container",
        ),
        _ => c.ok("running as root"),
    }
}

const NAMESPACES: &[(&str, &str)] = &[
    ("mnt", "MNT"),
    ("pid", "PID"),
    ("net", "NET"),
    ("ipc", "IPC"),
    ("uts", "UTS"),
    ("cgroup", "CGROUP"),
];

fn namespaces(host: &Host) -> Check {
    let c = Check::new(
        "namespaces",
        Backend::Sandbox,
        "mount, pid, net, ipc, uts and cgroup namespaces",
    );
    let ns = host.proc.join("self/ns");
    let absent: Vec<(&str, &str)> = NAMESPACES
        .iter()
        .copied()
        .filter(|(n, _)| std::fs::symlink_metadata(ns.join(n)).is_err())
        .collect();
    if absent.is_empty() {
        let names: Vec<&str> = NAMESPACES.iter().map(|(n, _)| *n).collect();
        return c.ok(format!("{} namespaces", names.join(", ")));
    }
    let names: Vec<&str> = absent.iter().map(|(n, _)| *n).collect();
    let options: Vec<String> = absent
        .iter()
        .map(|(_, o)| format!("CONFIG_{o}_NS"))
        .collect();
    let mut c = c.missing(
        format!(
            "the kernel has no {} namespaces ({} is missing)",
            names.join(", "),
            ns.join(names[0]).display()
        ),
        format!(
            "boot a kernel with {} (apt-get install linux-image-amd64)",
            options.join(", ")
        ),
    );
    c.package = Some("linux-image-amd64");
    c
}

fn user_namespaces(host: &Host) -> Check {
    let c = Check::new(
        "user namespaces",
        Backend::Sandbox,
        "user namespaces, for a rootless `juice run` and --userns only",
    );
    let max = host
        .read("sys/user/max_user_namespaces")
        .and_then(|s| s.trim().parse::<u64>().ok());
    let present = std::fs::symlink_metadata(host.proc.join("self/ns/user")).is_ok();
    match (present, max) {
        (false, _) => c.warning(
            "the kernel has no user namespaces: `juice run` needs root, and --userns is refused",
            "boot a kernel with CONFIG_USER_NS",
        ),
        (true, Some(0)) => c.warning(
            "user namespaces are switched off (user.max_user_namespaces = 0): `juice run` needs root, and --userns is refused",
            "sysctl -w user.max_user_namespaces=15000",
        ),
        _ => c.ok("user namespaces"),
    }
}

fn cgroups(host: &Host) -> Check {
    let c = Check::new(
        "cgroups",
        Backend::Sandbox,
        "cgroup v1 controllers cpu, memory and pids, or cgroup2 with them",
    );
    let (Some(mountinfo), Some(own)) = (host.read("self/mountinfo"), host.read("self/cgroup"))
    else {
        return c.missing(
            format!(
                "cannot read {} or {}",
                host.proc.join("self/mountinfo").display(),
                host.proc.join("self/cgroup").display()
            ),
            "mount /proc",
        );
    };
    match juice_sandbox::cgroup::detect_from(&mountinfo, &own) {
        Ok(h) => c.ok(format!(
            "cgroup {} with the cpu, memory and pids controllers",
            h.version()
        )),
        Err(_) => c.missing(
            "there are neither cgroup v1 controllers cpu, memory and pids nor a cgroup2 mount with them, so no limits can be set",
            "mount cgroup2 on /sys/fs/cgroup with those controllers enabled (systemd does)",
        ),
    }
}

fn nft(host: &Host) -> Check {
    let c = Check::new(
        "nft",
        Backend::Sandbox,
        "nft, able to list rules: isolation between instances",
    );
    let Some(nft) = host.program("nft") else {
        return c.not_installed("nft is missing from the PATH", "nftables");
    };
    if !host.root {
        return c.warning(
            format!("{} is there; listing rules needs root", nft.display()),
            "run juice doctor as root to check it",
        );
    }
    match run(&nft, &["list", "tables"], Duration::from_secs(5)) {
        Ok(()) => c.ok(format!("{} lists rules", nft.display())),
        Err(why) => c.missing(
            format!("{} cannot list rules: {why}", nft.display()),
            "boot a kernel with nf_tables (modprobe nf_tables)",
        ),
    }
}

/// Runs `program args`, which must succeed within `timeout`; else why not, in a few words.
fn run(program: &Path, args: &[&str], timeout: Duration) -> Result<(), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if status.success() {
                    return Ok(());
                }
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = (&mut e).take(4096).read_to_string(&mut err);
                }
                let line = err
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("no message")
                    .to_owned();
                return Err(format!("{status}: {line}"));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", timeout.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn bridge(host: &Host) -> Check {
    let c = Check::new(
        "bridge",
        Backend::Sandbox,
        "the juice0 bridge (made on first use): bridge support and CAP_NET_ADMIN",
    );
    let net = host.sys.join("class/net");
    if net.join("juice0/bridge").is_dir() {
        return c.ok("juice0 is there");
    }
    if net.join("juice0").exists() {
        return c.missing(
            "juice0 is there but is not a bridge",
            "remove it: ip link delete juice0",
        );
    }
    let loaded = host.sys.join("module/bridge").exists();
    if !loaded && host.config("BRIDGE") == Some(false) {
        return c.missing(
            "the kernel has no bridge support (CONFIG_BRIDGE)",
            "boot a kernel with CONFIG_BRIDGE (apt-get install linux-image-amd64)",
        );
    }
    match host.cap_eff() {
        Some(caps) if caps & (1 << CAP_NET_ADMIN) != 0 => {
            c.ok("juice0 can be made: bridge support and CAP_NET_ADMIN")
        }
        _ => c.missing(
            "juice0 cannot be made without CAP_NET_ADMIN",
            "run it as root",
        ),
    }
}

fn seccomp(host: &Host) -> Check {
    let c = Check::new(
        "seccomp",
        Backend::Sandbox,
        "seccomp filters: each appliance's syscall allow-list",
    );
    let status = host.read("self/status").unwrap_or_default();
    let has_seccomp = status_field(&status, "Seccomp").is_some();
    let has_filters = status_field(&status, "Seccomp_filters").is_some()
        || host.proc.join("sys/kernel/seccomp/actions_avail").exists();
    if has_seccomp && has_filters {
        c.ok("seccomp filters")
    } else {
        c.missing(
            "the kernel has no seccomp filters (no Seccomp_filters in /proc/self/status)",
            "boot a kernel with CONFIG_SECCOMP_FILTER (apt-get install linux-image-amd64)",
        )
    }
}

/// A syscall probe: `Ok`, or the errno it failed with.
type Probe = Result<(), rustix::io::Errno>;

fn probe_openat2() -> Probe {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    rustix::fs::openat2(
        rustix::fs::CWD,
        "/",
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_MAGICLINKS,
    )
    .map(drop)
}

fn probe_open_tree() -> Probe {
    // Without OPEN_TREE_CLONE this only opens an O_PATH descriptor: no privilege, no mount.
    rustix::mount::open_tree(
        rustix::fs::CWD,
        "/",
        rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map(drop)
}

fn syscall(name: &'static str, since: &str, release: &str, probe: Probe) -> Check {
    let needs = match name {
        "openat2" => "openat2 (Linux 5.6): opening image files beneath their root",
        _ => "open_tree (Linux 5.2): a detached view of init's directory",
    };
    let c = Check::new(name, Backend::Sandbox, needs);
    match probe {
        Ok(()) => c.ok(format!("{name} works (kernel {release})")),
        Err(rustix::io::Errno::NOSYS) => c.missing(
            format!("the kernel ({release}) has no {name}, which came in Linux {since}"),
            format!("boot Linux {since} or newer (Debian 12's linux-image-amd64 is 6.1)"),
        ),
        Err(e) => c.warning(
            format!("{name} answered {e} (kernel {release}); a seccomp filter around juice may refuse it"),
            "run juice outside that filter",
        ),
    }
}

fn init() -> Check {
    let c = Check::new(
        "juice-init",
        Backend::Sandbox,
        "juice-init (next to juice, or JUICE_INIT)",
    );
    match juice_sandbox::find_init() {
        Ok(p) => c.ok(format!("{}", p.display())),
        Err(e) => c.missing(
            e.to_string(),
            "cargo build --release, and run juice from target/x86_64-unknown-linux-musl/release",
        ),
    }
}

fn qemu(host: &Host) -> Check {
    let c = Check::new(
        "qemu",
        Backend::Microvm,
        "qemu-system-x86_64 (or JUICE_QEMU)",
    );
    match juice_microvm::vm::find_qemu(host.path.as_deref()) {
        Ok(p) if p.is_file() => c.ok(p.display().to_string()),
        Ok(p) => c.missing(
            format!("{} (JUICE_QEMU) does not exist", p.display()),
            "unset JUICE_QEMU, or point it at qemu-system-x86_64",
        ),
        Err(_) => c.not_installed(
            "qemu-system-x86_64 is missing from the PATH",
            "qemu-system-x86",
        ),
    }
}

fn guest_kernel(host: &Host) -> Check {
    let c = Check::new(
        "guest kernel",
        Backend::Microvm,
        "a guest kernel: the newest /boot/vmlinuz-*-cloud-amd64, or JUICE_KERNEL",
    );
    let kernel = match juice_microvm::kernel::Kernel::find_in(&host.boot) {
        Ok(k) => k,
        Err(juice_microvm::VmError::NoKernel) => {
            return c.not_installed(
                format!(
                    "there is no guest kernel ({}/vmlinuz-*-cloud-amd64)",
                    host.boot.display()
                ),
                "linux-image-cloud-amd64",
            );
        }
        Err(e) => return c.missing(e.to_string(), "unset JUICE_KERNEL, or point it at a kernel"),
    };
    match kernel.module_closure() {
        Ok(modules) => c.ok(format!(
            "{} ({} modules for the guest)",
            kernel.image.display(),
            modules.len()
        )),
        Err(e) => {
            let mut c = c.missing(
                e.to_string(),
                "apt-get install --reinstall linux-image-cloud-amd64",
            );
            c.package = Some("linux-image-cloud-amd64");
            c
        }
    }
}

fn guest_init() -> Check {
    let c = Check::new(
        "juice-guest",
        Backend::Microvm,
        "juice-guest, the guest's PID 1 (next to juice, or JUICE_GUEST)",
    );
    match juice_microvm::vm::guest_init_path() {
        Ok(p) if p.is_file() => c.ok(p.display().to_string()),
        Ok(p) => c.missing(
            format!("juice-guest is not at {}", p.display()),
            "cargo build --release, or set JUICE_GUEST",
        ),
        Err(e) => c.missing(e.to_string(), "cargo build --release, or set JUICE_GUEST"),
    }
}

fn tool(host: &Host, name: &'static str, needs: &'static str, package: &'static str) -> Check {
    let c = Check::new(name, Backend::Microvm, needs);
    match host.program(name) {
        Some(p) => c.ok(p.display().to_string()),
        None => c.not_installed(format!("{name} is missing from the PATH"), package),
    }
}

fn tun(host: &Host) -> Check {
    use std::os::unix::fs::FileTypeExt;
    let c = Check::new(
        "tun",
        Backend::Microvm,
        "/dev/net/tun: each microVM's tap on the bridge",
    );
    let path = host.dev.join("net/tun");
    match std::fs::metadata(&path) {
        Ok(m) if m.file_type().is_char_device() => c.ok(path.display().to_string()),
        _ => c.missing(
            format!("{} is missing", path.display()),
            "modprobe tun (and in a container, pass /dev/net/tun in)",
        ),
    }
}

fn kvm(host: &Host) -> Check {
    let c = Check::new(
        "kvm",
        Backend::Microvm,
        "KVM for fast boots (optional: TCG emulates without it)",
    );
    if let Ok(forced) = std::env::var("JUICE_ACCEL") {
        return c.ok(format!("JUICE_ACCEL={forced}"));
    }
    if !juice_microvm::Accel::hardware() {
        return c.warning(
            "no usable KVM (vmx/svm and /dev/kvm): microVMs boot under TCG, in seconds rather than milliseconds",
            "enable virtualisation in the firmware, or modprobe kvm_intel / kvm_amd",
        );
    }
    // Runtime::new remembers whether a guest booted with KVM, per guest kernel.
    let remembered = juice_microvm::kernel::Kernel::find_in(&host.boot)
        .ok()
        .and_then(|k| {
            std::fs::read(
                host.home
                    .join("vm-artefacts")
                    .join(format!("accel-{}.json", k.version)),
            )
            .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["boots"].as_bool());
    match remembered {
        Some(false) => c.warning(
            "/dev/kvm is there, but a guest did not boot with it: microVMs use TCG",
            "check the host's KVM (a nested or software KVM may not boot a stock kernel)",
        ),
        _ => c.ok("/dev/kvm and hardware virtualisation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A host whose /proc, /sys, /dev, /boot and PATH are scratch directories.
    struct Fake {
        dir: tempfile::TempDir,
        host: Host,
    }

    impl Fake {
        fn new() -> Fake {
            let dir = tempfile::tempdir().unwrap();
            let p = |s: &str| {
                let d = dir.path().join(s);
                std::fs::create_dir_all(&d).unwrap();
                d
            };
            let host = Host {
                path: Some(p("bin").into_os_string()),
                proc: p("proc"),
                sys: p("sys"),
                dev: p("dev"),
                boot: p("boot"),
                home: p("home"),
                root: true,
                probe_syscalls: false,
            };
            Fake { dir, host }
        }

        fn file(&self, rel: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            path
        }

        /// A program on the fake PATH: a shell script.
        fn program(&self, name: &str, script: &str) {
            let p = self.file(&format!("bin/{name}"), &format!("#!/bin/sh\n{script}\n"));
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn nft_missing_from_the_path_names_nftables() {
        let f = Fake::new();
        let c = nft(&f.host);
        assert_eq!(c.result, Outcome::Missing);
        assert_eq!(c.package, Some("nftables"));
        assert_eq!(
            c.sentence(),
            "nft is missing from the PATH (apt-get install nftables)"
        );
        // No PATH at all finds nothing either.
        let mut h = f.host.clone();
        h.path = None;
        assert_eq!(nft(&h).result, Outcome::Missing);
    }

    #[test]
    fn nft_must_list_rules() {
        let f = Fake::new();
        f.program("nft", "test \"$1 $2\" = 'list tables' || exit 2");
        assert_eq!(nft(&f.host).result, Outcome::Ok);
        f.program(
            "nft",
            "echo 'netlink: Error: Could not process rule: Operation not supported' >&2; exit 1",
        );
        let c = nft(&f.host);
        assert_eq!(c.result, Outcome::Missing, "{c:?}");
        assert!(c.detail.contains("Operation not supported"), "{c:?}");
        // Not root: found, but listing is not tried.
        let mut h = f.host.clone();
        h.root = false;
        assert_eq!(nft(&h).result, Outcome::Warning);
    }

    #[test]
    fn a_file_without_exec_permission_is_not_a_program() {
        let f = Fake::new();
        f.file("bin/mkfs.erofs", "");
        let c = tool(&f.host, "mkfs.erofs", "", "erofs-utils");
        assert_eq!(
            c.sentence(),
            "mkfs.erofs is missing from the PATH (apt-get install erofs-utils)"
        );
        f.program("mkfs.erofs", "");
        assert_eq!(
            tool(&f.host, "mkfs.erofs", "", "erofs-utils").result,
            Outcome::Ok
        );
    }

    #[test]
    fn missing_namespaces_are_named_with_their_config_option() {
        let f = Fake::new();
        for n in ["mnt", "pid", "net", "ipc", "uts"] {
            f.file(&format!("proc/self/ns/{n}"), "");
        }
        let c = namespaces(&f.host);
        assert_eq!(c.result, Outcome::Missing);
        assert!(c.detail.contains("no cgroup namespaces"), "{c:?}");
        assert!(c.sentence().contains("CONFIG_CGROUP_NS"), "{c:?}");
        f.file("proc/self/ns/cgroup", "");
        assert_eq!(namespaces(&f.host).result, Outcome::Ok);
    }

    #[test]
    fn user_namespaces_switched_off_is_only_a_warning() {
        let f = Fake::new();
        f.file("proc/self/ns/user", "");
        f.file("proc/sys/user/max_user_namespaces", "0\n");
        assert_eq!(user_namespaces(&f.host).result, Outcome::Warning);
        f.file("proc/sys/user/max_user_namespaces", "15000\n");
        assert_eq!(user_namespaces(&f.host).result, Outcome::Ok);
    }

    #[test]
    fn cgroups_v1_v2_or_neither() {
        let f = Fake::new();
        f.file("proc/self/cgroup", "0::/\n");
        // Nothing mounted.
        f.file(
            "proc/self/mountinfo",
            "22 1 0:21 / /proc rw - proc proc rw\n",
        );
        let c = cgroups(&f.host);
        assert_eq!(c.result, Outcome::Missing);
        // cgroup2 with the three controllers (read from the mount, a scratch dir here).
        let mount = f.dir.path().join("cg2");
        f.file("cg2/cgroup.controllers", "cpuset cpu io memory pids\n");
        f.file(
            "proc/self/mountinfo",
            &format!("30 1 0:26 / {} rw - cgroup2 cgroup2 rw\n", mount.display()),
        );
        let c = cgroups(&f.host);
        assert_eq!(
            (c.result, c.detail.contains("v2")),
            (Outcome::Ok, true),
            "{c:?}"
        );
        // cgroup2 without memory: not enough.
        f.file("cg2/cgroup.controllers", "cpu pids\n");
        assert_eq!(cgroups(&f.host).result, Outcome::Missing);
        // v1 controllers.
        f.file(
            "proc/self/mountinfo",
            "31 1 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
             32 1 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             33 1 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n",
        );
        f.file("proc/self/cgroup", "3:pids:/\n2:memory:/x\n1:cpu:/\n");
        let c = cgroups(&f.host);
        assert_eq!(
            (c.result, c.detail.contains("v1")),
            (Outcome::Ok, true),
            "{c:?}"
        );
    }

    #[test]
    fn the_bridge_needs_support_and_cap_net_admin() {
        let f = Fake::new();
        // CapEff with CAP_NET_ADMIN (bit 12) and CAP_SYS_ADMIN (21).
        f.file(
            "proc/self/status",
            "Name:\tjuice\nCapEff:\t0000000000201000\n",
        );
        assert_eq!(bridge(&f.host).result, Outcome::Ok);
        f.file("proc/self/status", "CapEff:\t0000000000200000\n");
        assert_eq!(bridge(&f.host).result, Outcome::Missing);
        // Already there: nothing more to ask.
        std::fs::create_dir_all(f.host.sys.join("class/net/juice0/bridge")).unwrap();
        assert_eq!(bridge(&f.host).result, Outcome::Ok);
        // A juice0 that is no bridge.
        std::fs::remove_dir(f.host.sys.join("class/net/juice0/bridge")).unwrap();
        assert_eq!(bridge(&f.host).result, Outcome::Missing);
    }

    #[test]
    fn a_kernel_config_without_bridges_says_so() {
        use std::io::Write;
        let f = Fake::new();
        f.file("proc/self/status", "CapEff:\t000001ffffffffff\n");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"CONFIG_NET=y\n# CONFIG_BRIDGE is not set\n")
            .unwrap();
        std::fs::write(f.host.proc.join("config.gz"), gz.finish().unwrap()).unwrap();
        let c = bridge(&f.host);
        assert!(c.detail.contains("CONFIG_BRIDGE"), "{c:?}");
        assert!(config_has("CONFIG_BRIDGE=m\n", "BRIDGE"));
        assert!(!config_has("CONFIG_BRIDGE_NETFILTER=y\n", "BRIDGE"));
    }

    #[test]
    fn root_without_cap_sys_admin_is_not_enough() {
        let f = Fake::new();
        f.file("proc/self/status", "CapEff:\t000001ffffffffff\n");
        assert_eq!(root(&f.host).result, Outcome::Ok);
        f.file("proc/self/status", "CapEff:\t0000000000001000\n");
        assert_eq!(root(&f.host).result, Outcome::Missing);
        let mut h = f.host.clone();
        h.root = false;
        let c = root(&h);
        assert!(c.sentence().contains("rootless"), "{c:?}");
    }

    #[test]
    fn seccomp_filters_come_from_proc() {
        let f = Fake::new();
        f.file("proc/self/status", "Seccomp:\t0\n");
        assert_eq!(seccomp(&f.host).result, Outcome::Missing);
        f.file("proc/self/status", "Seccomp:\t0\nSeccomp_filters:\t0\n");
        assert_eq!(seccomp(&f.host).result, Outcome::Ok);
    }

    #[test]
    fn syscalls_missing_name_the_kernel_version() {
        let c = syscall("openat2", "5.6", "5.4.0", Err(rustix::io::Errno::NOSYS));
        assert_eq!(c.result, Outcome::Missing);
        assert!(c.sentence().contains("Linux 5.6"), "{c:?}");
        assert_eq!(
            syscall("open_tree", "5.2", "6.1", Err(rustix::io::Errno::PERM)).result,
            Outcome::Warning
        );
        assert_eq!(syscall("openat2", "5.6", "6.1", Ok(())).result, Outcome::Ok);
        // This kernel (the tests need 5.6 or newer anyway).
        assert_eq!(probe_openat2(), Ok(()));
        assert_eq!(probe_open_tree(), Ok(()));
    }

    #[test]
    fn qemu_and_the_guest_kernel_come_from_the_microvm_rules() {
        if std::env::var_os("JUICE_QEMU").is_some() || std::env::var_os("JUICE_KERNEL").is_some() {
            return; // the overrides win over the fake PATH and /boot
        }
        let f = Fake::new();
        let checks = microvm(&f.host);
        let q = find(&checks, "qemu");
        assert_eq!(
            q.sentence(),
            "qemu-system-x86_64 is missing from the PATH (apt-get install qemu-system-x86)"
        );
        let k = find(&checks, "guest kernel");
        assert_eq!(
            (k.result, k.package),
            (Outcome::Missing, Some("linux-image-cloud-amd64"))
        );
        f.program("qemu-system-x86_64", "");
        f.file("boot/vmlinuz-6.1.0-9-cloud-amd64", "");
        f.file("boot/vmlinuz-6.1.0-56-cloud-amd64", "");
        let checks = microvm(&f.host);
        assert_eq!(find(&checks, "qemu").result, Outcome::Ok);
        let k = find(&checks, "guest kernel");
        assert!(k.detail.contains("6.1.0-56"), "the newest: {k:?}");
    }

    #[test]
    fn require_joins_what_is_missing_into_one_sentence() {
        let f = Fake::new();
        let checks = vec![
            nft(&f.host),
            tool(&f.host, "mkfs.ext4", "", "e2fsprogs"),
            Check::new("kvm", Backend::Microvm, "").warning("no KVM", "enable it"),
        ];
        let e = require(checks).unwrap_err();
        assert_eq!(
            e.to_string(),
            "nft is missing from the PATH (apt-get install nftables); mkfs.ext4 is missing from the PATH (apt-get install e2fsprogs)"
        );
        assert!(require(vec![Check::new("x", Backend::Sandbox, "").ok("fine")]).is_ok());
    }

    #[test]
    fn every_check_has_a_detail_and_failures_have_a_fix() {
        let f = Fake::new();
        for c in all(&f.host) {
            assert!(!c.detail.is_empty(), "{c:?}");
            assert_eq!(c.result == Outcome::Ok, c.fix.is_none(), "{c:?}");
        }
    }
}
