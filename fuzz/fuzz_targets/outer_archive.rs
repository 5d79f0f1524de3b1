//! `juice import`'s outer-archive reader on hostile archives: it may refuse,
//! never panic, and never create anything but numbered bodies in its scratch.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: common::Input| {
    let tar = input.tar();
    let top = tempfile::tempdir().expect("a scratch directory");
    let file = top.path().join("image.tar");
    std::fs::write(&file, tar).expect("the archive");
    let scratch = top.path().join("scratch");
    let _ = juice_registry::import::read_outer_archive(&file, &scratch);
    // The reader makes no links at all, so none may be found.
    common::assert_contained(top.path(), "scratch", &["image.tar"], true);
    if let Ok(entries) = std::fs::read_dir(&scratch) {
        for e in entries {
            let e = e.expect("an entry");
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(name == "archive" || name == "files", "{name} in scratch");
        }
        for dir in ["archive", "files"] {
        if let Ok(bodies) = std::fs::read_dir(scratch.join(dir)) {
            for b in bodies {
                let b = b.expect("a body");
                let name = b.file_name().to_string_lossy().into_owned();
                assert!(name.parse::<u64>().is_ok(), "{name} is not a numbered body");
                assert!(b.file_type().expect("its type").is_file());
            }
        }
        }
    }
});
