//! The kernel's socket diagnostics (`NETLINK_SOCK_DIAG`): open connections' byte counts, and
//! the namespace's listening sockets ([`listening_tcp`], which the socket scan reads).
//!
//! The sock_ops program adds a connection's bytes to its subset's counters when it closes. For
//! connections still open, [`tagged_connections`] dumps the TCP sockets of the calling thread's
//! network namespace with two extensions: `INET_DIAG_INFO` (`struct tcp_info`, whose
//! `tcpi_bytes_received` and `tcpi_bytes_acked` are the same counters the program reads at
//! close) and `INET_DIAG_REQ_SK_BPF_STORAGES`, which asks the kernel to include each socket's
//! value in tcpshift's `TS_SOCKTAG` socket storage — the record that names the connection's
//! subset. Sockets without that storage are not tcpshift's and are skipped.
//!
//! Only the map's file descriptor is used here (as a request attribute); the maps themselves
//! are handled by [`crate::state`].

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use tcpshift_common::SockTag;

/// One socket carrying a `TS_SOCKTAG` storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaggedSocket {
    /// The socket's storage value.
    pub tag: SockTag,
    /// TCP state (`TCP_ESTABLISHED` = 1 ... `TCP_CLOSING` = 11).
    pub state: u8,
    /// Payload bytes received (the client's FIN, if received, is not counted).
    pub bytes_received: u64,
    /// Payload bytes sent and acknowledged (our FIN, if acknowledged, is not counted).
    pub bytes_sent: u64,
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
/// `INET_DIAG_INFO`: response attribute holding `struct tcp_info`; also its bit in `idiag_ext`.
const INET_DIAG_INFO: u16 = 2;
/// `INET_DIAG_SK_BPF_STORAGES`: response attribute with the requested socket storages.
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
/// `INET_DIAG_REQ_SK_BPF_STORAGES`: request attribute naming socket-storage maps.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
/// `SK_DIAG_BPF_STORAGE_REQ_MAP_FD`.
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
/// `SK_DIAG_BPF_STORAGE` (nested, one per storage).
const SK_DIAG_BPF_STORAGE: u16 = 1;
/// `SK_DIAG_BPF_STORAGE_MAP_ID`.
const SK_DIAG_BPF_STORAGE_MAP_ID: u16 = 2;
/// `SK_DIAG_BPF_STORAGE_MAP_VALUE`.
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
/// Offsets in `struct tcp_info` (include/uapi/linux/tcp.h, stable ABI since Linux 4.1/4.2).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;
/// Size of `struct inet_diag_msg`.
const INET_DIAG_MSG_LEN: usize = 72;
/// TCP states as numbered by the kernel.
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_LISTEN: u8 = 10;
const TCP_CLOSING: u8 = 11;
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// Every TCP socket of the calling thread's network namespace that has a value in the
/// socket-storage map `map` (whose kernel id is `map_id`), with its byte counts.
pub fn tagged_connections(map: BorrowedFd<'_>, map_id: u32) -> io::Result<Vec<TaggedSocket>> {
    let states: u32 =
        ((1u32 << 12) - 2) & !(1 << TCP_LISTEN) & !(1 << TCP_TIME_WAIT) & !(1 << TCP_NEW_SYN_RECV);
    let request = Request {
        states,
        extensions: 1 << (INET_DIAG_INFO - 1),
        storage_map: Some(map),
    };
    let mut out = Vec::new();
    dump(&request, |payload| {
        if let Some(s) = parse_socket(payload, map_id) {
            out.push(s);
        }
    })?;
    Ok(out)
}

/// The listening TCP sockets of the calling thread's network namespace: (local address,
/// socket inode), IPv4 and IPv6.
///
/// The kernel walks only its table of listening sockets for this request, so the cost does
/// not grow with the connections of the namespace — unlike reading `/proc/net/tcp`, which
/// prints every socket, `TIME_WAIT` included (tens of thousands on a host that makes many
/// short connections; reading them four times a second cost tcpshiftd most of a core).
pub fn listening_tcp() -> io::Result<Vec<(SocketAddr, u64)>> {
    let request = Request {
        states: 1 << TCP_LISTEN,
        extensions: 0,
        storage_map: None,
    };
    let mut out = Vec::new();
    dump(&request, |payload| {
        if let Some(l) = parse_listener(payload) {
            out.push(l);
        }
    })?;
    Ok(out)
}

/// One `SOCK_DIAG_BY_FAMILY` dump request for TCP sockets, sent for IPv4 then IPv6.
struct Request<'a> {
    /// Bit `1 << state` for each TCP state wanted.
    states: u32,
    /// `inet_diag_req_v2.idiag_ext`: bit `1 << (INET_DIAG_x - 1)` for each extension.
    extensions: u8,
    /// Ask for each socket's value in this socket-storage map.
    storage_map: Option<BorrowedFd<'a>>,
}

/// Runs `request` for both families in the calling thread's network namespace and hands
/// every socket's message (`inet_diag_msg` and its attributes) to `each`.
fn dump(request: &Request<'_>, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        send_request(&sock, seq, family, request)?;
        receive(&sock, seq, &mut each)?;
    }
    Ok(())
}

fn send_request(sock: &OwnedFd, seq: u32, family: u8, request: &Request<'_>) -> io::Result<()> {
    let mut msg = Vec::with_capacity(96);
    // struct nlmsghdr, length patched below.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zero sockid.
    msg.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, request.extensions, 0]);
    msg.extend_from_slice(&request.states.to_ne_bytes());
    msg.extend_from_slice(&[0u8; 48]);
    if let Some(map) = request.storage_map {
        // INET_DIAG_REQ_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u32 }
        msg.extend_from_slice(&(4u16 + 8).to_ne_bytes());
        msg.extend_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
        msg.extend_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    }
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: sockaddr_nl zeroed = the kernel; msg is a valid buffer.
    let rc = unsafe {
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn receive(sock: &OwnedFd, seq: u32, each: &mut impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut data = &buf[..n as usize];
        while data.len() >= 16 {
            let len = u32_at(data, 0) as usize;
            let kind = u16_at(data, 4);
            let msg_seq = u32_at(data, 8);
            if len < 16 || len > data.len() {
                return Err(bad("truncated netlink message"));
            }
            let payload = &data[16..len];
            data = &data[align4(len).min(data.len())..];
            if msg_seq != seq {
                continue;
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = if payload.len() >= 4 {
                        -(u32_at(payload, 0) as i32)
                    } else {
                        libc::EPROTO
                    };
                    if errno == 0 {
                        continue;
                    }
                    return Err(io::Error::from_raw_os_error(errno));
                }
                SOCK_DIAG_BY_FAMILY => each(payload),
                _ => {}
            }
        }
    }
}

/// A listening socket's address and inode from its `inet_diag_msg`; `None` for a socket with
/// no inode (nothing holds it) or a message too short.
fn parse_listener(payload: &[u8]) -> Option<(SocketAddr, u64)> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    // inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid { sport (be16),
    // dport (be16), src[4] (be32 words), dst[4], if, cookie[2] }, expires, rqueue, wqueue,
    // uid, inode.
    let port = u16::from_be_bytes([payload[4], payload[5]]);
    let ip = match i32::from(payload[0]) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(
            payload[8],
            payload[9],
            payload[10],
            payload[11],
        )),
        libc::AF_INET6 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&payload[8..24]);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    let inode = u64::from(u32_at(payload, 68));
    (inode != 0).then_some((SocketAddr::new(ip, port), inode))
}

/// One `inet_diag_msg` with its attributes.
fn parse_socket(payload: &[u8], map_id: u32) -> Option<TaggedSocket> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    let state = payload[1];
    let mut info: Option<&[u8]> = None;
    let mut tag: Option<SockTag> = None;
    for (kind, value) in attributes(&payload[INET_DIAG_MSG_LEN..]) {
        match kind {
            INET_DIAG_INFO => info = Some(value),
            INET_DIAG_SK_BPF_STORAGES => {
                for (k, storage) in attributes(value) {
                    if k != SK_DIAG_BPF_STORAGE {
                        continue;
                    }
                    let mut id = None;
                    let mut val = None;
                    for (k, v) in attributes(storage) {
                        match k {
                            SK_DIAG_BPF_STORAGE_MAP_ID if v.len() >= 4 => id = Some(u32_at(v, 0)),
                            SK_DIAG_BPF_STORAGE_MAP_VALUE => val = Some(v),
                            _ => {}
                        }
                    }
                    if let (Some(id), Some(v)) = (id, val)
                        && id == map_id
                        && v.len() >= std::mem::size_of::<SockTag>()
                    {
                        tag = Some(bytemuck::pod_read_unaligned(
                            &v[..std::mem::size_of::<SockTag>()],
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    let tag = tag?;
    let info = info?;
    if info.len() < TCPI_BYTES_RECEIVED + 8 {
        return None;
    }
    let received = u64_at(info, TCPI_BYTES_RECEIVED);
    let acked = u64_at(info, TCPI_BYTES_ACKED);
    Some(TaggedSocket {
        tag,
        state,
        bytes_received: received.saturating_sub(u64::from(fin_received(state))),
        bytes_sent: acked.saturating_sub(u64::from(fin_acked(state))),
    })
}

/// Whether a socket in `state` has received the client's FIN (counted by the kernel as one
/// byte): the states that follow it. (FIN_WAIT2 plus a FIN is TIME_WAIT: no longer a socket.)
pub fn fin_received(state: u8) -> bool {
    matches!(state, TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING)
}

/// Whether a socket in `state` has had its own FIN acknowledged.
pub fn fin_acked(state: u8) -> bool {
    state == TCP_FIN_WAIT2
}

/// Iterates over netlink attributes: (type without flags, value).
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = usize::from(u16_at(data, 0));
        let kind = u16_at(data, 2) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = &data[align4(len).min(data.len())..];
        Some((kind, value))
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(a)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd,
    };

    use super::*;

    /// `TCP_INFO` through getsockopt is the same `struct tcp_info` as `INET_DIAG_INFO`: check
    /// the offsets used above against a real connection.
    #[test]
    fn tcp_info_offsets_match_the_kernel() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(&[7u8; 1234]).expect("write");
        let mut buf = [0u8; 1234];
        server.read_exact(&mut buf).expect("read");
        server.write_all(&[1u8; 99]).expect("write");
        let mut buf = [0u8; 99];
        client.read_exact(&mut buf).expect("read");
        let mut info = [0u8; 256];
        let mut len = info.len() as libc::socklen_t;
        // SAFETY: valid buffer and length.
        let rc = unsafe {
            libc::getsockopt(
                server.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert!(len as usize >= TCPI_BYTES_RECEIVED + 8);
        assert_eq!(u64_at(&info, TCPI_BYTES_RECEIVED), 1234);
        // The client's ACK of the 99 bytes may still be in flight on a busy machine; it is
        // on loopback, so wait for it briefly by reading the counter again.
        let mut acked = u64_at(&info, TCPI_BYTES_ACKED);
        for _ in 0..100 {
            if acked == 99 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            let mut len = info.len() as libc::socklen_t;
            // SAFETY: as above.
            unsafe {
                libc::getsockopt(
                    server.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    info.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            acked = u64_at(&info, TCPI_BYTES_ACKED);
        }
        assert_eq!(acked, 99);
    }

    #[test]
    fn attributes_are_walked_with_padding() {
        // Two attributes: type 1 with 5 bytes (padded to 8), type 0x8002 (nested flag) with 4.
        let mut b = Vec::new();
        b.extend_from_slice(&9u16.to_ne_bytes());
        b.extend_from_slice(&1u16.to_ne_bytes());
        b.extend_from_slice(&[1, 2, 3, 4, 5, 0, 0, 0]);
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&(2u16 | NLA_F_NESTED).to_ne_bytes());
        b.extend_from_slice(&[9, 9, 9, 9]);
        let got: Vec<(u16, Vec<u8>)> = attributes(&b).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(got, vec![(1, vec![1, 2, 3, 4, 5]), (2, vec![9, 9, 9, 9])]);
    }
}
