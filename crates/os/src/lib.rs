//! Juice OS: the server's own operating system as an immutable Juice image.
//!
//! An OS version is a kernel, an initramfs that is the whole read-only root (the
//! static PID 1 `juice-host`, `juice`, the kernel modules the host needs), and a
//! config naming the version and kernel command line. A disk keeps N versions on a
//! FAT boot partition beside GRUB; GRUB picks one by the state in its `grubenv`
//! ([`select`] is the same rule in Rust). A new version boots first as a trial, and
//! the daemon commits it only when the host is healthy; a trial that is not committed
//! is never booted again, so the bootloader falls back by itself.
//!
//! Written here, not taken from a crate: the boot-selection rule and its `grubenv`
//! encoding, the disk's layout, and the host's PID 1 are Juice's own protocol.

pub mod build;
pub mod daemon;
pub mod disk;
pub mod grub;
pub mod grubenv;
pub mod select;
pub mod settings;
pub mod slots;
pub mod trial;
pub mod version;

/// The GPT name of the partition with GRUB, its state and the kept versions (FAT).
pub const BOOT_PARTITION: &str = "juice-boot";
/// The GPT name of the partition mounted at `/var/lib/juice` (ext4).
pub const DATA_PARTITION: &str = "juice-data";
/// The GPT name of the BIOS boot partition holding GRUB's core image.
pub const BIOS_PARTITION: &str = "juice-bios";
/// The FAT volume label of the boot partition (GRUB finds it by this label).
pub const BOOT_LABEL: &str = "JUICEBOOT";
