//! Juice's nftables rules. The tables are created on first use and kept (like
//! the bridge); each change replaces the group sets and the `allow` chain in
//! one `nft -f` transaction.
//!
//! - `table bridge juice`: IPv4 frames between two instance veths go through
//!   the `allow` chain, which accepts them when both ends are in one group's
//!   set (`g_<group>`), or in the sets of two linked groups; everything else
//!   between instances is dropped, and all IPv6 between instances. Elements
//!   grow with the number of instances, rules with groups and links.
//! - Every instance port (veth or tap, `jv*`) is pinned: a frame from it must
//!   carry that port's MAC and IPv4 address (ARP included), and only IPv4 and
//!   ARP leave it at all. So a group's set can trust `ip saddr`: an appliance
//!   that changes its address or MAC, or speaks IPv6 or another ethertype, is
//!   dropped at its own port (`ports` set, `pin` chain).
//! - `table inet juice`: instances cannot open connections to the host, and
//!   nothing from the bridge is routed elsewhere (a host with `ip_forward=1`
//!   is no gateway for them); replies to connections the host opened (health
//!   probes, published ports) pass. Frames bridged between two ports (seen by
//!   this hook where br_netfilter is loaded) are the bridge table's to judge.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use super::NetworkError;
use super::ipam::Member;

/// The nft set of a group: `g_` and the name with '-' as '_' (group names have no '_').
fn set_name(group: &str) -> String {
    format!("g_{}", group.replace('-', "_"))
}

/// Juice's tables, created once and kept: only the sets and the `allow` chain change.
pub fn base_ruleset(bridge: &str) -> String {
    format!(
        r#"table bridge juice {{
    set ports {{
        type ifname . ether_addr . ipv4_addr;
    }}
    set unpinned {{
        type ether_addr . ipv4_addr;
    }}
    chain pin {{
        type filter hook prerouting priority -200; policy accept;
        iifname != "jv*" accept
        ether type arp iifname . ether saddr . arp saddr ip @ports accept
        ether type ip iifname . ether saddr . ip saddr @ports accept
        ether type arp ether saddr . arp saddr ip @unpinned accept
        ether type ip ether saddr . ip saddr @unpinned accept
        drop
    }}
    chain allow {{
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        meta protocol ip iifname "jv*" oifname "jv*" jump allow
        meta protocol ip iifname "jv*" oifname "jv*" drop
        meta protocol ip6 iifname "jv*" oifname "jv*" drop
    }}
}}
table inet juice {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{bridge}" ct state established,related accept
        iifname "{bridge}" drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname "{bridge}" oifname "{bridge}" accept
        iifname "{bridge}" ct state established,related accept
        iifname "{bridge}" drop
    }}
}}
"#
    )
}

/// The transaction that makes the sets and the `allow` chain match `members`;
/// `previous` are the sets made last time (deleted first).
pub fn update(members: &[Member], previous: &BTreeSet<String>) -> (String, BTreeSet<String>) {
    let mut groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for m in members {
        groups
            .entry(m.group.as_str())
            .or_default()
            .push(m.address.to_string());
    }
    let mut script = String::from(
        "flush chain bridge juice allow\nflush set bridge juice ports\nflush set bridge juice unpinned\n",
    );
    let mac = |m: &Member| {
        super::links::mac_for(m.address)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    // Each port carries only its own MAC and address. An instance recorded before
    // ports were pinned (still running across an upgrade) is held to its MAC and
    // address on any instance port until it is replaced.
    let (pinned, legacy): (Vec<&Member>, Vec<&Member>) =
        members.iter().partition(|m| !m.port.is_empty());
    if !pinned.is_empty() {
        let pins: Vec<String> = pinned
            .iter()
            .map(|m| format!("\"{}\" . {} . {}", m.port, mac(m), m.address))
            .collect();
        script.push_str(&format!(
            "add element bridge juice ports {{ {} }}\n",
            pins.join(", ")
        ));
    }
    if !legacy.is_empty() {
        let pins: Vec<String> = legacy
            .iter()
            .map(|m| format!("{} . {}", mac(m), m.address))
            .collect();
        script.push_str(&format!(
            "add element bridge juice unpinned {{ {} }}\n",
            pins.join(", ")
        ));
    }
    for old in previous {
        script.push_str(&format!("delete set bridge juice {old}\n"));
    }
    let linked: BTreeSet<&str> = members
        .iter()
        .flat_map(|m| {
            m.links
                .iter()
                .map(String::as_str)
                .chain(if m.links.is_empty() {
                    None
                } else {
                    Some(m.group.as_str())
                })
        })
        .collect();
    // A lone instance with no links has nothing to allow: no set, no rule (the common `juice run`).
    groups.retain(|g, addresses| addresses.len() > 1 || linked.contains(g));
    let mut made = BTreeSet::new();
    for (group, addresses) in &groups {
        let name = set_name(group);
        script.push_str(&format!(
            "add set bridge juice {name} {{ type ipv4_addr; elements = {{ {} }}; }}\n",
            addresses.join(", ")
        ));
        script.push_str(&format!(
            "add rule bridge juice allow ip saddr @{name} ip daddr @{name} accept\n"
        ));
        made.insert(name);
    }
    let mut pairs = BTreeSet::new();
    for m in members {
        for link in &m.links {
            if groups.contains_key(link.as_str()) && link != &m.group {
                pairs.insert((m.group.clone(), link.clone()));
                pairs.insert((link.clone(), m.group.clone()));
            }
        }
    }
    for (a, b) in pairs {
        script.push_str(&format!(
            "add rule bridge juice allow ip saddr @{} ip daddr @{} accept\n",
            set_name(&a),
            set_name(&b)
        ));
    }
    (script, made)
}

pub(super) fn run(script: &str) -> Result<(), NetworkError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            NetworkError::Nft(format!("cannot run nft (apt-get install nftables): {e}"))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| NetworkError::Nft(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetworkError::Nft(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Makes the rules match `members`; creates the tables the first time. The names of
/// the sets made are kept in `state` so the next change can delete them.
pub fn apply(members: &[Member], bridge: &str, state: &Path) -> Result<(), NetworkError> {
    let previous: BTreeSet<String> = std::fs::read(state)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let (script, made) = update(members, &previous);
    let result = run(&script).or_else(|_| {
        // First use, or the tables were removed by hand: install them, with nothing to delete.
        let (script, _) = update(members, &BTreeSet::new());
        let _ = run(
            "table bridge juice\ntable inet juice\ndelete table bridge juice\ndelete table inet juice\n",
        );
        run(&format!("{}{script}", base_ruleset(bridge)))
    });
    if result.is_ok() {
        let _ = std::fs::write(state, serde_json::to_vec(&made).unwrap_or_default());
    }
    result
}

/// Removes Juice's tables (published ports' `juice_nat` too).
pub fn remove() -> Result<(), NetworkError> {
    run(
        "table bridge juice\ntable inet juice\ntable ip juice_nat\ndelete table bridge juice\ndelete table inet juice\ndelete table ip juice_nat\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn m(name: &str, last: u8, group: &str, links: &[&str]) -> Member {
        Member {
            instance: name.into(),
            address: Ipv4Addr::new(10, 88, 0, last),
            group: group.into(),
            links: links.iter().map(|s| s.to_string()).collect(),
            port: format!("jv-{name}"),
        }
    }

    #[test]
    fn groups_become_sets_and_links_become_rules() {
        let members = [
            m("w1", 2, "web", &["db"]),
            m("w2", 3, "web", &[]),
            m("d", 4, "db", &[]),
            m("x", 5, "my-app", &["gone"]),
        ];
        let (script, made) = update(&members, &["g_old".to_owned()].into());
        assert!(
            script.starts_with(
                "flush chain bridge juice allow\nflush set bridge juice ports\nflush set bridge juice unpinned\nadd element bridge juice ports {"
            ) && script.contains("delete set bridge juice g_old\n"),
            "{script}"
        );
        // Each port is pinned to its own MAC and address.
        assert!(
            script.contains("\"jv-w1\" . 02:4a:0a:58:00:02 . 10.88.0.2"),
            "{script}"
        );
        // An instance recorded before ports were pinned is held to its MAC and address.
        let mut old = m("old", 9, "web", &[]);
        old.port.clear();
        let (legacy, _) = update(&[old], &BTreeSet::new());
        assert!(
            legacy.contains("add element bridge juice unpinned { 02:4a:0a:58:00:09 . 10.88.0.9 }"),
            "{legacy}"
        );
        assert!(script.contains("add set bridge juice g_web { type ipv4_addr; elements = { 10.88.0.2, 10.88.0.3 }; }"), "{script}");
        assert!(
            script.contains("ip saddr @g_web ip daddr @g_web accept"),
            "{script}"
        );
        assert!(
            script.contains("ip saddr @g_web ip daddr @g_db accept")
                && script.contains("ip saddr @g_db ip daddr @g_web accept"),
            "{script}"
        );
        assert!(
            !script.contains("g_gone"),
            "a link to a group with no instance makes no rule: {script}"
        );
        assert!(
            !script.contains("@g_my_app ip daddr @g_web")
                && !script.contains("@g_my_app ip daddr @g_db"),
            "{script}"
        );
        assert_eq!(
            made,
            ["g_db", "g_my_app", "g_web"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        let (empty, none) = update(&[], &made);
        assert!(
            empty.contains("delete set bridge juice g_web") && none.is_empty(),
            "{empty}"
        );
        assert!(base_ruleset("juice0").contains(r#"iifname "juice0" drop"#));
    }

    /// The whole ruleset and an update load into a real nft, in a network
    /// namespace of the test's own (nothing on the host changes).
    #[test]
    fn the_ruleset_loads_into_the_kernel() {
        if !nix::unistd::geteuid().is_root() {
            panic!(
                "this test needs root (CI runs as root): it loads the rules into a private network namespace"
            );
        }
        let members = [m("w1", 2, "web", &[]), m("w2", 3, "web", &[])];
        let (script, _) = update(&members, &BTreeSet::new());
        let out = Command::new("unshare")
            .args(["--net", "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(format!("{}{script}", base_ruleset("juice0")).as_bytes())?;
                c.wait_with_output()
            })
            .expect("unshare and nft run (apt-get install nftables)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
