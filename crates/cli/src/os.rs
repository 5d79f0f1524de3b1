//! `juice os`: the host's own OS as an immutable image. `build` and `disk` work on the
//! local store and files; `status`, `update`, `rollback` and `reboot` ask the daemon of
//! a Juice OS host (over its socket, or `JUICE_REMOTE` with mutual TLS). The layout,
//! the selection rule and the trial are in `juice-os`.

use std::path::{Path, PathBuf};

use juice_agent::client::Client;
use juice_agent::os::TrialEnd;
use juice_image::store::Store;
use juice_os::disk::{DiskSpec, VersionFiles};
use juice_os::slots::{NextBoot, OsStatus, SlotInfo, SlotStatus};
use juice_os::version::{OsConfig, OsVersion};

use crate::output::{self, Format};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The kernel command line of a version unless `--cmdline` says otherwise: the serial
/// console last (it becomes /dev/console), and a panicked kernel reboots by itself, so
/// GRUB can fall back.
pub const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0,115200 panic=10";

#[derive(Debug, clap::Subcommand)]
pub enum OsCommand {
    /// Make an OS version (kernel, the initramfs that is the whole root, its config) in the local store.
    Build {
        /// The version's name, such as 1.4.0.
        #[arg(long)]
        version: String,
        /// Tag it NAME:TAG (default juice-os:VERSION).
        #[arg(short = 't', long = "tag")]
        tag: Option<String>,
        /// The kernel (default: the newest /boot/vmlinuz-*-cloud-amd64).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Its modules directory (default /lib/modules/RELEASE).
        #[arg(long, value_name = "DIR", requires = "kernel")]
        modules: Option<PathBuf>,
        /// A kernel module to add, with its dependencies (repeatable).
        #[arg(long = "module", value_name = "NAME")]
        extra_modules: Vec<String>,
        /// The kernel command line.
        #[arg(long, default_value = DEFAULT_CMDLINE)]
        cmdline: String,
    },
    /// Write a bootable disk image (GPT, GRUB for BIOS and UEFI, the version, a data partition) into a file.
    Disk {
        /// The OS version in the local store.
        version: String,
        /// The disk image file to write.
        image: PathBuf,
        /// The disk's size.
        #[arg(long, default_value = "2GiB")]
        size: bytesize::ByteSize,
        /// The boot partition's size (it keeps the versions).
        #[arg(long, default_value = "512MiB")]
        boot_size: bytesize::ByteSize,
        /// The data partition's first content (/var/lib/juice): host.toml, site, store, policy, certificates.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
    },
    /// The kept versions: booted, committed, trial, the next boot, the last failure.
    Status {
        /// Read a disk image instead of asking the daemon.
        #[arg(long, value_name = "IMAGE")]
        disk: Option<PathBuf>,
    },
    /// Pull and verify a version (signature and policy), and make it the next boot's trial.
    Update {
        /// A registry reference, or a version in the host's store.
        reference: String,
        /// How many versions to keep, this one included.
        #[arg(long)]
        keep: Option<usize>,
        /// Reboot into the trial at once.
        #[arg(long)]
        reboot: bool,
    },
    /// Make a kept, committed version the one the next boot starts (default: the one before).
    Rollback {
        /// The version to go back to.
        #[arg(long)]
        to: Option<String>,
        /// Reboot into it at once.
        #[arg(long)]
        reboot: bool,
    },
    /// Reboot the host; during a trial, say whether the reboot commits or abandons it.
    Reboot {
        /// Commit the running trial first.
        #[arg(long, conflicts_with = "abort")]
        commit: bool,
        /// Abandon the running trial: it is marked bad and the committed version boots.
        #[arg(long)]
        abort: bool,
    },
}

fn client() -> Result<Client> {
    Ok(Client::new(&crate::juice_home())?)
}

pub fn run(command: OsCommand, format: Format) -> Result {
    match command {
        OsCommand::Build {
            version,
            tag,
            kernel,
            modules,
            extra_modules,
            cmdline,
        } => build(
            &version,
            tag,
            kernel,
            modules,
            extra_modules,
            &cmdline,
            format,
        ),
        OsCommand::Disk {
            version,
            image,
            size,
            boot_size,
            data,
        } => disk(&version, &image, size.as_u64(), boot_size.as_u64(), data),
        OsCommand::Status { disk: Some(image) } => print_status(&offline_status(&image)?, format),
        OsCommand::Status { disk: None } => print_status(&client()?.os_status()?, format),
        OsCommand::Update {
            reference,
            keep,
            reboot,
        } => {
            let c = client()?;
            let installed = c.os_update(&reference, keep)?;
            if format == Format::Json {
                output::json(&installed)?;
            } else {
                println!(
                    "wrote OS version {} ({}) into slot {}, signed by {}; the next boot is its trial",
                    installed.version,
                    installed.digest,
                    installed.slot,
                    installed.signed_by.join(", ")
                );
            }
            if reboot {
                c.os_reboot(None)?;
                println!("rebooting");
            }
            Ok(())
        }
        OsCommand::Rollback { to, reboot } => {
            let c = client()?;
            let slot = c.os_rollback(to.as_deref())?;
            println!("slot {slot} boots next");
            if reboot {
                c.os_reboot(None)?;
                println!("rebooting");
            }
            Ok(())
        }
        OsCommand::Reboot { commit, abort } => {
            let trial = match (commit, abort) {
                (true, _) => Some(TrialEnd::Commit),
                (_, true) => Some(TrialEnd::Abort),
                _ => None,
            };
            client()?.os_reboot(trial)?;
            println!("rebooting");
            Ok(())
        }
    }
}

fn build(
    version: &str,
    tag: Option<String>,
    kernel: Option<PathBuf>,
    modules: Option<PathBuf>,
    extra_modules: Vec<String>,
    cmdline: &str,
    format: Format,
) -> Result {
    juice_os::version::check_name(version)?;
    juice_os::version::check_cmdline(cmdline)?;
    let kernel = match kernel {
        Some(image) => kernel_at(image, modules)?,
        None => juice_microvm::kernel::Kernel::find()?,
    };
    let host = std::env::current_exe()?.with_file_name("juice-host");
    if !host.is_file() {
        return Err(format!(
            "{} is missing: `juice os build` takes PID 1 from beside juice (cargo build --release builds it)",
            host.display()
        )
        .into());
    }
    let mut initramfs = juice_os::build::Initramfs::beside(&host, kernel.clone(), version);
    initramfs.extra_modules = extra_modules;
    let store = Store::open(&crate::juice_home())?;
    let tmp = store.temp_path("os-initrd");
    let result = (|| -> Result<juice_image::store::ImageRecord> {
        initramfs.write_to(&tmp)?;
        let config = OsConfig {
            version: version.to_owned(),
            cmdline: cmdline.to_owned(),
            kernel_release: kernel.version.clone(),
            kernel_sha256: juice_os::version::file_sha256(&kernel.image)?,
            initrd_sha256: juice_os::version::file_sha256(&tmp)?,
            juice: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let reference = tag.unwrap_or_else(|| format!("juice-os:{version}"));
        Ok(juice_os::version::pack(
            &store,
            &reference,
            &config,
            &kernel.image,
            &tmp,
        )?)
    })();
    let kernel_size = std::fs::metadata(&kernel.image).map_or(0, |m| m.len());
    let initrd_size = std::fs::metadata(&tmp).map_or(0, |m| m.len());
    let _ = std::fs::remove_file(&tmp);
    let record = result?;
    if format == Format::Json {
        return output::json(&serde_json::json!({
            "reference": record.reference,
            "digest": record.digest.to_string(),
            "kernel_bytes": kernel_size,
            "initrd_bytes": initrd_size,
        }));
    }
    println!(
        "built OS version {} as {}: kernel {} ({}), initramfs {}, {} in all",
        version,
        record.reference,
        kernel.version,
        output::size(kernel_size),
        output::size(initrd_size),
        output::size(kernel_size + initrd_size)
    );
    println!("{}", record.digest);
    Ok(())
}

/// A kernel named on the command line; its release is what follows `vmlinuz-`.
fn kernel_at(image: PathBuf, modules: Option<PathBuf>) -> Result<juice_microvm::kernel::Kernel> {
    if !image.is_file() {
        return Err(format!("--kernel {}: no such file", image.display()).into());
    }
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let release = name.strip_prefix("vmlinuz-").unwrap_or(&name).to_owned();
    let modules = modules.unwrap_or_else(|| Path::new("/lib/modules").join(&release));
    if !modules.join("modules.dep").is_file() {
        return Err(format!(
            "--modules {}: no modules.dep there (give the kernel's modules directory)",
            modules.display()
        )
        .into());
    }
    Ok(juice_microvm::kernel::Kernel {
        image,
        version: release,
        modules: Some(modules),
    })
}

fn disk(version: &str, output: &Path, size: u64, boot_size: u64, data: Option<PathBuf>) -> Result {
    let store = Store::open(&crate::juice_home())?;
    let v = OsVersion::open(&store, version)?;
    if let Some(dir) = &data {
        if !dir.is_dir() {
            return Err(format!("--data {}: not a directory", dir.display()).into());
        }
        let host = dir.join("host.toml");
        if host.is_file() {
            // Refused now, naming the field, rather than found at the host's first boot.
            juice_os::settings::Settings::load(&host)?;
        }
    }
    let work = store.temp_path("os-disk");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let result = write_disk(&v, &store, &work, output, size, boot_size, data);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn write_disk(
    v: &OsVersion,
    store: &Store,
    work: &Path,
    output: &Path,
    size: u64,
    boot_size: u64,
    data: Option<PathBuf>,
) -> Result {
    let files = v.extract(store, work)?;
    let info = SlotInfo {
        version: v.config.version.clone(),
        digest: v.record.digest.to_string(),
        reference: v.record.reference.clone(),
        config: v.config.clone(),
        installed_ms: 0,
    };
    let mut spec = DiskSpec::new(
        output,
        VersionFiles {
            slot: "s1".into(),
            vmlinuz: files.vmlinuz,
            initrd: files.initrd,
            os_json: serde_json::to_vec_pretty(&info)?,
            cmdline: v.config.cmdline.clone(),
        },
    );
    spec.size = size;
    spec.boot_size = boot_size;
    spec.data_dir = data;
    juice_os::disk::write(&spec)?;
    println!(
        "wrote {} ({}): OS version {} committed in slot s1; it boots under BIOS and UEFI",
        output.display(),
        output::size(size),
        v.config.version
    );
    Ok(())
}

/// The state of a disk image, read from its boot partition.
fn offline_status(image: &Path) -> Result<OsStatus> {
    let state = juice_os::disk::read_state(image)?;
    let info = |slot: &str| -> Option<SlotInfo> {
        let bytes = juice_os::disk::read_boot_file(image, &format!("/os/{slot}/os.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let versions = state
        .order
        .iter()
        .chain(state.slots.keys().filter(|s| !state.order.contains(s)))
        .map(|slot| {
            let f = state.slots.get(slot).copied().unwrap_or_default();
            let i = info(slot);
            SlotStatus {
                slot: slot.clone(),
                version: i.as_ref().map(|i| i.version.clone()),
                digest: i.map(|i| i.digest),
                ok: f.ok,
                tried: f.tried,
                committed: f.good,
                booted: false,
            }
        })
        .collect();
    Ok(OsStatus {
        booted: None,
        versions,
        next: state.choose().map(NextBoot::from),
        last_failure: None,
    })
}

fn print_status(status: &OsStatus, format: Format) -> Result {
    if format == Format::Json {
        return output::json(status);
    }
    let mut t = output::table(["SLOT", "VERSION", "STATE", "BOOTED", "NEXT"]);
    for v in &status.versions {
        let state = match (v.ok, v.committed, v.tried) {
            (false, _, _) => "bad",
            (true, true, _) => "committed",
            (true, false, true) => "trial",
            (true, false, false) => "untried",
        };
        let next = status.next.as_ref().filter(|n| n.slot == v.slot);
        t.add_row([
            v.slot.clone(),
            v.version.clone().unwrap_or_else(|| "?".into()),
            state.into(),
            if v.booted { "yes" } else { "" }.into(),
            match next {
                Some(n) if n.trial => "trial".into(),
                Some(_) => "yes".into(),
                None => String::new(),
            },
        ]);
    }
    println!("{t}");
    if let Some(f) = &status.last_failure {
        println!(
            "last failure: slot {} ({}): {}",
            f.slot,
            f.version.as_deref().unwrap_or("?"),
            f.reason.as_deref().unwrap_or("no reason recorded")
        );
    }
    Ok(())
}
