//! cgroup v1: one directory per controller (cpu, memory, pids).

use std::path::{Path, PathBuf};

use super::{
    CPU_PERIOD_US, CgroupError, CgroupUsage, Hierarchy, Limits, keyed, kill_and_remove, number,
    read, write,
};

/// The v1 controllers Juice uses, with their mount points and our own cgroup in each.
#[derive(Debug, Clone)]
pub struct V1 {
    /// (controller, `<mount>/<our own path>/juice`)
    bases: Vec<(&'static str, PathBuf)>,
}

/// The controllers an instance needs; `devices` is used wherever it is mounted,
/// and so is `cpuacct`, which counts CPU time for `juice top` (often mounted
/// with `cpu`, then it is the same directory).
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
const OPTIONAL: [&str; 2] = ["devices", "cpuacct"];

/// The device policy: nothing, then the nodes juice-init binds into `/dev`
/// (null, zero, full, random, urandom, tty) and the instance's own ptys.
pub const DEVICE_ALLOW: [&str; 8] = [
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

impl V1 {
    /// Reads the controllers' mount points and our place in each.
    pub fn from_proc(mountinfo: &str, own_cgroup: &str) -> V1 {
        let mut bases = Vec::new();
        for controller in CONTROLLERS.into_iter().chain(OPTIONAL) {
            let mount = mountinfo.lines().find_map(|line| {
                let (pre, post) = line.split_once(" - ")?;
                let mut post = post.split_whitespace();
                if post.next()? != "cgroup" {
                    return None;
                }
                let super_opts = post.nth(1)?;
                super_opts
                    .split(',')
                    .any(|o| o == controller)
                    .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap_or("")))
            });
            let own = own_cgroup.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                ctrls
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.trim_start_matches('/').to_owned())
            });
            if let (Some(mount), Some(own)) = (mount, own) {
                bases.push((controller, mount.join(own).join("juice")));
            }
        }
        V1 { bases }
    }

    /// A v1 layout rooted in `root` (tests use a scratch directory).
    pub fn at(root: &Path) -> V1 {
        V1 {
            bases: CONTROLLERS
                .iter()
                .map(|c| (*c, root.join(c).join("juice")))
                .collect(),
        }
    }

    pub fn has_controllers(&self) -> bool {
        CONTROLLERS
            .iter()
            .all(|c| self.bases.iter().any(|(b, _)| b == c))
    }

    fn dir(&self, dirs: &[PathBuf], controller: &str) -> Option<PathBuf> {
        let base = &self.bases.iter().find(|(c, _)| *c == controller)?.1;
        dirs.iter().find(|d| d.starts_with(base)).cloned()
    }
}

impl Hierarchy for V1 {
    fn version(&self) -> &'static str {
        "v1"
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<Vec<PathBuf>, CgroupError> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (controller, base) in &self.bases {
            let dir = base.join(name);
            super::create_dir(&dir)?;
            if dirs.contains(&dir) {
                // A controller mounted with another one (cpu,cpuacct): already made.
                continue;
            }
            match *controller {
                "memory" => {
                    if let Some(m) = limits.memory {
                        write(&dir, "memory.limit_in_bytes", &m.to_string())?;
                        // Memory plus swap capped at the same value: no swap. Absent without swap accounting.
                        if dir.join("memory.memsw.limit_in_bytes").exists() {
                            write(&dir, "memory.memsw.limit_in_bytes", &m.to_string())?;
                        }
                        let _ = write(&dir, "memory.swappiness", "0");
                    }
                }
                "cpu" => {
                    if let Some(c) = limits.cpus {
                        write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                        write(
                            &dir,
                            "cpu.cfs_quota_us",
                            &super::cpu_quota_us(c).to_string(),
                        )?;
                    }
                }
                "pids" => {
                    if let Some(p) = limits.pids {
                        write(&dir, "pids.max", &p.to_string())?;
                    }
                }
                "devices" => {
                    write(&dir, "devices.deny", "a")?;
                    for rule in DEVICE_ALLOW {
                        write(&dir, "devices.allow", rule)?;
                    }
                }
                _ => {}
            }
            dirs.push(dir);
        }
        Ok(dirs)
    }

    fn attach(&self, dirs: &[PathBuf], pid: i32) -> Result<(), CgroupError> {
        for d in dirs {
            write(d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    fn oom_kills(&self, dirs: &[PathBuf]) -> u64 {
        self.dir(dirs, "memory")
            .and_then(|d| keyed(&d, "memory.oom_control", "oom_kill"))
            .unwrap_or(0)
    }

    fn read_limits(&self, dirs: &[PathBuf]) -> Limits {
        let num = |ctrl: &str, file: &str| {
            self.dir(dirs, ctrl)
                .and_then(|d| read(&d, file))
                .and_then(|v| v.parse::<i64>().ok())
        };
        Limits {
            cpus: num("cpu", "cpu.cfs_quota_us").filter(|q| *q > 0).map(|q| {
                q as f64
                    / num("cpu", "cpu.cfs_period_us").map_or(CPU_PERIOD_US as f64, |p| p as f64)
            }),
            // The kernel reports "no limit" as a huge page-aligned number.
            memory: num("memory", "memory.limit_in_bytes")
                .filter(|m| *m > 0 && *m < (1 << 62))
                .and_then(|m| u64::try_from(m).ok()),
            pids: self
                .dir(dirs, "pids")
                .and_then(|d| read(&d, "pids.max"))
                .and_then(|v| v.parse().ok()),
        }
    }

    fn usage(&self, dirs: &[PathBuf]) -> CgroupUsage {
        let num = |ctrl: &str, file: &str| self.dir(dirs, ctrl).and_then(|d| number(&d, file));
        CgroupUsage {
            cpu_ns: num("cpuacct", "cpuacct.usage"),
            memory_bytes: num("memory", "memory.usage_in_bytes"),
            pids: num("pids", "pids.current"),
        }
    }

    fn remove(&self, dirs: &[PathBuf]) -> Result<(), CgroupError> {
        for d in dirs {
            kill_and_remove(d)?;
        }
        Ok(())
    }

    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (_, base) in &self.bases {
            let dir = base.join(name);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 24 0:26 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory
31 24 0:27 / /sys/fs/cgroup/cpu rw,nosuid shared:10 - cgroup cgroup rw,cpu
32 24 0:28 / /sys/fs/cgroup/pids rw,nosuid shared:11 - cgroup cgroup rw,pids
33 24 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:12 - cgroup2 cgroup2 rw
";
    const OWN: &str = "4:memory:/process_api/abc\n1:cpu:/\n8:pids:/\n0::/\n";

    #[test]
    fn nests_under_our_own_cgroup_in_each_controller() {
        let v1 = V1::from_proc(MOUNTINFO, OWN);
        assert!(v1.has_controllers());
        let memory = &v1.bases.iter().find(|(c, _)| *c == "memory").unwrap().1;
        assert_eq!(
            memory,
            Path::new("/sys/fs/cgroup/memory/process_api/abc/juice")
        );
        let cpu = &v1.bases.iter().find(|(c, _)| *c == "cpu").unwrap().1;
        assert_eq!(cpu, Path::new("/sys/fs/cgroup/cpu/juice"));
    }

    #[test]
    fn writes_limits_into_a_scratch_tree() {
        let t = tempfile::tempdir().unwrap();
        let v1 = V1::at(t.path());
        let limits = Limits {
            cpus: Some(0.5),
            memory: Some(64 << 20),
            pids: Some(64),
        };
        let dirs = v1.create("web-1", &limits).unwrap();
        assert_eq!(
            read(&t.path().join("cpu/juice/web-1"), "cpu.cfs_quota_us").unwrap(),
            "50000"
        );
        assert_eq!(
            read(
                &t.path().join("memory/juice/web-1"),
                "memory.limit_in_bytes"
            )
            .unwrap(),
            "67108864"
        );
        assert_eq!(
            read(&t.path().join("pids/juice/web-1"), "pids.max").unwrap(),
            "64"
        );
        assert_eq!(v1.read_limits(&dirs), limits);
        std::fs::write(
            t.path().join("memory/juice/web-1/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(v1.oom_kills(&dirs), 2);
    }

    #[test]
    fn reads_usage_from_each_controller() {
        let t = tempfile::tempdir().unwrap();
        // cpuacct mounted on its own, as on this project's CI hosts.
        let mut v1 = V1::at(t.path());
        v1.bases
            .push(("cpuacct", t.path().join("cpuacct").join("juice")));
        let dirs = v1.create("web-1", &Limits::default()).unwrap();
        assert_eq!(dirs.len(), 4);
        assert_eq!(
            v1.usage(&dirs),
            CgroupUsage::default(),
            "nothing to read yet"
        );
        let put = |ctrl: &str, file: &str, text: &str| {
            std::fs::write(t.path().join(ctrl).join("juice/web-1").join(file), text).unwrap()
        };
        put("cpuacct", "cpuacct.usage", "2500000000\n");
        put("memory", "memory.usage_in_bytes", "67502080\n");
        put("pids", "pids.current", "3\n");
        assert_eq!(
            v1.usage(&dirs),
            CgroupUsage {
                cpu_ns: Some(2_500_000_000),
                memory_bytes: Some(67_502_080),
                pids: Some(3),
            }
        );
    }

    #[test]
    fn a_controller_mounted_with_another_is_one_directory() {
        let t = tempfile::tempdir().unwrap();
        let mut v1 = V1::at(t.path());
        v1.bases
            .push(("cpuacct", t.path().join("cpu").join("juice")));
        let dirs = v1.create("web-1", &Limits::default()).unwrap();
        assert_eq!(dirs.len(), 3);
        assert_eq!(v1.dirs("web-1"), dirs);
        std::fs::write(dirs[0].join("cpuacct.usage"), "7\n").unwrap();
        assert_eq!(v1.usage(&dirs).cpu_ns, Some(7));
    }
}
