//! What a host is, read from the host itself: its name, CPUs, memory, OS and kernel, and
//! its stable id. Each reader takes the file's text, so the parsing is tested on strings.

use std::path::Path;

use crate::error::{Error, Result};
use crate::record::HostId;

/// The host's id from `path` (`$JUICE_HOME/host-id`), made there on first use: 16 random
/// bytes in hex. A file that holds something else is an error naming it, never replaced,
/// since other hosts' records and the controller's placements refer to this id.
pub fn host_id(path: &Path) -> Result<HostId> {
    let file_error = |source| Error::File {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|e: Error| Error::File {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 16];
            std::io::Read::read_exact(
                &mut std::fs::File::open("/dev/urandom").map_err(file_error)?,
                &mut bytes,
            )
            .map_err(file_error)?;
            let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            // Written whole under another name, then renamed: a crash leaves no half id.
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{id}\n")).map_err(file_error)?;
            std::fs::rename(&tmp, path).map_err(file_error)?;
            id.parse()
        }
        Err(e) => Err(file_error(e)),
    }
}

/// `PRETTY_NAME` from an os-release file, or `NAME VERSION_ID`, or `Linux`.
pub fn os_name(os_release: &str) -> String {
    let field = |name: &str| {
        os_release.lines().find_map(|l| {
            let v = l.strip_prefix(name)?.strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
    };
    field("PRETTY_NAME")
        .filter(|s| !s.is_empty())
        .or_else(|| Some(format!("{} {}", field("NAME")?, field("VERSION_ID")?)))
        .unwrap_or_else(|| "Linux".into())
}

/// `MemTotal` from /proc/meminfo, in bytes.
pub fn memory_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The facts of this host, read now.
pub struct Facts {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub os: String,
    pub kernel: String,
}

impl Facts {
    pub fn current() -> Facts {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Facts {
            hostname: read("/proc/sys/kernel/hostname").trim().to_owned(),
            cpus: std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok())
                .unwrap_or(1),
            memory_bytes: memory_bytes(&read("/proc/meminfo")).unwrap_or(0),
            os: os_name(
                &std::fs::read_to_string("/etc/os-release")
                    .unwrap_or_else(|_| read("/usr/lib/os-release")),
            ),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_is_its_pretty_name_or_name_and_version() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\n";
        assert_eq!(os_name(debian), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os_name("NAME=Juice\nVERSION_ID=3\n"), "Juice 3");
        assert_eq!(os_name(""), "Linux");
    }

    #[test]
    fn memory_is_memtotal_in_bytes() {
        let meminfo = "MemTotal:        8048576 kB\nMemFree:         1000 kB\n";
        assert_eq!(memory_bytes(meminfo), Some(8_048_576 * 1024));
        assert_eq!(memory_bytes("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn the_host_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host-id");
        let first = host_id(&path).unwrap();
        assert_eq!(first.as_str().len(), 32);
        assert_eq!(host_id(&path).unwrap(), first);
        std::fs::write(&path, "Not An Id\n").unwrap();
        let e = host_id(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: host id `Not An Id`", path.display())),
            "{e}"
        );
    }
}
