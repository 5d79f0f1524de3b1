//! `lo` and `eth0` over rtnetlink, synchronously: the messages come from
//! `netlink-packet-route`, the socket from `netlink-sys` (no async runtime in PID 1).

use juice_init::GuestNetwork;
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

pub fn configure(n: &GuestNetwork) -> Result<(), String> {
    let socket = open()?;
    link_up(&socket, index("lo")?)?;
    let eth0 = index("eth0")?;
    let mut addr = AddressMessage::default();
    addr.header.family = AddressFamily::Inet;
    addr.header.prefix_len = n.prefix;
    addr.header.index = eth0;
    addr.attributes = vec![
        AddressAttribute::Local(n.address.into()),
        AddressAttribute::Address(n.address.into()),
    ];
    request(
        &socket,
        RouteNetlinkMessage::NewAddress(addr),
        NLM_F_CREATE | NLM_F_EXCL,
        "add the address",
    )?;
    link_up(&socket, eth0)?;
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.header.protocol = RouteProtocol::Boot;
    route.header.scope = RouteScope::Universe;
    route.header.kind = RouteType::Unicast;
    route.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet(n.gateway))];
    request(
        &socket,
        RouteNetlinkMessage::NewRoute(route),
        NLM_F_CREATE | NLM_F_EXCL,
        "add the default route",
    )
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
