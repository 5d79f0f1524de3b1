//! `juice-host`: PID 1 of a Juice OS host.
//!
//! The initramfs is the host's whole root, and this is its `/init`. In order it:
//! 1. moves the root out of the initial ramfs into a tmpfs and execs itself again
//!    there (the kernel refuses `pivot_root` from the initial ramfs, and every sandbox
//!    pivots);
//! 2. mounts the kernel's filesystems and cgroup2, loads the modules of
//!    `/lib/modules/order`, finds the partitions by GPT name and mounts `juice-boot`
//!    at `/boot` and `juice-data` at `/var/lib/juice`;
//! 3. reads `/var/lib/juice/host.toml` (see [`juice_os::settings`]), sets the hostname,
//!    configures the network over rtnetlink and writes `/etc/resolv.conf`, then
//!    remounts the root read-only;
//! 4. starts `juice daemon` and starts it again when it exits, reaps every orphan,
//!    pets the software watchdog, and reboots a trial boot that gets no verdict;
//! 5. on SIGINT (Ctrl-Alt-Del) or SIGUSR1 reboots, on SIGTERM or SIGUSR2 powers off,
//!    stopping everything first and leaving the data partition clean.
//!
//! Every step prints one `juice-host: ...` line on the console. Nothing here returns:
//! PID 1 exiting panics the kernel, so a fatal error reboots after a delay instead.

mod boot;
mod daemon;
mod shutdown;
mod trial;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use juice_os::settings::{self, Settings};
use nix::mount::MsFlags;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

use shutdown::Halt;

/// A step that failed, as one sentence for the console.
#[derive(Debug)]
pub struct Failed(pub String);

/// Prints one line on the console.
pub fn log(msg: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "juice-host: {msg}");
}

/// How often the watchdog is petted (softdog's default timeout is 60 s).
const PET_EVERY: Duration = Duration::from_secs(10);
/// How long a host without its data partition shows the error before it reboots.
const NO_DATA_REBOOT: Duration = Duration::from_secs(30);

fn main() {
    if std::process::id() != 1 {
        eprintln!("juice-host is PID 1 of a Juice OS host; it is not run as a program");
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|p| log(&format!("panic: {p}"))));
    let result = std::panic::catch_unwind(run);
    let why = match result {
        Ok(Err(Failed(why))) => why,
        Ok(Ok(never)) => match never {},
        Err(_) => "a panic (above)".to_owned(),
    };
    log(&format!("cannot go on: {why}; rebooting in 30 s"));
    std::thread::sleep(NO_DATA_REBOOT);
    shutdown::halt_now(Halt::Reboot);
}

fn run() -> Result<std::convert::Infallible, Failed> {
    if boot::on_initramfs_after_mounting()? {
        log("moving the root out of the initramfs into a tmpfs");
        return boot::switch_root();
    }
    boot::console();
    log(&format!("Juice OS {}", os_version()));
    // Ctrl-Alt-Del becomes SIGINT to us instead of an immediate reboot.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        log(&format!("cannot take over Ctrl-Alt-Del: {e}"));
    }
    let signals = shutdown::block_signals()?;
    boot::mount_kernel_filesystems()?;
    log("mounted /proc, /sys, /dev, /run, /tmp and cgroup2");
    boot::load_modules(&log);

    match boot::find_partition(juice_os::BOOT_PARTITION, boot::DEVICE_WAIT) {
        Some(dev) => match boot::mount_fs(
            &dev.display().to_string(),
            "/boot",
            "vfat",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("umask=0077"),
        ) {
            Ok(()) => log(&format!("mounted {} at /boot", dev.display())),
            Err(Failed(e)) => log(&e),
        },
        None => log(&format!(
            "no partition named {}: /boot stays empty",
            juice_os::BOOT_PARTITION
        )),
    }
    let Some(data) = boot::find_partition(juice_os::DATA_PARTITION, boot::DEVICE_WAIT) else {
        return Err(Failed(format!(
            "no partition named {} on any disk after {} s: the host keeps its state there",
            juice_os::DATA_PARTITION,
            boot::DEVICE_WAIT.as_secs()
        )));
    };
    boot::mount_fs(
        &data.display().to_string(),
        settings::HOME,
        "ext4",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    log(&format!("mounted {} at {}", data.display(), settings::HOME));

    let home = Path::new(settings::HOME);
    let settings = read_settings(&home.join(settings::FILE));
    configure_host(&settings);
    boot::mount_fs(
        "none",
        "/",
        "tmpfs",
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    )?;
    log("the root is read-only");

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut trial = trial::Trial::from_cmdline(&cmdline, settings.os.trial_deadline);
    if let Some(t) = &trial {
        log(&format!(
            "trial boot of slot {}: rebooting unless the daemon gives a verdict within {} s",
            t.slot,
            t.deadline.as_secs()
        ));
    }
    let mut watchdog = shutdown::Watchdog::open(&log);
    let mut supervisor = daemon::Supervisor::new(
        daemon::arguments(&settings, home),
        daemon::environment(&settings, home),
        home,
    );
    let mut last_pet = Instant::now();
    loop {
        supervisor.start_if_due(&log);
        if let Some(signal) = shutdown::wait_signal(&signals, Duration::from_secs(1))
            && let Some(halt) = Halt::for_signal(signal)
        {
            log(&format!("{signal:?}: {}", halt.describe()));
            shutdown::shutdown(halt, &mut supervisor, &mut watchdog);
        }
        reap(&mut supervisor);
        if last_pet.elapsed() >= PET_EVERY {
            watchdog.pet();
            last_pet = Instant::now();
        }
        if let Some(t) = &trial {
            if t.verdict_given() {
                log(&format!(
                    "the daemon gave the trial's verdict: {}",
                    t.verdict()
                ));
                trial = None;
            } else if t.expired() {
                let reason = t.record_failure(Path::new("/boot"), home);
                log(&format!("trial of slot {} failed: {reason}", t.slot));
                shutdown::shutdown(Halt::Reboot, &mut supervisor, &mut watchdog);
            }
        }
    }
}

/// Reaps every child that has ended; the daemon's end schedules its restart.
fn reap(supervisor: &mut daemon::Supervisor) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                supervisor.exited(pid.as_raw(), &format!("exited with {code}"), &log);
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) => {
                supervisor.exited(pid.as_raw(), &format!("was killed by {signal:?}"), &log);
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// `host.toml`, or the defaults. An invalid file is reported on the console with its
/// file, line and field, and the host goes on with the defaults: loopback only and no
/// remote API. The daemon still starts, so instances recorded on the data partition
/// come back, and the console tells the operator what to fix.
fn read_settings(path: &Path) -> Settings {
    match Settings::load_if_present(path) {
        Ok(Some(loaded)) => {
            if let Some(v) = loaded.migrated_from {
                log(&format!(
                    "{} is version {v}: read as version {} in memory; the file is left as written",
                    path.display(),
                    settings::CURRENT_VERSION
                ));
            }
            log(&format!("read {}", path.display()));
            loaded.settings
        }
        Ok(None) => {
            log(&format!("no {}: defaults, loopback only", path.display()));
            Settings::default()
        }
        Err(e) => {
            log(&format!("{e}"));
            log(&format!(
                "{} is invalid: going on with the defaults, loopback only",
                path.display()
            ));
            Settings::default()
        }
    }
}

/// The hostname, the network and `/etc/resolv.conf` (the root is still writable).
fn configure_host(settings: &Settings) {
    if let Some(h) = &settings.hostname {
        match nix::unistd::sethostname(h) {
            Ok(()) => log(&format!("hostname {h}")),
            Err(e) => log(&format!("cannot set the hostname {h}: {e}")),
        }
    }
    let result = match &settings.network {
        None => juice_init::net::loopback_only().map(|()| "loopback only".to_owned()),
        Some(n) => {
            if !boot::wait_for_interface(&n.interface, boot::DEVICE_WAIT) {
                log(&format!(
                    "no interface {} after {} s",
                    n.interface,
                    boot::DEVICE_WAIT.as_secs()
                ));
            }
            let addresses: Vec<_> = n.addresses.iter().map(|c| (c.address, c.prefix)).collect();
            juice_init::net::configure_interface(&n.interface, &addresses, n.gateway).map(|()| {
                let list: Vec<String> = n.addresses.iter().map(|c| c.to_string()).collect();
                format!(
                    "{} up with {}{}",
                    n.interface,
                    list.join(", "),
                    n.gateway
                        .map(|g| format!(", default route via {g}"))
                        .unwrap_or_default()
                )
            })
        }
    };
    match result {
        Ok(what) => log(&format!("network: {what}")),
        Err(e) => log(&format!("network: {e}")),
    }
    // Published ports are DNAT to instances on the bridge: the host routes for them.
    // Juice's own rules (juice_net::nft) keep everything else from being forwarded.
    match std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        Ok(()) => log("IPv4 forwarding on, for published ports"),
        Err(e) => log(&format!("cannot turn IPv4 forwarding on: {e}")),
    }
    if let Some(resolv) = settings.resolv_conf() {
        match std::fs::write("/etc/resolv.conf", resolv) {
            Ok(()) => log("wrote /etc/resolv.conf"),
            Err(e) => log(&format!("cannot write /etc/resolv.conf: {e}")),
        }
    }
}

fn os_version() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_ID="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "(unknown version)".into())
}
