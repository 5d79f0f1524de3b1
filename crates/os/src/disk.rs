//! A Juice OS disk: GPT with GRUB, kept versions on a FAT boot partition, and an ext4
//! data partition, written into a plain file (no root, no loop device).
//!
//! Layout (512-byte sectors, partitions aligned to 1 MiB):
//!
//! | # | GPT name | type | contents |
//! |---|---|---|---|
//! | 1 | `juice-bios` | BIOS boot, 1 MiB | GRUB's i386-pc core image |
//! | 2 | `juice-boot` | EFI system, FAT, label `JUICEBOOT` | `/EFI/BOOT/BOOTX64.EFI`, `/grub/grub.cfg`, `/grub/grubenv`, `/os/<slot>/{vmlinuz,initrd,os.json,boot.cfg}` |
//! | 3 | `juice-data` | Linux filesystem, ext4, label `juice-data` | `/var/lib/juice` (optionally pre-populated) |
//!
//! Parts and why: the partition table is written with the `gpt` crate (it takes a plain
//! file and lets every GUID be chosen), the FAT with the `fatfs` crate on a window of
//! the file (no mtools, and the same code reads the boot files of an offline disk),
//! GRUB's images with Debian's `grub-mkimage` ([`crate::grub`]), and ext4 with Debian's
//! `mkfs.ext4 -E offset=` (e2fsprogs; no Rust crate writes ext4 with `-d`).
//! `grub-bios-setup` refuses files, so the MBR boot code and core.img's block list are
//! written here by hand, at the offsets GRUB's `boot.S` and `diskboot.S` define.
//!
//! Reproducible: the disk and partition GUIDs, the FAT volume id and the ext4 UUID are
//! derived from a hash of the spec's contents, FAT timestamps are all 1980-01-01 (fatfs
//! without its clock), and mkfs.ext4 runs with `E2FSPROGS_FAKE_TIME` and a fixed hash
//! seed. Two writes of the same spec give the same bytes as long as grub-mkimage does.
//!
//! On a running host the boot partition is mounted by the kernel: [`BootDir`] changes it
//! there (a new version, the boot state) without ever moving `grubenv`'s sectors.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::grub::{self, GrubError};
use crate::grubenv::{self, Env, GrubenvError};
use crate::select::{self, BootState, SelectError};

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
/// The default disk size: 2 GiB (sparse).
pub const DEFAULT_SIZE: u64 = 2 << 30;
/// The default boot partition size: room for a few versions of ~60 MB.
pub const DEFAULT_BOOT_SIZE: u64 = 512 * MIB;
/// The path of the environment block on the boot partition.
pub const GRUBENV_PATH: &str = "/grub/grubenv";

/// Why a disk could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A field of the spec is out of range.
    #[error("disk spec, {field}: {reason}")]
    Spec { field: &'static str, reason: String },
    /// Reading or writing a file failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Writing or reading the GPT failed.
    #[error("GPT of {path}: {source}")]
    Gpt {
        path: PathBuf,
        source: gpt::GptError,
    },
    /// The disk has no partition with this GPT name.
    #[error("{path} has no partition named {name}")]
    NoPartition { path: PathBuf, name: &'static str },
    /// Reading or writing the FAT boot partition failed.
    #[error("FAT boot partition of {image}, {what} {file}: {source}")]
    Fat {
        image: PathBuf,
        what: &'static str,
        file: String,
        source: io::Error,
    },
    /// A file written in place must keep its size (GRUB writes `grubenv` by its sectors).
    #[error(
        "{file} on {image} is {have} bytes; it can only be overwritten with as many, not {want}"
    )]
    SizeChange {
        image: PathBuf,
        file: String,
        have: u64,
        want: u64,
    },
    /// GRUB's images, a tool, or a command line.
    #[error(transparent)]
    Grub(#[from] GrubError),
    /// mkfs.ext4 failed.
    #[error("mkfs.ext4 for the data partition of {path} failed: {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
    /// The environment block is invalid or too full.
    #[error("{path}: {source}")]
    Env { path: PathBuf, source: GrubenvError },
    /// The boot state was refused.
    #[error(transparent)]
    Select(#[from] SelectError),
}

/// One OS version to keep on the boot partition.
#[derive(Debug, Clone)]
pub struct VersionFiles {
    /// The slot it goes into (`s1`, `s2`, ...).
    pub slot: String,
    /// The kernel.
    pub vmlinuz: PathBuf,
    /// The initramfs (the whole root of the host).
    pub initrd: PathBuf,
    /// The version's metadata, opaque here (written by the caller).
    pub os_json: Vec<u8>,
    /// The kernel command line; GRUB appends `juice.os.slot=` and `juice.os.trial=`.
    pub cmdline: String,
}

/// What [`write`] puts on a new disk.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// The image file (created or truncated; sparse).
    pub path: PathBuf,
    /// The whole disk, in bytes (a multiple of 1 MiB; default 2 GiB).
    pub size: u64,
    /// The boot partition, in bytes (a multiple of 1 MiB; default 512 MiB).
    pub boot_size: u64,
    /// The kept versions, most preferred first. The first is the initial version.
    pub versions: Vec<VersionFiles>,
    /// Whether the first version is committed (an `os disk` image's is). The others,
    /// and an uncommitted first, are installed but untried: each boots once as a trial.
    pub committed: bool,
    /// A directory whose contents pre-populate the data partition.
    pub data_dir: Option<PathBuf>,
}

impl DiskSpec {
    /// A spec with the default sizes, one committed version and an empty data partition.
    pub fn new(path: impl Into<PathBuf>, version: VersionFiles) -> DiskSpec {
        DiskSpec {
            path: path.into(),
            size: DEFAULT_SIZE,
            boot_size: DEFAULT_BOOT_SIZE,
            versions: vec![version],
            committed: true,
            data_dir: None,
        }
    }
}

/// Where the three partitions lie, in sectors.
struct Layout {
    sectors: u64,
    bios: (u64, u64),
    boot: (u64, u64),
    data: (u64, u64),
}

impl Layout {
    fn of(spec: &DiskSpec) -> Result<Layout, DiskError> {
        let spec_err = |field, reason: String| DiskError::Spec { field, reason };
        if !spec.size.is_multiple_of(MIB) || !spec.boot_size.is_multiple_of(MIB) {
            return Err(spec_err(
                "size",
                "the disk and boot sizes must be multiples of 1 MiB".into(),
            ));
        }
        if spec.boot_size < 32 * MIB {
            return Err(spec_err(
                "boot_size",
                format!("{} bytes is below the 32 MiB minimum", spec.boot_size),
            ));
        }
        let per_mib = MIB / SECTOR;
        let bios = (per_mib, per_mib);
        let boot = (2 * per_mib, spec.boot_size / SECTOR);
        let data_start = boot.0 + boot.1;
        // The backup GPT takes the last 33 sectors; the data partition ends on a MiB before it.
        let data_end = (spec.size / SECTOR).saturating_sub(33) / per_mib * per_mib;
        if data_end < data_start + 16 * per_mib {
            return Err(spec_err(
                "size",
                format!(
                    "{} bytes leaves under 16 MiB for the data partition after a {} byte boot partition",
                    spec.size, spec.boot_size
                ),
            ));
        }
        Ok(Layout {
            sectors: spec.size / SECTOR,
            bios,
            boot,
            data: (data_start, data_end - data_start),
        })
    }
}

/// A window of a file, for `fatfs` to treat as a whole volume.
#[derive(Debug)]
struct Region<'f> {
    file: &'f File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Region<'_> {
    fn room(&self, want: usize) -> usize {
        let left = self.len.saturating_sub(self.pos);
        usize::try_from(left).map_or(want, |left| want.min(left))
    }
}

impl Read for Region<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        let n = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Region<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "past the end of the partition",
            ));
        }
        let n = self.file.write_at(&buf[..n], self.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Region<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek before the partition")
        })?;
        Ok(self.pos)
    }
}

/// Writes a new disk image as `spec` says (see the module doc for the layout).
pub fn write(spec: &DiskSpec) -> Result<(), DiskError> {
    let layout = Layout::of(spec)?;
    if spec.versions.is_empty() {
        return Err(DiskError::Spec {
            field: "versions",
            reason: "a disk needs at least one OS version".into(),
        });
    }
    let mut boot_cfgs = Vec::new();
    for v in &spec.versions {
        if !select::valid_slot(&v.slot) {
            return Err(SelectError::BadSlot(v.slot.clone()).into());
        }
        boot_cfgs.push(grub::boot_cfg(&v.cmdline)?);
    }
    let mkfs = find_mkfs()?;
    let seed = seed_of(spec);
    let path = &spec.path;
    let io_err = |what| {
        move |source| DiskError::Io {
            what,
            path: path.clone(),
            source,
        }
    };

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("create"))?;
    file.set_len(spec.size).map_err(io_err("size"))?;

    let work = tempfile::tempdir().map_err(io_err("make a work directory beside"))?;
    let images = grub::images(work.path())?;

    write_gpt(&file, path, &layout, &seed, &images)?;
    write_bios_boot(&file, path, &layout, &images)?;
    write_boot_partition(&file, spec, &layout, &seed, &images, &boot_cfgs)?;
    file.sync_all().map_err(io_err("sync"))?;
    drop(file);
    write_data_partition(&mkfs, spec, &layout, &seed)?;
    Ok(())
}

fn find_mkfs() -> Result<PathBuf, GrubError> {
    grub::find_tool("mkfs.ext4", "e2fsprogs")
}

/// 32 bytes that stand for the spec's contents: every id on the disk is derived from them.
fn seed_of(spec: &DiskSpec) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"juice-os-disk\0");
    h.update(spec.size.to_le_bytes());
    h.update(spec.boot_size.to_le_bytes());
    h.update([u8::from(spec.committed)]);
    for v in &spec.versions {
        for part in [v.slot.as_bytes(), &v.os_json, v.cmdline.as_bytes()] {
            h.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_le_bytes());
            h.update(part);
        }
    }
    h.finalize().into()
}

fn derived_uuid(seed: &[u8; 32], what: &str) -> uuid::Uuid {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(what.as_bytes());
    let digest: [u8; 32] = h.finalize().into();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

fn write_gpt(
    file: &File,
    path: &Path,
    layout: &Layout,
    seed: &[u8; 32],
    images: &grub::GrubImages,
) -> Result<(), DiskError> {
    let gpt_err = |source| DiskError::Gpt {
        path: path.to_path_buf(),
        source,
    };
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(file, Some(derived_uuid(seed, "disk")))
        .map_err(gpt_err)?;
    let part = |n: &str, ty, (first, len): (u64, u64)| gpt::partition::Partition {
        part_type_guid: ty,
        part_guid: derived_uuid(seed, n),
        first_lba: first,
        last_lba: first + len - 1,
        flags: 0,
        name: n.to_string(),
    };
    let parts = [
        (
            1,
            part(
                crate::BIOS_PARTITION,
                gpt::partition_types::BIOS,
                layout.bios,
            ),
        ),
        (
            2,
            part(
                crate::BOOT_PARTITION,
                gpt::partition_types::EFI,
                layout.boot,
            ),
        ),
        (
            3,
            part(
                crate::DATA_PARTITION,
                gpt::partition_types::LINUX_FS,
                layout.data,
            ),
        ),
    ];
    disk.update_partitions(parts.into_iter().collect())
        .map_err(gpt_err)?;
    let mut file = disk.write().map_err(gpt_err)?;

    // The protective MBR, carrying GRUB's boot code: boot.img up to the disk signature,
    // with the LBA of core.img at 0x5c (GRUB_BOOT_MACHINE_KERNEL_SECTOR) and the
    // boot-drive check at 0x66 turned into two NOPs, as grub-bios-setup does for a hard
    // disk (some BIOSes pass a wrong drive number).
    let mut code = [0u8; 440];
    let boot_img = images.boot_img.get(..440).ok_or_else(|| DiskError::Spec {
        field: "boot.img",
        reason: format!(
            "GRUB's boot.img is {} bytes, not 512",
            images.boot_img.len()
        ),
    })?;
    code.copy_from_slice(boot_img);
    code[0x5c..0x64].copy_from_slice(&layout.bios.0.to_le_bytes());
    code[0x66..0x68].copy_from_slice(&[0x90, 0x90]);
    let total = u32::try_from(layout.sectors - 1).unwrap_or(u32::MAX);
    let mut mbr = gpt::mbr::ProtectiveMBR::with_lb_size(total);
    mbr.set_bootcode(code);
    mbr.set_disk_signature(
        derived_uuid(seed, "mbr").as_bytes()[..4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    mbr.overwrite_lba0(&mut file).map_err(|e| DiskError::Io {
        what: "write the protective MBR of",
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(())
}

/// core.img goes at the start of the BIOS boot partition. Its first sector (diskboot)
/// loads the rest from the block list at its offset 0x1f4: start LBA (u64), sector
/// count (u16), load segment (u16, kept), terminated by the zero-length entry below it.
fn write_bios_boot(
    file: &File,
    path: &Path,
    layout: &Layout,
    images: &grub::GrubImages,
) -> Result<(), DiskError> {
    let mut core = images.core_img.clone();
    let sectors = u64::try_from(core.len()).unwrap_or(u64::MAX) / SECTOR;
    if sectors < 2 || sectors > layout.bios.1 {
        return Err(DiskError::Spec {
            field: "core.img",
            reason: format!(
                "GRUB's core image is {} bytes; it must fit the 1 MiB BIOS boot partition",
                core.len()
            ),
        });
    }
    let rest = u16::try_from(sectors - 1).map_err(|_| DiskError::Spec {
        field: "core.img",
        reason: "too many sectors for one block-list entry".into(),
    })?;
    core[0x1f4..0x1fc].copy_from_slice(&(layout.bios.0 + 1).to_le_bytes());
    core[0x1fc..0x1fe].copy_from_slice(&rest.to_le_bytes());
    file.write_all_at(&core, layout.bios.0 * SECTOR)
        .map_err(|source| DiskError::Io {
            what: "write GRUB's core image into",
            path: path.to_path_buf(),
            source,
        })
}

fn write_boot_partition(
    file: &File,
    spec: &DiskSpec,
    layout: &Layout,
    seed: &[u8; 32],
    images: &grub::GrubImages,
    boot_cfgs: &[String],
) -> Result<(), DiskError> {
    let image = &spec.path;
    let fat_err = |what, file: &str| {
        let file = file.to_string();
        move |source| DiskError::Fat {
            image: image.clone(),
            what,
            file,
            source,
        }
    };
    let region = || Region {
        file,
        start: layout.boot.0 * SECTOR,
        len: layout.boot.1 * SECTOR,
        pos: 0,
    };
    let mut label = [b' '; 11];
    label[..crate::BOOT_LABEL.len()].copy_from_slice(crate::BOOT_LABEL.as_bytes());
    let volume_id = u32::from_le_bytes(
        derived_uuid(seed, "fat").as_bytes()[..4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    fatfs::format_volume(
        region(),
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .volume_id(volume_id),
    )
    .map_err(fat_err("format", "/"))?;
    write_label_entry(file, layout, &label).map_err(fat_err("write the volume label", "/"))?;

    let fs =
        fatfs::FileSystem::new(region(), fatfs::FsOptions::new()).map_err(fat_err("open", "/"))?;
    let root = fs.root_dir();
    let put = |path: &str, data: &[u8]| -> Result<(), DiskError> {
        let rel = path.trim_start_matches('/');
        if let Some((dirs, _)) = rel.rsplit_once('/') {
            let mut at = String::new();
            for d in dirs.split('/') {
                at = if at.is_empty() {
                    d.to_string()
                } else {
                    format!("{at}/{d}")
                };
                if root.open_dir(&at).is_err() {
                    root.create_dir(&at)
                        .map_err(fat_err("create directory", &at))?;
                }
            }
        }
        let mut f = root.create_file(rel).map_err(fat_err("create", path))?;
        f.truncate().map_err(fat_err("truncate", path))?;
        f.write_all(data).map_err(fat_err("write", path))
    };

    // grubenv first, so it lies in the first clusters, in one piece.
    let mut env = Env::default();
    let mut state = BootState::default();
    for v in spec.versions.iter().rev() {
        state.install(&v.slot)?;
    }
    if spec.committed {
        state.commit(&spec.versions[0].slot)?;
    }
    state.write_to(&mut env)?;
    let block = env.to_block().map_err(|source| DiskError::Env {
        path: image.clone(),
        source,
    })?;
    put(GRUBENV_PATH, &block)?;
    put("/grub/grub.cfg", grub::config().as_bytes())?;
    put("/EFI/BOOT/BOOTX64.EFI", &images.bootx64_efi)?;
    for (v, boot_cfg) in spec.versions.iter().zip(boot_cfgs) {
        let dir = format!("/os/{}", v.slot);
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| DiskError::Io {
                what: "read",
                path: p.clone(),
                source,
            })
        };
        put(&format!("{dir}/vmlinuz"), &read(&v.vmlinuz)?)?;
        put(&format!("{dir}/initrd"), &read(&v.initrd)?)?;
        put(&format!("{dir}/os.json"), &v.os_json)?;
        put(&format!("{dir}/boot.cfg"), boot_cfg.as_bytes())?;
    }
    drop(root);
    fs.unmount().map_err(fat_err("unmount", "/"))
}

/// GRUB's `search --fs-label` reads the label from the root directory's volume-label
/// entry, which `fatfs` does not write: put one in the first slot of the new, empty root.
fn write_label_entry(file: &File, layout: &Layout, label: &[u8; 11]) -> io::Result<()> {
    let base = layout.boot.0 * SECTOR;
    let mut bs = [0u8; 512];
    file.read_exact_at(&mut bs, base)?;
    let u16_at = |o: usize| u64::from(u16::from_le_bytes([bs[o], bs[o + 1]]));
    let u32_at = |o: usize| u64::from(u32::from_le_bytes([bs[o], bs[o + 1], bs[o + 2], bs[o + 3]]));
    let bytes_per_sector = u16_at(0x0b);
    let sectors_per_cluster = u64::from(bs[0x0d]);
    let reserved = u16_at(0x0e);
    let fats = u64::from(bs[0x10]);
    let fat16_sectors = u16_at(0x16);
    let root_sector = if fat16_sectors != 0 {
        reserved + fats * fat16_sectors
    } else {
        let root_cluster = u32_at(0x2c);
        reserved + fats * u32_at(0x24) + root_cluster.saturating_sub(2) * sectors_per_cluster
    };
    let mut entry = [0u8; 32];
    entry[..11].copy_from_slice(label);
    entry[11] = 0x08; // ATTR_VOLUME_ID
    file.write_all_at(&entry, base + root_sector * bytes_per_sector)
}

fn write_data_partition(
    mkfs: &Path,
    spec: &DiskSpec,
    layout: &Layout,
    seed: &[u8; 32],
) -> Result<(), DiskError> {
    let uuid = derived_uuid(seed, "ext4").hyphenated().to_string();
    let hash_seed = derived_uuid(seed, "ext4-hash").hyphenated().to_string();
    let mut cmd = Command::new(mkfs);
    cmd.env("E2FSPROGS_FAKE_TIME", "1")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            crate::DATA_PARTITION,
            "-U",
            &uuid,
        ])
        .arg("-E")
        .arg(format!(
            "offset={},nodiscard,hash_seed={hash_seed}",
            layout.data.0 * SECTOR
        ));
    if let Some(dir) = &spec.data_dir {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(&spec.path)
        .arg(format!("{}k", layout.data.1 * SECTOR / 1024));
    let out = cmd.output().map_err(|source| DiskError::Io {
        what: "run",
        path: mkfs.to_path_buf(),
        source,
    })?;
    if !out.status.success() {
        return Err(DiskError::Mkfs {
            path: spec.path.clone(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// Opens the FAT boot partition of an image file and runs `f` on it.
fn with_boot_fs<T>(
    image: &Path,
    writable: bool,
    f: impl FnOnce(&fatfs::FileSystem<Region<'_>>) -> Result<T, DiskError>,
) -> Result<T, DiskError> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(image)
        .map_err(|source| DiskError::Io {
            what: "open",
            path: image.to_path_buf(),
            source,
        })?;
    let disk = gpt::GptConfig::new()
        .writable(false)
        .open_from_device(&file)
        .map_err(|source| DiskError::Gpt {
            path: image.to_path_buf(),
            source,
        })?;
    let boot = disk
        .partitions()
        .values()
        .find(|p| p.name == crate::BOOT_PARTITION)
        .ok_or(DiskError::NoPartition {
            path: image.to_path_buf(),
            name: crate::BOOT_PARTITION,
        })?;
    let region = Region {
        file: &file,
        start: boot.first_lba * SECTOR,
        len: (boot.last_lba + 1 - boot.first_lba) * SECTOR,
        pos: 0,
    };
    let fs = fatfs::FileSystem::new(region, fatfs::FsOptions::new()).map_err(|source| {
        DiskError::Fat {
            image: image.to_path_buf(),
            what: "open",
            file: "/".into(),
            source,
        }
    })?;
    let result = f(&fs)?;
    fs.unmount().map_err(|source| DiskError::Fat {
        image: image.to_path_buf(),
        what: "unmount",
        file: "/".into(),
        source,
    })?;
    Ok(result)
}

/// Reads a file of the boot partition of an offline disk image, e.g. [`GRUBENV_PATH`].
pub fn read_boot_file(image: &Path, path: &str) -> Result<Vec<u8>, DiskError> {
    with_boot_fs(image, false, |fs| {
        let err = |what| {
            move |source| DiskError::Fat {
                image: image.to_path_buf(),
                what,
                file: path.to_string(),
                source,
            }
        };
        let mut f = fs
            .root_dir()
            .open_file(path.trim_start_matches('/'))
            .map_err(err("open"))?;
        let mut data = Vec::new();
        f.read_to_end(&mut data).map_err(err("read"))?;
        Ok(data)
    })
}

/// Overwrites a file of the boot partition of an offline disk image in place, with
/// data of the same size (as GRUB's `save_env` does to `grubenv`).
pub fn overwrite_boot_file(image: &Path, path: &str, data: &[u8]) -> Result<(), DiskError> {
    with_boot_fs(image, true, |fs| {
        let err = |what| {
            move |source| DiskError::Fat {
                image: image.to_path_buf(),
                what,
                file: path.to_string(),
                source,
            }
        };
        let mut f = fs
            .root_dir()
            .open_file(path.trim_start_matches('/'))
            .map_err(err("open"))?;
        let have = f.seek(SeekFrom::End(0)).map_err(err("seek"))?;
        let want = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if have != want {
            return Err(DiskError::SizeChange {
                image: image.to_path_buf(),
                file: path.to_string(),
                have,
                want,
            });
        }
        f.seek(SeekFrom::Start(0)).map_err(err("seek"))?;
        f.write_all(data).map_err(err("write"))?;
        f.flush().map_err(err("flush"))
    })
}

/// Reads the boot state of an offline disk image.
pub fn read_state(image: &Path) -> Result<BootState, DiskError> {
    let block = read_boot_file(image, GRUBENV_PATH)?;
    let env = Env::parse(&block).map_err(|source| DiskError::Env {
        path: image.join(GRUBENV_PATH),
        source,
    })?;
    Ok(BootState::from_env(&env)?)
}

/// Replaces the boot state of an offline disk image (other variables are kept).
pub fn write_state(image: &Path, state: &BootState) -> Result<(), DiskError> {
    let block = read_boot_file(image, GRUBENV_PATH)?;
    let env_err = |source| DiskError::Env {
        path: image.join(GRUBENV_PATH),
        source,
    };
    let mut env = Env::parse(&block).map_err(env_err)?;
    state.write_to(&mut env)?;
    overwrite_boot_file(image, GRUBENV_PATH, &env.to_block().map_err(env_err)?)
}

/// The boot partition of a running host, mounted by the kernel at a directory.
#[derive(Debug, Clone)]
pub struct BootDir {
    root: PathBuf,
}

impl BootDir {
    /// The boot partition mounted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> BootDir {
        BootDir { root: root.into() }
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DiskError {
        let path = path.to_path_buf();
        move |source| DiskError::Io { what, path, source }
    }

    /// Writes a version into `/os/<slot>`: into `/os/<slot>.tmp` first, synced, then
    /// renamed, so a crash leaves either the old slot or the new one. An existing slot
    /// of the same name is replaced (the caller evicted it from the boot state first).
    pub fn write_version(&self, files: &VersionFiles) -> Result<(), DiskError> {
        if !select::valid_slot(&files.slot) {
            return Err(SelectError::BadSlot(files.slot.clone()).into());
        }
        let boot_cfg = grub::boot_cfg(&files.cmdline)?;
        let os = self.root.join("os");
        std::fs::create_dir_all(&os).map_err(Self::io("create", &os))?;
        let tmp = os.join(format!("{}.tmp", files.slot));
        let dest = os.join(&files.slot);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(Self::io("remove", &tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(Self::io("create", &tmp))?;
        let put = |name: &str, data: &[u8]| -> Result<(), DiskError> {
            let p = tmp.join(name);
            let mut f = File::create(&p).map_err(Self::io("create", &p))?;
            f.write_all(data).map_err(Self::io("write", &p))?;
            f.sync_all().map_err(Self::io("sync", &p))
        };
        let copy = |name: &str, from: &Path| -> Result<(), DiskError> {
            let p = tmp.join(name);
            std::fs::copy(from, &p).map_err(Self::io("copy to", &p))?;
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(Self::io("sync", &p))
        };
        copy("vmlinuz", &files.vmlinuz)?;
        copy("initrd", &files.initrd)?;
        put("os.json", &files.os_json)?;
        put("boot.cfg", boot_cfg.as_bytes())?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(Self::io("remove", &dest))?;
        }
        std::fs::rename(&tmp, &dest).map_err(Self::io("rename into place", &dest))?;
        File::open(&os)
            .and_then(|d| d.sync_all())
            .map_err(Self::io("sync", &os))
    }

    /// Removes the files of a slot (after it left the boot state).
    pub fn remove_version(&self, slot: &str) -> Result<(), DiskError> {
        if !select::valid_slot(slot) {
            return Err(SelectError::BadSlot(slot.to_string()).into());
        }
        let os = self.root.join("os");
        let dir = os.join(slot);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Self::io("remove", &dir)(e));
            }
            _ => {}
        }
        File::open(&os)
            .and_then(|d| d.sync_all())
            .map_err(Self::io("sync", &os))
    }

    /// Reads `/grub/grubenv`.
    pub fn read_env(&self) -> Result<Env, DiskError> {
        let p = self.env_path();
        let block = std::fs::read(&p).map_err(Self::io("read", &p))?;
        Env::parse(&block).map_err(|source| DiskError::Env { path: p, source })
    }

    /// Overwrites `/grub/grubenv` in place: one write of 1024 bytes at offset 0, then
    /// fsync. Never truncated or renamed, since GRUB's `save_env` writes into the
    /// file's existing sectors and a new file could lie elsewhere.
    pub fn write_env(&self, env: &Env) -> Result<(), DiskError> {
        let p = self.env_path();
        let block = env.to_block().map_err(|source| DiskError::Env {
            path: p.clone(),
            source,
        })?;
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(Self::io("open", &p))?;
        let len = f.metadata().map_err(Self::io("stat", &p))?.len();
        if len != grubenv::BLOCK_SIZE as u64 {
            return Err(DiskError::SizeChange {
                image: self.root.clone(),
                file: GRUBENV_PATH.into(),
                have: len,
                want: grubenv::BLOCK_SIZE as u64,
            });
        }
        f.write_all_at(&block, 0).map_err(Self::io("write", &p))?;
        f.sync_all().map_err(Self::io("sync", &p))
    }

    /// The boot state in `/grub/grubenv`.
    pub fn read_state(&self) -> Result<BootState, DiskError> {
        Ok(BootState::from_env(&self.read_env()?)?)
    }

    /// Replaces the boot state in `/grub/grubenv`, keeping any other variables.
    pub fn write_state(&self, state: &BootState) -> Result<(), DiskError> {
        let mut env = self.read_env()?;
        state.write_to(&mut env)?;
        self.write_env(&env)
    }

    fn env_path(&self) -> PathBuf {
        self.root.join(GRUBENV_PATH.trim_start_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(dir: &Path, slot: &str) -> VersionFiles {
        let k = dir.join(format!("{slot}-vmlinuz"));
        let i = dir.join(format!("{slot}-initrd"));
        std::fs::write(&k, format!("kernel {slot}").repeat(1000)).unwrap();
        std::fs::write(&i, format!("initrd {slot}")).unwrap();
        VersionFiles {
            slot: slot.into(),
            vmlinuz: k,
            initrd: i,
            os_json: b"{}".to_vec(),
            cmdline: "console=ttyS0".into(),
        }
    }

    #[test]
    fn a_boot_dir_replaces_versions_atomically_and_grubenv_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let boot = BootDir::new(tmp.path().join("boot"));
        std::fs::create_dir_all(tmp.path().join("boot/grub")).unwrap();
        std::fs::write(boot.env_path(), Env::default().to_block().unwrap()).unwrap();
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = ino(&boot.env_path());

        boot.write_version(&version(tmp.path(), "s1")).unwrap();
        boot.write_version(&version(tmp.path(), "s1")).unwrap();
        let mut state = BootState::default();
        state.install("s1").unwrap();
        boot.write_state(&state).unwrap();
        assert_eq!(boot.read_state().unwrap(), state);
        assert_eq!(
            ino(&boot.env_path()),
            before,
            "grubenv must be written in place"
        );
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("boot/os/s1/boot.cfg")).unwrap(),
            "set juice_cmdline=\"console=ttyS0\"\n"
        );
        assert!(!tmp.path().join("boot/os/s1.tmp").exists());

        let mut bad = version(tmp.path(), "s2");
        bad.cmdline = "x\"; reboot".into();
        assert!(matches!(
            boot.write_version(&bad),
            Err(DiskError::Grub(GrubError::BadCmdline { ch: '"', .. }))
        ));
        boot.remove_version("s1").unwrap();
        boot.remove_version("s1").unwrap();
        assert!(!tmp.path().join("boot/os/s1").exists());
    }

    #[test]
    fn a_written_disk_has_the_contract_layout_and_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("disk.img");
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("hello"), b"kept").unwrap();
        let mut spec = DiskSpec::new(&img, version(tmp.path(), "s1"));
        spec.versions.push(version(tmp.path(), "s2"));
        spec.size = 128 * MIB;
        spec.boot_size = 64 * MIB;
        spec.data_dir = Some(data);
        write(&spec).unwrap();

        let disk = gpt::GptConfig::new().open(&img).unwrap();
        let names: Vec<_> = disk
            .partitions()
            .values()
            .map(|p| (p.name.clone(), p.first_lba))
            .collect();
        assert_eq!(
            names,
            [
                ("juice-bios".into(), 2048),
                ("juice-boot".into(), 4096),
                ("juice-data".into(), 4096 + 131072)
            ]
        );
        let block = read_boot_file(&img, GRUBENV_PATH).unwrap();
        assert_eq!(block.len(), 1024);
        let state = read_state(&img).unwrap();
        assert_eq!(state.order, ["s1", "s2"]);
        assert!(state.slots["s1"].good && !state.slots["s2"].good);
        assert_eq!(read_boot_file(&img, "/os/s2/initrd").unwrap(), b"initrd s2");
        assert_eq!(
            read_boot_file(&img, "/grub/grub.cfg").unwrap(),
            grub::config().as_bytes()
        );

        let mut state = state;
        state.prefer("s1").unwrap();
        state.install("s2").unwrap();
        write_state(&img, &state).unwrap();
        assert_eq!(read_state(&img).unwrap(), state);

        // Same spec, same bytes (where GRUB's images are reproducible, which Debian's are).
        let first = std::fs::read(&img).unwrap();
        write(&spec).unwrap();
        write_state(&img, &state).unwrap();
        assert!(
            std::fs::read(&img).unwrap() == first,
            "two writes of one spec differ"
        );

        // The label GRUB searches for is in the root directory.
        let label = with_boot_fs(&img, false, |fs| {
            Ok(fs.read_volume_label_from_root_dir().unwrap())
        })
        .unwrap();
        assert_eq!(label.as_deref(), Some(crate::BOOT_LABEL));

        // Errors name the field or file.
        spec.boot_size = 16 * MIB;
        assert!(write(&spec).unwrap_err().to_string().contains("boot_size"));
        assert!(
            read_boot_file(&img, "/nope")
                .unwrap_err()
                .to_string()
                .contains("/nope")
        );
    }
}
