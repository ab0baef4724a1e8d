//! The listening TCP sockets of the current thread's network namespace, read from
//! `/proc/thread-self/net/tcp` and `tcp6`, and the choice of the one that serves an address.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Once,
};

use super::{DiscoveryError, Listener};

/// Where the current thread's IPv4 TCP sockets are listed.
pub(super) const PROC_NET_TCP: &str = "/proc/thread-self/net/tcp";
/// Where the current thread's IPv6 TCP sockets are listed.
const PROC_NET_TCP6: &str = "/proc/thread-self/net/tcp6";
/// `TCP_LISTEN` in the `st` column of `/proc/net/tcp`.
const TCP_LISTEN: u8 = 0x0A;

/// Listening sockets in the current thread's netns, sorted by address, then inode.
///
/// Asked of the kernel's socket diagnostics ([`crate::sockdiag::listening_tcp`]), which
/// walk the listening sockets only; when those cannot answer (no `tcp_diag` in the kernel),
/// read from `/proc/thread-self/net/tcp` and `tcp6` instead ([`listeners_from_proc`]), which
/// list every socket of the namespace.
pub fn listeners() -> Result<Vec<Listener>, DiscoveryError> {
    match crate::sockdiag::listening_tcp() {
        Ok(found) => {
            let mut out: Vec<Listener> = found
                .into_iter()
                .map(|(local, inode)| Listener { inode, local })
                .collect();
            out.sort_by_key(|l| (l.local, l.inode));
            Ok(out)
        }
        Err(e) => {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "the kernel's socket diagnostics cannot list listening sockets ({e}); \
                     reading /proc/thread-self/net/tcp instead, which lists every socket and \
                     costs more CPU on a host with many connections (load the tcp_diag and \
                     inet_diag modules to avoid it)"
                );
            });
            listeners_from_proc()
        }
    }
}

/// Listening sockets in the current thread's netns, from `/proc/thread-self/net/tcp` and
/// `tcp6` (state `0A`).
///
/// Addresses are decoded as the kernel prints them: an IPv4 address is one 32-bit word and an
/// IPv6 address four, each the raw network-order bytes printed as a host-order hex number
/// (so little-endian hosts show `127.0.0.1` as `0100007F`); ports are printed in host order.
/// A missing `tcp6` (IPv6 disabled) is not an error. The result is sorted by address, then
/// inode.
pub fn listeners_from_proc() -> Result<Vec<Listener>, DiscoveryError> {
    let mut out = Vec::new();
    for (path, optional) in [(PROC_NET_TCP, false), (PROC_NET_TCP6, true)] {
        let path = Path::new(path);
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if optional && e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DiscoveryError::ReadProc {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        out.extend(parse_proc_net_tcp(&text, path)?);
    }
    out.sort_by_key(|l| (l.local, l.inode));
    Ok(out)
}

/// Parses the text of a `/proc/net/tcp` or `/proc/net/tcp6` file and returns its listening
/// sockets (state `0A`, non-zero inode). `path` is only used in error messages.
pub fn parse_proc_net_tcp(text: &str, path: &Path) -> Result<Vec<Listener>, DiscoveryError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // The first line is the column header.
        if i == 0 || line.trim().is_empty() {
            continue;
        }
        let parsed = parse_line(line, TCP_LISTEN).map_err(|reason| DiscoveryError::Parse {
            path: path.to_path_buf(),
            line_no: i + 1,
            line: line.to_owned(),
            reason,
        })?;
        if let Some(listener) = parsed {
            out.push(listener);
        }
    }
    Ok(out)
}

/// `TCP_CLOSE` in the `st` column of `/proc/net/udp`: an unconnected UDP socket.
const UDP_UNCONNECTED: u8 = 0x07;
/// Where the current thread's IPv4 UDP sockets are listed.
pub(super) const PROC_NET_UDP: &str = "/proc/thread-self/net/udp";
/// Where the current thread's IPv6 UDP sockets are listed.
const PROC_NET_UDP6: &str = "/proc/thread-self/net/udp6";

/// Bound, unconnected UDP sockets in the current thread's netns, from
/// `/proc/thread-self/net/udp` and `udp6` (state `07`), decoded as [`listeners`] does; a UDP
/// server's socket is one of them. A missing `udp6` is not an error.
pub fn udp_sockets() -> Result<Vec<Listener>, DiscoveryError> {
    let mut out = Vec::new();
    for (path, optional) in [(PROC_NET_UDP, false), (PROC_NET_UDP6, true)] {
        let path = Path::new(path);
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if optional && e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DiscoveryError::ReadProc {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        for (i, line) in text.lines().enumerate() {
            if i == 0 || line.trim().is_empty() {
                continue;
            }
            let parsed =
                parse_line(line, UDP_UNCONNECTED).map_err(|reason| DiscoveryError::Parse {
                    path: path.to_path_buf(),
                    line_no: i + 1,
                    line: line.to_owned(),
                    reason,
                })?;
            // Bound to a port: an unbound socket shows port 0.
            if let Some(l) = parsed.filter(|l| l.local.port() != 0) {
                out.push(l);
            }
        }
    }
    out.sort_by_key(|l| (l.local, l.inode));
    Ok(out)
}

/// Parses one socket line; `Ok(None)` for sockets not in state `wanted`.
fn parse_line(line: &str, wanted: u8) -> Result<Option<Listener>, String> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return Err(format!("expected at least 10 fields, got {}", fields.len()));
    }
    let state =
        u8::from_str_radix(fields[3], 16).map_err(|e| format!("bad state {:?}: {e}", fields[3]))?;
    if state != wanted {
        return Ok(None);
    }
    let local = parse_hex_sockaddr(fields[1])?;
    let inode: u64 = fields[9]
        .parse()
        .map_err(|e| format!("bad inode {:?}: {e}", fields[9]))?;
    if inode == 0 {
        // Not backed by a file: nothing can hold it, so nothing can take it.
        return Ok(None);
    }
    Ok(Some(Listener { inode, local }))
}

/// Parses `ADDR:PORT` in `/proc/net/tcp{,6}` hex notation.
fn parse_hex_sockaddr(s: &str) -> Result<SocketAddr, String> {
    let (addr, port) = s
        .split_once(':')
        .ok_or_else(|| format!("bad address {s:?}: no ':'"))?;
    let port = u16::from_str_radix(port, 16).map_err(|e| format!("bad port in {s:?}: {e}"))?;
    let word = |hex: &str| -> Result<[u8; 4], String> {
        u32::from_str_radix(hex, 16)
            .map(u32::to_ne_bytes)
            .map_err(|e| format!("bad address {s:?}: {e}"))
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                let hex = addr
                    .get(i * 8..i * 8 + 8)
                    .ok_or_else(|| format!("bad address {s:?}: not hex"))?;
                chunk.copy_from_slice(&word(hex)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        n => {
            return Err(format!(
                "bad address {s:?}: {n} hex digits, expected 8 or 32"
            ));
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// How well a listener's address serves a backend address; lower is better, `None` means not
/// at all.
fn rank(addr: SocketAddr, local: SocketAddr) -> Option<u8> {
    if local.port() != addr.port() {
        return None;
    }
    // A v4-mapped backend address is reached by IPv4 packets: treat it as IPv4.
    let want = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let have = local.ip();
    match want {
        IpAddr::V4(w) if w.is_unspecified() => match have {
            IpAddr::V4(h) if h.is_unspecified() => Some(0),
            IpAddr::V6(h) if h.is_unspecified() => Some(1),
            IpAddr::V4(_) => Some(2),
            IpAddr::V6(_) => Some(3),
        },
        IpAddr::V6(w) if w.is_unspecified() => match have {
            IpAddr::V6(h) if h.is_unspecified() => Some(0),
            IpAddr::V4(h) if h.is_unspecified() => Some(1),
            IpAddr::V6(_) => Some(2),
            IpAddr::V4(_) => Some(3),
        },
        IpAddr::V4(w) => match have {
            IpAddr::V4(h) if h == w => Some(0),
            IpAddr::V6(h) if h.to_ipv4_mapped() == Some(w) => Some(1),
            IpAddr::V4(h) if h.is_unspecified() => Some(2),
            IpAddr::V6(h) if h.is_unspecified() => Some(3),
            _ => None,
        },
        IpAddr::V6(w) => match have {
            IpAddr::V6(h) if h == w => Some(0),
            IpAddr::V6(h) if h.is_unspecified() => Some(1),
            _ => None,
        },
    }
}

/// The listeners among `all` that can serve backend address `addr`, best first.
///
/// Order: an exact address match; for an IPv4 address, a v4-mapped `[::ffff:a.b.c.d]:P`
/// listener; a wildcard of the same family (`0.0.0.0:P` / `[::]:P`); for an IPv4 address, a
/// `[::]:P` listener (which serves IPv4 if it is dual-stack, see [`acquire`](super::acquire)). A v4-mapped
/// IPv6 `addr` is treated as the IPv4 address. If `addr`'s IP is unspecified (`0.0.0.0` or
/// `::`), every listener on the port qualifies: the same-family wildcard, the other wildcard,
/// then specific addresses of the same family, then of the other. Ties (e.g. `SO_REUSEPORT`
/// groups) are broken by address, then inode, so the choice is deterministic. The IPv6 scope
/// id of `addr` is ignored.
pub fn candidates(addr: SocketAddr, all: &[Listener]) -> Vec<Listener> {
    let mut ranked: Vec<(u8, Listener)> = all
        .iter()
        .filter_map(|l| rank(addr, l.local).map(|r| (r, *l)))
        .collect();
    ranked.sort_by_key(|(r, l)| (*r, l.local, l.inode));
    ranked.into_iter().map(|(_, l)| l).collect()
}

/// The best listener for backend address `addr`: exact address match first; else a wildcard of
/// the same family on that port (`0.0.0.0:P` for IPv4, `[::]:P` for IPv6); for an IPv4 addr
/// also a `[::]:P` listener (dual-stack) and a v4-mapped `[::ffff:a.b.c.d]:P` listener. If
/// addr's IP is unspecified (`0.0.0.0` or `::`), any listener on that port (wildcards
/// preferred). The full order is documented on [`candidates`]; the choice is deterministic.
pub fn find_listener(addr: SocketAddr) -> Result<Option<Listener>, DiscoveryError> {
    Ok(candidates(addr, &listeners()?).into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(inode: u64, local: &str) -> Listener {
        Listener {
            inode,
            local: local.parse().unwrap(),
        }
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    #[test]
    #[cfg(target_endian = "little")]
    fn parse_v4_lines() {
        let text = format!(
            "{HEADER}   0: 0100007F:2329 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0\n\
             \x20  1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
             \x20  2: 0100007F:2329 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 5555 1 0000000000000000 20 4 30 10 -1\n\
             \x20  3: 0A01A8C0:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 777 1 0000000000000000 100 0 0 10 0\n"
        );
        let got = parse_proc_net_tcp(&text, Path::new("tcp")).unwrap();
        assert_eq!(
            got,
            vec![
                l(31337, "127.0.0.1:9001"),
                l(4242, "0.0.0.0:22"),
                l(777, "192.168.1.10:8080"),
            ]
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parse_v6_lines() {
        let text = format!(
            "{HEADER}   0: 00000000000000000000000001000000:2329 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0000000000000000 100 0 0 10 0\n\
             \x20  1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 200 1 0000000000000000 100 0 0 10 0\n\
             \x20  2: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 300 1 0000000000000000 100 0 0 10 0\n\
             \x20  3: B80D0120000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 400 1 0000000000000000 100 0 0 10 0\n\
             \x20  4: 00000000000000000000000001000000:2329 00000000000000000000000001000000:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 500 1 0000000000000000 20 4 30 10 -1\n"
        );
        let got = parse_proc_net_tcp(&text, Path::new("tcp6")).unwrap();
        assert_eq!(
            got,
            vec![
                l(100, "[::1]:9001"),
                l(200, "[::]:80"),
                l(300, "[::ffff:127.0.0.1]:8080"),
                l(400, "[2001:db8::1]:443"),
            ]
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let text = format!("{HEADER}   0: 0100007F:2329 garbage\n");
        let err = parse_proc_net_tcp(&text, Path::new("tcp")).unwrap_err();
        assert!(
            matches!(err, DiscoveryError::Parse { line_no: 2, .. }),
            "{err}"
        );
        let text = format!(
            "{HEADER}   0: 0100007:2329 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        );
        assert!(parse_proc_net_tcp(&text, Path::new("tcp")).is_err());
        let text = format!(
            "{HEADER}   0: 0100007F:ZZ 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        );
        assert!(parse_proc_net_tcp(&text, Path::new("tcp")).is_err());
        // Empty files (just the header) are fine.
        assert!(
            parse_proc_net_tcp(HEADER, Path::new("tcp"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn candidate_order() {
        let all = [
            l(1, "[::]:80"),
            l(2, "0.0.0.0:80"),
            l(3, "127.0.0.1:80"),
            l(4, "[::ffff:127.0.0.1]:80"),
            l(5, "[::1]:80"),
            l(6, "10.0.0.1:80"),
            l(7, "127.0.0.1:81"),
        ];
        let inodes = |addr: &str| -> Vec<u64> {
            candidates(addr.parse().unwrap(), &all)
                .iter()
                .map(|l| l.inode)
                .collect()
        };
        assert_eq!(inodes("127.0.0.1:80"), [3, 4, 2, 1]);
        assert_eq!(inodes("[::ffff:127.0.0.1]:80"), [3, 4, 2, 1]);
        assert_eq!(inodes("127.0.0.2:80"), [2, 1]);
        assert_eq!(inodes("[::1]:80"), [5, 1]);
        assert_eq!(inodes("[::2]:80"), [1]);
        assert_eq!(inodes("0.0.0.0:80"), [2, 1, 6, 3, 5, 4]);
        assert_eq!(inodes("[::]:80"), [1, 2, 5, 4, 6, 3]);
        assert_eq!(inodes("127.0.0.1:82"), Vec::<u64>::new());
        // SO_REUSEPORT groups: lowest inode wins, whatever the input order.
        let group = [l(9, "0.0.0.0:80"), l(8, "0.0.0.0:80")];
        assert_eq!(
            candidates("1.2.3.4:80".parse().unwrap(), &group)[0].inode,
            8
        );
    }
}
