//! Connection accounting (sock_ops), status, top, metrics and kernel debug events.
//! Each test runs in its own network namespace (see `tcpshift_tests::TestNs`).
//!
//! Closing a connection is accounted asynchronously (when the server's socket reaches CLOSE),
//! so every expectation about closed connections waits for the kernel with `poll_until`.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use prometheus_parse::{Scrape, Value as Sample};
use serde_json::Value;
use tcpshift_tests::{
    Conn, TestNs, count_prefixes, counter, exchange, http_get, poll_until, privileged, scaled,
    seed, seed_addr, seed_config, subset,
};

const METRICS: &str = "127.0.0.1:9464";

fn metrics_addr() -> SocketAddr {
    METRICS.parse().expect("valid address")
}

/// Both seed backends, and the loader with more arguments.
fn seed_with(ns: &mut TestNs, v1: u32, v2: u32, args: &[&str]) -> Result<(usize, usize, usize)> {
    let a = ns.echo("127.0.0.1", 9001, "one")?;
    let b = ns.echo("127.0.0.1", 9002, "two")?;
    let l = ns.loader_with(&seed_config(v1, v2), args)?;
    Ok((a, b, l))
}

/// Waits until the kernel has accounted `n` closed connections (all subsets), returns status.
fn wait_closed(ns: &TestNs, n: u64) -> Result<Value> {
    poll_until(
        Duration::from_secs(10),
        &format!("{n} connections accounted as closed"),
        || {
            let st = ns.status()?;
            let closed = counter(&st, "v1", "closed") + counter(&st, "v2", "closed");
            ensure!(
                closed <= n,
                "more connections closed than made: {closed} > {n}"
            );
            Ok((closed == n).then_some(st))
        },
    )
}

fn prefix_count(counts: &BTreeMap<String, usize>, prefix: &str) -> u64 {
    counts.get(prefix).copied().unwrap_or(0) as u64
}

fn scrape_text(text: &str) -> Result<Scrape> {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).context("not Prometheus text")
}

fn scrape() -> Result<Scrape> {
    let (code, body) = http_get(metrics_addr(), "/metrics")?;
    ensure!(code == 200, "GET /metrics: HTTP {code}: {body}");
    scrape_text(&body)
}

/// The value of the sample `metric` whose labels include all of `labels`.
fn sample(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let found: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            Sample::Counter(v) | Sample::Gauge(v) | Sample::Untyped(v) => v,
            _ => f64::NAN,
        })
        .collect();
    match found.as_slice() {
        [v] => Ok(*v),
        _ => bail!("{metric}{labels:?}: {} samples ({found:?})", found.len()),
    }
}

fn subset_sample(s: &Scrape, metric: &str, subset: &str) -> Result<u64> {
    let v = sample(s, metric, &[("service", "tcp-echo"), ("subset", subset)])?;
    Ok(v as u64)
}

/// Bytes exchanged per reply prefix: (sent by the client, received by the client).
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Bytes {
    sent: u64,
    received: u64,
}

/// One-shot connections like `count_prefixes`, also tallying the bytes of each.
fn exchanges(n: usize) -> Result<(BTreeMap<String, usize>, BTreeMap<String, Bytes>)> {
    let mut counts = BTreeMap::new();
    let mut bytes: BTreeMap<String, Bytes> = BTreeMap::new();
    for i in 0..n {
        // Lines of varied lengths.
        let line = format!("line {i} {}", "x".repeat(i % 37));
        let prefix = exchange(seed_addr(), &line)?;
        let b = bytes.entry(prefix.clone()).or_default();
        b.sent += line.len() as u64 + 1;
        b.received += (prefix.len() + 1 + line.len() + 1) as u64;
        *counts.entry(prefix).or_insert(0) += 1;
    }
    Ok((counts, bytes))
}

#[test]
fn opened_per_subset_equals_the_reply_prefixes_exactly() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 70, 30)?;
    let counts = count_prefixes(seed_addr(), 500)?;
    let status = wait_closed(&ns, 500)?;
    eprintln!("500 connections at 70/30: {counts:?}");
    for (name, prefix) in [("v1", "one"), ("v2", "two")] {
        let want = prefix_count(&counts, prefix);
        assert_eq!(counter(&status, name, "opened"), want, "{name}: {status}");
        // sk_lookup counts lookups: a SYN looked up again (e.g. retransmitted after its
        // request was dropped on a slow machine) counts twice there, never in `opened`.
        assert!(
            counter(&status, name, "steered") >= want,
            "{name}: {status}"
        );
        assert_eq!(counter(&status, name, "closed"), want, "{name}: {status}");
        assert_eq!(counter(&status, name, "active"), 0, "{name}: {status}");
    }
    assert_eq!(
        status["debug_events"], false,
        "debug events are off by default"
    );
    assert!(status["accounting_program_id"].as_u64().is_some());
    Ok(())
}

#[test]
fn ipv6_connections_are_accounted_opened_closed_and_bytes_exactly() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("::1", 9001, "one")?;
    ns.echo("::1", 9002, "two")?;
    ns.loader(
        "services:\n  tcp-echo:\n    listen: \"[::1]:31400\"\n    subsets:\n      \
         v1: \"[::1]:9001\"\n      v2: \"[::1]:9002\"\n    weights: {v1: 60, v2: 40}\n",
    )?;
    ns.wait_live(Duration::from_secs(10))?;
    let addr: SocketAddr = "[::1]:31400".parse()?;
    let n = 200;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut bytes: BTreeMap<String, Bytes> = BTreeMap::new();
    for i in 0..n {
        let line = format!("six {i} {}", "y".repeat(i % 23));
        let prefix = exchange(addr, &line)?;
        let b = bytes.entry(prefix.clone()).or_default();
        b.sent += line.len() as u64 + 1;
        b.received += (prefix.len() + 1 + line.len() + 1) as u64;
        *counts.entry(prefix).or_default() += 1;
    }
    eprintln!("{n} connections over ::1 at 60/40: {counts:?}");
    // Both subsets took connections, so both are checked below.
    ensure!(counts.len() == 2, "not both backends answered: {counts:?}");
    let status = wait_closed(&ns, n as u64)?;
    for (name, prefix) in [("v1", "one"), ("v2", "two")] {
        let want = counts.get(prefix).copied().unwrap_or(0);
        let b = bytes.get(prefix).copied().unwrap_or_default();
        assert_eq!(counter(&status, name, "opened"), want, "{name}: {status}");
        assert_eq!(counter(&status, name, "closed"), want, "{name}: {status}");
        assert_eq!(counter(&status, name, "active"), 0, "{name}: {status}");
        assert_eq!(
            counter(&status, name, "bytes_received"),
            b.sent,
            "{name}: {status}"
        );
        assert_eq!(
            counter(&status, name, "bytes_sent"),
            b.received,
            "{name}: {status}"
        );
    }
    Ok(())
}

#[test]
fn active_is_the_number_of_connections_held_open_and_closed_catches_up() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 100, 0)?;
    let mut held = Vec::new();
    for i in 0..7 {
        let mut c = Conn::open(seed_addr())?;
        assert_eq!(c.exchange(&format!("held {i}"))?, "one");
        held.push(c);
    }
    ns.ctl_ok(&["set-weight", "v1=0", "v2=100"])?;
    for i in 0..3 {
        let mut c = Conn::open(seed_addr())?;
        assert_eq!(c.exchange(&format!("held {i}"))?, "two");
        held.push(c);
    }
    // A connection is counted when the server side is established, before the reply: no wait.
    let status = ns.status()?;
    for (name, n) in [("v1", 7), ("v2", 3)] {
        assert_eq!(counter(&status, name, "opened"), n, "{name}: {status}");
        assert_eq!(counter(&status, name, "active"), n, "{name}: {status}");
        assert_eq!(counter(&status, name, "closed"), 0, "{name}: {status}");
    }
    drop(held);
    let status = wait_closed(&ns, 10)?;
    for (name, n) in [("v1", 7), ("v2", 3)] {
        assert_eq!(counter(&status, name, "opened"), n, "{name}: {status}");
        assert_eq!(counter(&status, name, "closed"), n, "{name}: {status}");
        assert_eq!(counter(&status, name, "active"), 0, "{name}: {status}");
    }
    Ok(())
}

#[test]
fn bytes_equal_what_clients_sent_and_received_while_open_and_after_close() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 50, 50)?;
    let mut conns = Vec::new();
    let mut want: BTreeMap<String, Bytes> = BTreeMap::new();
    for i in 0..20 {
        let mut c = Conn::open(seed_addr())?;
        let mut prefix = String::new();
        let mut b = Bytes::default();
        for j in 0..=i {
            let line = format!("conn {i} line {j} {}", "y".repeat(j * 13));
            prefix = c.exchange(&line)?;
            b.sent += line.len() as u64 + 1;
            b.received += (prefix.len() + 1 + line.len() + 1) as u64;
        }
        let w = want.entry(prefix).or_default();
        w.sent += b.sent;
        w.received += b.received;
        conns.push(c);
    }
    eprintln!("bytes per prefix: {want:?}");
    let matches = |st: &Value| {
        [("v1", "one"), ("v2", "two")].iter().all(|(name, prefix)| {
            let w = want.get(*prefix).copied().unwrap_or_default();
            // The server received what the client sent, and sent what it received.
            counter(st, name, "bytes_received") == w.sent
                && counter(st, name, "bytes_sent") == w.received
        })
    };
    // Open connections: their bytes are read live (the last ACK may still be in flight),
    // through the kernel's socket diagnostics — unless the kernel has no TCP sock_diag (a
    // kernel without the tcp_diag module loaded): then `status` says so.
    let first = ns.status()?;
    assert_eq!(
        counter(&first, "v1", "active") + counter(&first, "v2", "active"),
        20
    );
    let no_diag = first["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|w| w.contains("sock_diag"));
    match no_diag {
        None => {
            poll_until(Duration::from_secs(5), "bytes of open connections", || {
                let st = ns.status()?;
                Ok(matches(&st).then_some(st))
            })?;
        }
        Some(w) => eprintln!("note: open connections' bytes not checked: {w}"),
    }
    drop(conns);
    let closed = wait_closed(&ns, 20)?;
    assert!(matches(&closed), "after close: want {want:?}, got {closed}");
    Ok(())
}

#[test]
fn bytes_are_exact_when_the_server_closes_first() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (v1, _, _) = seed(&mut ns, 100, 0)?;
    let mut conns = Vec::new();
    let mut want = Bytes::default();
    for i in 0..5 {
        let mut c = Conn::open(seed_addr())?;
        let line = format!("before the backend dies {i}");
        assert_eq!(c.exchange(&line)?, "one");
        want.sent += line.len() as u64 + 1;
        want.received += ("one ".len() + line.len() + 1) as u64;
        conns.push(c);
    }
    // The backend dies with its connections open: the kernel closes them (FIN from the server,
    // FIN_WAIT1, FIN_WAIT2), the clients still hold theirs.
    ns.kill(v1)?;
    let status = wait_closed(&ns, 5)?;
    assert_eq!(
        counter(&status, "v1", "bytes_received"),
        want.sent,
        "{status}"
    );
    assert_eq!(
        counter(&status, "v1", "bytes_sent"),
        want.received,
        "{status}"
    );
    drop(conns);
    Ok(())
}

/// A backend in this test process that sends its answer and half-closes first, then reads what
/// the client sends after that: the client's data and FIN arrive while the server's socket is in
/// FIN_WAIT2 (the path where the program must see the client's FIN itself).
#[test]
fn bytes_are_exact_when_the_client_sends_after_the_server_half_closed() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let listener = TcpListener::bind("127.0.0.1:9003")?;
    let server = std::thread::spawn(move || -> Result<u64> {
        let mut got = 0;
        for _ in 0..3 {
            let (mut s, _) = listener.accept()?;
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello)?;
            s.write_all(b"0123456789")?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
            got += (hello.len() + rest.len()) as u64;
        }
        Ok(got)
    });
    ns.loader("services:\n  half:\n    listen: 31500\n    subsets:\n      v1: 127.0.0.1:9003\n")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], 31500));
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.write_all(b"hello")?;
        let mut answer = Vec::new();
        c.read_to_end(&mut answer)?;
        assert_eq!(answer, b"0123456789");
        c.write_all(b"abcdefg")?;
        drop(c);
    }
    let server_got = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    assert_eq!(server_got, 3 * 12);
    let status = wait_closed(&ns, 3)?;
    assert_eq!(counter(&status, "v1", "bytes_received"), 3 * 12, "{status}");
    assert_eq!(counter(&status, "v1", "bytes_sent"), 3 * 10, "{status}");
    Ok(())
}

#[test]
fn metrics_endpoint_is_scraped_and_parsed() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed_with(&mut ns, 70, 30, &["--metrics", METRICS])?;
    let (counts, bytes) = exchanges(300)?;
    eprintln!("300 connections at 70/30: {counts:?}, bytes {bytes:?}");
    let s = poll_until(Duration::from_secs(10), "scrape with 300 closed", || {
        let s = scrape()?;
        let closed = subset_sample(&s, "tcpshift_tcp_connections_closed_total", "v1")?
            + subset_sample(&s, "tcpshift_tcp_connections_closed_total", "v2")?;
        Ok((closed == 300).then_some(s))
    })?;
    for (name, prefix, weight) in [("v1", "one", 70), ("v2", "two", 30)] {
        let n = prefix_count(&counts, prefix);
        let b = bytes.get(prefix).copied().unwrap_or_default();
        let get = |metric| subset_sample(&s, metric, name);
        assert_eq!(get("tcpshift_tcp_connections_opened_total")?, n, "{name}");
        assert_eq!(get("tcpshift_tcp_connections_closed_total")?, n, "{name}");
        assert_eq!(get("tcpshift_tcp_connections_active")?, 0, "{name}");
        assert_eq!(get("tcpshift_tcp_received_bytes_total")?, b.sent, "{name}");
        assert_eq!(get("tcpshift_tcp_sent_bytes_total")?, b.received, "{name}");
        // Lookups, not connections: a SYN looked up twice counts twice.
        assert!(get("tcpshift_lookups_total")? >= n, "{name}");
        assert_eq!(get("tcpshift_misses_total")?, 0, "{name}");
        assert_eq!(get("tcpshift_subset_weight")?, weight, "{name}");
        assert_eq!(get("tcpshift_subset_socket_live")?, 1, "{name}");
        for direction in ["in", "out"] {
            let labels = [
                ("service", "tcp-echo"),
                ("subset", name),
                ("direction", direction),
            ];
            assert_eq!(sample(&s, "tcpshift_fallbacks_total", &labels)?, 0.0);
        }
    }
    // Types as declared to Prometheus.
    assert!(matches!(
        s.samples
            .iter()
            .find(|x| x.metric == "tcpshift_tcp_connections_opened_total")
            .map(|x| &x.value),
        Some(Sample::Counter(_))
    ));
    assert!(matches!(
        s.samples
            .iter()
            .find(|x| x.metric == "tcpshift_tcp_connections_active")
            .map(|x| &x.value),
        Some(Sample::Gauge(_))
    ));
    // `tcpshiftctl metrics` prints the same, without the loader's endpoint.
    let ctl = scrape_text(&ns.ctl_ok(&["metrics"])?)?;
    for metric in [
        "tcpshift_tcp_connections_opened_total",
        "tcpshift_tcp_received_bytes_total",
        "tcpshift_subset_weight",
    ] {
        for name in ["v1", "v2"] {
            assert_eq!(
                subset_sample(&ctl, metric, name)?,
                subset_sample(&s, metric, name)?,
                "{metric} {name}"
            );
        }
    }
    // Anything but /metrics is refused.
    assert_eq!(http_get(metrics_addr(), "/")?.0, 404);
    Ok(())
}

#[test]
fn killed_backend_shows_socket_live_0_and_fallbacks_in_metrics() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, v2, _) = seed_with(&mut ns, 50, 50, &["--metrics", METRICS])?;
    ns.kill(v2)?;
    poll_until(Duration::from_secs(5), "v2's socket gone", || {
        Ok((subset_sample(&scrape()?, "tcpshift_subset_socket_live", "v2")? == 0).then_some(()))
    })?;
    let counts = count_prefixes(seed_addr(), 200)?;
    assert_eq!(counts.get("one"), Some(&200), "{counts:?}");
    let s = poll_until(Duration::from_secs(10), "200 closed", || {
        let s = scrape()?;
        let closed = subset_sample(&s, "tcpshift_tcp_connections_closed_total", "v1")?;
        Ok((closed == 200).then_some(s))
    })?;
    let chose_v2 = subset_sample(&s, "tcpshift_lookups_total", "v2")?;
    assert!(chose_v2 > 50, "about half of 200 chose v2: {chose_v2}");
    let fallbacks = |subset, direction| {
        sample(
            &s,
            "tcpshift_fallbacks_total",
            &[
                ("service", "tcp-echo"),
                ("subset", subset),
                ("direction", direction),
            ],
        )
        .map(|v| v as u64)
    };
    assert_eq!(fallbacks("v2", "out")?, chose_v2);
    assert_eq!(fallbacks("v1", "in")?, chose_v2);
    assert_eq!(subset_sample(&s, "tcpshift_subset_socket_live", "v2")?, 0);
    assert_eq!(subset_sample(&s, "tcpshift_subset_socket_live", "v1")?, 1);
    assert_eq!(
        subset_sample(&s, "tcpshift_tcp_connections_opened_total", "v1")?,
        200
    );
    assert_eq!(
        subset_sample(&s, "tcpshift_tcp_connections_opened_total", "v2")?,
        0
    );
    assert_eq!(subset_sample(&s, "tcpshift_misses_total", "v2")?, 0);
    Ok(())
}

#[test]
fn status_shows_the_observed_share_and_top_draws_bars() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 70, 30)?;
    // Fewer connections where time is stretched (emulation), so that all of them fit in the
    // kernel's observation window.
    let n = (400.0 / scaled(Duration::from_secs(1)).as_secs_f64()).clamp(100.0, 400.0) as usize;
    let start = Instant::now();
    let counts = count_prefixes(seed_addr(), n)?;
    let status = ns.status()?;
    let took = start.elapsed();
    // Observed over the kernel's last window (10 s): exact when all connections fit in it.
    // The check always runs: a run too slow for it fails instead of skipping it.
    let window = Duration::from_secs(
        status["observed_window_secs"]
            .as_u64()
            .context("observed_window_secs")?,
    );
    ensure!(
        took + Duration::from_secs(1) < window,
        "{n} connections and the status took {took:?}: not within the {window:?} observation \
         window, so the observed share cannot be checked exactly"
    );
    for (name, prefix) in [("v1", "one"), ("v2", "two")] {
        let want = prefix_count(&counts, prefix) as f64 * 100.0 / n as f64;
        let got = subset(&status, name).expect("subset")["observed_share"]
            .as_f64()
            .context("observed_share")?;
        assert!((got - want).abs() < 1e-9, "{name}: {got} vs {want}");
    }
    let table = ns.ctl_ok(&["status"])?;
    let header = table.lines().next().unwrap_or("");
    for column in [
        "WEIGHT",
        "OBSERVED(10s)",
        "ACTIVE",
        "OPENED",
        "CLOSED",
        "RECEIVED",
        "SENT",
    ] {
        assert!(header.contains(column), "{column} in {table}");
    }
    assert!(
        table.lines().nth(1).unwrap_or("").contains("70.0%"),
        "{table}"
    );

    let one = ns.ctl_ok(&["top", "--iterations", "1"])?;
    assert_eq!(one.matches("tcpshift top").count(), 1, "{one}");
    assert!(one.contains("weight    70.0%"), "{one}");
    assert!(one.contains("weight    30.0%"), "{one}");
    assert!(one.contains('█'), "{one}");
    let out = ns.ctl(&["top", "--iterations", "2", "--interval", "0.2"])?;
    assert!(out.status.success(), "{out:?}");
    let two = String::from_utf8_lossy(&out.stdout);
    assert_eq!(two.matches("tcpshift top").count(), 2, "{two}");
    assert!(two.contains("new connections/s"), "{two}");
    Ok(())
}

#[test]
fn debug_events_are_forwarded_only_while_a_debug_loader_runs() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, v2, loader) = seed_with(&mut ns, 50, 50, &["--log-level", "debug"])?;
    assert_eq!(ns.status()?["debug_events"], true);
    count_prefixes(seed_addr(), 20)?;
    ns.kill(v2)?;
    count_prefixes(seed_addr(), 40)?;
    poll_until(
        Duration::from_secs(10),
        "kernel events in tcpshiftd's log",
        || {
            let log = ns.loader_log();
            Ok([
                "port 31400: subset 0 chosen",
                "port 31400: subset 1 chosen",
                "connection opened on subset 0",
                "connection closed on subset 0",
                "subset 1 has no live socket, fell back to subset 0",
            ]
            .iter()
            .all(|e| log.contains(e))
            .then_some(()))
        },
    )?;
    // The loader turns the events off when it exits.
    ns.signal(loader, libc::SIGTERM)?;
    assert_eq!(ns.status()?["debug_events"], false);
    Ok(())
}

#[test]
fn another_namespace_s_connections_are_not_counted() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 100, 0)?;
    // The same service, addresses and ports in another namespace, with its own tcpshift: the
    // sock_ops programs of both see every socket of the host.
    let other = std::thread::spawn(|| -> Result<u64> {
        let mut other = TestNs::new()?;
        seed(&mut other, 100, 0)?;
        let counts = count_prefixes(seed_addr(), 100)?;
        let st = wait_closed(&other, 100)?;
        ensure!(counts.get("one") == Some(&100), "{counts:?}");
        Ok(counter(&st, "v1", "opened"))
    });
    let counts = count_prefixes(seed_addr(), 30)?;
    assert_eq!(counts.get("one"), Some(&30));
    let other_opened = other
        .join()
        .map_err(|_| anyhow::anyhow!("other namespace's thread panicked"))??;
    assert_eq!(other_opened, 100);
    let status = wait_closed(&ns, 30)?;
    assert_eq!(counter(&status, "v1", "opened"), 30, "{status}");
    Ok(())
}

/// `netns_ino` of the pinned netns link at `path` (0 once its namespace is gone).
fn link_netns_ino(path: &std::path::Path) -> Result<u32> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET (7) reads the path pointer only; attr is 128 zeroed bytes.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, attr.as_mut_ptr(), 128) };
    ensure!(
        fd >= 0,
        "BPF_OBJ_GET {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = [0u32; 32];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | (128u64 << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD (15); info is 128 bytes, as declared.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 15, attr.as_mut_ptr(), 128) };
    ensure!(
        rc == 0,
        "BPF_OBJ_GET_INFO_BY_FD: {}",
        std::io::Error::last_os_error()
    );
    // struct bpf_link_info { type, id, prog_id, (pad), netns { netns_ino, attach_type } }
    Ok(info[4])
}

#[test]
fn the_state_of_a_namespace_that_died_without_uninstall_is_swept() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    // A namespace whose loader is killed and which then disappears, leaving its pinned state
    // (and its sock_ops program on the cgroup root) behind.
    let dead = std::thread::spawn(|| -> Result<std::path::PathBuf> {
        // SAFETY: affects only this thread.
        ensure!(unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0, "unshare");
        let ino = std::fs::metadata("/proc/thread-self/ns/net")?;
        let dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/tcpshift/netns-{}",
            std::os::unix::fs::MetadataExt::ino(&ino)
        ));
        let cfg = std::env::temp_dir().join(format!("tcpshift-dead-{}.yaml", std::process::id()));
        std::fs::write(&cfg, seed_config(100, 0))?;
        let mut loader = std::process::Command::new(tcpshift_tests::bin_dir().join("tcpshiftd"))
            .arg("--config")
            .arg(&cfg)
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let pinned = poll_until(Duration::from_secs(15), "state pinned", || {
            Ok(dir.join("sockops-link").exists().then_some(()))
        });
        let _ = loader.kill();
        let _ = loader.wait();
        let _ = std::fs::remove_file(&cfg);
        pinned?;
        Ok(dir)
    });
    let dead = dead
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))??;
    poll_until(
        Duration::from_secs(15),
        "the dead namespace cleaned up",
        || Ok((link_netns_ino(&dead.join("link"))? == 0).then_some(())),
    )?;
    assert!(dead.exists(), "still pinned before another loader starts");
    let mut ns = TestNs::new()?;
    seed(&mut ns, 100, 0)?;
    assert!(
        !dead.exists(),
        "{} should have been removed",
        dead.display()
    );
    Ok(())
}
