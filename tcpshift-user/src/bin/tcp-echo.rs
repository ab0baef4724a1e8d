//! `tcp-echo`: a line-echo TCP server compatible with Istio's `tcp-echo` sample.
//!
//! For every line a client sends, it writes back `PREFIX <line>`. It serves as a test backend
//! for tcpshift: run several with different prefixes and see which one answers. With `--udp` it
//! answers each UDP datagram with `PREFIX <datagram>` instead.

use std::{
    collections::HashSet,
    io::{self, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter},
    net::{TcpListener, TcpStream, UdpSocket},
    signal::unix::{SignalKind, signal},
};

/// Listen backlog of every port.
const BACKLOG: i32 = 1024;
/// Longest line accepted (including its newline); a longer one closes the connection.
const MAX_LINE: u64 = 1 << 20;

/// Line-echo TCP server, compatible with Istio's tcp-echo sample.
///
/// Listens on every port in PORTS and answers each line received with "PREFIX <line>". A last
/// line without a newline is answered too (with a newline added) before the connection closes.
/// Once all ports are bound it prints "listening on ADDR:PORT, prefix: PREFIX" per port to
/// stdout. Exits 0 on SIGINT or SIGTERM. Log level: RUST_LOG (default "warn").
#[derive(Debug, Parser)]
#[command(
    name = "tcp-echo",
    override_usage = "tcp-echo [--bind ADDR] [--port-in-prefix] [--udp] PORTS PREFIX",
    after_help = "Example:\n  \
        tcp-echo 9000,9001 one\n  \
        printf 'hello\\nworld\\n' | nc -q1 127.0.0.1 9000    # prints \"one hello\" and \"one world\""
)]
struct Cli {
    /// Listen on ADDR (IPv4 or IPv6, e.g. 127.0.0.1 or ::1) instead of dual-stack [::].
    ///
    /// Without it every port listens on [::] with IPV6_V6ONLY off, so it accepts both IPv4 and
    /// IPv6. With an IPv6 ADDR the socket is IPv6-only.
    #[arg(long, short, value_name = "ADDR", value_parser = parse_bind)]
    bind: Option<IpAddr>,

    /// Comma-separated ports to listen on, e.g. 9000,9001 (each in 1-65535, no duplicates).
    #[arg(value_name = "PORTS", value_parser = parse_ports)]
    ports: Ports,

    /// Text put before each echoed line (followed by a space).
    #[arg(value_name = "PREFIX", allow_hyphen_values = true)]
    prefix: String,

    /// Put the port that accepted the connection after the prefix ("PREFIX:PORT line"), to
    /// tell apart the ports of one process.
    #[arg(long)]
    port_in_prefix: bool,

    /// Serve UDP instead of TCP: answer each datagram received with one datagram,
    /// "PREFIX <datagram>", sent back to its sender.
    #[arg(long)]
    udp: bool,

    /// Fault injection: reset this percentage of connections (0-100) after reading their first
    /// line, without a reply (SO_LINGER 0, so the kernel sends a RST). Spread evenly: with 30,
    /// 3 connections of every 10.
    #[arg(long, value_name = "PERCENT", default_value = "0", value_parser = clap::value_parser!(u8).range(0..=100))]
    fault_reset_percent: u8,

    /// Fault injection: close this percentage of connections (0-100) after reading their
    /// first line, without a reply (a FIN, no byte sent).
    #[arg(long, value_name = "PERCENT", default_value = "0", value_parser = clap::value_parser!(u8).range(0..=100))]
    fault_close_percent: u8,

    /// Fault injection: wait this many milliseconds before each reply.
    #[arg(long, value_name = "MS", default_value = "0")]
    fault_delay_ms: u64,
}

/// The faults to inject (see the `--fault-*` flags).
#[derive(Debug, Default)]
struct Faults {
    reset_percent: u64,
    close_percent: u64,
    delay: Duration,
    /// Connections accepted so far, to spread the faults evenly.
    count: std::sync::atomic::AtomicU64,
}

/// What to do with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Reset,
    Close,
}

impl Faults {
    /// The fault of the next connection: connection `k` gets a fault of `p` % when
    /// `floor(k p / 100)` moves, so `p` of every 100 connections do, evenly spread.
    fn next(&self) -> Fault {
        let k = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let hit = |p: u64| p > 0 && k * p / 100 != (k - 1) * p / 100;
        if hit(self.reset_percent) {
            Fault::Reset
        } else if hit(self.close_percent) {
            Fault::Close
        } else {
            Fault::None
        }
    }
}

/// The parsed PORTS argument.
#[derive(Debug, Clone)]
struct Ports(Vec<u16>);

/// Parses a comma-separated list of distinct ports in 1-65535.
fn parse_ports(s: &str) -> Result<Ports, String> {
    if s.trim().is_empty() {
        return Err("empty port list (give e.g. 9000 or 9000,9001)".to_owned());
    }
    let mut seen = HashSet::new();
    let mut ports = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("empty entry in port list {s:?}"));
        }
        let port: u16 = item
            .parse()
            .map_err(|_| format!("port {item:?} is not a number in 1-65535"))?;
        if port == 0 {
            return Err("port 0 is not allowed (give a port in 1-65535)".to_owned());
        }
        if !seen.insert(port) {
            return Err(format!("port {port} is listed twice"));
        }
        ports.push(port);
    }
    Ok(Ports(ports))
}

/// Parses an IPv4 or IPv6 address, the latter optionally in brackets.
fn parse_bind(s: &str) -> Result<IpAddr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse().map_err(|_| {
        format!("{s:?} is not an IPv4 or IPv6 address (give e.g. 127.0.0.1 or ::1, without a port)")
    })
}

/// Creates a listening socket on `addr`; `dual_stack` turns IPV6_V6ONLY off, otherwise an IPv6
/// socket is IPv6-only.
fn listen(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Creates a UDP socket bound to `addr`, like [`listen`].
fn bind_udp(addr: SocketAddr, dual_stack: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Answers every datagram with the prefix, forever.
async fn udp_loop(socket: UdpSocket, prefix: Arc<[u8]>) {
    let mut buf = vec![0u8; 65_536];
    let mut reply = Vec::with_capacity(65_536 + prefix.len() + 1);
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                reply.clear();
                reply.extend_from_slice(&prefix);
                reply.push(b' ');
                reply.extend_from_slice(&buf[..n]);
                if let Err(e) = socket.send_to(&reply, peer).await {
                    tracing::debug!(%peer, "cannot answer: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts connections forever, one task per connection.
async fn accept_loop(listener: TcpListener, prefix: Arc<[u8]>, faults: Arc<Faults>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let prefix = Arc::clone(&prefix);
                let faults = Arc::clone(&faults);
                tokio::spawn(async move {
                    tracing::debug!(%peer, "connection");
                    if let Err(e) = serve(stream, &prefix, &faults).await {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                // Usually transient (aborted handshake) or resource exhaustion (EMFILE): wait
                // a little instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Echoes every line of one connection with the prefix.
async fn serve(mut stream: TcpStream, prefix: &[u8], faults: &Faults) -> io::Result<()> {
    // Like Go's net package (Istio's server): replies go out at once.
    stream.set_nodelay(true)?;
    let fault = faults.next();
    if fault != Fault::None {
        let mut first = Vec::new();
        BufReader::new(&mut stream)
            .take(MAX_LINE)
            .read_until(b'\n', &mut first)
            .await?;
        if fault == Fault::Reset {
            socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
            drop(stream);
        } else {
            stream.shutdown().await?;
            // Wait for the client's FIN so that the backend's FIN came first.
            let mut rest = [0u8; 512];
            while stream.read(&mut rest).await? > 0 {}
        }
        return Ok(());
    }
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut wr = BufWriter::new(wr);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut rd)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            break;
        }
        let complete = line.ends_with(b"\n");
        if !complete && n as u64 == MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line longer than {MAX_LINE} bytes"),
            ));
        }
        if !faults.delay.is_zero() {
            tokio::time::sleep(faults.delay).await;
        }
        wr.write_all(prefix).await?;
        wr.write_all(b" ").await?;
        wr.write_all(&line).await?;
        if !complete {
            wr.write_all(b"\n").await?;
        }
        // Batch the replies to pipelined lines, but never hold one back while waiting for
        // more input.
        if !rd.buffer().contains(&b'\n') {
            wr.flush().await?;
        }
    }
    wr.flush().await?;
    wr.shutdown().await
}

/// Binds every port, reports readiness, then serves until SIGINT or SIGTERM.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;

    raise_fd_limit(cli.ports.0.len());
    let ip = cli.bind.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    let mut listeners = Vec::with_capacity(cli.ports.0.len());
    let mut udp_sockets = Vec::new();
    for &port in &cli.ports.0 {
        let addr = SocketAddr::new(ip, port);
        if cli.udp {
            let socket = bind_udp(addr, cli.bind.is_none())
                .with_context(|| format!("cannot bind UDP {addr}"))?;
            let local = socket
                .local_addr()
                .with_context(|| format!("cannot get the local address of {addr}"))?;
            udp_sockets.push((socket, local));
            continue;
        }
        let listener = listen(addr, cli.bind.is_none()).map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::AddrInUse => format!(" (is another process using port {port}?)"),
                io::ErrorKind::AddrNotAvailable => {
                    format!(" ({ip} is not an address of this host)")
                }
                io::ErrorKind::PermissionDenied => {
                    " (ports below 1024 need root or CAP_NET_BIND_SERVICE)".to_owned()
                }
                _ => String::new(),
            };
            anyhow::Error::new(e).context(format!("cannot listen on {addr}{hint}"))
        })?;
        let local = listener
            .local_addr()
            .with_context(|| format!("cannot get the local address of {addr}"))?;
        listeners.push((listener, local));
    }

    let mut out = io::stdout().lock();
    for local in listeners
        .iter()
        .map(|(_, l)| l)
        .chain(udp_sockets.iter().map(|(_, l)| l))
    {
        if let Err(e) = writeln!(out, "listening on {local}, prefix: {}", cli.prefix) {
            tracing::warn!("cannot write to stdout: {e}");
        }
    }
    if let Err(e) = out.flush() {
        tracing::warn!("cannot write to stdout: {e}");
    }
    drop(out);

    let prefix: Arc<[u8]> = Arc::from(cli.prefix.as_bytes());
    let faults = Arc::new(Faults {
        reset_percent: u64::from(cli.fault_reset_percent),
        close_percent: u64::from(cli.fault_close_percent),
        delay: Duration::from_millis(cli.fault_delay_ms),
        ..Faults::default()
    });
    for (listener, local) in listeners {
        let prefix = if cli.port_in_prefix {
            Arc::from(format!("{}:{}", cli.prefix, local.port()).into_bytes())
        } else {
            Arc::clone(&prefix)
        };
        tokio::spawn(accept_loop(listener, prefix, Arc::clone(&faults)));
    }
    for (socket, local) in udp_sockets {
        let prefix = if cli.port_in_prefix {
            Arc::from(format!("{}:{}", cli.prefix, local.port()).into_bytes())
        } else {
            Arc::clone(&prefix)
        };
        tokio::spawn(udp_loop(socket, prefix));
    }

    tokio::select! {
        _ = sigint.recv() => tracing::info!("SIGINT, exiting"),
        _ = sigterm.recv() => tracing::info!("SIGTERM, exiting"),
    }
    Ok(())
}

/// Raises the soft limit on open files towards the hard limit when `ports` listening sockets
/// (plus their connections) would not fit: one process may listen on thousands of ports.
fn raise_fd_limit(ports: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let wanted = (ports as libc::rlim_t)
        .saturating_mul(2)
        .saturating_add(1024);
    if lim.rlim_cur < wanted && lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = wanted.min(lim.rlim_max);
        // SAFETY: valid pointer; failure leaves the limit as it was (binding then reports it).
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Prints a clap error on one line (help and version are printed as usual).
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        // Printing help can only fail if stdout is gone; nothing to do about it then.
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let rendered = err.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("tcp-echo: {message} (see tcp-echo --help)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = match tcpshift::cli_docs::try_parse::<Cli>() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-echo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_ports("9000").unwrap().0, [9000]);
        assert_eq!(parse_ports("9000, 9001,1").unwrap().0, [9000, 9001, 1]);
        assert!(parse_ports("").is_err());
        assert!(parse_ports("0").unwrap_err().contains("port 0"));
        assert!(parse_ports("abc").unwrap_err().contains("\"abc\""));
        assert!(parse_ports("65536").is_err());
        assert!(parse_ports("9000,").is_err());
        assert!(parse_ports("9000,9000").unwrap_err().contains("twice"));
    }

    #[test]
    fn bind() {
        assert_eq!(
            parse_bind("127.0.0.1").unwrap(),
            IpAddr::from([127, 0, 0, 1])
        );
        assert_eq!(parse_bind("::1").unwrap(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(
            parse_bind("[::1]").unwrap(),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
        assert!(parse_bind("localhost").is_err());
        assert!(parse_bind("127.0.0.1:80").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
