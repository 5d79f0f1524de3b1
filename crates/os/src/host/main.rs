//! `juice-host`: PID 1 of a Juice OS host (to be written).

fn main() {
    eprintln!("juice-host: not written yet");
    std::process::exit(1);
}
