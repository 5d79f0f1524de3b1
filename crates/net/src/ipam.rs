//! Address allocation, persisted in `$JUICE_HOME/network/allocations.json`
//! under a file lock, so concurrent starts never hand out one address twice.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{NetworkError, NetworkSpec};

/// An IPv4 subnet; the first host address is the bridge (gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Default for Subnet {
    fn default() -> Self {
        Subnet {
            network: Ipv4Addr::new(10, 88, 0, 0),
            prefix: 16,
        }
    }
}

impl Subnet {
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let size = 1u64 << (32 - u64::from(self.prefix));
        // Minus broadcast. `from_str` keeps the network aligned to its prefix, so the
        // broadcast address (network + size - 1) fits in a u32 and this never saturates.
        let last = u32::try_from(u64::from(u32::from(self.network)) + size - 2).unwrap_or(u32::MAX);
        (first..=last).map(Ipv4Addr::from)
    }
}

impl std::str::FromStr for Subnet {
    type Err = NetworkError;
    fn from_str(s: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::BadSubnet(s.to_owned());
        let (net, prefix) = s.split_once('/').ok_or_else(bad)?;
        let network: Ipv4Addr = net.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) || u32::from(network) & (u32::MAX >> prefix) != 0 {
            return Err(bad());
        }
        Ok(Subnet { network, prefix })
    }
}
impl TryFrom<String> for Subnet {
    type Error = NetworkError;
    fn try_from(s: String) -> Result<Self, NetworkError> {
        s.parse()
    }
}
impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}
impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// One allocated address and who may talk to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub instance: String,
    pub address: Ipv4Addr,
    pub group: String,
    pub links: Vec<String>,
    /// The host side of its link (veth or tap), which nftables pins to its
    /// address; empty for members recorded before ports were pinned.
    #[serde(default)]
    pub port: String,
}

pub(super) fn dir(home: &Path) -> PathBuf {
    home.join("network")
}

/// Where the nft module records the sets it made.
pub fn nft_state(home: &Path) -> PathBuf {
    dir(home).join("nft-sets.json")
}

pub(super) fn lock(home: &Path) -> Result<File, NetworkError> {
    let d = dir(home);
    std::fs::create_dir_all(&d).map_err(|source| NetworkError::Io {
        action: "create",
        path: d.clone(),
        source,
    })?;
    let path = d.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| NetworkError::Io {
            action: "open",
            path: path.clone(),
            source,
        })?;
    f.lock().map_err(|source| NetworkError::Io {
        action: "lock",
        path,
        source,
    })?;
    Ok(f)
}

fn load(home: &Path) -> BTreeMap<String, Member> {
    std::fs::read(dir(home).join("allocations.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save(home: &Path, all: &BTreeMap<String, Member>) -> Result<(), NetworkError> {
    super::write_json_atomically(&dir(home).join("allocations.json"), all)
}

/// The lowest free address (or the one `instance` already holds).
/// Reserves an address for `instance`, whose link will be `port`; an instance
/// that has one already keeps its address and port.
pub fn allocate(
    home: &Path,
    instance: &str,
    spec: &NetworkSpec,
    port: &str,
) -> Result<Member, NetworkError> {
    let _lock = lock(home)?;
    let mut all = load(home);
    if let Some(m) = all.get(instance) {
        return Ok(m.clone());
    }
    let used: std::collections::BTreeSet<Ipv4Addr> = all.values().map(|m| m.address).collect();
    let address = spec
        .subnet
        .hosts()
        .find(|a| !used.contains(a))
        .ok_or_else(|| NetworkError::Exhausted(spec.subnet.to_string()))?;
    let member = Member {
        instance: instance.to_owned(),
        address,
        group: spec.group.clone(),
        links: spec.links.clone(),
        port: port.to_owned(),
    };
    all.insert(instance.to_owned(), member.clone());
    save(home, &all)?;
    Ok(member)
}

/// Frees `instance`'s address; returns who is left. The caller holds the lock
/// (and keeps it while it writes the rules for who is left, so that a
/// concurrent start's rules are not lost).
pub(super) fn release_locked(home: &Path, instance: &str) -> Result<Vec<Member>, NetworkError> {
    let mut all = load(home);
    if all.remove(instance).is_some() {
        save(home, &all)?;
    }
    Ok(all.into_values().collect())
}

/// Every member; the caller holds the lock.
pub(super) fn members_locked(home: &Path) -> Vec<Member> {
    load(home).into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_persist_and_never_collide() {
        let t = tempfile::tempdir().unwrap();
        let spec = NetworkSpec::new("web");
        let a = allocate(t.path(), "a", &spec, "jv-a").unwrap().address;
        let b = allocate(t.path(), "b", &spec, "jv-b").unwrap().address;
        assert_eq!(a, Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(b, Ipv4Addr::new(10, 88, 0, 3));
        assert_eq!(
            allocate(t.path(), "a", &spec, "jv-a").unwrap().address,
            a,
            "an instance keeps its address"
        );
        release_locked(t.path(), "a").unwrap();
        assert_eq!(
            allocate(t.path(), "c", &spec, "jv-c").unwrap().address,
            a,
            "freed addresses are reused"
        );
        assert_eq!(members_locked(t.path()).len(), 2);
        // A second allocation keeps the first port: its link is already named.
        assert_eq!(
            allocate(t.path(), "b", &spec, "jv-new").unwrap().port,
            "jv-b"
        );
    }

    #[test]
    fn a_small_subnet_runs_out_cleanly() {
        let t = tempfile::tempdir().unwrap();
        let mut spec = NetworkSpec::new("g");
        spec.subnet = "192.168.7.0/30".parse().unwrap();
        assert_eq!(
            allocate(t.path(), "a", &spec, "jv-a").unwrap().address,
            Ipv4Addr::new(192, 168, 7, 2)
        );
        assert!(matches!(
            allocate(t.path(), "b", &spec, "jv-b"),
            Err(NetworkError::Exhausted(_))
        ));
    }

    #[test]
    fn subnets_parse_strictly() {
        assert_eq!(
            "10.88.0.0/16".parse::<Subnet>().unwrap().gateway(),
            Ipv4Addr::new(10, 88, 0, 1)
        );
        for bad in [
            "10.88.0.1/16",
            "10.88.0.0",
            "10.88.0.0/33",
            "x/16",
            "10.0.0.0/4",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }
}
