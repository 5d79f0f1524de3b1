//! Published ports: nftables DNAT in `table ip juice_nat`, so a published port
//! answers whether or not the process that published it is running (a daemon
//! being killed, restarted or upgraded; the rules stay as they were).
//!
//! - Each owner (a daemon's group, a `juice run` instance) has two base chains
//!   of its own, `pre_<id>` (hook prerouting, priority dstnat: clients on
//!   other hosts) and `out_<id>` (hook output, priority -100: the host's own
//!   clients, 127.0.0.1 included), where `<id>` is a hash of the Juice home
//!   and the owner. Owners never touch each other's chains, so two homes (or a
//!   daemon and `juice run`) share the table without overwriting each other's
//!   rules (but a host port published by both is not detected: one rule wins).
//! - A mapping `[IP:]HOST:PORT` matches `ip daddr IP` (any local address when
//!   IP is 0.0.0.0) and `tcp dport HOST`, and DNATs to `PORT` on the owner's
//!   targets; with several, connections are spread by `numgen inc`.
//! - No target (no instance ready): no rule, so the connection reaches the
//!   host itself, where Juice holds nothing: refused (a TCP reset), unless a
//!   host process listens on that port.
//! - Clients on other hosts need the kernel to forward their DNATed packets to
//!   the bridge and the replies back: publishing turns `net.ipv4.ip_forward` on
//!   where it is off, as Docker does (a Juice OS host, or a fresh Debian, has it
//!   off). Instances still cannot use the host as a gateway: `table inet juice`
//!   drops anything forwarded from the bridge that is not a reply.
//! - Clients from the host's loopback need `route_localnet` on the bridge and
//!   a masquerade of 127.0.0.0/8 sources leaving it (chain `post_<bridge>`),
//!   as Docker does without its userland proxy. Instances cannot forge such a
//!   source: the bridge table pins each port to its own address.
//! - Connections that instances open toward the host never match: the
//!   prerouting chains skip the bridge, and `table inet juice` drops them.
//! - Every change is one idempotent `nft -f` transaction (`add` then `flush`),
//!   so it also works when the table was removed by hand; what each owner
//!   published is kept in `$JUICE_HOME/network/published.json`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{NetworkError, PortMapping};

/// What one owner publishes right now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub bridge: String,
    pub ports: Vec<PortMapping>,
    /// Where connections go (ready instances); empty: refused.
    pub targets: Vec<Ipv4Addr>,
}

/// The owner of a `juice run` instance's ports.
pub fn run_owner(instance: &str) -> String {
    format!("run:{instance}")
}

/// The owner of a daemon group's ports.
pub fn group_owner(group: &str) -> String {
    format!("group:{group}")
}

fn state_path(home: &Path) -> PathBuf {
    super::ipam::dir(home).join("published.json")
}

/// What each owner of this home published last (as the kernel has it, unless
/// someone changed the rules by hand).
pub fn current(home: &Path) -> BTreeMap<String, Published> {
    std::fs::read(state_path(home))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// A stable id for `owner` in `home`: 64-bit FNV-1a in hex, so chain names are
/// short, valid and distinct between homes.
fn chain_id(home: &Path, owner: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in home
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .chain(b"\0")
        .chain(owner.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The transaction that makes the chains of the owners in `changes` match
/// (`None`: the owner publishes nothing any more, its chains are deleted).
pub fn script(home: &Path, changes: &BTreeMap<String, Option<Published>>) -> String {
    let mut s = String::from("add table ip juice_nat\n");
    let mut bridges: Vec<&str> = changes
        .values()
        .flatten()
        .map(|p| p.bridge.as_str())
        .collect();
    bridges.sort_unstable();
    bridges.dedup();
    // One masquerade chain per bridge, shared by the homes that use it.
    for b in &bridges {
        let chain = format!(
            "post_{}",
            b.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        s.push_str(&format!(
            "add chain ip juice_nat {chain} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             flush chain ip juice_nat {chain}\n\
             add rule ip juice_nat {chain} oifname \"{b}\" ip saddr 127.0.0.0/8 masquerade\n"
        ));
    }
    for (owner, published) in changes {
        let id = chain_id(home, owner);
        let chains = [
            (format!("pre_{id}"), "prerouting priority dstnat"),
            (format!("out_{id}"), "output priority -100"),
        ];
        for (chain, hook) in &chains {
            s.push_str(&format!(
                "add chain ip juice_nat {chain} {{ type nat hook {hook}; policy accept; }}\nflush chain ip juice_nat {chain}\n"
            ));
        }
        let Some(p) = published else {
            for (chain, _) in &chains {
                s.push_str(&format!("delete chain ip juice_nat {chain}\n"));
            }
            continue;
        };
        if p.targets.is_empty() {
            continue;
        }
        for m in &p.ports {
            let daddr = if m.host_ip.is_unspecified() {
                "fib daddr type local".to_owned()
            } else {
                format!("ip daddr {}", m.host_ip)
            };
            let to = match p.targets.as_slice() {
                [one] => format!("{one}:{}", m.port),
                many => format!(
                    "numgen inc mod {} map {{ {} }} : {}",
                    many.len(),
                    many.iter()
                        .enumerate()
                        .map(|(i, t)| format!("{i} : {t}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    m.port
                ),
            };
            let rule = format!("{daddr} tcp dport {} dnat ip to {to}", m.host_port);
            s.push_str(&format!(
                "add rule ip juice_nat {} iifname != \"{}\" {rule}\n",
                chains[0].0, p.bridge
            ));
            s.push_str(&format!("add rule ip juice_nat {} {rule}\n", chains[1].0));
        }
    }
    s
}

/// Lets the host's loopback clients reach instances behind `bridge` (packets
/// from 127.0.0.0/8 may leave through it once masqueraded).
fn route_localnet(bridge: &str) -> Result<(), NetworkError> {
    let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"));
    if std::fs::read(&path).is_ok_and(|v| v.starts_with(b"1")) {
        return Ok(());
    }
    std::fs::write(&path, "1").map_err(|source| NetworkError::Io {
        action: "write",
        path,
        source,
    })
}

/// Turns IPv4 forwarding on, for clients on other hosts (see the module's notes).
fn ip_forward() -> Result<(), NetworkError> {
    let path = PathBuf::from("/proc/sys/net/ipv4/ip_forward");
    if std::fs::read(&path).is_ok_and(|v| v.starts_with(b"1")) {
        return Ok(());
    }
    std::fs::write(&path, "1").map_err(|source| NetworkError::Io {
        action: "write",
        path,
        source,
    })
}

/// Makes the kernel's rules for the owners in `changes` match them, in one
/// transaction, and records them. Owners not named are left as they are.
pub fn apply(
    home: &Path,
    changes: &BTreeMap<String, Option<Published>>,
) -> Result<(), NetworkError> {
    if changes.is_empty() {
        return Ok(());
    }
    let _lock = super::ipam::lock(home)?;
    let mut all = current(home);
    for p in changes.values().flatten() {
        route_localnet(&p.bridge)?;
        if !p.ports.is_empty() {
            ip_forward()?;
        }
    }
    super::nft::run(&script(home, changes))?;
    for (owner, p) in changes {
        match p {
            Some(p) => all.insert(owner.clone(), p.clone()),
            None => all.remove(owner),
        };
    }
    super::write_json_atomically(&state_path(home), &all)
}

/// Publishes `ports` of one owner to `targets` (or, with no ports, removes what it published).
pub fn set(
    home: &Path,
    owner: &str,
    bridge: &str,
    ports: &[PortMapping],
    targets: &[Ipv4Addr],
) -> Result<(), NetworkError> {
    let p = (!ports.is_empty()).then(|| Published {
        bridge: bridge.to_owned(),
        ports: ports.to_vec(),
        targets: targets.to_vec(),
    });
    if p.is_none() && !current(home).contains_key(owner) {
        return Ok(());
    }
    apply(home, &[(owner.to_owned(), p)].into())
}

#[cfg(test)]
mod tests {
    use super::super::ipam::Member;
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn changes() -> BTreeMap<String, Option<Published>> {
        let web = Published {
            bridge: "juice0".into(),
            ports: vec![
                "127.0.0.1:18080:8080".parse().unwrap(),
                "9000:80".parse().unwrap(),
            ],
            targets: vec![Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 3)],
        };
        let one = Published {
            targets: vec![Ipv4Addr::new(10, 88, 0, 9)],
            ports: vec!["7000:7000".parse().unwrap()],
            ..web.clone()
        };
        let idle = Published {
            targets: vec![],
            ..one.clone()
        };
        [
            (group_owner("web"), Some(web)),
            (run_owner("solo"), Some(one)),
            (group_owner("idle"), Some(idle)),
            (group_owner("gone"), None),
        ]
        .into()
    }

    #[test]
    fn the_script_dnats_each_mapping_to_the_ready_targets() {
        let home = Path::new("/var/lib/juice");
        let s = script(home, &changes());
        let id = |o: &str| chain_id(home, o);
        let (web, solo, idle, gone) = (
            id(&group_owner("web")),
            id(&run_owner("solo")),
            id(&group_owner("idle")),
            id(&group_owner("gone")),
        );
        assert!(s.starts_with("add table ip juice_nat\n"), "{s}");
        assert!(
            s.contains("add rule ip juice_nat post_juice0 oifname \"juice0\" ip saddr 127.0.0.0/8 masquerade\n"),
            "{s}"
        );
        // A bind address restricts the destination; several targets are spread.
        assert!(s.contains(&format!("add rule ip juice_nat out_{web} ip daddr 127.0.0.1 tcp dport 18080 dnat ip to numgen inc mod 2 map {{ 0 : 10.88.0.2, 1 : 10.88.0.3 }} : 8080\n")), "{s}");
        // From other hosts, not from the bridge (instances cannot reach the host).
        assert!(s.contains(&format!("add rule ip juice_nat pre_{web} iifname != \"juice0\" fib daddr type local tcp dport 9000 dnat ip to numgen inc mod 2 map")), "{s}");
        assert!(
            s.contains(&format!(
                "add rule ip juice_nat out_{solo} fib daddr type local tcp dport 7000 dnat ip to 10.88.0.9:7000\n"
            )),
            "{s}"
        );
        // No ready target: the chains exist and are empty.
        assert!(
            s.contains(&format!("flush chain ip juice_nat out_{idle}\n"))
                && !s.contains(&format!("add rule ip juice_nat out_{idle}")),
            "{s}"
        );
        assert!(
            s.contains(&format!(
                "flush chain ip juice_nat out_{gone}\ndelete chain ip juice_nat pre_{gone}\ndelete chain ip juice_nat out_{gone}\n"
            )),
            "{s}"
        );
        // Withdrawing touches no masquerade chain (other homes may need it).
        let withdraw = script(home, &[(group_owner("gone"), None)].into());
        assert!(!withdraw.contains("post_"), "{withdraw}");
        // Two homes never share a chain.
        assert_ne!(web, chain_id(Path::new("/other"), &group_owner("web")));
    }

    /// The script loads into a real nft twice (it is idempotent), in a network
    /// namespace of the test's own (nothing on the host changes), after Juice's
    /// filter tables.
    #[test]
    fn the_nat_rules_load_into_the_kernel() {
        if !nix::unistd::geteuid().is_root() {
            panic!(
                "this test needs root (CI runs as root): it loads the rules into a private network namespace"
            );
        }
        let home = Path::new("/var/lib/juice");
        let s = script(home, &changes());
        let all = format!("{}{s}{s}", super::super::nft::base_ruleset("juice0"));
        let out = Command::new("unshare")
            .args([
                "--net",
                "sh",
                "-c",
                "nft -f - && nft list table ip juice_nat",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().expect("stdin").write_all(all.as_bytes())?;
                c.wait_with_output()
            })
            .expect("unshare and nft run (apt-get install nftables)");
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            listed.contains("numgen inc mod 2 map { 0 : 10.88.0.2, 1 : 10.88.0.3 }")
                && !listed.contains(&chain_id(home, &group_owner("gone"))),
            "{listed}"
        );
    }

    /// A network namespace held by `unshare --net sleep`, gone with it.
    struct Ns(std::process::Child);

    impl Ns {
        fn new() -> Ns {
            Ns(Command::new("unshare")
                .args(["--net", "sleep", "120"])
                .spawn()
                .expect("unshare runs"))
        }
        fn pid(&self) -> u32 {
            self.0.id()
        }
        /// Runs a shell script inside.
        fn sh(&self, script: &str) {
            let out = Command::new("nsenter")
                .arg(format!("--net=/proc/{}/ns/net", self.pid()))
                .args(["sh", "-ec", script])
                .output()
                .expect("nsenter runs");
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        /// Runs `f` on a thread inside (sockets it makes stay in the namespace).
        fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            let ns = std::fs::File::open(format!("/proc/{}/ns/net", self.pid())).unwrap();
            std::thread::spawn(move || {
                use std::os::fd::AsFd;
                // setns affects only this thread, which ends with `f`.
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        }
    }

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The rules at work, in three namespaces of the test's own: a "host" with
    /// the bridge and Juice's tables, an "instance" behind it (10.88.0.2,
    /// pinned MAC) answering on 8080, and a "client" host on another link.
    /// A published port answers from the host's loopback and from the other
    /// host, is refused with no target, and is not reachable by the instance
    /// through the host.
    #[test]
    fn dnat_reaches_the_instance_from_loopback_and_from_another_host() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (CI runs as root): it makes private network namespaces");
        }
        let (host, instance, client) = (Ns::new(), Ns::new(), Ns::new());
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mac = super::super::mac_for(Ipv4Addr::new(10, 88, 0, 2))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        host.sh(&format!(
            "ip link set lo up
             ip link add juice0 type bridge && ip addr add 10.88.0.1/16 dev juice0 && ip link set juice0 up
             ip link add jv-test type veth peer name eth0 address {mac} netns {i}
             ip link set jv-test master juice0 up
             ip link add wan type veth peer name wan netns {c}
             ip addr add 192.168.77.1/24 dev wan && ip link set wan up
             echo 1 > /proc/sys/net/ipv4/ip_forward",
            i = instance.pid(),
            c = client.pid()
        ));
        instance.sh(
            "ip link set lo up && ip addr add 10.88.0.2/16 dev eth0 && ip link set eth0 up
             ip route add default via 10.88.0.1",
        );
        client.sh("ip link set lo up && ip addr add 192.168.77.2/24 dev wan && ip link set wan up");
        let member = Member {
            instance: "i".into(),
            address: Ipv4Addr::new(10, 88, 0, 2),
            group: "web".into(),
            links: vec![],
            port: "jv-test".into(),
        };
        let (filter, _) = super::super::nft::update(&[member], &Default::default());
        let home = Path::new("/var/lib/juice");
        let publish = |targets: Vec<Ipv4Addr>| {
            let changes = [(
                group_owner("web"),
                Some(Published {
                    bridge: "juice0".into(),
                    ports: vec![
                        "127.0.0.1:18080:8080".parse().unwrap(),
                        "9000:8080".parse().unwrap(),
                    ],
                    targets,
                }),
            )]
            .into();
            script(home, &changes)
        };
        let load = |s: String| {
            let out = Command::new("nsenter")
                .arg(format!("--net=/proc/{}/ns/net", host.pid()))
                .args(["nft", "-f", "-"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().expect("stdin").write_all(s.as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        load(format!(
            "{}{filter}{}",
            super::super::nft::base_ruleset("juice0"),
            publish(vec![Ipv4Addr::new(10, 88, 0, 2)])
        ));
        host.sh("echo 1 > /proc/sys/net/ipv4/conf/juice0/route_localnet");

        let listener = instance.run(|| std::net::TcpListener::bind("10.88.0.2:8080").unwrap());
        let server = std::thread::spawn(move || {
            for c in listener.incoming().take(2) {
                let _ = c.unwrap().write_all(b"hello");
            }
        });
        let read = |to: &'static str| {
            move || -> std::io::Result<String> {
                use std::io::Read;
                let mut s = std::net::TcpStream::connect_timeout(
                    &to.parse().unwrap(),
                    std::time::Duration::from_secs(2),
                )?;
                s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
                let mut b = String::new();
                s.read_to_string(&mut b)?;
                Ok(b)
            }
        };
        assert_eq!(
            host.run(read("127.0.0.1:18080")).unwrap(),
            "hello",
            "from the host's loopback"
        );
        assert_eq!(
            client.run(read("192.168.77.1:9000")).unwrap(),
            "hello",
            "from another host"
        );
        server.join().unwrap();
        // The bind address restricts the destination: port 18080 on another address is not published.
        assert!(client.run(read("192.168.77.1:18080")).is_err());
        // The instance cannot use the host's published port (prerouting skips the bridge,
        // and the input chain drops new connections from it).
        assert!(instance.run(read("10.88.0.1:9000")).is_err());
        // No target: refused by the host.
        load(publish(vec![]));
        let refused = host.run(read("127.0.0.1:18080")).unwrap_err();
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
    }
}
