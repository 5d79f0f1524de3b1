//! Host memory per idle sandbox, beyond the appliance itself.
//!
//! Starts N copies of an idle program bare (plain child processes) and
//! measures how much `MemAvailable` drops; stops them; then starts N
//! sandboxed instances of the same program (namespaces, read-only root,
//! cgroup with limits, seccomp, juice-init as PID 1) and measures again.
//! The difference per instance is what the sandbox costs the host: init,
//! page tables, namespaces, cgroups, mounts. Also reports the PSS of the
//! juice-init processes alone.
//!
//! Usage: juice-bench-density JUICE_HOME IMAGE COUNT   (root)

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use juice_image::store::Store;
use juice_image::unpack::materialise;
use juice_runtime::Limits;
use juice_runtime::{Handle, InstanceSpec};
use juice_sandbox::Runtime;

fn mem_available_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn settle() -> u64 {
    // Page cache and slab reclaim make single readings noisy: drop caches and take the best of a few.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    std::thread::sleep(Duration::from_millis(500));
    (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            mem_available_kib()
        })
        .max()
        .unwrap_or(0)
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: {} JUICE_HOME IMAGE COUNT", args[0]);
        std::process::exit(2);
    }
    let home = Path::new(&args[1]);
    let count: usize = args[3].parse().expect("COUNT is a number");
    let store = Store::open(home).expect("store");
    let root = materialise(&store, &args[2]).expect("image").path;
    let program = root.join("usr/bin/probe");

    // Baseline: the same program, bare.
    let before = settle();
    let mut bare: Vec<Child> = (0..count)
        .map(|_| {
            Command::new(&program)
                .args(["sleep", "3600"])
                .spawn()
                .expect("spawn bare")
        })
        .collect();
    let with_bare = settle();
    let app_pss: u64 = bare
        .iter()
        .map(|c| pss_kib(i32::try_from(c.id()).expect("a pid fits pid_t")))
        .sum();
    for c in &mut bare {
        let _ = c.kill();
        let _ = c.wait();
    }

    let runtime = Runtime::new(home)
        .expect("runtime (is juice-init next to this binary, or JUICE_INIT set?)");
    let before_sandboxes = settle();
    let mut instances = Vec::new();
    for i in 0..count {
        let mut spec = InstanceSpec::new(
            &format!("idle-{i}"),
            &root,
            vec!["/usr/bin/probe".into(), "sleep".into(), "3600".into()],
        );
        spec.limits = Limits {
            cpus: Some(0.1),
            memory: Some(32 << 20),
            pids: Some(16),
        };
        spec.log_max_bytes = 1 << 20;
        // JUICE_DENSITY_NO_CGROUP=1 measures the cgroup's share separately.
        if std::env::var_os("JUICE_DENSITY_NO_CGROUP").is_some() {
            spec.cgroup = false;
            spec.limits = Limits::default();
        }
        instances.push(runtime.spawn(&spec).expect("spawn sandbox"));
    }
    let with_sandboxes = settle();
    let init_pss: u64 = instances.iter().map(|i| pss_kib(i.pid())).sum();
    for i in &mut instances {
        i.stop(Duration::from_secs(5));
    }

    let bare_per = before.saturating_sub(with_bare) as f64 / count as f64;
    let sandbox_per = before_sandboxes.saturating_sub(with_sandboxes) as f64 / count as f64;
    println!("instances: {count}");
    println!(
        "bare program, host memory per copy:       {bare_per:8.1} KiB  (its own PSS: {:.1} KiB)",
        app_pss as f64 / count as f64
    );
    println!("sandboxed, host memory per instance:      {sandbox_per:8.1} KiB");
    println!(
        "sandbox overhead per instance:            {:8.1} KiB  (goal: under 200 KiB; containerd's shim: 5-8 MB)",
        sandbox_per - bare_per
    );
    println!(
        "  of which juice-init PSS:                {:8.1} KiB",
        init_pss as f64 / count as f64
    );
}
