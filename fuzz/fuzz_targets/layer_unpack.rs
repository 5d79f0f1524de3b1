//! The layer unpacker on hostile tar streams: it may refuse, never panic,
//! and never write outside its destination or leave a link that leads out.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: common::Input| {
    let tar = input.tar();
    let top = tempfile::tempdir().expect("a scratch directory");
    let dest = top.path().join("root");
    std::fs::create_dir(&dest).expect("the destination");
    let policy = juice_image::unpack::UnpackPolicy {
        max_entries: 256,
        max_file_size: 1 << 20,
        max_total_size: 4 << 20,
        ..Default::default()
    };
    let accepted = juice_image::unpack::unpack_layer(std::io::Cursor::new(tar), &dest, &policy).is_ok();
    // Whatever it did, nothing is outside; what it accepted has no escaping link.
    common::assert_contained(top.path(), "root", &[], accepted);
});
