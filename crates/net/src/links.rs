//! Bridge and veth plumbing over netlink.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use super::{Attachment, NetworkError};

fn nl(what: &str) -> impl FnOnce(rtnetlink::Error) -> NetworkError + '_ {
    move |e| NetworkError::Netlink(format!("{what}: {e}"))
}

/// `jv` and 8 hex digits of a hash of the instance name: unique, under IFNAMSIZ.
pub fn veth_name(instance: &str) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c9dc5;
    for b in instance.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x01000193);
    }
    format!("jv{h:08x}")
}

/// A locally administered unicast MAC derived from an IPv4 address: 02:4a:a.b.c.d.
pub fn mac_for(address: Ipv4Addr) -> Vec<u8> {
    let o = address.octets();
    vec![0x02, 0x4a, o[0], o[1], o[2], o[3]]
}

/// Runs netlink work on a fresh single-threaded runtime in the current thread's namespace.
fn with_handle<T>(
    f: impl AsyncFnOnce(Handle) -> Result<T, NetworkError>,
) -> Result<T, NetworkError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| NetworkError::Netlink(format!("runtime: {e}")))?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetworkError::Netlink(format!("socket: {e}")))?;
        let task = tokio::spawn(conn);
        let r = f(handle).await;
        task.abort();
        r
    })
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(NetworkError::Netlink(format!("look up {name}: {e}"))),
    }
}

/// Creates the bridge with the gateway address if it is missing; returns its index.
async fn ensure_bridge(handle: &Handle, a: &Attachment) -> Result<u32, NetworkError> {
    if let Some(i) = index_of(handle, &a.bridge).await? {
        return Ok(i);
    }
    match handle
        .link()
        .add(LinkBridge::new(&a.bridge).up().build())
        .execute()
        .await
    {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
        Err(e) => {
            return Err(NetworkError::Netlink(format!(
                "create bridge {}: {e}",
                a.bridge
            )));
        }
    }
    let index = index_of(handle, &a.bridge)
        .await?
        .ok_or_else(|| NetworkError::Netlink(format!("bridge {} vanished", a.bridge)))?;
    match handle
        .address()
        .add(index, IpAddr::V4(a.subnet.gateway()), a.subnet.prefix)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
        Err(e) => return Err(NetworkError::Netlink(format!("address {}: {e}", a.bridge))),
    }
    Ok(index)
}

/// Puts the host-side link `name` (a veth end or a tap) on the bridge and brings it up.
async fn enslave_and_up(
    handle: &Handle,
    name: &str,
    bridge: u32,
    what: &'static str,
) -> Result<(), NetworkError> {
    let index = index_of(handle, name)
        .await?
        .ok_or_else(|| NetworkError::Netlink(format!("{name} vanished")))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .controller(bridge)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(what))
}

/// The veth pair, its host end on the bridge, its other end as `eth0` in the instance.
pub fn attach(a: &Attachment, pid: i32) -> Result<(), NetworkError> {
    let ns_pid = u32::try_from(pid)
        .map_err(|_| NetworkError::Netlink(format!("attach: {pid} is not a process id")))?;
    with_handle(async |handle: Handle| {
        let bridge = ensure_bridge(&handle, a).await?;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name("eth0".to_owned())
            // The MAC follows the address (as Docker does): a host neighbour entry left by an
            // earlier instance with this address stays right, so probes reach the new one at once.
            .address(mac_for(a.address))
            .setns_by_pid(ns_pid)
            .build();
        let mut veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(
            rtnetlink::packet_route::link::InfoKind::Veth,
        )
        .name(a.veth.clone())
        .build();
        veth.attributes.iter_mut().for_each(|attr| {
            if let LinkAttribute::LinkInfo(infos) = attr {
                infos.push(rtnetlink::packet_route::link::LinkInfo::Data(
                    InfoData::Veth(InfoVeth::Peer(peer.clone())),
                ));
            }
        });
        handle
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(nl("create the veth pair"))?;
        enslave_and_up(&handle, &a.veth, bridge, "attach the veth to the bridge").await
    })?;
    crate::trace::mark("veth on the bridge");
    configure_inside(a, pid)
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags (40 bytes in all).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap device named `a.veth` on the bridge, for a microVM. It lives as long as
/// the returned fd (and the copies a VMM inherits), so it goes with the VM.
pub fn attach_tap(a: &Attachment) -> Result<std::os::fd::OwnedFd, NetworkError> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| NetworkError::Io {
            action: "open",
            path: "/dev/net/tun".into(),
            source,
        })?;
    // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR is 0x5002, which fits the kernel's short `ifr_flags`.
    #[allow(clippy::cast_possible_truncation)]
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    let name = a.veth.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(NetworkError::Netlink(format!(
            "tap name {} is too long",
            a.veth
        )));
    }
    req.name[..name.len()].copy_from_slice(name);
    // SAFETY: TUNSETIFF reads (and writes back) one `struct ifreq`, which `req` is laid out as.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(NetworkError::Netlink(format!(
            "create tap {}: {}",
            a.veth,
            std::io::Error::last_os_error()
        )));
    }
    with_handle(async |handle: Handle| {
        let bridge = ensure_bridge(&handle, a).await?;
        enslave_and_up(&handle, &a.veth, bridge, "attach the tap to the bridge").await
    })?;
    Ok(tun.into())
}

/// Addresses and routes inside the instance, from a thread that enters its network namespace.
fn configure_inside(a: &Attachment, pid: i32) -> Result<(), NetworkError> {
    let ns_path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&ns_path).map_err(|source| NetworkError::Io {
        action: "open",
        path: ns_path.into(),
        source,
    })?;
    let a = a.clone();
    std::thread::spawn(move || {
        // setns affects only this thread, which ends when the work is done.
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetworkError::Netlink(format!("enter the instance's network: {e}")))?;
        with_handle(async |handle: Handle| {
            for (name, addr) in [("lo", None), ("eth0", Some(a.address))] {
                let index = index_of(&handle, name)
                    .await?
                    .ok_or_else(|| NetworkError::Netlink(format!("{name} missing inside")))?;
                if let Some(addr) = addr {
                    handle
                        .address()
                        .add(index, IpAddr::V4(addr), a.subnet.prefix)
                        .execute()
                        .await
                        .map_err(nl("add the address"))?;
                }
                handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute()
                    .await
                    .map_err(nl("bring the link up"))?;
            }
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(a.subnet.gateway())
                .build();
            handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(nl("add the default route"))
        })
    })
    .join()
    .map_err(|_| NetworkError::Netlink("the namespace thread panicked".into()))?
}

async fn delete(handle: &Handle, name: &str) -> Result<(), NetworkError> {
    if let Some(i) = index_of(handle, name).await? {
        match handle.link().del(i).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => return Err(NetworkError::Netlink(format!("delete {name}: {e}"))),
        }
    }
    Ok(())
}

pub fn remove_bridge(name: &str) -> Result<(), NetworkError> {
    with_handle(async |handle: Handle| delete(&handle, name).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_follow_addresses() {
        assert_eq!(
            mac_for(Ipv4Addr::new(10, 88, 0, 2)),
            [0x02, 0x4a, 10, 88, 0, 2]
        );
        assert_eq!(mac_for(Ipv4Addr::new(10, 88, 0, 2))[0] & 0x01, 0, "unicast");
    }

    #[test]
    fn veth_names_fit_and_differ() {
        let a = veth_name("web-1");
        assert_eq!(a.len(), 10);
        assert!(a.len() < libc::IFNAMSIZ);
        assert_ne!(a, veth_name("web-2"));
        assert_eq!(a, veth_name("web-1"));
    }
}
