//! Writes the disk `bench/os-floor.sh` boots: one committed version made of the host's
//! kernel and the one-line busybox init of the boot tests.
//!
//! Usage: `os-floor-disk DIR` writes `DIR/disk.img` and `DIR/initrd.cpio`, and prints
//! the kernel's path (for the direct `-kernel` comparison).

#[path = "../tests/support/mod.rs"]
mod support;

use juice_os::disk::{self, DiskSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(
        std::env::args_os()
            .nth(1)
            .ok_or("usage: os-floor-disk DIR")?,
    );
    support::require_all();
    let version = support::version(&dir, "s1", support::Init::Report);
    std::fs::copy(&version.initrd, dir.join("initrd.cpio"))?;
    let kernel = version.vmlinuz.clone();
    disk::write(&DiskSpec::new(dir.join("disk.img"), version))?;
    println!("{}", kernel.display());
    Ok(())
}
