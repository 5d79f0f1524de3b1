//! cgroup v2: one unified tree; controllers are enabled per level through `cgroup.subtree_control`.

use std::path::{Path, PathBuf};

use super::{
    CPU_PERIOD_US, CgroupError, CgroupUsage, Hierarchy, Limits, io_err, keyed, kill_and_remove,
    number, read, write,
};

#[derive(Debug, Clone)]
pub struct V2 {
    /// Our own cgroup.
    own: PathBuf,
}

const CONTROLLERS: &str = "+cpu +memory +pids";

impl V2 {
    /// Finds the cgroup2 mount that holds the cpu, memory and pids controllers, and our place in it.
    pub fn from_proc(mountinfo: &str, own_cgroup: &str) -> Option<V2> {
        let mount = mountinfo.lines().find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap_or("")))
        })?;
        let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).ok()?;
        if !["cpu", "memory", "pids"]
            .iter()
            .all(|c| controllers.split_whitespace().any(|x| x == *c))
        {
            return None;
        }
        let own = own_cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))?
            .trim_start_matches('/');
        Some(V2 {
            own: mount.join(own),
        })
    }

    /// A v2 tree whose own cgroup is `own` (tests use a scratch directory).
    pub fn at(own: &Path) -> V2 {
        V2 {
            own: own.to_owned(),
        }
    }

    fn base(&self) -> PathBuf {
        self.own.join("juice")
    }

    /// Enables the controllers for `juice/` and its children. v2 forbids processes in a
    /// cgroup that delegates controllers, so if our own cgroup holds processes (ours), they
    /// move to a `supervisor` leaf first.
    fn delegate(&self) -> Result<(), CgroupError> {
        let base = self.base();
        std::fs::create_dir_all(&base).map_err(io_err("create", &base))?;
        if write(&self.own, "cgroup.subtree_control", CONTROLLERS).is_err() {
            let leaf = self.own.join("supervisor");
            std::fs::create_dir_all(&leaf).map_err(io_err("create", &leaf))?;
            for pid in read(&self.own, "cgroup.procs").unwrap_or_default().lines() {
                let _ = write(&leaf, "cgroup.procs", pid.trim());
            }
            write(&self.own, "cgroup.subtree_control", CONTROLLERS)?;
        }
        write(&base, "cgroup.subtree_control", CONTROLLERS)
    }
}

impl Hierarchy for V2 {
    fn version(&self) -> &'static str {
        "v2"
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<Vec<PathBuf>, CgroupError> {
        self.delegate()?;
        let dir = self.base().join(name);
        super::create_dir(&dir)?;
        if let Some(m) = limits.memory {
            write(&dir, "memory.max", &m.to_string())?;
            write(&dir, "memory.swap.max", "0")?;
        }
        if let Some(c) = limits.cpus {
            let quota = super::cpu_quota_us(c);
            write(&dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
        }
        if let Some(p) = limits.pids {
            write(&dir, "pids.max", &p.to_string())?;
        }
        Ok(vec![dir])
    }

    fn attach(&self, dirs: &[PathBuf], pid: i32) -> Result<(), CgroupError> {
        for d in dirs {
            write(d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    fn oom_kills(&self, dirs: &[PathBuf]) -> u64 {
        dirs.first()
            .and_then(|d| keyed(d, "memory.events", "oom_kill"))
            .unwrap_or(0)
    }

    fn read_limits(&self, dirs: &[PathBuf]) -> Limits {
        let Some(d) = dirs.first() else {
            return Limits::default();
        };
        let cpus = read(d, "cpu.max").and_then(|v| {
            let (q, p) = v.split_once(' ')?;
            Some(q.parse::<f64>().ok()? / p.parse::<f64>().ok()?)
        });
        Limits {
            cpus,
            memory: read(d, "memory.max").and_then(|v| v.parse().ok()),
            pids: read(d, "pids.max").and_then(|v| v.parse().ok()),
        }
    }

    /// From the kernel's cgroup-v2 interface files (Documentation/admin-guide/cgroup-v2.rst):
    /// `cpu.stat` (flat-keyed, `usage_usec` in microseconds), `memory.current`, `pids.current`.
    fn usage(&self, dirs: &[PathBuf]) -> CgroupUsage {
        let Some(d) = dirs.first() else {
            return CgroupUsage::default();
        };
        CgroupUsage {
            cpu_ns: keyed(d, "cpu.stat", "usage_usec").and_then(|us| us.checked_mul(1000)),
            memory_bytes: number(d, "memory.current"),
            pids: number(d, "pids.current"),
        }
    }

    fn remove(&self, dirs: &[PathBuf]) -> Result<(), CgroupError> {
        for d in dirs {
            // cgroup.kill (5.14+) kills the whole subtree at once; older kernels get signals per pid.
            if d.join("cgroup.kill").exists() {
                let _ = write(d, "cgroup.kill", "1");
            }
            kill_and_remove(d)?;
        }
        Ok(())
    }

    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        vec![self.base().join(name)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory shaped like a cgroup2 tree.
    fn scratch() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(t.path().join("cgroup.procs"), "").unwrap();
        t
    }

    #[test]
    fn finds_our_place_in_the_unified_tree() {
        let t = scratch();
        let mountinfo = format!(
            "40 24 0:30 / {} rw - cgroup2 cgroup2 rw\n",
            t.path().display()
        );
        let v2 = V2::from_proc(&mountinfo, "0::/system.slice/juice.service\n").unwrap();
        assert_eq!(v2.own, t.path().join("system.slice/juice.service"));
        std::fs::write(t.path().join("cgroup.controllers"), "cpu io\n").unwrap();
        assert!(
            V2::from_proc(&mountinfo, "0::/\n").is_none(),
            "memory and pids are required"
        );
    }

    #[test]
    fn delegates_controllers_and_writes_limits() {
        let t = scratch();
        let v2 = V2::at(t.path());
        let limits = Limits {
            cpus: Some(0.25),
            memory: Some(32 << 20),
            pids: Some(16),
        };
        let dirs = v2.create("db-0", &limits).unwrap();
        assert_eq!(
            read(t.path(), "cgroup.subtree_control").unwrap(),
            "+cpu +memory +pids"
        );
        assert_eq!(
            read(&t.path().join("juice"), "cgroup.subtree_control").unwrap(),
            "+cpu +memory +pids"
        );
        let dir = t.path().join("juice/db-0");
        assert_eq!(read(&dir, "cpu.max").unwrap(), "25000 100000");
        assert_eq!(read(&dir, "memory.max").unwrap(), "33554432");
        assert_eq!(read(&dir, "memory.swap.max").unwrap(), "0");
        assert_eq!(read(&dir, "pids.max").unwrap(), "16");
        assert_eq!(v2.read_limits(&dirs), limits);
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(v2.oom_kills(&dirs), 1);
        v2.attach(&dirs, 4242).unwrap();
        assert_eq!(read(&dir, "cgroup.procs").unwrap(), "4242");
    }

    #[test]
    fn reads_usage_from_the_unified_files() {
        let t = scratch();
        let v2 = V2::at(t.path());
        let dirs = v2.create("db-0", &Limits::default()).unwrap();
        assert_eq!(
            v2.usage(&dirs),
            CgroupUsage::default(),
            "nothing to read yet"
        );
        let dir = t.path().join("juice/db-0");
        std::fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n\
             nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
        )
        .unwrap();
        std::fs::write(dir.join("memory.current"), "67502080\n").unwrap();
        std::fs::write(dir.join("pids.current"), "2\n").unwrap();
        assert_eq!(
            v2.usage(&dirs),
            CgroupUsage {
                cpu_ns: Some(1_234_567_000),
                memory_bytes: Some(67_502_080),
                pids: Some(2),
            }
        );
        assert_eq!(v2.usage(&[]), CgroupUsage::default());
    }
}
