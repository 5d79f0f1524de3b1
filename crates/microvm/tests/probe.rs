//! The accelerator probe, for real under TCG: `juice-guest` with `juice.probe`
//! boots, says so and powers off; something that is no kernel never does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use juice_microvm::kernel::Kernel;
use juice_microvm::vm::{Accel, probe_boot};

fn guest_init() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/x86_64-unknown-linux-musl/release/juice-guest");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --release` first (as .ci/run does)",
        p.display()
    );
    p
}

fn qemu() -> PathBuf {
    let p = PathBuf::from("/usr/bin/qemu-system-x86_64");
    assert!(
        p.is_file(),
        "this test needs qemu-system-x86 (installed by .ci/run)"
    );
    p
}

#[test]
fn a_guest_boots_under_tcg_and_something_that_is_no_kernel_does_not() {
    let kernel = Kernel::find().expect("linux-image-cloud-amd64 (installed by .ci/run)");
    let dir = tempfile::tempdir().unwrap();
    let initrd = juice_microvm::artefacts::initramfs(dir.path(), &kernel, &guest_init()).unwrap();
    assert!(probe_boot(
        &qemu(),
        &kernel.image,
        &initrd,
        Accel::Tcg,
        Duration::from_secs(90)
    ));
    let bogus = dir.path().join("bogus");
    std::fs::write(&bogus, b"not a kernel").unwrap();
    assert!(!probe_boot(
        &qemu(),
        &bogus,
        &initrd,
        Accel::Tcg,
        Duration::from_secs(20)
    ));
}
