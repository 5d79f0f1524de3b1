//! Juice OS disks booted for real: GRUB under SeaBIOS and OVMF, in QEMU (KVM if there is
//! one, TCG otherwise), with a fake OS whose init prints the slot and trial it was given.
//! No `-no-reboot`: a panicking kernel reboots into GRUB as on a host. Every tool missing
//! fails the test with the Debian package to install.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use juice_os::disk::{self, DiskSpec};
use juice_os::select::{BootState, Choice};
use support::{Firmware, Init, Qemu, booted};

/// Generous for TCG: a GRUB boot with OVMF there takes tens of seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// A small disk (the defaults work too but take longer to write) with `versions`, the
/// first committed.
fn make_disk(dir: &Path, versions: &[(&str, Init)]) -> std::path::PathBuf {
    support::require_all();
    let img = dir.join("disk.img");
    let files: Vec<_> = versions
        .iter()
        .map(|(slot, init)| support::version(dir, slot, *init))
        .collect();
    let mut spec = DiskSpec::new(&img, files[0].clone());
    spec.versions = files;
    spec.size = 256 * MIB;
    spec.boot_size = 128 * MIB;
    disk::write(&spec).expect("write the disk");
    img
}

/// Boots `img` until the guest powers off; returns the console and the boots it reported.
fn boot(img: &Path, firmware: Firmware, name: &str) -> (String, Vec<String>) {
    let t = Instant::now();
    let mut q = Qemu::start(img, firmware, &img.with_file_name(format!("{name}.log")));
    let console = q.wait(BOOT_TIMEOUT, |_| false);
    eprintln!(
        "{name}: {firmware:?} run took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let lines = booted(&console);
    (console, lines)
}

fn state(desc: &str) -> BootState {
    let mut st = BootState::default();
    for part in desc.split_whitespace() {
        let (slot, flags) = part.split_once(':').unwrap_or((part, ""));
        st.order.push(slot.to_string());
        st.slots.insert(
            slot.to_string(),
            juice_os::select::SlotFlags {
                ok: flags.contains("ok"),
                tried: flags.contains("try"),
                good: flags.contains("good"),
            },
        );
    }
    st
}

fn line(c: &Choice) -> String {
    format!("slot={} trial={}", c.slot, u8::from(c.trial))
}

#[test]
fn one_disk_boots_its_committed_version_under_seabios_and_ovmf() {
    let tmp = tempfile::tempdir().unwrap();
    let img = make_disk(tmp.path(), &[("s1", Init::Report)]);
    for fw in [Firmware::SeaBios, Firmware::Ovmf] {
        let (console, lines) = boot(&img, fw, &format!("{fw:?}"));
        assert_eq!(lines, ["slot=s1 trial=0"], "{fw:?} console:\n{console}");
    }
    // A committed boot changes nothing in grubenv.
    assert_eq!(disk::read_state(&img).unwrap(), state("s1:ok,good"));
}

#[test]
fn a_new_version_boots_once_as_a_trial_and_grub_records_the_try() {
    let tmp = tempfile::tempdir().unwrap();
    let img = make_disk(tmp.path(), &[("s1", Init::Report), ("s2", Init::Report)]);
    let mut st = disk::read_state(&img).unwrap();
    st.install("s2").unwrap();
    disk::write_state(&img, &st).unwrap();

    // Under OVMF: GRUB's save_env must work under UEFI too (the fallback test covers SeaBIOS).
    let (console, lines) = boot(&img, Firmware::Ovmf, "trial");
    assert_eq!(lines, ["slot=s2 trial=1"], "console:\n{console}");
    let after = disk::read_state(&img).unwrap();
    assert!(
        after.slots["s2"].tried,
        "GRUB did not save s2_try=1: {after:?}"
    );
    assert!(!after.slots["s2"].good);
    // The daemon never committed it: the next boot is the committed version.
    assert_eq!(after.choose().map(|c| c.slot).as_deref(), Some("s1"));
}

#[test]
fn a_panicking_trial_kernel_falls_back_to_the_committed_version_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let img = make_disk(tmp.path(), &[("s1", Init::Report), ("s2", Init::Exit)]);
    let mut st = disk::read_state(&img).unwrap();
    st.install("s2").unwrap();
    disk::write_state(&img, &st).unwrap();

    // One QEMU run: s2 panics, the kernel reboots (panic=1), GRUB boots s1, s1 powers off.
    let (console, lines) = boot(&img, Firmware::SeaBios, "fallback");
    assert!(
        console.contains("Juice OS: booting slot s2 (trial=1)"),
        "console:\n{console}"
    );
    assert!(
        console.contains("Kernel panic"),
        "s2 did not panic; console:\n{console}"
    );
    assert_eq!(lines, ["slot=s1 trial=0"], "console:\n{console}");
    let after = disk::read_state(&img).unwrap();
    assert_eq!(after, state("s2:ok,try s1:ok,good"));
}

#[test]
fn prefer_rolls_back_to_an_older_committed_version() {
    let tmp = tempfile::tempdir().unwrap();
    let img = make_disk(tmp.path(), &[("s2", Init::Report), ("s1", Init::Report)]);
    let mut st = disk::read_state(&img).unwrap();
    st.commit("s1").unwrap();
    assert_eq!(st.choose().map(|c| c.slot).as_deref(), Some("s2"));
    st.prefer("s1").unwrap();
    disk::write_state(&img, &st).unwrap();

    let (console, lines) = boot(&img, Firmware::SeaBios, "prefer");
    assert_eq!(lines, ["slot=s1 trial=0"], "console:\n{console}");
}

#[test]
fn grub_and_the_rust_twin_choose_the_same_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let img = make_disk(
        tmp.path(),
        &[
            ("s1", Init::Report),
            ("s2", Init::Report),
            ("s3", Init::Report),
        ],
    );
    let cases = [
        // A committed slot behind a bad one and a burnt trial.
        "s3:ok,try s2 s1:ok,good",
        // A trial of a slot that is not first in the order.
        "s3:try s2:ok s1:ok,good",
        // A committed slot that was a trial once, ahead of an older committed one.
        "s2:ok,try,good s3:ok s1:ok,good",
        // Nothing bootable: GRUB must say so and reboot.
        "s3:ok,try s2 s1:try,good",
    ];
    for (i, desc) in cases.iter().enumerate() {
        let st = state(desc);
        disk::write_state(&img, &st).unwrap();
        let want = st.choose();
        let name = format!("twin{i}");
        let mut q = Qemu::start(
            &img,
            Firmware::SeaBios,
            &img.with_file_name(format!("{name}.log")),
        );
        let t = Instant::now();
        let console = q.wait(BOOT_TIMEOUT, |c| c.contains("Juice OS: rebooting in 5 s"));
        drop(q);
        eprintln!("{name} ({desc}): {:.1} s", t.elapsed().as_secs_f64());
        match want {
            Some(c) => assert_eq!(booted(&console), [line(&c)], "{desc}; console:\n{console}"),
            None => {
                assert!(
                    console.contains("no bootable OS version"),
                    "{desc}; console:\n{console}"
                );
                assert!(booted(&console).is_empty(), "{desc}; console:\n{console}");
            }
        }
        // And GRUB's bookkeeping is the twin's `begin`.
        let mut twin = st.clone();
        twin.begin();
        assert_eq!(disk::read_state(&img).unwrap(), twin, "{desc}");
    }
}
