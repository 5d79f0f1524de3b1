//! The short version of `bench/chaos.sh`: the daemon SIGKILLed at random moments
//! while a group flips between two revisions; the script fails unless the host
//! ends with exactly the declared instances and the published port never failed.
//! (`JUICE_TEST_SEED` or `JUICE_CHAOS_SEED` replays a run; the script prints the seed it used.)

mod common;

#[test]
fn the_daemon_killed_at_random_moments_loses_nothing_and_the_port_answers_throughout() {
    common::hello_web_binary();
    for tool in ["jq", "curl"] {
        common::require(tool);
    }
    let root = common::workspace();
    let out = std::process::Command::new("bash")
        .arg(root.join("bench/chaos.sh"))
        .arg("6")
        .current_dir(&root)
        .output()
        .expect("run bench/chaos.sh");
    let text = common::text(&out);
    assert!(out.status.success(), "bench/chaos.sh 6 failed:\n{text}");
    assert!(text.contains("requests, 0 failed"), "{text}");
}
