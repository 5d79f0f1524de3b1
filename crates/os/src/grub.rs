//! GRUB for a Juice OS disk: the fixed `grub.cfg` that runs the boot-selection rule,
//! and the BIOS and UEFI images that find the boot partition by itself.
//!
//! The images come from Debian's `grub-mkimage` (packages `grub-pc-bin` and
//! `grub-efi-amd64-bin`): GRUB is the one bootloader Debian ships that can both read and
//! write a state file (`load_env`/`save_env`) under BIOS and UEFI, and building its
//! images is a job for its own tool. Each image embeds an early config that searches for
//! the FAT volume labelled [`crate::BOOT_LABEL`] and sets `$prefix` to its `/grub`, so no
//! device path is baked in; GRUB's normal mode then runs `$prefix/grub.cfg`.
//!
//! `grub.cfg` never changes per version: the state is in `/grub/grubenv`
//! ([`crate::select`] states the rule) and a version's command line in
//! `/os/<slot>/boot.cfg` ([`boot_cfg`]).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The modules both images embed (GRUB cannot load more: the partition has no module dir).
const MODULES: &[&str] = &[
    "part_gpt",
    "fat",
    "search",
    "search_label",
    "configfile",
    "normal",
    "loadenv",
    "echo",
    "linux",
    "gzio",
    "test",
    "reboot",
    "sleep",
    "serial",
    "terminal",
    "eval",
];

/// Why GRUB's images could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GrubError {
    /// A program the disk needs is not installed.
    #[error("{tool} is not installed (Debian package {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    /// A file from GRUB's packages is missing.
    #[error("cannot read {path} (Debian package {package}): {source}")]
    MissingFile {
        path: PathBuf,
        package: &'static str,
        source: std::io::Error,
    },
    /// Writing or reading a file in the work directory failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// grub-mkimage failed.
    #[error("grub-mkimage -O {format} failed: {stderr}")]
    Mkimage {
        format: &'static str,
        stderr: String,
    },
    /// A command line has a character that could break out of GRUB's quotes.
    #[error(
        "kernel command line {cmdline:?}: character {ch:?} is not allowed (letters, digits, space and ._,:=/+@- only)"
    )]
    BadCmdline { cmdline: String, ch: char },
}

/// Finds `tool` on `PATH` (and in `/usr/sbin` and `/sbin`, which a non-root `PATH` may lack).
pub fn find_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, GrubError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or(GrubError::ToolMissing { tool, package })
}

/// GRUB's three images for one disk.
#[derive(Debug, Clone)]
pub struct GrubImages {
    /// The i386-pc core image, for the BIOS boot partition (a multiple of 512 bytes).
    pub core_img: Vec<u8>,
    /// The x86_64-efi image, for `/EFI/BOOT/BOOTX64.EFI`.
    pub bootx64_efi: Vec<u8>,
    /// The i386-pc MBR boot sector (`boot.img`, 512 bytes).
    pub boot_img: Vec<u8>,
}

/// The config embedded in both images: find the boot partition by its label. The rescue
/// parser runs it, so it holds plain commands only.
pub fn early_config() -> String {
    format!(
        "search --no-floppy --label {label} --set=root\nset prefix=($root)/grub\n",
        label = crate::BOOT_LABEL
    )
}

/// Builds the images with `grub-mkimage` in `workdir` (which must exist).
pub fn images(workdir: &Path) -> Result<GrubImages, GrubError> {
    let mkimage = find_tool("grub-mkimage", "grub-common")?;
    let early = workdir.join("early.cfg");
    std::fs::write(&early, early_config()).map_err(|source| GrubError::Io {
        path: early.clone(),
        source,
    })?;
    let build = |format: &'static str, dir: &str, package: &'static str, extra: &[&str]| {
        let dir = Path::new("/usr/lib/grub").join(dir);
        if !dir.join("kernel.img").is_file() {
            return Err(GrubError::MissingFile {
                path: dir.join("kernel.img"),
                package,
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let out = workdir.join(format!("grub-{format}.img"));
        let result = Command::new(&mkimage)
            .args(["-O", format, "-p", "/grub", "-c"])
            .arg(&early)
            .arg("-d")
            .arg(&dir)
            .arg("-o")
            .arg(&out)
            .args(MODULES)
            .args(extra)
            .output()
            .map_err(|source| GrubError::Io {
                path: mkimage.clone(),
                source,
            })?;
        if !result.status.success() {
            return Err(GrubError::Mkimage {
                format,
                stderr: String::from_utf8_lossy(&result.stderr).into_owned(),
            });
        }
        std::fs::read(&out).map_err(|source| GrubError::Io { path: out, source })
    };
    let mut core_img = build("i386-pc", "i386-pc", "grub-pc-bin", &["biosdisk"])?;
    core_img.resize(core_img.len().div_ceil(512) * 512, 0);
    let bootx64_efi = build("x86_64-efi", "x86_64-efi", "grub-efi-amd64-bin", &[])?;
    let boot_path = PathBuf::from("/usr/lib/grub/i386-pc/boot.img");
    let boot_img = std::fs::read(&boot_path).map_err(|source| GrubError::MissingFile {
        path: boot_path,
        package: "grub-pc-bin",
        source,
    })?;
    Ok(GrubImages {
        core_img,
        bootx64_efi,
        boot_img,
    })
}

/// Checks a kernel command line against the characters `boot.cfg` can quote safely.
pub fn check_cmdline(cmdline: &str) -> Result<(), GrubError> {
    match cmdline
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || " ._,:=/+@-".contains(*c)))
    {
        Some(ch) => Err(GrubError::BadCmdline {
            cmdline: cmdline.to_string(),
            ch,
        }),
        None => Ok(()),
    }
}

/// The `/os/<slot>/boot.cfg` of a version: its kernel command line, for `grub.cfg` to source.
pub fn boot_cfg(cmdline: &str) -> Result<String, GrubError> {
    check_cmdline(cmdline)?;
    Ok(format!("set juice_cmdline=\"{cmdline}\"\n"))
}

/// The fixed `/grub/grub.cfg`: the boot-selection rule of [`crate::select`] in GRUB script.
pub fn config() -> String {
    r#"# Juice OS boot selection, written by Juice; the same on every disk and for every version.
# State: /grub/grubenv (juice_order, <slot>_ok, <slot>_try, <slot>_good); rule: boot the first
# slot in juice_order that is ok and (good or not tried); a slot that is not good is a trial,
# and its _try=1 is saved before the kernel loads, so a trial boots at most once.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
load_env --file /grub/grubenv
set juice_slot=
set juice_trial=0
for juice_s in $juice_order; do
  if [ -z "$juice_slot" ]; then
    eval 'set juice_ok=$'"${juice_s}_ok"
    eval 'set juice_try=$'"${juice_s}_try"
    eval 'set juice_good=$'"${juice_s}_good"
    if [ "$juice_ok" = 1 ]; then
      if [ "$juice_good" = 1 ]; then
        set juice_slot="$juice_s"
        set juice_trial=0
      elif [ "$juice_try" != 1 ]; then
        set juice_slot="$juice_s"
        set juice_trial=1
      fi
    fi
  fi
done
if [ "$juice_trial" = 1 ]; then
  eval "set ${juice_slot}_try=1"
  if eval "save_env --file /grub/grubenv ${juice_slot}_try"; then
    set juice_saved=1
  else
    # Booting a trial whose try was not recorded could loop forever: boot committed only.
    echo "Juice OS: cannot record the trial of slot $juice_slot in /grub/grubenv; booting a committed version"
    set juice_slot=
    set juice_trial=0
    for juice_s in $juice_order; do
      if [ -z "$juice_slot" ]; then
        eval 'set juice_ok=$'"${juice_s}_ok"
        eval 'set juice_good=$'"${juice_s}_good"
        if [ "$juice_ok" = 1 ]; then
          if [ "$juice_good" = 1 ]; then
            set juice_slot="$juice_s"
          fi
        fi
      fi
    done
  fi
fi
if [ -n "$juice_slot" ]; then
  set juice_cmdline=
  source /os/$juice_slot/boot.cfg
  echo "Juice OS: booting slot $juice_slot (trial=$juice_trial)"
  linux /os/$juice_slot/vmlinuz $juice_cmdline juice.os.slot=$juice_slot juice.os.trial=$juice_trial
  initrd /os/$juice_slot/initrd
  boot
  echo "Juice OS: slot $juice_slot did not start"
else
  echo "Juice OS: no bootable OS version on this disk (juice_order=$juice_order): every version is bad or a failed trial"
fi
echo "Juice OS: rebooting in 5 s"
sleep 5
reboot
"#
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_that_could_leave_the_quotes_are_refused_by_character() {
        assert_eq!(
            boot_cfg("console=ttyS0 panic=1").unwrap(),
            "set juice_cmdline=\"console=ttyS0 panic=1\"\n"
        );
        for (cmdline, ch) in [
            ("a\"b", '"'),
            ("a$b", '$'),
            ("a\\b", '\\'),
            ("a;b", ';'),
            ("a\nb", '\n'),
            ("é", 'é'),
        ] {
            match boot_cfg(cmdline) {
                Err(GrubError::BadCmdline { ch: got, .. }) => assert_eq!(got, ch, "{cmdline:?}"),
                other => panic!("{cmdline:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let err = find_tool("juice-no-such-tool", "juice-pkg").unwrap_err();
        assert_eq!(
            err.to_string(),
            "juice-no-such-tool is not installed (Debian package juice-pkg)"
        );
    }
}
