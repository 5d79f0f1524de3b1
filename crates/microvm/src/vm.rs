//! Starting, finding, stopping and waiting for microVMs.
//!
//! One QEMU process per instance, started detached (its own session) so it
//! outlives the daemon; no shim. What is needed to find it again is in
//! `$JUICE_HOME/vms/<name>/state.json` (the pid and its start time), next to
//! its QMP socket, its control socket, its console log and the status the
//! guest reports.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use juice_init::{
    ExitRecord, GUEST_CONFIG_SERIAL, GUEST_CONTROL_PORT, GUEST_DEBUG_PORT, GUEST_LOG_PORT,
    GUEST_PROBE_OK, GUEST_ROOT_SERIAL, GUEST_STATUS_PORT, GUEST_TOOLBOX_SERIAL, GuestConfig,
    GuestNetwork, GuestVolume, InitConfig, LOG_FILE,
};
use juice_net::{self as network, Attachment};
use juice_runtime::process::{Process, now_unix_ms, record, start_time, valid_name};
use juice_runtime::{Backend, BackendError, ExitReport, Handle, InstanceSpec, Meter, Usage};
use serde::{Deserialize, Serialize};

use crate::kernel::Kernel;
use crate::qmp::Qmp;
use crate::{VmError, artefacts};

/// Guest memory beyond the appliance's own limit: the kernel, page cache, init.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// Guest memory when the manifest sets no limit.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// TCG's translated-code cache, per VM.
pub const TCG_CODE_CACHE_MIB: u32 = 32;
/// The size of a volume's disk (sparse: it takes host space only as it fills).
pub const VOLUME_BYTES: u64 = 1 << 30;
/// How much of the guest-written status file is read.
const STATUS_READ_BYTES: u64 = 64 << 10;

/// Hardware-assisted or emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// `JUICE_ACCEL=kvm|tcg`; else KVM only where the CPU shows hardware
    /// virtualisation (vmx/svm), /dev/kvm opens, and a probe guest actually
    /// boots with it (`boots`, asked once per kernel and remembered by the
    /// caller). A nested software KVM (like `kvm_pvm`) answers the API but
    /// cannot boot a stock kernel, so /dev/kvm alone is not enough.
    pub fn detect(boots: impl FnOnce(Accel) -> bool) -> Accel {
        match std::env::var("JUICE_ACCEL").as_deref() {
            Ok("kvm") => return Accel::Kvm,
            Ok("tcg") => return Accel::Tcg,
            _ => {}
        }
        if Accel::hardware() && boots(Accel::Kvm) {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// The CPU has vmx or svm and /dev/kvm opens read-write.
    pub fn hardware() -> bool {
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        hw && kvm
    }
}

/// Boots the probe: `juice-guest` with `juice.probe` prints [`GUEST_PROBE_OK`] and
/// powers off. True if that line appeared within `timeout`.
pub fn probe_boot(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    accel: Accel,
    timeout: Duration,
) -> bool {
    let mut args = vec![
        "-M".to_owned(),
        "microvm,isa-serial=on,pit=on,pic=on,rtc=on".into(),
        "-accel".into(),
        match accel {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg => format!("tcg,tb-size={TCG_CODE_CACHE_MIB}"),
        },
        "-cpu".into(),
        match accel {
            Accel::Kvm => "host".into(),
            Accel::Tcg => "max".into(),
        },
        "-m".into(),
        "128M".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-serial".into(),
        "stdio".into(),
        "-kernel".into(),
        kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        initrd.to_string_lossy().into_owned(),
        "-append".into(),
    ];
    let mut cmdline = "console=ttyS0 quiet panic=-1 reboot=t juice.probe".to_owned();
    if accel == Accel::Tcg {
        cmdline.push_str(" tsc_early_khz=1000000");
    }
    args.push(cmdline);
    let Ok(mut child) = Command::new(qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return false;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let ok = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains(GUEST_PROBE_OK));
        let _ = tx.send(ok);
    });
    let ok = rx.recv_timeout(timeout).unwrap_or(false);
    let _ = child.kill();
    let _ = child.wait();
    ok
}

/// Where `juice-guest` is expected: `JUICE_GUEST`, else next to this program.
pub fn guest_init_path() -> Result<PathBuf, VmError> {
    match std::env::var_os("JUICE_GUEST") {
        Some(p) => Ok(PathBuf::from(p)),
        None => Ok(std::env::current_exe()
            .map_err(|e| {
                VmError::Io(juice_image::PathError::at(
                    "find",
                    std::path::Path::new("/proc/self/exe"),
                )(e))
            })?
            .with_file_name("juice-guest")),
    }
}

/// QEMU: `JUICE_QEMU`, else `qemu-system-x86_64` in `path` (a `PATH` value).
pub fn find_qemu(path: Option<&std::ffi::OsStr>) -> Result<PathBuf, VmError> {
    match std::env::var_os("JUICE_QEMU") {
        Some(p) => Ok(PathBuf::from(p)),
        None => {
            juice_runtime::process::find_program("qemu-system-x86_64", path).ok_or(VmError::NoQemu)
        }
    }
}

/// What is on disk about a running VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub name: String,
    /// The QEMU process.
    pub pid: i32,
    pub start_time: u64,
    pub network: Option<Attachment>,
    pub started_unix_ms: u64,
    pub accel: Accel,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// `app.log` is rotated past this size, keeping this many old files (as a sandbox's init does).
    #[serde(default)]
    pub log_max_bytes: u64,
    #[serde(default)]
    pub log_keep: u32,
    /// The toolbox (its unpacked root on the host) the VM carries as a disk.
    #[serde(default)]
    pub toolbox: Option<PathBuf>,
}

/// The microVM backend.
pub struct Runtime {
    home: PathBuf,
    kernel: Kernel,
    guest_init: PathBuf,
    qemu: PathBuf,
    accel: Accel,
}

impl Runtime {
    /// Finds the kernel, `juice-guest` (`JUICE_GUEST` or next to this program)
    /// and QEMU (`JUICE_QEMU` or `qemu-system-x86_64` on the PATH).
    pub fn new(home: &Path) -> Result<Runtime, VmError> {
        Runtime::with_guest_init(home, guest_init_path()?)
    }

    /// As [`Runtime::new`], with the guest init at `guest_init`.
    pub fn with_guest_init(home: &Path, guest_init: PathBuf) -> Result<Runtime, VmError> {
        if !guest_init.is_file() {
            return Err(VmError::NoGuestInit(guest_init));
        }
        let qemu = find_qemu(std::env::var_os("PATH").as_deref())?;
        let kernel = Kernel::find()?;
        let dir = home.join("vms");
        std::fs::create_dir_all(&dir)
            .map_err(|e| VmError::Io(juice_image::PathError::at("create", &dir)(e)))?;
        let mut runtime = Runtime {
            home: home.to_owned(),
            kernel,
            guest_init,
            qemu,
            accel: Accel::Tcg,
        };
        runtime.accel = Accel::detect(|accel| runtime.kvm_boots(accel));
        Ok(runtime)
    }

    /// Whether a guest boots with `accel`, probed once per kernel and guest init
    /// and remembered in `vm-artefacts/accel-<kernel>.json`.
    fn kvm_boots(&self, accel: Accel) -> bool {
        let Ok(initrd) = artefacts::initramfs(&self.artefact_dir(), &self.kernel, &self.guest_init)
        else {
            return false;
        };
        let memo = self
            .artefact_dir()
            .join(format!("accel-{}.json", self.kernel.version));
        if let Some(known) = std::fs::read(&memo)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["boots"].as_bool())
        {
            return known;
        }
        let boots = probe_boot(
            &self.qemu,
            &self.kernel.image,
            &initrd,
            accel,
            Duration::from_secs(60),
        );
        let _ = std::fs::write(
            &memo,
            serde_json::json!({ "accel": accel, "boots": boots }).to_string(),
        );
        boots
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.home.join("vms").join(name)
    }

    fn artefact_dir(&self) -> PathBuf {
        self.home.join("vm-artefacts")
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        Runtime::log_path_in(&self.home, name)
    }

    /// Where a VM's appliance output is, without a runtime (no kernel or QEMU needed).
    pub fn log_path_in(home: &Path, name: &str) -> PathBuf {
        home.join("vms").join(name).join(LOG_FILE)
    }

    /// The boot artefacts for an unpacked image, made once and verified now:
    /// (initramfs, root disk).
    pub fn artefacts(&self, rootfs: &Path) -> Result<(PathBuf, PathBuf), VmError> {
        let initrd = artefacts::initramfs(&self.artefact_dir(), &self.kernel, &self.guest_init)?;
        let root = artefacts::root_disk(&self.artefact_dir(), rootfs)?;
        // Made now or long ago, both are checked against their records before a boot.
        for a in [&initrd, &root] {
            if !artefacts::verify(a)? {
                return Err(VmError::Artefact(format!("{} vanished", a.display())));
            }
        }
        Ok((initrd, root))
    }

    /// Boots an instance as `spec` describes. Returns once QEMU runs and answers
    /// QMP; the guest boots on (see [`Vm::wait_started`]). On failure nothing is left.
    pub fn spawn(&self, spec: &InstanceSpec) -> Result<Vm, VmError> {
        check_name(&spec.name)?;
        if let Ok(mut existing) = self.adopt(&spec.name) {
            if existing.is_running() {
                return Err(VmError::Exists(spec.name.clone()));
            }
            existing.abandon();
        }
        let dir = self.vm_dir(&spec.name);
        // A boot that fails leaves no directory behind (unless an earlier VM of the
        // name left its logs there).
        let fresh = !dir.exists();
        let booted = self.spawn_in(spec, &dir);
        if booted.is_err() && fresh {
            let _ = std::fs::remove_dir_all(&dir);
        }
        booted
    }

    fn spawn_in(&self, spec: &InstanceSpec, dir: &Path) -> Result<Vm, VmError> {
        let dir = dir.to_owned();
        std::fs::create_dir_all(&dir)
            .map_err(|e| VmError::Io(juice_image::PathError::at("create", &dir)(e)))?;
        for stale in [
            "state.json",
            "status",
            "console.log",
            "qemu.log",
            "qmp.sock",
            "ctl.sock",
            "debug.sock",
        ] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let (initrd, root) = self.artefacts(&spec.rootfs)?;
        // Made once per toolbox image, like the root disk, and verified the same way.
        let toolbox = match &spec.toolbox {
            Some(t) => Some(artefacts::root_disk(&self.artefact_dir(), t)?),
            None => None,
        };

        let mut volumes = Vec::new();
        for (i, v) in spec.volumes.iter().enumerate() {
            let disk = volume_disk_path(&v.source);
            artefacts::volume_disk(&disk, VOLUME_BYTES, spec.program.uid, spec.program.gid)?;
            volumes.push((format!("juice-vol-{i}"), disk, v.target.clone()));
        }

        let memory_mib = spec.limits.memory.map_or(DEFAULT_MEMORY_MIB, |m| {
            m.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB
        });
        // `cpus` is validated positive and finite and is rounded up here; `as` saturates anyway.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let vcpus = spec.limits.cpus.map_or(1, |c| c.ceil().max(1.0) as u32);

        let attachment = match &spec.network {
            Some(n) => Some(network::allocate(&self.home, &spec.name, n)?),
            None => None,
        };
        let result = self.boot(
            spec,
            &dir,
            &initrd,
            &root,
            toolbox.as_deref(),
            &volumes,
            attachment.as_ref(),
            memory_mib,
            vcpus,
        );
        if result.is_err()
            && let Some(a) = &attachment
        {
            network::release(&self.home, a);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn boot(
        &self,
        spec: &InstanceSpec,
        dir: &Path,
        initrd: &Path,
        root: &Path,
        toolbox: Option<&Path>,
        volumes: &[(String, PathBuf, PathBuf)],
        attachment: Option<&Attachment>,
        memory_mib: u64,
        vcpus: u32,
    ) -> Result<Vm, VmError> {
        let config = GuestConfig {
            app: InitConfig {
                rootfs: "/".into(),
                hostname: spec.name.clone(),
                program: spec.program.clone(),
                seccomp: if spec.seccomp {
                    juice_runtime::seccomp::default_filters()
                        .map_err(|e| VmError::Artefact(e.to_string()))?
                } else {
                    Vec::new()
                },
                binds: Vec::new(),
                user_namespace: false,
                cgroup_namespace: false,
                log_max_bytes: spec.log_max_bytes,
                log_keep: spec.log_keep,
            },
            volumes: volumes
                .iter()
                .map(|(serial, _, target)| GuestVolume {
                    serial: serial.clone(),
                    target: target.clone(),
                })
                .collect(),
            network: attachment.map(|a| GuestNetwork {
                address: a.address,
                prefix: a.subnet.prefix,
                gateway: a.subnet.gateway(),
            }),
        };
        let config_disk = dir.join("config.disk");
        write_config_disk(&config_disk, &config)?;
        let tap = match attachment {
            Some(a) => Some(network::attach_tap(&self.home, a)?),
            None => None,
        };
        let args = qemu_args(&QemuPlan {
            dir,
            kernel: &self.kernel.image,
            initrd,
            root,
            config: &config_disk,
            toolbox,
            volumes,
            mac: attachment.map(|a| network::mac_for(a.address)),
            tap_fd: tap.as_ref().map(|t| t.as_raw_fd()),
            memory_mib,
            vcpus,
            accel: self.accel,
            name: &spec.name,
        });
        let qemu_log = std::fs::File::create(dir.join("qemu.log")).map_err(|e| {
            VmError::Io(juice_image::PathError::at("create", &dir.join("qemu.log"))(
                e,
            ))
        })?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone().map_err(|e| VmError::Start {
                name: spec.name.clone(),
                reason: e.to_string(),
            })?)
            .stderr(qemu_log);
        let tap_raw = tap.as_ref().map(|t| t.as_raw_fd());
        let die_with_parent = spec.die_with_parent;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (setsid, fcntl, prctl); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                // Every file QEMU writes for the guest (its log, console, status, volume
                // disks of VOLUME_BYTES) stays within that size, even while no daemon
                // rotates them: past it a write fails (EFBIG) instead of filling the disk.
                let limit = libc::rlimit {
                    rlim_cur: VOLUME_BYTES,
                    rlim_max: VOLUME_BYTES,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                // The tap keeps its number; only its close-on-exec flag goes.
                if let Some(fd) = tap_raw
                    && libc::fcntl(fd, libc::F_SETFD, 0) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if die_with_parent {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| VmError::Start {
            name: spec.name.clone(),
            reason: format!("cannot run {}: {e}", self.qemu.display()),
        })?;
        drop(tap);
        let Ok(pid) = i32::try_from(child.id()) else {
            // Pids stop at 2^22, so this cannot happen; if it did, leave no qemu behind.
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmError::Start {
                name: spec.name.clone(),
                reason: format!("qemu's pid {} is not a pid_t", child.id()),
            });
        };
        // We reap it ourselves through waitpid (dropping `Child` neither waits nor kills).
        drop(child);
        let kill_it = || {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        };
        let pidfd = match juice_runtime::process::pidfd(pid) {
            Ok(fd) => fd,
            Err(e) => {
                kill_it();
                return Err(VmError::Syscall(format!("pidfd_open {pid}: {e}")));
            }
        };
        // How adoption tells QEMU from a recycled pid: without it, a live VM would look dead.
        let Some(started) = start_time(pid) else {
            kill_it();
            return Err(VmError::Start {
                name: spec.name.clone(),
                reason: format!("cannot read the start time of QEMU (pid {pid})"),
            });
        };
        let state = VmState {
            name: spec.name.clone(),
            pid,
            start_time: started,
            network: attachment.cloned(),
            started_unix_ms: now_unix_ms(),
            accel: self.accel,
            memory_mib,
            vcpus,
            log_max_bytes: spec.log_max_bytes,
            log_keep: spec.log_keep,
            toolbox: spec.toolbox.clone(),
        };
        let mut vm = Vm {
            state,
            process: Process::child(pid, pidfd),
            dir: dir.to_owned(),
            home: self.home.clone(),
        };
        let written = record::write(&vm.dir, &vm.state).map_err(VmError::from);
        if let Err(e) = written.and_then(|()| vm.wait_for_qmp(&spec.name)) {
            kill_it();
            vm.abandon();
            return Err(e);
        }
        Ok(vm)
    }

    /// Finds a VM started earlier, by this process or another, and checks it answers QMP.
    pub fn adopt(&self, name: &str) -> Result<Vm, VmError> {
        check_name(name)?;
        let dir = self.vm_dir(name);
        let state: VmState = record::read(&dir).map_err(|e| match e {
            record::RecordError::NotFound(_) => VmError::NotFound(name.to_owned()),
            e => VmError::Damaged {
                name: name.to_owned(),
                reason: e.to_string(),
            },
        })?;
        let process = Process::found(state.pid, state.start_time)
            .map_err(|e| VmError::Syscall(format!("find microVM {name:?} again: {e}")))?;
        let vm = Vm {
            state,
            process,
            dir,
            home: self.home.clone(),
        };
        if vm.is_running() {
            // A live pid that is not our VM's QEMU would not answer on its socket.
            let status = Qmp::connect(&vm.dir.join("qmp.sock"), Duration::from_secs(2))
                .and_then(|mut q| q.status())
                .map_err(|reason| VmError::Damaged {
                    name: name.to_owned(),
                    reason,
                })?;
            if status != "running" {
                return Err(VmError::Damaged {
                    name: name.to_owned(),
                    reason: format!("the VM is {status}"),
                });
            }
        }
        Ok(vm)
    }
}

/// A volume's disk sits beside the directory a sandbox would use: `<volume>.ext4`.
pub fn volume_disk_path(source: &Path) -> PathBuf {
    let mut name = source.as_os_str().to_owned();
    name.push(".ext4");
    PathBuf::from(name)
}

struct QemuPlan<'a> {
    dir: &'a Path,
    kernel: &'a Path,
    initrd: &'a Path,
    root: &'a Path,
    config: &'a Path,
    toolbox: Option<&'a Path>,
    volumes: &'a [(String, PathBuf, PathBuf)],
    mac: Option<[u8; 6]>,
    tap_fd: Option<RawFd>,
    memory_mib: u64,
    vcpus: u32,
    accel: Accel,
    name: &'a str,
}

/// QEMU's comma-separated option values escape a comma by doubling it.
fn opt_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

fn qemu_args(p: &QemuPlan<'_>) -> Vec<String> {
    let mut cmdline = String::from("console=ttyS0 quiet panic=-1 reboot=t");
    if std::env::var_os("JUICE_TRACE").is_some() {
        // The guest init prints its phases on the console (console.log).
        cmdline.push_str(" juice.trace");
    }
    if p.accel == Accel::Tcg {
        // Without a TSC frequency the emulated guest stalls calibrating it.
        cmdline.push_str(" tsc_early_khz=1000000");
    }
    let file = |n: &str| opt_path(&p.dir.join(n));
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("juice-{}", p.name),
        "-M".into(),
        "microvm,isa-serial=on,pit=on,pic=on,rtc=on".into(),
        "-accel".into(),
        match p.accel {
            Accel::Kvm => "kvm".into(),
            // TCG's translated-code cache grows to 1 GiB by default; an appliance runs
            // little distinct code, so a small cache costs no speed and saves host memory.
            Accel::Tcg => format!("tcg,tb-size={TCG_CODE_CACHE_MIB}"),
        },
        "-cpu".into(),
        match p.accel {
            Accel::Kvm => "host".into(),
            Accel::Tcg => "max".into(),
        },
        "-m".into(),
        format!("{}M", p.memory_mib),
        "-smp".into(),
        p.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        // QEMU's own seccomp filter: no exec, no privilege changes, no obsolete calls.
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-serial".into(),
        format!("file:{}", file("console.log")),
        "-kernel".into(),
        p.kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        p.initrd.to_string_lossy().into_owned(),
        "-append".into(),
        cmdline,
    ];
    let mut disk = |id: &str, path: &Path, serial: &str, read_only: bool| {
        a.push("-drive".into());
        a.push(format!(
            "id={id},file={},format=raw,if=none{}",
            opt_path(path),
            if read_only { ",readonly=on" } else { "" }
        ));
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive={id},serial={serial}"));
    };
    disk("root", p.root, GUEST_ROOT_SERIAL, true);
    disk("config", p.config, GUEST_CONFIG_SERIAL, true);
    if let Some(t) = p.toolbox {
        disk("toolbox", t, GUEST_TOOLBOX_SERIAL, true);
    }
    for (i, (serial, path, _)) in p.volumes.iter().enumerate() {
        disk(&format!("vol{i}"), path, serial, false);
    }
    if let (Some(fd), Some(mac)) = (p.tap_fd, p.mac) {
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,fd={fd}"));
        a.push("-device".into());
        a.push(format!(
            "virtio-net-device,netdev=net0,mac={}",
            mac.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        ));
    }
    a.push("-device".into());
    // Port 0 is kept for a console: four ports need five.
    a.push("virtio-serial-device,max_ports=8".into());
    for (id, backend, port) in [
        (
            "log",
            format!("file,id=log,path={},append=on", file(LOG_FILE)),
            GUEST_LOG_PORT,
        ),
        (
            "status",
            format!("file,id=status,path={}", file("status")),
            GUEST_STATUS_PORT,
        ),
        (
            "ctl",
            format!("socket,id=ctl,path={},server=on,wait=off", file("ctl.sock")),
            GUEST_CONTROL_PORT,
        ),
        (
            "debug",
            format!(
                "socket,id=debug,path={},server=on,wait=off",
                file("debug.sock")
            ),
            GUEST_DEBUG_PORT,
        ),
    ] {
        a.push("-chardev".into());
        a.push(backend);
        a.push("-device".into());
        a.push(format!("virtserialport,chardev={id},name={port}"));
    }
    a.push("-qmp".into());
    a.push(format!("unix:{},server=on,wait=off", file("qmp.sock")));
    a
}

fn write_config_disk(path: &Path, config: &GuestConfig) -> Result<(), VmError> {
    let mut bytes = serde_json::to_vec(config).map_err(|e| VmError::Artefact(e.to_string()))?;
    // A disk is whole sectors; the guest reads up to the first NUL.
    bytes.resize(bytes.len().div_ceil(4096).max(1) * 4096 + 4096, 0);
    std::fs::write(path, &bytes)
        .map_err(|e| VmError::Io(juice_image::PathError::at("write", path)(e)))
}

/// A running (or finished) microVM.
pub struct Vm {
    state: VmState,
    process: Process,
    dir: PathBuf,
    home: PathBuf,
}

impl Vm {
    pub fn state(&self) -> &VmState {
        &self.state
    }
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Waits until QEMU answers on its QMP socket (or has died, with its reason).
    fn wait_for_qmp(&self, name: &str) -> Result<(), VmError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = self.dir.join("qmp.sock");
        loop {
            if !self.is_running() {
                return Err(VmError::Start {
                    name: name.to_owned(),
                    reason: format!("QEMU exited: {}", self.tail("qemu.log")),
                });
            }
            if sock.exists()
                && let Ok(mut q) = Qmp::connect(&sock, Duration::from_secs(2))
                && q.status().is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(VmError::Start {
                    name: name.to_owned(),
                    reason: "QEMU did not answer on its QMP socket within 10 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last lines of a file in the VM's directory, for error messages.
    /// The last lines of a guest-written file, reading at most its last 16 KiB.
    fn tail(&self, file: &str) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut bytes = Vec::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join(file)) {
            let len = f.metadata().map_or(0, |m| m.len());
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 << 10)));
            let _ = f.take(16 << 10).read_to_end(&mut bytes);
        }
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// The guest's status lines. The guest writes this file, so only its start is
    /// read (juice-guest writes a handful of short lines; anything past is noise).
    fn status_lines(&self) -> Vec<String> {
        use std::io::Read;
        let mut bytes = Vec::new();
        if let Ok(f) = std::fs::File::open(self.dir.join("status")) {
            let _ = f.take(STATUS_READ_BYTES).read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the guest has started the appliance; its reason if it could not.
    pub fn wait_started(&mut self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            for line in self.status_lines() {
                if line.starts_with("started ") {
                    return Ok(());
                }
                if let Some(reason) = line.strip_prefix("failed ") {
                    return Err(self.start_failure(reason.to_owned()));
                }
            }
            if !self.is_running() {
                let console = self.tail("console.log");
                return Err(self.start_failure(format!("the VM stopped during boot: {console}")));
            }
            if Instant::now() > deadline {
                return Err(self.start_failure(format!(
                    "the guest did not start the appliance within {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn start_failure(&mut self, reason: String) -> VmError {
        let _ = self.stop(Duration::ZERO);
        VmError::Start {
            name: self.state.name.clone(),
            reason,
        }
    }

    /// Once `app.log` is past its size: shifts `app.log.N`, renames `app.log` to
    /// `app.log.1`, and has QEMU write a new `app.log` (QMP `chardev-change`), so
    /// nothing is copied or lost. True if it rotated.
    pub fn rotate_log(&self) -> Result<bool, VmError> {
        let max = self.state.log_max_bytes;
        let log = self.dir.join(LOG_FILE);
        let size = std::fs::metadata(&log).map_or(0, |m| m.len());
        if max == 0 || size <= max {
            return Ok(false);
        }
        let keep = self.state.log_keep.max(1);
        let numbered = |n: u32| self.dir.join(format!("{LOG_FILE}.{n}"));
        let _ = std::fs::remove_file(numbered(keep));
        for n in (1..keep).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        std::fs::rename(&log, numbered(1))
            .map_err(|e| VmError::Io(juice_image::PathError::at("rotate", &log)(e)))?;
        let damaged = |reason: String| VmError::Damaged {
            name: self.state.name.clone(),
            reason,
        };
        Qmp::connect(&self.dir.join("qmp.sock"), Duration::from_secs(2))
            .and_then(|mut q| {
                q.execute_with(
                    "chardev-change",
                    serde_json::json!({
                        "id": "log",
                        "backend": { "type": "file", "data": {
                            "out": log.to_string_lossy(), "append": true } },
                    }),
                )
            })
            .map_err(damaged)?;
        Ok(true)
    }
}

impl Runtime {
    /// Starts a debug session in the running microVM `name`: the guest runs the
    /// program from the toolbox disk the VM booted with (its machine takes no
    /// disk later), with the appliance's root read-only at `/app`. One session
    /// at a time per VM: its port is one stream.
    pub fn debug(
        &self,
        name: &str,
        spec: &juice_runtime::DebugSpec,
    ) -> Result<juice_runtime::DebugSession, VmError> {
        use juice_init::session::{Kind, Request, write_frame};
        let vm = self.adopt(name)?;
        let refuse = |reason: String| VmError::Debug {
            name: name.to_owned(),
            reason,
        };
        if !vm.is_running() {
            return Err(refuse("it is not running".into()));
        }
        match &vm.state.toolbox {
            None => {
                return Err(refuse(
                    "it booted without a toolbox disk; build juice-toolbox (juice build examples/toolbox) and restart the instance".into(),
                ));
            }
            Some(t) if *t != spec.toolbox => {
                return Err(refuse(format!(
                    "a microVM carries the toolbox it booted with ({}), not {}; restart the instance to change it",
                    t.display(),
                    spec.toolbox.display()
                )));
            }
            Some(_) => {}
        }
        let socket = vm.dir.join("debug.sock");
        let mut conn = std::os::unix::net::UnixStream::connect(&socket)
            .map_err(|e| refuse(format!("cannot reach its debug port: {e}")))?;
        // The guest mounts the toolbox disk and the appliance's root itself.
        let request = Request::toolbox(
            PathBuf::new(),
            name,
            spec.program.clone(),
            Vec::new(),
            spec.tty.then_some((spec.rows, spec.cols)),
        );
        let json = serde_json::to_vec(&request).map_err(|e| refuse(e.to_string()))?;
        write_frame(&mut conn, Kind::Request, &json)
            .map_err(|e| refuse(format!("cannot send the session request: {e}")))?;
        Ok(juice_runtime::DebugSession {
            conn: conn.into(),
            finish: Box::new(|| {}),
        })
    }
}

/// Reads a microVM's use from its QEMU process and the host end of its tap.
/// QEMU runs in no cgroup of its own: its CPU time and resident set are the
/// VM's whole footprint (guest memory it has touched, QEMU's own, the device
/// emulation), and the guest's processes are the guest's to count.
struct VmMeter {
    pid: i32,
    start_time: u64,
    memory_limit_bytes: u64,
    tap: Option<String>,
}

impl Meter for VmMeter {
    fn read(&self) -> Usage {
        let process = juice_runtime::usage::process_usage(self.pid, self.start_time).ok();
        Usage {
            cpu_ns: process.map(|p| p.0),
            memory_bytes: process.map(|p| p.1),
            memory_limit_bytes: Some(self.memory_limit_bytes),
            pids: None,
            pids_limit: None,
            net: self
                .tap
                .as_deref()
                .and_then(|t| juice_runtime::usage::interface_bytes(t).ok()),
        }
    }
}

impl Handle for Vm {
    fn meter(&self) -> Option<std::sync::Arc<dyn Meter>> {
        Some(std::sync::Arc::new(VmMeter {
            pid: self.state.pid,
            start_time: self.state.start_time,
            memory_limit_bytes: self.state.memory_mib << 20,
            tap: self.state.network.as_ref().map(|a| a.veth.clone()),
        }))
    }

    fn process(&self) -> &Process {
        &self.process
    }
    fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// The guest's `exit` status line says how the appliance ended; without a
    /// word from the guest, QEMU's own end is the best account (a SIGKILL, say).
    fn collect(&mut self, status: Option<nix::sys::wait::WaitStatus>) -> ExitReport {
        let mut report = ExitReport::UNKNOWN;
        if let Some(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) = status {
            report.signal = Some(sig as i32);
        }
        for line in self.status_lines() {
            if let Some(json) = line.strip_prefix("exit ")
                && let Ok(r) = serde_json::from_str::<ExitRecord>(json)
            {
                report.code = r.code;
                report.signal = r.signal;
            }
            if let Some(reason) = line.strip_prefix("failed ") {
                // Into the log, where `juice logs` shows it.
                if let Ok(mut log) = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(self.dir.join(LOG_FILE))
                {
                    let _ = writeln!(
                        log,
                        "juice: the guest could not start the appliance: {reason}"
                    );
                }
            }
        }
        report
    }

    /// Frees the address; the tap went with QEMU. Keeps logs and status.
    fn free(&mut self) {
        if let Some(a) = &self.state.network {
            network::release(&self.home, a);
        }
        record::remove(&self.dir);
        for f in ["qmp.sock", "ctl.sock", "debug.sock", "config.disk"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
    }

    /// Asks the guest to stop the appliance (SIGTERM inside), then ends QEMU
    /// through QMP after `grace`, then SIGKILL.
    fn stop(&mut self, grace: Duration) -> ExitReport {
        if self.process.reaped().is_none() {
            if !grace.is_zero()
                && let Ok(mut ctl) =
                    std::os::unix::net::UnixStream::connect(self.dir.join("ctl.sock"))
            {
                let _ = ctl.write_all(b"term\n");
                if let Some(r) = self.wait_timeout(grace) {
                    return r;
                }
            }
            if let Ok(mut q) = Qmp::connect(&self.dir.join("qmp.sock"), Duration::from_millis(500))
            {
                let _ = q.execute("quit");
                if let Some(r) = self.wait_timeout(Duration::from_secs(2)) {
                    return r;
                }
            }
            self.signal(libc::SIGKILL);
        }
        self.wait()
    }

    fn address(&self) -> Option<Ipv4Addr> {
        self.state.network.as_ref().map(|a| a.address)
    }

    fn started_unix_ms(&self) -> u64 {
        self.state.started_unix_ms
    }

    fn wait_started(&mut self, timeout: Duration) -> Result<(), BackendError> {
        Ok(Vm::wait_started(self, timeout)?)
    }

    /// Periodic upkeep while running: rotates the log.
    fn maintain(&mut self) {
        if self.is_running() {
            let _ = self.rotate_log();
        }
    }
}

impl Backend for Runtime {
    fn spawn(&self, spec: &InstanceSpec) -> Result<Box<dyn Handle>, BackendError> {
        Ok(Box::new(Runtime::spawn(self, spec)?))
    }
    fn adopt(&self, name: &str) -> Result<Box<dyn Handle>, BackendError> {
        Ok(Box::new(Runtime::adopt(self, name)?))
    }
    fn list(&self) -> Vec<String> {
        record::list(&self.home.join("vms"))
    }
    fn log_path(&self, name: &str) -> PathBuf {
        Runtime::log_path(self, name)
    }
    fn debug(
        &self,
        name: &str,
        spec: &juice_runtime::DebugSpec,
    ) -> Result<juice_runtime::DebugSession, BackendError> {
        Ok(Runtime::debug(self, name, spec)?)
    }
    /// The address is found by name; the tap went with QEMU.
    fn forget(&self, name: &str) {
        network::release_name(&self.home, name);
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
    }
}

fn check_name(name: &str) -> Result<(), VmError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(VmError::BadName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_gets_the_disks_ports_and_network_it_needs() {
        let vols = vec![(
            "juice-vol-0".to_owned(),
            PathBuf::from("/v/data,1.ext4"),
            PathBuf::from("/data"),
        )];
        let args = qemu_args(&QemuPlan {
            dir: Path::new("/h/vms/a"),
            kernel: Path::new("/boot/k"),
            initrd: Path::new("/i"),
            root: Path::new("/r"),
            config: Path::new("/c"),
            toolbox: None,
            volumes: &vols,
            mac: Some([2, 0x4a, 10, 88, 0, 5]),
            tap_fd: Some(3),
            memory_mib: 128,
            vcpus: 2,
            accel: Accel::Tcg,
            name: "a",
        });
        let joined = args.join(" ");
        assert!(
            joined.contains("file=/r,format=raw,if=none,readonly=on"),
            "{joined}"
        );
        assert!(joined.contains("serial=juice-root"));
        assert!(joined.contains("file=/v/data,,1.ext4,format=raw,if=none -device virtio-blk-device,drive=vol0,serial=juice-vol-0"), "{joined}");
        assert!(joined.contains("tap,id=net0,fd=3"));
        assert!(joined.contains("mac=02:4a:0a:58:00:05"));
        assert!(joined.contains("-m 128M -smp 2"));
        assert!(joined.contains("tsc_early_khz=1000000"));
        assert!(joined.contains("name=juice.status"));
        assert!(joined.contains("unix:/h/vms/a/qmp.sock,server=on,wait=off"));
        assert!(joined.contains("path=/h/vms/a/debug.sock,server=on,wait=off"));
        assert!(joined.contains("name=juice.debug"));
        assert!(
            !joined.contains("juice-toolbox"),
            "no toolbox, no toolbox disk"
        );
    }

    #[test]
    fn kvm_boots_without_the_tcg_clock_hint_and_a_toolbox_is_a_read_only_disk() {
        let args = qemu_args(&QemuPlan {
            dir: Path::new("/d"),
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            root: Path::new("/r"),
            config: Path::new("/c"),
            toolbox: Some(Path::new("/t")),
            volumes: &[],
            mac: None,
            tap_fd: None,
            memory_mib: 256,
            vcpus: 1,
            accel: Accel::Kvm,
            name: "b",
        });
        let joined = args.join(" ");
        assert!(!joined.contains("tsc_early_khz"));
        assert!(joined.contains("-accel kvm -cpu host"));
        assert!(!joined.contains("netdev"));
        assert!(joined.contains(
            "id=toolbox,file=/t,format=raw,if=none,readonly=on -device virtio-blk-device,drive=toolbox,serial=juice-toolbox"
        ));
    }

    #[test]
    fn the_config_disk_is_whole_sectors_and_ends_in_nul() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let config = GuestConfig {
            app: InitConfig {
                rootfs: "/".into(),
                hostname: "h".into(),
                program: juice_init::Program::new(vec!["/x".into()]),
                seccomp: vec![],
                binds: vec![],
                user_namespace: false,
                cgroup_namespace: false,
                log_max_bytes: 1,
                log_keep: 1,
            },
            volumes: vec![],
            network: None,
        };
        write_config_disk(&p, &config).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let end = bytes.iter().position(|b| *b == 0).unwrap();
        let back: GuestConfig = serde_json::from_slice(&bytes[..end]).unwrap();
        assert_eq!(back.app.program.argv, ["/x"]);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("web-r1-00ab").is_ok());
        for bad in ["", "-a", "A", "a/b", "a.b", &"x".repeat(49)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
