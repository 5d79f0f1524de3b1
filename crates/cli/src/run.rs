//! `juice run`: one instance in the foreground, outside any group.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use juice_image::appliance::ApplianceConfig;
use juice_image::store::Store;
use juice_image::unpack::materialise;
use juice_runtime::{
    Backend, HostLimits, IdMap, InstanceSpec, Limits, NetworkSpec, PortMapping, trace,
};
use juice_sandbox::Runtime;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// What `juice run` was asked for.
#[derive(clap::Args)]
pub struct RunArgs {
    pub image: String,
    /// Instance name (default: the appliance name and a random suffix).
    #[arg(long)]
    pub name: Option<String>,
    /// Publish a port: HOST:CONTAINER or IP:HOST:CONTAINER (repeatable).
    #[arg(short = 'p', long = "publish")]
    pub publish: Vec<String>,
    /// How the instance is kept apart from the host.
    #[arg(long, value_enum, default_value_t = Isolation::Sandbox)]
    pub isolation: Isolation,
    /// The instance's network.
    #[arg(long, value_enum, default_value_t = Network::Bridge)]
    pub network: Network,
    /// Do not create a cgroup (no limits).
    #[arg(long)]
    pub no_cgroup: bool,
    /// Run in a user namespace: root inside is this host uid (and the 65535 after it).
    #[arg(long, value_name = "HOST_UID")]
    pub userns: Option<u32>,
    /// Print nothing but the appliance's output.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Seconds between SIGTERM and SIGKILL on Ctrl-C.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    /// Arguments that replace the command's own (the program stays the manifest's).
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// `--isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// Under the host's kernel: namespaces, cgroups, seccomp, a read-only root.
    Sandbox,
    /// Its own kernel, under QEMU.
    Microvm,
}

/// `--network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Network {
    /// An address on juice0, default-deny between instances.
    Bridge,
    /// Loopback only.
    None,
}

/// Runs the instance until it ends (or Ctrl-C); returns the exit code to use.
pub fn run(args: RunArgs) -> Result<i32> {
    let microvm = args.isolation == Isolation::Microvm;
    // Block the signals we forward before any thread exists, so every thread inherits the mask.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.thread_block()?;

    trace::mark("juice run");
    let home = crate::juice_home();
    let rootless = !nix::unistd::geteuid().is_root();
    let store = Store::open(&home)?;
    let mut image = args.image.clone();
    if store.resolve(&image).is_err() && juice_registry::reference::looks_remote(&image) {
        let mut options = juice_registry::remote::RemoteOptions::from_env(&home)?;
        options.progress = crate::progress::reporter(args.quiet);
        // The pull checks the policy before any layer moves and says which digest it got.
        image = juice_registry::remote::Remote::new(&options)?
            .pull(&store, &image)?
            .digest;
    }
    // The host's trust policy decides before anything is unpacked or started, and what it
    // admitted is what runs: by digest from here on, so a tag moved meanwhile changes nothing.
    let admitted = juice_registry::policy::admit(&store, &image)?;
    let rootfs = materialise(&store, &admitted.digest.to_string())?;
    let appliance = rootfs.appliance.clone().ok_or_else(|| {
        format!(
            "{} is not a Juice appliance (no {} label); import it first",
            rootfs.reference,
            juice_image::appliance::LABEL
        )
    })?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_name(&appliance));
    let ports: Vec<PortMapping> = args
        .publish
        .iter()
        .map(|p| p.parse())
        .collect::<std::result::Result<_, _>>()?;

    trace::mark("image ready");
    if microvm && rootless {
        return Err("a microVM needs root (its tap on the Juice bridge and its disks)".into());
    }
    let sandbox = Runtime::new(&home)?;
    sandbox.cleanup_stale();
    let vms = if microvm {
        let vms = juice_microvm::Runtime::new(&home)?;
        vms.cleanup_stale();
        Some(vms)
    } else {
        None
    };
    let backend: &dyn Backend = match &vms {
        Some(v) => v,
        None => &sandbox,
    };
    let mut spec = InstanceSpec::for_appliance(
        &appliance,
        &rootfs.path,
        &name,
        &home.join("volumes").join(&name),
        &HostLimits::load(&home)?,
    );
    spec.die_with_parent = true;
    if !args.args.is_empty() {
        spec.program.argv.truncate(1);
        spec.program.argv.extend(args.args.iter().cloned());
    }
    spec.cgroup = !args.no_cgroup;
    if args.no_cgroup {
        spec.limits = Limits::default();
    }
    if let Some(host_id) = args.userns {
        spec.user_namespace = Some(IdMap::range(host_id));
    }
    let mut network = args.network;
    if rootless {
        // Without root: a user namespace mapping only ourselves, no cgroup, loopback only.
        spec.user_namespace = Some(IdMap::caller());
        if spec.limits != Limits::default() && !args.quiet {
            eprintln!(
                "juice: rootless: the manifest's limits are not enforced (cgroups need root or a delegated cgroup)"
            );
        }
        spec.cgroup = false;
        spec.limits = Limits::default();
        if (spec.program.uid, spec.program.gid) != (0, 0) && !args.quiet {
            eprintln!(
                "juice: rootless: running as root inside (your own uid outside) instead of {}:{}",
                spec.program.uid, spec.program.gid
            );
        }
        spec.program.uid = 0;
        spec.program.gid = 0;
        if !ports.is_empty() {
            return Err(
                "rootless: publishing ports needs root (there is no bridge without it)".into(),
            );
        }
        network = Network::None;
    }
    match network {
        Network::Bridge => {
            let mut net = NetworkSpec::new(&name);
            net.ports = ports.clone();
            spec.network = Some(net);
        }
        Network::None if ports.is_empty() => {}
        Network::None => return Err("publishing ports needs --network bridge".into()),
    }
    spec.prepare_volumes(args.userns.unwrap_or(0))?;

    trace::mark("spec ready");
    let mut instance = backend.spawn(&spec)?;
    if microvm && !args.quiet {
        eprintln!(
            "juice: booting {name} from {} ({:?}, pid {})",
            rootfs.reference,
            vms.as_ref().map(|v| v.accel()),
            instance.pid()
        );
    }
    instance.wait_started(Duration::from_secs(120))?;
    // Published ports are DNAT rules to the instance's address, made when its
    // network was wired and removed when it is released.
    if !args.quiet {
        let addr = instance
            .address()
            .map(|a| format!(", address {a}"))
            .unwrap_or_default();
        eprintln!(
            "juice: started {name} from {} (pid {}{addr})",
            rootfs.reference,
            instance.pid()
        );
        if !microvm && let Some(l) = sandbox.adopt(&name).ok().and_then(|i| i.limits()) {
            eprintln!("juice: limits in the kernel: {}", describe(&l));
        }
    }

    // A thread turns Ctrl-C into a stop request; the loop below stops the instance
    // (SIGTERM inside, SIGKILL after the grace period; a second Ctrl-C kills at once).
    let stop_requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let requests = stop_requests.clone();
    std::thread::spawn(move || {
        while signals.wait().is_ok() {
            requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let grace = Duration::from_secs(args.grace);

    let mut tail = Tail::new(backend.log_path(&name));
    let report = loop {
        if let Some(r) = instance.wait_timeout(Duration::from_millis(100)) {
            break r;
        }
        tail.pump();
        instance.maintain();
        match stop_requests.load(std::sync::atomic::Ordering::SeqCst) {
            0 => {}
            1 => break instance.stop(grace),
            _ => break instance.stop(Duration::ZERO),
        }
    };
    tail.pump();
    if !args.quiet || report.oom_killed {
        eprintln!("juice: {name} {report}");
    }
    Ok(match (report.code, report.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 125,
    })
}

/// `hello-web-3fa2`: the appliance name made valid for an instance, and a random suffix.
fn default_name(a: &ApplianceConfig) -> String {
    let base: String = a
        .manifest
        .appliance
        .name
        .as_str()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{:04x}",
        base.trim_end_matches('-'),
        (nanos ^ std::process::id()) & 0xffff
    )
}

fn describe(l: &Limits) -> String {
    let cpus = l
        .cpus
        .map_or("cpu unlimited".into(), |c| format!("cpus {c}"));
    let mem = l.memory.map_or("memory unlimited".into(), |m| {
        format!("memory {}", crate::output::size(m))
    });
    let pids = l
        .pids
        .map_or("pids unlimited".into(), |p| format!("pids {p}"));
    format!("{cpus}, {mem}, {pids}")
}

/// Follows a log file across rotations, copying new bytes to stdout.
struct Tail {
    path: PathBuf,
    file: Option<(std::fs::File, u64)>,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        Tail { path, file: None }
    }

    fn pump(&mut self) {
        let mut out = std::io::stdout().lock();
        let current_ino = std::fs::metadata(&self.path).ok().map(|m| m.ino());
        if let Some((f, ino)) = &mut self.file {
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            let _ = out.write_all(&buf);
            if current_ino != Some(*ino) {
                self.file = None;
            }
        }
        if self.file.is_none()
            && let Ok(mut f) = std::fs::File::open(&self.path)
            && let Ok(m) = f.metadata()
        {
            let _ = f.seek(SeekFrom::Start(0));
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            let _ = out.write_all(&buf);
            self.file = Some((f, m.ino()));
        }
        let _ = out.flush();
    }
}
