//! The bare-boot baseline for `bench/microvm-boot.sh`: as `/init` of an
//! initramfs it prints one line on the console and powers the VM off, so a
//! boot to it measures the kernel and QEMU alone.

use std::io::Write;

fn main() {
    // The initramfs has no /dev/console node: mount devtmpfs to get one.
    let _ = std::fs::create_dir_all("/dev");
    // SAFETY: mount(2) with NUL-terminated literals and no data.
    unsafe {
        libc::mount(
            c"devtmpfs".as_ptr(),
            c"/dev".as_ptr(),
            c"devtmpfs".as_ptr(),
            0,
            std::ptr::null(),
        );
    }
    if let Ok(mut console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(console, "juice-boot-line");
    }
    // SAFETY: reboot(2) as PID 1 ends the VM.
    unsafe {
        libc::reboot(libc::RB_POWER_OFF);
    }
}
