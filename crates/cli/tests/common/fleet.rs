//! Helpers shared by the fleet's tests (tests/fleet.rs, tests/fleet_update.rs).

use super::Juice;

/// This host's fleet id, as its daemon wrote it.
pub fn host_id(j: &Juice) -> String {
    std::fs::read_to_string(j.home.path().join("host-id"))
        .expect("the daemon wrote $JUICE_HOME/host-id")
        .trim()
        .to_owned()
}

/// `juice get instances -o json` against `j`'s daemon: (name, pid) of `group`'s instances.
pub fn local_instances(j: &Juice, group: &str) -> Vec<(String, i64)> {
    let out = j.ok(&["get", "instances", "-o", "json"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut mine: Vec<(String, i64)> = all
        .iter()
        .filter(|i| i["group"] == group)
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                i["pid"].as_i64().unwrap(),
            )
        })
        .collect();
    mine.sort();
    mine
}
