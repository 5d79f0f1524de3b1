//! The initramfs of an OS version: the host's whole read-only root.
//!
//! A reproducible gzip-compressed cpio (newc): entries sorted by path, every parent
//! directory present, inode numbers in that order, mtime 0, uid and gid 0. The same
//! inputs give the same bytes, so a version's digest names its content.
//!
//! | path | from |
//! |---|---|
//! | `/init` | `juice-host`, the PID 1 |
//! | `/usr/bin/juice`, `/usr/bin/juice-init` | the daemon finds juice-init next to its own executable |
//! | `/usr/sbin/nft` and its libraries, with the ELF interpreter | the build host, by [`juice_image::closure`] |
//! | `/lib/modules/*.ko`, `/lib/modules/order` | [`HOST_MODULES`] and the caller's, with their `modules.dep` closure |
//! | `/etc/ssl/certs/ca-certificates.crt` | the build host |
//! | `/etc/os-release` | `NAME="Juice OS"`, `ID=juice`, `VERSION_ID` |
//!
//! Nothing is stripped here: what the build gives is what boots.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use juice_image::closure::Resolver;
use juice_microvm::kernel::Kernel;

/// The modules a Juice OS host loads: the virtio disk and network, the boot
/// partition's FAT with the character sets it mounts with, the software watchdog,
/// and what the daemon's networking needs (the bridge, veth pairs, taps, and the
/// nftables expressions of `juice_net::nft` and `juice_net::publish`: conntrack
/// state, NAT, masquerade, `numgen` load balancing and `fib daddr type local`).
pub const HOST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "nls_utf8",
    "softdog",
    "bridge",
    "veth",
    "tun",
    "nf_tables",
    "nft_meta_bridge",
    "nft_ct",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_numgen",
    "nft_fib_ipv4",
];

/// Why an initramfs could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Io(#[from] juice_image::PathError),
    #[error("the kernel modules: {0}")]
    Modules(#[from] juice_microvm::VmError),
    #[error("the libraries of {program}: {source}")]
    Closure {
        program: PathBuf,
        source: juice_image::closure::ClosureError,
    },
}

/// What goes into an OS version's initramfs.
#[derive(Debug, Clone)]
pub struct Initramfs {
    /// The OS version, written to `/etc/os-release`.
    pub version: String,
    /// `juice-host`, which becomes `/init`.
    pub host: PathBuf,
    /// `juice`, at `/usr/bin/juice`.
    pub juice: PathBuf,
    /// `juice-init`, next to `juice`.
    pub juice_init: PathBuf,
    /// The kernel whose modules are taken.
    pub kernel: Kernel,
    /// Modules beyond [`HOST_MODULES`].
    pub extra_modules: Vec<String>,
    /// Dynamically linked programs copied with their libraries, at the same path.
    pub programs: Vec<PathBuf>,
    /// The CA bundle (absent: none is included).
    pub ca_certificates: Option<PathBuf>,
}

/// One entry of the archive (the cpio writer is shared with the microVM guest's initramfs).
pub use juice_microvm::artefacts::CpioEntry as Entry;

/// The empty directories of the root; the host mounts onto most of them.
const DIRS: &[&str] = &[
    "boot",
    "dev",
    "etc",
    "lib/modules",
    "newroot",
    "proc",
    "run",
    "sys",
    "tmp",
    "usr/bin",
    "var/lib/juice",
];

impl Initramfs {
    /// The usual inputs: `juice` and `juice-init` beside `host`, `/usr/sbin/nft`, the
    /// build host's CA bundle, and `kernel`'s modules.
    pub fn beside(host: &Path, kernel: Kernel, version: &str) -> Initramfs {
        let dir = host.parent().unwrap_or(Path::new("."));
        let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
        Initramfs {
            version: version.to_owned(),
            host: host.to_owned(),
            juice: dir.join("juice"),
            juice_init: dir.join("juice-init"),
            kernel,
            extra_modules: Vec::new(),
            programs: vec![PathBuf::from("/usr/sbin/nft")],
            ca_certificates: ca.is_file().then(|| ca.to_owned()),
        }
    }

    /// Every entry, by path, parents included.
    pub fn entries(&self) -> Result<BTreeMap<String, Entry>, BuildError> {
        let mut entries = BTreeMap::new();
        for d in DIRS {
            entries.insert((*d).to_owned(), Entry::Dir);
        }
        let mut file = |path: &str, mode: u32, data: Vec<u8>| {
            entries.insert(
                path.trim_start_matches('/').to_owned(),
                Entry::File { mode, data },
            );
        };
        file("init", 0o755, read(&self.host)?);
        file("usr/bin/juice", 0o755, read(&self.juice)?);
        file("usr/bin/juice-init", 0o755, read(&self.juice_init)?);
        for program in &self.programs {
            let closure = Resolver::system()
                .closure(std::slice::from_ref(program))
                .map_err(|source| BuildError::Closure {
                    program: program.clone(),
                    source,
                })?;
            file(&program.to_string_lossy(), 0o755, read(program)?);
            for lib in closure.libraries() {
                file(&lib.to_string_lossy(), 0o755, read(&lib)?);
            }
        }
        let mut wanted: Vec<&str> = HOST_MODULES.to_vec();
        wanted.extend(self.extra_modules.iter().map(String::as_str));
        let mut order = String::new();
        for (name, path) in self.kernel.module_closure_of(&wanted)? {
            file(&format!("lib/modules/{name}.ko"), 0o644, read(&path)?);
            order.push_str(&name);
            order.push('\n');
        }
        file("lib/modules/order", 0o644, order.into_bytes());
        if let Some(ca) = &self.ca_certificates {
            file("etc/ssl/certs/ca-certificates.crt", 0o644, read(ca)?);
        }
        file(
            "etc/os-release",
            0o644,
            format!(
                "NAME=\"Juice OS\"\nID=juice\nVERSION_ID={}\nPRETTY_NAME=\"Juice OS {}\"\n",
                self.version, self.version
            )
            .into_bytes(),
        );
        // Every parent directory, so the kernel's unpacker never has to guess one.
        let parents: Vec<String> = entries
            .keys()
            .flat_map(|p| {
                Path::new(p)
                    .ancestors()
                    .skip(1)
                    .filter(|a| !a.as_os_str().is_empty())
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        for p in parents {
            entries.entry(p).or_insert(Entry::Dir);
        }
        Ok(entries)
    }

    /// Writes the gzip-compressed archive to `out`.
    pub fn write(&self, out: impl Write) -> Result<(), BuildError> {
        write_cpio_gz(&self.entries()?, out)
    }

    /// Writes the archive to `path`.
    pub fn write_to(&self, path: &Path) -> Result<(), BuildError> {
        let file =
            std::fs::File::create(path).map_err(juice_image::PathError::at("create", path))?;
        let mut out = std::io::BufWriter::new(file);
        self.write(&mut out)?;
        out.flush()
            .map_err(juice_image::PathError::at("write", path))?;
        Ok(())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, BuildError> {
    Ok(std::fs::read(path).map_err(juice_image::PathError::at("read", path))?)
}

/// A gzip-compressed cpio newc of `entries`, in their (sorted) order; inode numbers
/// follow that order, times are 0 and the gzip header has no name and no time.
pub fn write_cpio_gz(entries: &BTreeMap<String, Entry>, out: impl Write) -> Result<(), BuildError> {
    let err = |e: std::io::Error| {
        BuildError::Io(juice_image::PathError::at("write", Path::new("initramfs"))(
            e,
        ))
    };
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(out, flate2::Compression::default());
    juice_microvm::artefacts::write_newc(entries.iter().map(|(p, e)| (p.as_str(), e)), &mut gz)
        .map_err(err)?;
    gz.finish().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs made in the test: three small "binaries" (the build host's `true` stands
    /// for each, it is an ELF like them) and a fake modules directory.
    fn inputs(dir: &Path) -> Initramfs {
        let modules = dir.join("modules");
        std::fs::create_dir_all(modules.join("kernel")).unwrap();
        let mut dep = String::new();
        for m in HOST_MODULES.iter().chain(["extra"].iter()) {
            dep.push_str(&format!("kernel/{m}.ko: kernel/common.ko\n"));
            std::fs::write(modules.join(format!("kernel/{m}.ko")), m.as_bytes()).unwrap();
        }
        dep.push_str("kernel/common.ko:\n");
        std::fs::write(modules.join("kernel/common.ko"), b"common").unwrap();
        std::fs::write(modules.join("modules.dep"), dep).unwrap();
        for b in ["juice-host", "juice", "juice-init"] {
            std::fs::write(dir.join(b), format!("#!{b}")).unwrap();
        }
        let mut i = Initramfs::beside(
            &dir.join("juice-host"),
            Kernel {
                image: "/dev/null".into(),
                version: "test".into(),
                modules: Some(modules),
            },
            "1.0.0",
        );
        i.extra_modules = vec!["extra".into()];
        // Any dynamically linked program of the build host shows the closure at work.
        i.programs = vec![PathBuf::from("/usr/bin/true")];
        i.ca_certificates = None;
        i
    }

    fn archive(i: &Initramfs) -> Vec<u8> {
        let mut out = Vec::new();
        i.write(&mut out).unwrap();
        out
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let i = inputs(dir.path());
        let a = archive(&i);
        let b = archive(&i);
        assert_eq!(a, b);
        assert_eq!(&a[..2], &[0x1f, 0x8b], "gzip");
    }

    #[test]
    fn the_listing_has_the_root_the_host_needs() {
        let dir = tempfile::tempdir().unwrap();
        let i = inputs(dir.path());
        let bytes = archive(&i);
        let mut r = flate2::read::GzDecoder::new(bytes.as_slice());
        let mut names = Vec::new();
        let mut order = String::new();
        let mut last_ino = 0;
        loop {
            let mut e = cpio::NewcReader::new(r).unwrap();
            if e.entry().is_trailer() {
                break;
            }
            let name = e.entry().name().to_owned();
            assert_eq!(e.entry().mtime(), 0);
            assert_eq!((e.entry().uid(), e.entry().gid()), (0, 0));
            assert!(e.entry().ino() > last_ino, "inodes follow the order");
            last_ino = e.entry().ino();
            if name == "lib/modules/order" {
                std::io::Read::read_to_string(&mut e, &mut order).unwrap();
            }
            names.push(name);
            r = e.finish().unwrap();
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "entries are sorted");
        for want in [
            "init",
            "usr/bin/juice",
            "usr/bin/juice-init",
            "usr/bin/true",
            "lib/modules/virtio_blk.ko",
            "lib/modules/softdog.ko",
            "lib/modules/extra.ko",
            "etc/os-release",
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "boot",
            "var/lib/juice",
            "var/lib",
            "var",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(
            names.iter().any(|n| n.contains("libc.so")),
            "the closure of a dynamic program brings libc: {names:?}"
        );
        assert!(
            names.iter().any(|n| n.contains("ld-linux")),
            "and the ELF interpreter: {names:?}"
        );
        let order: Vec<&str> = order.lines().collect();
        assert_eq!(order[0], "common", "dependencies first: {order:?}");
        assert_eq!(order.len(), HOST_MODULES.len() + 2);
    }
}
