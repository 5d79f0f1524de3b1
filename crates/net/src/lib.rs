//! Juice's instance networking, shared by the sandbox and the microVM
//! backends: a veth (or a tap) from each instance to the `juice0` bridge, an
//! address from a persisted pool, default-deny between instances (nftables),
//! and published ports.
//!
//! - Links and addresses go through netlink (`rtnetlink`); the inside of an
//!   instance is configured from a thread that enters its network namespace.
//! - Filtering is one nftables ruleset owned by Juice (`table bridge juice`
//!   and `table inet juice`). The bridge and the tables are host
//!   infrastructure, made on first use and kept (like `docker0`); per
//!   instance only the `allowed` set changes, in one transaction.
//! - Published ports are nftables DNAT (`table ip juice_nat`, see `publish`),
//!   so they do not depend on the process that published them.
//! - An instance's veth dies with its network namespace, so a crashed caller
//!   leaves no interface; addresses and rules of dead instances are released
//!   by the backends' `cleanup_stale`.
//!
//! Written for Juice: the rules are Juice's own (which instance may reach
//! which, pinned by address and MAC); the commodity parts come from
//! `rtnetlink` (links and addresses) and the `nft` program (rule sets).

mod ipam;
mod links;
mod nft;
pub mod publish;

/// Phase timings on stderr when `JUICE_TRACE` is set: where a start spends its time.
pub mod trace {
    use std::sync::OnceLock;
    use std::time::Instant;

    fn start() -> Option<&'static Instant> {
        static START: OnceLock<Option<Instant>> = OnceLock::new();
        START
            .get_or_init(|| std::env::var_os("JUICE_TRACE").map(|_| Instant::now()))
            .as_ref()
    }

    /// Prints `phase` with the microseconds since the first call in this process.
    pub fn mark(phase: &str) {
        if let Some(t) = start() {
            eprintln!("juice-trace {:>8} us  {phase}", t.elapsed().as_micros());
        }
    }
}

use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use ipam::Subnet;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("nftables: {0}")]
    Nft(String),
    #[error("the subnet {0} has no free address left")]
    Exhausted(String),
    #[error("{0:?} is not a port mapping like 8080:80 or 127.0.0.1:8080:80")]
    BadPort(String),
    #[error("{0:?} is not a subnet like 10.88.0.0/16")]
    BadSubnet(String),
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, so
/// a reader (or a crash) never sees half a record.
pub(crate) fn write_json_atomically(
    path: &std::path::Path,
    value: &impl Serialize,
) -> Result<(), NetworkError> {
    let io = |action, path: &std::path::Path| {
        let path = path.to_owned();
        move |source| NetworkError::Io {
            action,
            path,
            source,
        }
    };
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| io("encode", path)(std::io::Error::other(e)))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))
}

/// A host port forwarded to an instance port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub port: u16,
}

impl std::str::FromStr for PortMapping {
    type Err = NetworkError;
    /// `HOST:CONTAINER` or `IP:HOST:CONTAINER`.
    fn from_str(s: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::BadPort(s.to_owned());
        let parts: Vec<&str> = s.split(':').collect();
        let (ip, host, port) = match parts.as_slice() {
            [h, c] => (Ipv4Addr::UNSPECIFIED, *h, *c),
            [ip, h, c] => (ip.parse().map_err(|_| bad())?, *h, *c),
            _ => return Err(bad()),
        };
        let host_port: u16 = host.parse().map_err(|_| bad())?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host_port == 0 || port == 0 {
            return Err(bad());
        }
        Ok(PortMapping {
            host_ip: ip,
            host_port,
            port,
        })
    }
}

/// How an instance joins the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub bridge: String,
    pub subnet: Subnet,
    pub ports: Vec<PortMapping>,
    /// Instances of the same group may talk to each other.
    pub group: String,
    /// Other groups this instance may talk to (both ways).
    pub links: Vec<String>,
}

impl NetworkSpec {
    /// The defaults: bridge `juice0`, subnet 10.88.0.0/16.
    pub fn new(group: &str) -> NetworkSpec {
        NetworkSpec {
            bridge: "juice0".into(),
            subnet: Subnet::default(),
            ports: Vec::new(),
            group: group.to_owned(),
            links: Vec::new(),
        }
    }
}

/// An instance's place on the network, kept in its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub instance: String,
    pub bridge: String,
    pub subnet: Subnet,
    pub address: Ipv4Addr,
    /// The host end of the veth.
    pub veth: String,
    pub group: String,
    pub links: Vec<String>,
    pub ports: Vec<PortMapping>,
}

/// Reserves an address for `instance`.
pub fn allocate(
    home: &Path,
    instance: &str,
    spec: &NetworkSpec,
) -> Result<Attachment, NetworkError> {
    // Unique per start: the veth of an earlier instance of this name may still be
    // going away with its namespace.
    let veth = links::veth_name(&format!(
        "{instance}/{}/{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let member = ipam::allocate(home, instance, spec, &veth)?;
    Ok(Attachment {
        instance: instance.to_owned(),
        bridge: spec.bridge.clone(),
        subnet: spec.subnet,
        address: member.address,
        veth: if member.port.is_empty() {
            veth
        } else {
            member.port
        },
        group: spec.group.clone(),
        links: spec.links.clone(),
        ports: spec.ports.clone(),
    })
}

/// Wires the instance whose init is `pid` to the bridge and opens the allowed paths.
pub fn attach(home: &Path, a: &Attachment, pid: i32) -> Result<(), NetworkError> {
    links::attach(a, pid)?;
    crate::trace::mark("links ready");
    allow_members(home, &a.bridge)?;
    publish_own(home, a)
}

/// An instance started with its own published ports (`juice run -p`) gets
/// DNAT rules to its address, removed by `release`.
fn publish_own(home: &Path, a: &Attachment) -> Result<(), NetworkError> {
    if a.ports.is_empty() {
        return Ok(());
    }
    publish::set(
        home,
        &publish::run_owner(&a.instance),
        &a.bridge,
        &a.ports,
        &[a.address],
    )
}

/// Puts a microVM's tap on the bridge and opens the allowed paths; the tap
/// lives as long as the returned fd (hand it to the VMM).
pub fn attach_tap(home: &Path, a: &Attachment) -> Result<std::os::fd::OwnedFd, NetworkError> {
    let tap = links::attach_tap(a)?;
    allow_members(home, &a.bridge)?;
    publish_own(home, a)?;
    Ok(tap)
}

/// The MAC an instance with `address` gets (02:4a and the address), so that a
/// neighbour entry left by an earlier instance with that address stays right.
pub fn mac_for(address: Ipv4Addr) -> [u8; 6] {
    let m = links::mac_for(address);
    [m[0], m[1], m[2], m[3], m[4], m[5]]
}

/// Frees the address and drops the instance from the allowed pairs. The veth
/// needs nothing: it goes with the instance's network namespace (its peer was
/// created inside it), which the kernel tears down once the last process exits.
pub fn release(home: &Path, a: &Attachment) {
    let _ = publish::set(home, &publish::run_owner(&a.instance), &a.bridge, &[], &[]);
    // The rules are written from the members under the same lock: a start and a
    // release running at once must not each write a set that lacks the other.
    if let Ok(_lock) = ipam::lock(home)
        && let Ok(remaining) = ipam::release_locked(home, &a.instance)
    {
        let _ = nft::apply(&remaining, &a.bridge, &ipam::nft_state(home));
    }
    crate::trace::mark("rules updated");
}

/// Frees whatever address `instance` holds, for an instance that never
/// finished starting (its starter was killed): there is no attachment to read.
pub fn release_name(home: &Path, instance: &str) {
    let bridge = NetworkSpec::new("").bridge;
    let _ = publish::set(home, &publish::run_owner(instance), &bridge, &[], &[]);
    if let Ok(_lock) = ipam::lock(home)
        && let Ok(remaining) = ipam::release_locked(home, instance)
    {
        let _ = nft::apply(&remaining, &bridge, &ipam::nft_state(home));
    }
}

/// Writes the rules for every member, under the members' lock.
fn allow_members(home: &Path, bridge: &str) -> Result<(), NetworkError> {
    let _lock = ipam::lock(home)?;
    nft::apply(&ipam::members_locked(home), bridge, &ipam::nft_state(home))
}

/// Removes the bridge and Juice's nftables tables (host infrastructure that
/// is otherwise kept between instances).
pub fn remove_infrastructure(bridge: &str) -> Result<(), NetworkError> {
    nft::remove()?;
    links::remove_bridge(bridge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings_parse() {
        let p: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(
            (p.host_ip, p.host_port, p.port),
            (Ipv4Addr::UNSPECIFIED, 8080, 80)
        );
        let p: PortMapping = "127.0.0.1:9000:8080".parse().unwrap();
        assert_eq!(p.host_ip, Ipv4Addr::LOCALHOST);
        for bad in [
            "",
            "80",
            "0:80",
            "80:0",
            "a:b",
            "1.2.3:80:80",
            "1:2:3:4",
            "70000:80",
        ] {
            assert!(bad.parse::<PortMapping>().is_err(), "{bad}");
        }
    }
}
