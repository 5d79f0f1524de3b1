//! What a microVM boots from, made once and verified before every boot:
//!
//! - the **initramfs**: `juice-guest` as `/init`, the kernel modules in
//!   load order, nothing else. One per (kernel, guest init) pair, shared by
//!   every image.
//! - the **root disk**: the image's verified, unpacked layer as a read-only
//!   erofs file system. One per layer (the unpacked tree is named by the
//!   layer's diff_id, so two images with the same layer share it).
//!
//! Each artefact has a `.sha256` record written after the file itself; a
//! file without its record is unfinished and is made again, a file that no
//! longer matches its record is refused.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::VmError;
use crate::kernel::Kernel;

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError + use<> {
    let at = juice_image::PathError::at(action, path);
    move |source| VmError::Io(at(source))
}

/// sha256 of a file, hex.
pub fn file_digest(path: &Path) -> Result<String, VmError> {
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn record_path(artefact: &Path) -> PathBuf {
    let mut name = artefact.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Checks `artefact` against its record; `Ok(false)` if it was never finished.
pub fn verify(artefact: &Path) -> Result<bool, VmError> {
    let record = match std::fs::read_to_string(record_path(artefact)) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("read", &record_path(artefact))(e)),
    };
    if !artefact.exists() {
        return Ok(false);
    }
    let actual = file_digest(artefact)?;
    if actual != record.trim() {
        return Err(VmError::Corrupt {
            path: artefact.to_owned(),
            expected: record.trim().to_owned(),
            actual,
        });
    }
    Ok(true)
}

/// Moves a finished `tmp` into place and records its digest.
fn finish(tmp: &Path, dest: &Path) -> Result<(), VmError> {
    let digest = file_digest(tmp)?;
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(io("sync", tmp))?;
    std::fs::rename(tmp, dest).map_err(io("rename", tmp))?;
    let rec = record_path(dest);
    let rec_tmp = rec.with_extension("sha256.tmp");
    std::fs::write(&rec_tmp, format!("{digest}\n")).map_err(io("write", &rec_tmp))?;
    std::fs::rename(&rec_tmp, &rec).map_err(io("rename", &rec_tmp))
}

fn unique_tmp(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(
        "{name}.tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ))
}

/// The initramfs for `kernel` and the guest init at `guest_init`, made if missing.
pub fn initramfs(dir: &Path, kernel: &Kernel, guest_init: &Path) -> Result<PathBuf, VmError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let modules = kernel.module_closure()?;
    let init = std::fs::read(guest_init).map_err(io("read", guest_init))?;
    let mut key = Sha256::new();
    key.update(kernel.version.as_bytes());
    key.update(Sha256::digest(&init));
    for (name, path) in &modules {
        key.update(name.as_bytes());
        key.update(path.as_os_str().as_encoded_bytes());
    }
    let key = hex::encode(key.finalize());
    let dest = dir.join(format!("initramfs-{}.cpio", &key[..16]));
    if verify(&dest)? {
        return Ok(dest);
    }
    let tmp = unique_tmp(dir, "initramfs");
    let result = write_initramfs(&tmp, &init, &modules).and_then(|()| finish(&tmp, &dest));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| dest)
}

fn write_initramfs(path: &Path, init: &[u8], modules: &[(String, PathBuf)]) -> Result<(), VmError> {
    let mut entries: Vec<(String, CpioEntry)> = Vec::new();
    for d in ["dev", "proc", "sys", "lib", "lib/modules"] {
        entries.push((d.to_owned(), CpioEntry::Dir));
    }
    entries.push((
        "init".to_owned(),
        CpioEntry::File {
            mode: 0o755,
            data: init.to_vec(),
        },
    ));
    let mut order = String::new();
    for (name, path) in modules {
        let data = std::fs::read(path).map_err(io("read", path))?;
        entries.push((
            format!("lib/modules/{name}.ko"),
            CpioEntry::File { mode: 0o644, data },
        ));
        order.push_str(name);
        order.push('\n');
    }
    entries.push((
        "lib/modules/order".to_owned(),
        CpioEntry::File {
            mode: 0o644,
            data: order.into_bytes(),
        },
    ));
    let file = std::fs::File::create(path).map_err(io("create", path))?;
    let mut out = std::io::BufWriter::new(file);
    write_newc(entries.iter().map(|(p, e)| (p.as_str(), e)), &mut out)
        .map_err(io("write", path))?;
    out.flush().map_err(io("write", path))
}

/// One entry of a cpio archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpioEntry {
    Dir,
    /// A regular file with its permission bits.
    File {
        mode: u32,
        data: Vec<u8>,
    },
}

/// Writes `entries` (paths without the leading `/`), in the order given, as a cpio newc
/// archive with its trailer: inode numbers follow that order, and mtime, uid and gid
/// are 0, so the same entries give the same bytes. Shared by the guest's initramfs and
/// a Juice OS host's.
pub fn write_newc<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a CpioEntry)>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    use cpio::newc::Builder;
    // cpio newc has 32-bit inode numbers and sizes.
    let too_large = || {
        std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            "over 2^32 entries, or one of 4 GiB or more, does not fit a cpio newc archive",
        )
    };
    for (i, (path, entry)) in entries.into_iter().enumerate() {
        let ino = u32::try_from(i + 1).map_err(|_| too_large())?;
        let (builder, data): (Builder, &[u8]) = match entry {
            CpioEntry::Dir => (Builder::new(path).mode(0o040755).nlink(2), &[]),
            CpioEntry::File { mode, data } => (
                Builder::new(path).mode(0o100000 | mode).nlink(1),
                data.as_slice(),
            ),
        };
        let len = u32::try_from(data.len()).map_err(|_| too_large())?;
        let mut w = builder
            .ino(ino)
            .uid(0)
            .gid(0)
            .mtime(0)
            .write(&mut *out, len);
        w.write_all(data)?;
        w.finish()?;
    }
    cpio::newc::trailer(&mut *out)?;
    Ok(())
}

/// The root disk for the unpacked image at `rootfs`, made if missing.
pub fn root_disk(dir: &Path, rootfs: &Path) -> Result<PathBuf, VmError> {
    let layer = rootfs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            VmError::Artefact(format!("{} is not an unpacked image", rootfs.display()))
        })?;
    let dir = dir.join(layer);
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let dest = dir.join("root.erofs");
    if verify(&dest)? {
        return Ok(dest);
    }
    let tmp = unique_tmp(&dir, "root.erofs");
    let out = Command::new("mkfs.erofs")
        // Fixed timestamps and UUID: the same layer gives the same disk.
        .args([
            "-T0",
            "-U",
            "00000000-0000-0000-0000-000000000000",
            "--quiet",
        ])
        .arg(&tmp)
        .arg(rootfs)
        .output();
    let result = match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(VmError::Tool(
            "mkfs.erofs is not installed (apt-get install erofs-utils)".into(),
        )),
        Err(e) => Err(VmError::Tool(format!("mkfs.erofs: {e}"))),
        Ok(o) if !o.status.success() => Err(VmError::Tool(format!(
            "mkfs.erofs {} failed: {}",
            rootfs.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Ok(_) => finish(&tmp, &dest),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| dest)
}

/// A volume's disk, made (sparse, ext4, owned by `uid:gid` at its root) on first use.
pub fn volume_disk(path: &Path, size: u64, uid: u32, gid: u32) -> Result<(), VmError> {
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    }
    let tmp = unique_tmp(path.parent().unwrap_or(Path::new(".")), "volume");
    let made = std::fs::File::create(&tmp)
        .and_then(|f| f.set_len(size))
        .map_err(io("create", &tmp));
    let result = made.and_then(|()| {
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E"])
            .arg(format!("root_owner={uid}:{gid}"))
            .arg(&tmp)
            .output()
            .map_err(|e| VmError::Tool(format!("mkfs.ext4 (apt-get install e2fsprogs): {e}")))?;
        if !out.status.success() {
            return Err(VmError::Tool(format!(
                "mkfs.ext4 {} failed: {}",
                tmp.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        std::fs::rename(&tmp, path).map_err(io("rename", &tmp))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes root disks whose unpacked layer (`rootfs/<diff_id>`) is gone, and
/// initramfs files not used for `keep_days` days (each `juice-guest` build makes a
/// new one). Returns how many artefacts went.
pub fn gc(home: &Path, keep_days: u64) -> usize {
    let dir = home.join("vm-artefacts");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut removed = 0;
    let max_age = std::time::Duration::from_secs(keep_days * 86_400);
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !home.join("rootfs").join(&name).exists() && std::fs::remove_dir_all(&path).is_ok() {
                removed += 1;
            }
        } else if name.starts_with("initramfs-") && name.ends_with(".cpio") {
            let unused = e
                .metadata()
                .and_then(|m| m.accessed())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_age);
            if unused && std::fs::remove_file(&path).is_ok() {
                let _ = std::fs::remove_file(record_path(&path));
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_takes_root_disks_of_layers_that_are_gone() {
        let home = tempfile::tempdir().unwrap();
        for layer in ["kept", "gone"] {
            std::fs::create_dir_all(home.path().join("vm-artefacts").join(layer)).unwrap();
            std::fs::write(
                home.path()
                    .join("vm-artefacts")
                    .join(layer)
                    .join("root.erofs"),
                b"x",
            )
            .unwrap();
        }
        std::fs::create_dir_all(home.path().join("rootfs/kept")).unwrap();
        std::fs::write(home.path().join("vm-artefacts/initramfs-1.cpio"), b"x").unwrap();
        assert_eq!(gc(home.path(), 30), 1);
        assert!(home.path().join("vm-artefacts/kept/root.erofs").exists());
        assert!(!home.path().join("vm-artefacts/gone").exists());
        assert!(
            home.path().join("vm-artefacts/initramfs-1.cpio").exists(),
            "recently used"
        );
    }

    #[test]
    fn a_changed_artefact_is_refused_and_an_unfinished_one_is_redone() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"one").unwrap();
        assert!(!verify(&f).unwrap(), "no record yet: not finished");
        let tmp = dir.path().join("a.tmp");
        std::fs::write(&tmp, b"one").unwrap();
        finish(&tmp, &f).unwrap();
        assert!(verify(&f).unwrap());
        std::fs::write(&f, b"onE").unwrap();
        let e = verify(&f).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
    }

    #[test]
    fn the_initramfs_holds_init_and_the_modules_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mods = dir.path().join("mods");
        std::fs::create_dir_all(mods.join("kernel")).unwrap();
        std::fs::write(mods.join("kernel/a.ko"), b"A").unwrap();
        std::fs::write(mods.join("kernel/b.ko"), b"BB").unwrap();
        std::fs::write(
            mods.join("modules.dep"),
            "kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n",
        )
        .unwrap();
        let mut text = String::new();
        for m in crate::kernel::NEEDED_MODULES {
            text.push_str(&format!("kernel/{m}.ko: kernel/a.ko kernel/b.ko\n"));
            std::fs::write(mods.join(format!("kernel/{m}.ko")), m.as_bytes()).unwrap();
        }
        text.push_str("kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n");
        std::fs::write(mods.join("modules.dep"), text).unwrap();
        let kernel = Kernel {
            image: "/dev/null".into(),
            version: "t".into(),
            modules: Some(mods),
        };
        let init = dir.path().join("init");
        std::fs::write(&init, b"\x7fELF-init").unwrap();
        let out = dir.path().join("out");
        let path = initramfs(&out, &kernel, &init).unwrap();
        assert_eq!(initramfs(&out, &kernel, &init).unwrap(), path, "reused");
        let mut r = std::fs::File::open(&path).unwrap();
        let mut files = Vec::new();
        loop {
            let mut e = cpio::NewcReader::new(r).unwrap();
            if e.entry().is_trailer() {
                break;
            }
            let name = e.entry().name().to_owned();
            let mut body = String::new();
            e.read_to_string(&mut body).unwrap();
            files.push((name, body));
            r = e.finish().unwrap();
        }
        let get = |n: &str| files.iter().find(|f| f.0 == n).map(|f| f.1.clone());
        assert_eq!(get("init").as_deref(), Some("\x7fELF-init"));
        let order = get("lib/modules/order").unwrap();
        let order: Vec<&str> = order.lines().collect();
        assert_eq!(&order[..2], ["b", "a"]);
        assert_eq!(order.len(), 2 + crate::kernel::NEEDED_MODULES.len());
        assert_eq!(get("lib/modules/b.ko").as_deref(), Some("BB"));
    }
}
