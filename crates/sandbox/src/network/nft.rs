//! Juice's nftables rules. The tables are created on first use and kept; each
//! change replaces the `allowed` set's elements in one `nft -f` transaction.
//!
//! - `table bridge juice`: frames between two instance veths pass only for
//!   address pairs in the `allowed` set (same group or a declared link).
//! - `table inet juice`: instances cannot open connections to the host;
//!   replies to connections the host opened (health probes, published ports) pass.

use std::io::Write;
use std::process::{Command, Stdio};

use super::NetworkError;
use super::ipam::Member;

/// The address pairs that may talk, as nft set elements.
pub fn allowed_pairs(members: &[Member]) -> Vec<String> {
    let mut pairs = Vec::new();
    for a in members {
        for b in members {
            if a.instance != b.instance && a.may_talk_to(b) {
                pairs.push(format!("{} . {}", a.address, b.address));
            }
        }
    }
    pairs
}

/// Juice's tables, created once and kept (like the bridge): only the set changes per instance.
pub fn base_ruleset(bridge: &str) -> String {
    format!(
        r#"table bridge juice {{
    set allowed {{
        type ipv4_addr . ipv4_addr
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        meta protocol ip iifname "jv*" oifname "jv*" ip saddr . ip daddr @allowed accept
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
}}
"#
    )
}

/// Replaces the set's elements with exactly the pairs for `members`, in one transaction.
pub fn set_update(members: &[Member]) -> String {
    let pairs = allowed_pairs(members);
    let mut script = String::from("flush set bridge juice allowed\n");
    if !pairs.is_empty() {
        script.push_str(&format!(
            "add element bridge juice allowed {{ {} }}\n",
            pairs.join(", ")
        ));
    }
    script
}

fn nft(script: &str) -> Result<(), NetworkError> {
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

/// Makes the allowed set exactly the pairs for `members`; creates the tables the first time.
pub fn apply(members: &[Member], bridge: &str) -> Result<(), NetworkError> {
    let update = set_update(members);
    if nft(&update).is_ok() {
        return Ok(());
    }
    // The tables are missing (first use, or removed by hand): install them with the elements.
    nft(&format!("{}{update}", base_ruleset(bridge)))
}

/// Removes Juice's tables.
pub fn remove() -> Result<(), NetworkError> {
    nft(
        "table bridge juice\ntable inet juice\ndelete table bridge juice\ndelete table inet juice\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn only_declared_pairs_are_allowed() {
        let m = |name: &str, last: u8, group: &str, links: &[&str]| Member {
            instance: name.into(),
            address: Ipv4Addr::new(10, 88, 0, last),
            group: group.into(),
            links: links.iter().map(|s| s.to_string()).collect(),
        };
        let rules = set_update(&[
            m("w1", 2, "web", &["db"]),
            m("w2", 3, "web", &[]),
            m("d", 4, "db", &[]),
            m("x", 5, "other", &[]),
        ]);
        for pair in [
            "10.88.0.2 . 10.88.0.3",
            "10.88.0.3 . 10.88.0.2",
            "10.88.0.2 . 10.88.0.4",
            "10.88.0.4 . 10.88.0.2",
        ] {
            assert!(rules.contains(pair), "{pair} missing:\n{rules}");
        }
        for pair in [
            "10.88.0.3 . 10.88.0.4",
            "10.88.0.5 . 10.88.0.2",
            "10.88.0.2 . 10.88.0.5",
        ] {
            assert!(
                !rules.contains(pair),
                "{pair} must not be allowed:\n{rules}"
            );
        }
        assert_eq!(set_update(&[]), "flush set bridge juice allowed\n");
        assert!(base_ruleset("juice0").contains(r#"iifname "juice0" drop"#));
    }
}
