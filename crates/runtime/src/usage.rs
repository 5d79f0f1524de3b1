//! What an instance uses right now: CPU time, memory, processes and network
//! bytes, for `juice top` and `GET /v1/stats`.
//!
//! A backend hands out a [`Meter`] for each instance: the few paths and the pid
//! its figures are read from, cheap to take while the agent holds its lock, and
//! read later without it. CPU is reported as a counter (nanoseconds since the
//! instance started), not a rate: whoever reads twice divides by the time in
//! between, so no reader disturbs another's rate.
//!
//! The files read here are the kernel's: `/proc/PID/stat` and `/proc/PID/status`
//! (proc(5)), and `/sys/class/net/IFACE/statistics/{rx,tx}_bytes`
//! (Documentation/ABI/testing/sysfs-class-net-statistics).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One reading of an instance's resource use. A figure that cannot be read
/// (an instance without cgroups, a file gone with an instance that just ended)
/// is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time used since the instance started, in nanoseconds (a counter).
    pub cpu_ns: Option<u64>,
    /// Memory in use: a sandbox's cgroup charge, a microVM's QEMU resident set.
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    /// Processes (tasks) in the instance; a microVM's are the guest's to count.
    pub pids: Option<u64>,
    pub pids_limit: Option<u64>,
    /// Network bytes, from the instance's point of view.
    pub net: Option<NetBytes>,
}

/// Bytes through an instance's network interface, as the instance sees them:
/// `rx` is what it received. The counters are read on the host end (a veth or
/// a tap), where the directions are the other way round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetBytes {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Reads one instance's [`Usage`]; each call is a fresh reading.
pub trait Meter: Send + Sync {
    fn read(&self) -> Usage;
}

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not read as expected: {text:?}")]
    Unexpected { path: PathBuf, text: String },
    /// A name that would not stay one path component under `/sys/class/net`.
    #[error("{0:?} is not a network interface name")]
    BadInterface(String),
}

fn read(path: PathBuf) -> Result<(PathBuf, String), UsageError> {
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((path, text)),
        Err(source) => Err(UsageError::Io { path, source }),
    }
}

/// A Linux interface name: 1 to 15 bytes, no `/`, no whitespace, not `.` or `..`
/// (the kernel's `dev_valid_name`); checked before it becomes part of a path.
pub fn valid_interface(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// The bytes through the host end `iface` of an instance's link, turned round to
/// the instance's point of view (the host end receives what the instance sends).
pub fn interface_bytes(iface: &str) -> Result<NetBytes, UsageError> {
    if !valid_interface(iface) {
        return Err(UsageError::BadInterface(iface.chars().take(32).collect()));
    }
    let dir = PathBuf::from("/sys/class/net")
        .join(iface)
        .join("statistics");
    let counter = |file: &str| -> Result<u64, UsageError> {
        let (path, text) = read(dir.join(file))?;
        parse_counter(&text).ok_or(UsageError::Unexpected { path, text })
    };
    let (host_rx, host_tx) = (counter("rx_bytes")?, counter("tx_bytes")?);
    Ok(host_side_to_instance(host_rx, host_tx))
}

/// The host end's counters, as the instance sees them.
pub fn host_side_to_instance(host_rx: u64, host_tx: u64) -> NetBytes {
    NetBytes {
        rx_bytes: host_tx,
        tx_bytes: host_rx,
    }
}

/// A file holding one decimal number (and a newline).
pub fn parse_counter(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// What `/proc/PID/stat` says of a process's CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Fields 14 and 15 (utime, stime), in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Field 22, in clock ticks since boot: tells a recycled pid apart.
    pub start_time: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from past its last `)`.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    // `rest` starts at field 3 (state): field N is at index N - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        utime: field(14)?,
        stime: field(15)?,
        start_time: field(22)?,
    })
}

/// `VmRSS` of `/proc/PID/status`, in bytes (the file says kB, meaning KiB).
pub fn parse_status_rss(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?;
        v.trim().parse::<u64>().ok()?.checked_mul(1024)
    })
}

/// A process's CPU time (user and system) in nanoseconds and its resident set
/// in bytes, if it is still the process that started at `start_time`.
pub fn process_usage(pid: i32, start_time: u64) -> Result<(u64, u64), UsageError> {
    let (path, text) = read(PathBuf::from(format!("/proc/{pid}/stat")))?;
    let stat = parse_proc_stat(&text)
        .filter(|s| s.start_time == start_time)
        .ok_or(UsageError::Unexpected { path, text })?;
    let (path, text) = read(PathBuf::from(format!("/proc/{pid}/status")))?;
    let rss = parse_status_rss(&text).ok_or(UsageError::Unexpected { path, text })?;
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let cpu_ns = (stat.utime + stat.stime).saturating_mul(1_000_000_000) / ticks;
    Ok((cpu_ns, rss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_past_the_last_parenthesis() {
        // A command name with a space and a ')' in it, as a process may choose.
        let text = "4242 (qemu) sys) S 1 4242 4242 0 -1 4194560 30000 0 12 0 \
                    1500 250 0 0 20 0 5 0 987654 2147483648 25000 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            parse_proc_stat(text),
            Some(ProcStat {
                utime: 1500,
                stime: 250,
                start_time: 987654,
            })
        );
        assert_eq!(parse_proc_stat("4242 (short) S 1 2"), None);
        assert_eq!(parse_proc_stat("no parenthesis"), None);
    }

    #[test]
    fn status_rss_is_read_in_kib() {
        let text =
            "Name:\tqemu-system-x86\nVmPeak:\t  900000 kB\nVmRSS:\t  131072 kB\nThreads:\t5\n";
        assert_eq!(parse_status_rss(text), Some(128 << 20));
        // A kernel thread has no VmRSS line.
        assert_eq!(parse_status_rss("Name:\tkworker/0:1\nThreads:\t1\n"), None);
    }

    #[test]
    fn interface_names_cannot_leave_sys_class_net() {
        for good in ["jv1a2b3c4d5e6f7", "eth0", "tap-web-1", "veth.1"] {
            assert!(valid_interface(good), "{good}");
        }
        for bad in ["", ".", "..", "../../etc", "a/b", "a b", "sixteen-chars-xx"] {
            assert!(!valid_interface(bad), "{bad}");
            assert!(matches!(
                interface_bytes(bad),
                Err(UsageError::BadInterface(_))
            ));
        }
    }

    #[test]
    fn the_host_end_counts_the_other_way_round() {
        assert_eq!(
            host_side_to_instance(100, 7),
            NetBytes {
                rx_bytes: 7,
                tx_bytes: 100
            }
        );
        assert_eq!(parse_counter("123456\n"), Some(123456));
        assert_eq!(parse_counter("x\n"), None);
    }

    #[test]
    fn our_own_process_reads() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let started = crate::process::start_time(pid).unwrap();
        let (cpu_ns, rss) = process_usage(pid, started).unwrap();
        assert!(rss > 0);
        assert!(cpu_ns < 3600 * 1_000_000_000);
        assert!(
            process_usage(pid, started + 1).is_err(),
            "another start time"
        );
    }
}
