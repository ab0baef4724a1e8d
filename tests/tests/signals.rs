//! The kernel's per-subset failure signals (issues 14 and 18), read straight from the pinned
//! per-CPU counter map with `bpftool`: connections reset by the backend, closed by it without
//! a reply, refused for lack of a live socket, retransmission timeouts, and the smoothed-RTT
//! histogram. Each test runs in its own network namespace (see `tcpshift_tests::TestNs`); the
//! backend of v2 is a listener of the test itself, registered through the seed config.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use tcpshift_tests::{TestNs, pinned, poll_until, privileged, scaled, seed_addr, seed_config};

/// Offsets (in `u64` words) of `tcpshift_common::Counters` fields, layout version 6.
mod field {
    pub const MISSES: usize = 4;
    pub const OPENED: usize = 5;
    pub const CLOSED: usize = 6;
    pub const RESET_BY_BACKEND: usize = 9;
    pub const CLOSED_WITHOUT_REPLY: usize = 10;
    pub const RETRANSMIT_TIMEOUTS: usize = 11;
    /// First bucket of `srtt_histogram` (after 12 words and the 16 × 8-byte `recent` ring);
    /// its buckets are `u32`, widened to one word each by [`super::counters`].
    pub const SRTT_HISTOGRAM: usize = 12 + 16;
    pub const SRTT_BUCKETS: usize = 16;
    /// Words of the result: the `u64` fields and ring entries, then one per bucket.
    pub const WORDS: usize = SRTT_HISTOGRAM + SRTT_BUCKETS;
    /// `size_of::<Counters>()`.
    pub const BYTES: usize = SRTT_HISTOGRAM * 8 + SRTT_BUCKETS * 4;
}

/// Index of v1 and v2 in the seed config (slot = service id × 16 + index).
const V1: u32 = 0;
const V2: u32 = 1;

/// The counters of subset `subset` of the namespace's only service (one value shared by all
/// CPUs), read with `bpftool map dump pinned …/TS_COUNTERS -j` (the map has no BTF: raw
/// bytes); the `u32` srtt buckets are widened to words.
fn counters(subset: u32) -> Result<[u64; field::WORDS]> {
    let mut words = [0u64; field::WORDS];
    for (key, value) in pinned::dump("TS_COUNTERS")? {
        let slot = u32::from_le_bytes(key.as_slice().try_into().context("4-byte key")?);
        if slot % 16 != subset {
            continue;
        }
        ensure!(
            value.len() == field::BYTES,
            "Counters of {} bytes, expected {} (layout changed?)",
            value.len(),
            field::BYTES
        );
        let (head, histogram) = value.split_at(field::SRTT_HISTOGRAM * 8);
        let head = head
            .chunks_exact(8)
            .map(|w| w.try_into().map(u64::from_le_bytes));
        let histogram = histogram
            .chunks_exact(4)
            .map(|w| w.try_into().map(|w| u64::from(u32::from_le_bytes(w))));
        for (out, word) in words.iter_mut().zip(head.chain(histogram)) {
            *out = word.context("word of the value")?;
        }
    }
    Ok(words)
}

/// Waits until subset `subset`'s counter `index` reaches `n` (fails if it goes past).
fn wait_counter(subset: u32, index: usize, n: u64, what: &str) -> Result<[u64; field::WORDS]> {
    poll_until(Duration::from_secs(10), what, || {
        let c = counters(subset)?;
        ensure!(c[index] <= n, "{what}: {} > {n}", c[index]);
        Ok((c[index] == n).then_some(c))
    })
}

fn srtt_total(c: &[u64; field::WORDS]) -> u64 {
    c[field::SRTT_HISTOGRAM..].iter().sum()
}

/// Seed config with v1 at 0 and v2 at 100; v1 is a tcp-echo, v2 is `listener`.
fn seed_v2_only(ns: &mut TestNs) -> Result<()> {
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.loader(&seed_config(0, 100))?;
    Ok(())
}

/// Accepts `n` connections on `listener` in a thread, handing each to `handle`.
fn serve(
    listener: TcpListener,
    n: usize,
    handle: fn(TcpStream) -> Result<()>,
) -> thread::JoinHandle<Result<()>> {
    thread::spawn(move || {
        for _ in 0..n {
            let (s, _) = listener.accept()?;
            handle(s)?;
        }
        Ok(())
    })
}

/// Connects through the service, sends the line `helo<i>`, reads until EOF or error: the bytes read,
/// or the error kind.
fn try_exchange(i: u8) -> Result<std::result::Result<Vec<u8>, ErrorKind>> {
    let mut s = TcpStream::connect_timeout(&seed_addr(), scaled(Duration::from_secs(5)))?;
    s.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
    // The server may already have reset the connection: a failed write is part of the answer.
    if let Err(e) = s.write_all(&[b'h', b'e', b'l', b'o', b'0' + i, b'\n']) {
        return Ok(Err(e.kind()));
    }
    let mut buf = Vec::new();
    Ok(s.read_to_end(&mut buf).map(|_| buf).map_err(|e| e.kind()))
}

/// Sets `SO_LINGER` to 0 on `s`: closing it then sends a RST instead of a FIN.
fn linger0(s: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd, and a linger struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    Ok(())
}

#[test]
fn backend_resets_are_counted_per_connection_and_client_closes_are_not() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let listener = TcpListener::bind("127.0.0.1:9002")?;
    let server = serve(listener.try_clone()?, 6, |s| {
        // Wait for the request. Even ones: read it, close with SO_LINGER 0; odd ones: close
        // with the request unread. Either way the kernel sends a RST.
        let mut line = [0u8; 6];
        while s.peek(&mut line)? < line.len() {
            thread::sleep(Duration::from_millis(1));
        }
        if (line[4] - b'0').is_multiple_of(2) {
            (&s).read_exact(&mut line)?;
            linger0(&s)?;
        }
        Ok(())
    });
    seed_v2_only(&mut ns)?;
    for i in 0..6 {
        let r = try_exchange(i)?;
        ensure!(
            r == Err(ErrorKind::ConnectionReset),
            "connection {i}: expected a reset, got {r:?}"
        );
    }
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    let c = wait_counter(V2, field::CLOSED, 6, "6 connections closed on v2")?;
    let c = poll_until(Duration::from_secs(5), "6 resets counted", || {
        let c2 = counters(V2)?;
        Ok((c2[field::RESET_BY_BACKEND] == 6).then_some(c2))
    })
    .with_context(|| format!("counters after close: {c:?}"))?;
    assert_eq!(c[field::OPENED], 6, "{c:?}");
    assert_eq!(c[field::CLOSED_WITHOUT_REPLY], 0, "{c:?}");
    assert_eq!(
        srtt_total(&c),
        6,
        "one RTT sample per closed connection: {c:?}"
    );

    // Clients that reset their own connections (SO_LINGER 0 on the client) are not backend
    // resets: the backend answers, then the client aborts.
    drop(listener);
    let listener = TcpListener::bind("127.0.0.1:9002")?;
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    let server = serve(listener, 3, |mut s| {
        let mut line = [0u8; 6];
        s.read_exact(&mut line)?;
        s.write_all(&line)?;
        // Wait for the client's reset before closing.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        Ok(())
    });
    for _ in 0..3 {
        let mut s = TcpStream::connect_timeout(&seed_addr(), scaled(Duration::from_secs(5)))?;
        s.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
        s.write_all(b"hello\n")?;
        let mut line = [0u8; 6];
        s.read_exact(&mut line)?;
        linger0(&s)?;
    }
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    let c = wait_counter(V2, field::CLOSED, 9, "9 connections closed on v2")?;
    assert_eq!(
        c[field::RESET_BY_BACKEND],
        6,
        "client resets counted: {c:?}"
    );
    assert_eq!(c[field::CLOSED_WITHOUT_REPLY], 0, "{c:?}");
    Ok(())
}

#[test]
fn backend_closing_without_a_reply_is_counted_and_a_reply_is_not() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let listener = TcpListener::bind("127.0.0.1:9002")?;
    let server = serve(listener, 6, |mut s| {
        // Read the whole request, then close (FIN first) — replying to every other one,
        // decided by the request's last digit.
        let mut line = [0u8; 6];
        s.read_exact(&mut line)?;
        if (line[4] - b'0') % 2 == 1 {
            s.write_all(&line)?;
        }
        Ok(())
    });
    seed_v2_only(&mut ns)?;
    for i in 0..6u8 {
        let mut s = TcpStream::connect_timeout(&seed_addr(), scaled(Duration::from_secs(5)))?;
        s.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
        s.write_all(&[b'h', b'e', b'l', b'o', b'0' + i, b'\n'])?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)?;
        let expected = if i % 2 == 1 { 6 } else { 0 };
        ensure!(reply.len() == expected, "connection {i}: reply {reply:?}");
    }
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    let c = wait_counter(V2, field::CLOSED, 6, "6 connections closed on v2")?;
    assert_eq!(c[field::CLOSED_WITHOUT_REPLY], 3, "{c:?}");
    assert_eq!(c[field::RESET_BY_BACKEND], 0, "{c:?}");
    assert_eq!(srtt_total(&c), 6, "{c:?}");
    // Loopback RTTs are far below 524 ms: nothing in the last bucket.
    assert_eq!(
        c[field::SRTT_HISTOGRAM + field::SRTT_BUCKETS - 1],
        0,
        "{c:?}"
    );
    Ok(())
}

#[test]
fn connections_to_a_service_without_any_live_socket_are_refused_and_counted() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let v1 = TcpListener::bind("127.0.0.1:9001")?;
    let v2 = TcpListener::bind("127.0.0.1:9002")?;
    ns.loader(&seed_config(0, 100))?;
    // Both servers go away: v2 (chosen for every connection) and v1 (its only fallback).
    drop(v1);
    drop(v2);
    poll_until(Duration::from_secs(10), "both subsets dead", || {
        let st = ns.status()?;
        Ok(tcpshift_tests::subsets(&st)
            .all(|s| s["live"] == false)
            .then_some(()))
    })?;
    for i in 0..4 {
        match TcpStream::connect_timeout(&seed_addr(), scaled(Duration::from_secs(5))) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            other => bail!("connection {i}: expected refused, got {other:?}"),
        }
    }
    let c = counters(V2)?;
    assert_eq!(c[field::MISSES], 4, "{c:?}");
    assert_eq!(c[field::OPENED], 0, "{c:?}");
    assert_eq!(counters(V1)?[field::MISSES], 0);
    Ok(())
}

/// Runs `nft` with `args`, failing with its message.
fn nft(args: &[&str]) -> Result<()> {
    let out = Command::new("nft")
        .args(args)
        .output()
        .context("cannot run nft (nftables)")?;
    ensure!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn retransmission_timeouts_of_the_backend_are_counted() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let listener = TcpListener::bind("127.0.0.1:9002")?;
    seed_v2_only(&mut ns)?;
    let mut client = TcpStream::connect_timeout(&seed_addr(), scaled(Duration::from_secs(5)))?;
    client.set_read_timeout(Some(scaled(Duration::from_secs(20))))?;
    let (mut server, _) = listener.accept()?;
    ensure!(counters(V2)?[field::RETRANSMIT_TIMEOUTS] == 0);
    // Drop what the backend sends (its connection's local port is the service's) where the
    // client receives it — dropped on output, the send would fail locally and the kernel
    // would probe instead of retransmitting: the data is never acknowledged and the
    // retransmission timer expires (first after ~200 ms).
    nft(&["add", "table", "inet", "tcpshift_test"])?;
    nft(&[
        "add",
        "chain",
        "inet",
        "tcpshift_test",
        "in",
        "{ type filter hook input priority 0; }",
    ])?;
    nft(&[
        "add",
        "rule",
        "inet",
        "tcpshift_test",
        "in",
        "tcp",
        "sport",
        "31400",
        "drop",
    ])?;
    server.write_all(b"hello\n")?;
    let c = poll_until(Duration::from_secs(10), "a retransmission timeout", || {
        let c = counters(V2)?;
        Ok((c[field::RETRANSMIT_TIMEOUTS] >= 1).then_some(c))
    })?;
    nft(&["delete", "table", "inet", "tcpshift_test"])?;
    // Once the path is back, the retransmission gets through.
    let mut line = [0u8; 6];
    client.read_exact(&mut line)?;
    assert_eq!(&line, b"hello\n");
    assert_eq!(c[field::OPENED], 1, "{c:?}");
    drop(server);
    Ok(())
}

/// The benchmark's measurement switch (`tcpshiftd --measure-without-signals`): connections are
/// still accounted (opened, closed) but a backend reset is not watched for.
#[test]
fn without_signals_resets_are_not_watched_and_connections_still_counted() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let listener = TcpListener::bind("127.0.0.1:9002")?;
    let server = serve(listener.try_clone()?, 2, |s| {
        // Close with the request unread: the kernel sends a RST.
        let mut line = [0u8; 6];
        while s.peek(&mut line)? < line.len() {
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    });
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.loader_with(&seed_config(0, 100), &["--measure-without-signals"])?;
    for i in 0..2 {
        let r = try_exchange(i)?;
        ensure!(
            r == Err(ErrorKind::ConnectionReset),
            "connection {i}: expected a reset, got {r:?}"
        );
    }
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    let c = wait_counter(V2, field::CLOSED, 2, "2 connections closed on v2")?;
    assert_eq!(c[field::OPENED], 2, "{c:?}");
    assert_eq!(c[field::RESET_BY_BACKEND], 0, "{c:?}");
    Ok(())
}
