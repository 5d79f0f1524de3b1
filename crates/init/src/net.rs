//! `lo` and one interface over rtnetlink, synchronously: the messages come from
//! `netlink-packet-route`, the socket from `netlink-sys` (no async runtime in PID 1).
//! Shared by the microVM guest's init (`eth0`) and a Juice OS host's PID 1.

use std::net::Ipv4Addr;

use crate::GuestNetwork;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub fn loopback_only() -> Result<(), String> {
    let socket = open()?;
    link_up(&socket, index("lo")?)
}

/// A guest's `eth0`: one address and the default route.
pub fn configure(n: &GuestNetwork) -> Result<(), String> {
    configure_interface("eth0", &[(n.address, n.prefix)], Some(n.gateway))
}

/// Brings up `lo` and `interface` with `addresses` (address, prefix length) and,
/// if given, a default route through `gateway`.
pub fn configure_interface(
    interface: &str,
    addresses: &[(Ipv4Addr, u8)],
    gateway: Option<Ipv4Addr>,
) -> Result<(), String> {
    let socket = open()?;
    link_up(&socket, index("lo")?)?;
    let link = index(interface)?;
    for (address, prefix) in addresses {
        let mut addr = AddressMessage::default();
        addr.header.family = AddressFamily::Inet;
        addr.header.prefix_len = *prefix;
        addr.header.index = link;
        addr.attributes = vec![
            AddressAttribute::Local((*address).into()),
            AddressAttribute::Address((*address).into()),
        ];
        request(
            &socket,
            RouteNetlinkMessage::NewAddress(addr),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add the address {address}/{prefix} to {interface}"),
        )?;
    }
    link_up(&socket, link)?;
    let Some(gateway) = gateway else {
        return Ok(());
    };
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.header.protocol = RouteProtocol::Boot;
    route.header.scope = RouteScope::Universe;
    route.header.kind = RouteType::Unicast;
    route.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet(gateway))];
    request(
        &socket,
        RouteNetlinkMessage::NewRoute(route),
        NLM_F_CREATE | NLM_F_EXCL,
        &format!("add the default route via {gateway}"),
    )
}

/// Whether an interface called `name` exists (a driver may still be probing it).
pub fn exists(name: &str) -> bool {
    index(name).is_ok()
}

fn open() -> Result<Socket, String> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| format!("netlink socket: {e}"))?;
    socket
        .bind_auto()
        .map_err(|e| format!("netlink bind: {e}"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| format!("netlink connect: {e}"))?;
    Ok(socket)
}

fn index(name: &str) -> Result<u32, String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad interface name {name:?}"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(format!("no interface {name}")),
        i => Ok(i),
    }
}

fn link_up(socket: &Socket, index: u32) -> Result<(), String> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    request(
        socket,
        RouteNetlinkMessage::SetLink(link),
        0,
        "bring a link up",
    )
}

/// Sends one request and waits for its acknowledgement.
fn request(
    socket: &Socket,
    msg: RouteNetlinkMessage,
    flags: u16,
    what: &str,
) -> Result<(), String> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .map_err(|e| format!("{what}: netlink send: {e}"))?;
    let (reply, _) = socket
        .recv_from_full()
        .map_err(|e| format!("{what}: netlink receive: {e}"))?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| format!("{what}: netlink reply: {e}"))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(format!(
                "{what}: {}",
                std::io::Error::from_raw_os_error(-code.get())
            )),
        },
        _ => Ok(()),
    }
}
