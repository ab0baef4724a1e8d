//! tcpshiftd as a daemon: its HTTP endpoint (/metrics under concurrent scrapes and bad
//! clients, /healthz, /readyz), one tcpshiftd per network namespace, systemd's readiness
//! protocol, SIGHUP reloads and its log. Each test runs in its own network namespace.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tcpshift_tests::{
    TestNs, bin_dir, exchange, http_get, http_raw, poll_until, privileged, scaled, seed_addr,
    seed_config, subset, subsets,
};

const METRICS: &str = "127.0.0.1:9464";

fn metrics_addr() -> SocketAddr {
    METRICS.parse().expect("valid address")
}

/// Both seed backends and a loader serving the endpoint at [`METRICS`].
fn seed_with_metrics(ns: &mut TestNs, v1: u32, v2: u32) -> Result<usize> {
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    ns.loader_with(&seed_config(v1, v2), &["--metrics", METRICS])
}

/// The series of a Prometheus text body (name and labels, without the value).
fn series(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()))
        .collect()
}

/// Status code of a raw HTTP response.
fn code(response: &[u8]) -> Option<u16> {
    String::from_utf8_lossy(response)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
}

/// The endpoint answers `GET /metrics` with the seed's series.
fn scrape_ok() -> Result<BTreeSet<String>> {
    let (code, body) = http_get(metrics_addr(), "/metrics")?;
    ensure!(code == 200, "GET /metrics: HTTP {code}: {body}");
    let s = series(&body);
    ensure!(
        s.contains("tcpshift_subset_weight{service=\"tcp-echo\",subset=\"v2\"}"),
        "no weight series in {body}"
    );
    Ok(s)
}

#[test]
fn metrics_endpoint_serves_concurrent_scrapes_and_survives_bad_clients() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed_with_metrics(&mut ns, 80, 20)?;
    let expected = scrape_ok()?;

    // 50 concurrent scrapes: every one answered, all with the same series.
    let scrapes: Vec<_> = (0..50)
        .map(|_| std::thread::spawn(scrape_ok))
        .collect::<Vec<_>>();
    for (i, s) in scrapes.into_iter().enumerate() {
        let got = s
            .join()
            .map_err(|_| anyhow::anyhow!("scrape {i} panicked"))??;
        assert_eq!(got, expected, "scrape {i}");
    }

    // HEAD: the GET's status and length, no body.
    let (response, closed) = http_raw(
        metrics_addr(),
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(15),
    )?;
    let text = String::from_utf8_lossy(&response);
    assert!(closed, "HEAD: connection not closed: {text}");
    assert_eq!(code(&response), Some(200), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").context("HEAD response")?;
    assert!(body.is_empty(), "HEAD sent a body: {text}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );

    // Unknown path, wrong method.
    assert_eq!(http_get(metrics_addr(), "/nothing")?.0, 404);
    let (response, _) = http_raw(
        metrics_addr(),
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        Duration::from_secs(15),
    )?;
    assert_eq!(
        code(&response),
        Some(405),
        "{}",
        String::from_utf8_lossy(&response)
    );

    // Oversized headers: refused (431) or closed, quickly.
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        big.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(30)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let started = Instant::now();
    let outcome = http_raw(metrics_addr(), &big, Duration::from_secs(15));
    let took = started.elapsed();
    match &outcome {
        Ok((response, closed)) => {
            assert!(*closed, "oversized headers: still open after {took:?}");
            assert_ne!(code(response), Some(200), "oversized headers were accepted");
        }
        // The server may close while we still write: a broken pipe or reset is a refusal.
        Err(e) => eprintln!("oversized headers: {e:#} after {took:?}"),
    }

    // An endless header stream, written slowly enough to stay under the size limit for a
    // while: closed within the bound.
    let endless = std::thread::spawn(|| -> Result<Duration> {
        let mut s = TcpStream::connect(metrics_addr())?;
        let started = Instant::now();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")?;
        let mut i = 0u64;
        loop {
            if s.write_all(format!("X-Endless-{i}: yes\r\n").as_bytes())
                .is_err()
            {
                return Ok(started.elapsed());
            }
            i += 1;
            if started.elapsed() > scaled(Duration::from_secs(30)) {
                bail!("an endless header stream was still accepted after 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });

    // Idle clients holding connections: /metrics is served while they wait, not after.
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| {
            let s = TcpStream::connect(metrics_addr())?;
            // A partial request line, never finished.
            (&s).write_all(b"GET /met")?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    scrape_ok()?;
    eprintln!(
        "/metrics served in {:?} while 40 idle clients were connected",
        started.elapsed()
    );
    let mut byte = [0u8; 1];
    idle[0].set_nonblocking(true)?;
    match (&idle[0]).read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => bail!("the idle clients were closed before /metrics was served: {other:?}"),
    }
    idle[0].set_nonblocking(false)?;
    // Each idle client is closed within the bound.
    for (i, mut s) in idle.into_iter().enumerate() {
        s.set_read_timeout(Some(scaled(Duration::from_secs(30))))?;
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => bail!("idle client {i} still connected: {e}"),
        }
    }

    let took = endless
        .join()
        .map_err(|_| anyhow::anyhow!("endless writer panicked"))??;
    eprintln!("endless header stream closed after {took:?}");
    assert_eq!(scrape_ok()?, expected, "after the bad clients");
    Ok(())
}

/// `GET path`: (code, body).
fn get(path: &str) -> Result<(u16, String)> {
    http_get(metrics_addr(), path)
}

#[test]
fn healthz_is_alive_and_readyz_follows_the_subsets_with_weight() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    let config = ns.file("tcpshift.yaml");
    std::fs::write(&config, seed_config(50, 50))?;
    let config = config.display().to_string();
    ns.spawn_loader(&["--config", &config, "--metrics", METRICS], &[])?;
    poll_until(Duration::from_secs(30), "/healthz answers 200", || {
        Ok(matches!(get("/healthz"), Ok((200, _))).then_some(()))
    })
    .with_context(|| ns.loader_log())?;
    poll_until(Duration::from_secs(10), "v1 live", || {
        Ok((subset(&ns.status()?, "v1").context("v1")?["live"] == true).then_some(()))
    })?;

    // v2 has weight 50 and no server: not ready, and the reason names it.
    let (code, body) = get("/readyz")?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("tcp-echo/v2"), "{body}");
    assert!(!body.contains("tcp-echo/v1"), "{body}");

    // Its server starts: ready once the socket is registered.
    let v2 = ns.echo("127.0.0.1", 9002, "two")?;
    poll_until(Duration::from_secs(10), "/readyz answers 200", || {
        Ok(matches!(get("/readyz"), Ok((200, _))).then_some(()))
    })?;
    assert_eq!(subset(&ns.status()?, "v2").context("v2")?["live"], true);

    // v2's server stops: not ready; with weight 0 v2 does not count.
    ns.kill(v2)?;
    poll_until(Duration::from_secs(10), "/readyz answers 503", || {
        Ok(matches!(get("/readyz"), Ok((503, _))).then_some(()))
    })?;
    ns.ctl_ok(&["set-weight", "v1=100", "v2=0"])?;
    let (code, body) = get("/readyz")?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(get("/healthz")?.0, 200);
    Ok(())
}

/// Runs tcpshiftd `args` to its exit (at most 30 s): (exit code, stderr).
fn run_daemon(args: &[&str]) -> Result<(Option<i32>, String)> {
    let mut child = Command::new(bin_dir().join("tcpshiftd"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let timeout = scaled(Duration::from_secs(30));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("tcpshiftd {args:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    Ok((status.code(), stderr))
}

/// What must not change: weights, sockets and program ids.
fn essentials(status: &Value) -> Value {
    serde_json::json!({
        "program_id": status["program_id"],
        "accounting_program_id": status["accounting_program_id"],
        "subsets": subsets(status)
            .map(|s| serde_json::json!([s["name"], s["backend"], s["weight"], s["live"]]))
            .collect::<Vec<_>>(),
    })
}

#[test]
fn a_second_daemon_in_the_namespace_is_refused_naming_the_first() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    let first = ns.loader_with(&seed_config(80, 20), &[])?;
    let before = essentials(&ns.status()?);
    let other = ns.file("other.yaml");
    std::fs::write(&other, seed_config(10, 90))?;
    let other = other.display().to_string();

    let (code, stderr) =
        run_daemon(&["--config", &other, "--metrics", METRICS, "--reload-program"])?;
    eprintln!("second tcpshiftd: {}", stderr.trim());
    assert_ne!(code, Some(0), "{stderr}");
    assert!(code.is_some(), "killed by a signal: {stderr}");
    let pid = ns.pid(first);
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");
    assert!(stderr.contains(&format!("kill {pid}")), "{stderr}");
    assert!(stderr.contains("--takeover"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing changed: same weights, sockets and programs; no metrics endpoint; the first
    // one still runs and still registers sockets.
    assert_eq!(essentials(&ns.status()?), before);
    assert!(
        TcpStream::connect(metrics_addr()).is_err(),
        "the refused tcpshiftd serves metrics"
    );
    assert!(ns.running(first)?, "the first tcpshiftd exited");

    // --takeover: the first one stops, the second takes its place with its own arguments.
    let second = ns.spawn_loader(
        &["--config", &other, "--takeover", "--metrics", METRICS],
        &[],
    )?;
    poll_until(Duration::from_secs(30), "the first tcpshiftd exits", || {
        Ok((!ns.running(first)?).then_some(()))
    })?;
    poll_until(Duration::from_secs(30), "the second serves metrics", || {
        Ok(matches!(http_get(metrics_addr(), "/healthz"), Ok((200, _))).then_some(()))
    })
    .with_context(|| ns.loader_log())?;
    assert!(ns.running(second)?, "{}", ns.loader_log());
    assert!(ns.loader_log().contains("took over"), "{}", ns.loader_log());
    // Adopted: the kernel's weights are kept, not the second file's.
    let status = ns.status()?;
    assert_eq!(
        subset(&status, "v2").context("v2")?["weight"],
        20,
        "{status}"
    );
    Ok(())
}

#[test]
fn an_unbindable_metrics_address_installs_nothing() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let ns = TestNs::new()?;
    let config = ns.file("tcpshift.yaml");
    std::fs::write(&config, seed_config(80, 20))?;
    // TEST-NET-1: no interface of this namespace has it.
    let (code, stderr) = run_daemon(&[
        "--config",
        &config.display().to_string(),
        "--metrics",
        "192.0.2.1:9464",
    ])?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot listen on 192.0.2.1:9464"),
        "{stderr}"
    );
    let out = ns.ctl(&["status"])?;
    assert!(!out.status.success(), "installed anyway");
    Ok(())
}

#[test]
fn ready_is_notified_once_the_seed_is_steered_and_stopping_on_sigterm() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    let socket_path = ns.file("notify.sock");
    let socket = UnixDatagram::bind(&socket_path)?;
    let config = ns.file("tcpshift.yaml");
    std::fs::write(&config, seed_config(50, 50))?;
    let loader = ns.spawn_loader(
        &["--config", &config.display().to_string()],
        &[("NOTIFY_SOCKET", Some(&socket_path.display().to_string()))],
    )?;
    socket.set_read_timeout(Some(scaled(Duration::from_secs(30))))?;
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no notification; log: {}", ns.loader_log()))?;
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(first, "READY=1", "first notification");
    // At READY the seed is steered: connections through the service port work at once, to
    // both subsets.
    let prefixes: BTreeSet<String> = (0..40)
        .map(|i| exchange(seed_addr(), &format!("ready {i}")))
        .collect::<Result<_>>()?;
    assert_eq!(
        prefixes,
        BTreeSet::from(["one".to_string(), "two".to_string()])
    );

    ns.signal(loader, libc::SIGTERM)?;
    socket.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
    let n = socket.recv(&mut buf).context("no notification at exit")?;
    assert_eq!(String::from_utf8_lossy(&buf[..n]), "STOPPING=1");
    Ok(())
}

/// Waits until `needle` occurs `n` times in the loader's log.
fn wait_log(ns: &TestNs, needle: &str, n: usize) -> Result<()> {
    poll_until(Duration::from_secs(15), needle, || {
        Ok((ns.loader_log().matches(needle).count() >= n).then_some(()))
    })
    .with_context(|| ns.loader_log())
}

/// (subset, weight) of every subset, in order.
fn weights(status: &Value) -> Vec<(String, u64)> {
    subsets(status)
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["weight"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

fn w(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(n, w)| (n.to_string(), *w)).collect()
}

#[test]
fn sighup_applies_a_changed_file_and_refuses_a_bad_one() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    let loader = ns.loader_with(&seed_config(80, 20), &[])?;
    let config = ns.file("tcpshift.yaml");

    // The file's weights did not change: the kernel's (set-weight) are kept.
    ns.ctl_ok(&["set-weight", "v1=70", "v2=30"])?;
    ns.send_signal(loader, libc::SIGHUP)?;
    wait_log(&ns, "reloaded the configuration", 1)?;
    assert_eq!(weights(&ns.status()?), w(&[("v1", 70), ("v2", 30)]));

    // Changed weights and a new subset: applied.
    ns.echo("127.0.0.1", 9003, "three")?;
    std::fs::write(
        &config,
        "services:\n  tcp-echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n      v2: 127.0.0.1:9002\n      v3: 127.0.0.1:9003\n    weights: {v1: 40, v2: 40, v3: 20}\n",
    )?;
    ns.send_signal(loader, libc::SIGHUP)?;
    wait_log(&ns, "reloaded the configuration", 2)?;
    let status = ns.wait_live(scaled(Duration::from_secs(10)))?;
    assert_eq!(
        weights(&status),
        w(&[("v1", 40), ("v2", 40), ("v3", 20)]),
        "{status}"
    );
    let prefixes: BTreeSet<String> = (0..60)
        .map(|i| exchange(seed_addr(), &format!("after reload {i}")))
        .collect::<Result<_>>()?;
    assert!(prefixes.contains("three"), "{prefixes:?}");

    // A bad file: refused, logged, nothing changed, still running.
    let before = essentials(&ns.status()?);
    std::fs::write(
        &config,
        "services:\n  tcp-echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n    weights: {v1: -5}\n",
    )?;
    ns.send_signal(loader, libc::SIGHUP)?;
    wait_log(&ns, "reload refused, nothing changed", 1)?;
    assert!(ns.running(loader)?, "{}", ns.loader_log());
    assert_eq!(essentials(&ns.status()?), before);
    // A good file again: the next SIGHUP applies it (v3 is gone from the service).
    std::fs::write(&config, seed_config(90, 10))?;
    ns.send_signal(loader, libc::SIGHUP)?;
    wait_log(&ns, "reloaded the configuration", 3)?;
    assert_eq!(
        weights(&ns.status()?),
        w(&[("v1", 90), ("v2", 10)]),
        "{}",
        ns.loader_log()
    );
    Ok(())
}

#[test]
fn log_written_to_a_file_has_no_escape_codes_and_registration_times() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    let config = ns.file("tcpshift.yaml");
    std::fs::write(&config, seed_config(50, 50))?;
    // NO_COLOR unset: the log is plain because it is not a terminal.
    let loader = ns.spawn_loader(
        &[
            "--config",
            &config.display().to_string(),
            "--log-level",
            "debug",
        ],
        &[("NO_COLOR", None), ("RUST_LOG", None)],
    )?;
    wait_log(&ns, "ready: every subset has a registered socket", 1)?;
    exchange(seed_addr(), "hello")?;
    ns.signal(loader, libc::SIGTERM)?;
    let log = std::fs::read(ns.file("tcpshiftd.log"))?;
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("exiting"), "{text}");
    assert!(!log.contains(&0x1b), "ESC in the log:\n{text}");
    // Every registration says how long it took from the scan that saw the listener.
    for name in ["v1", "v2"] {
        let line = text
            .lines()
            .find(|l| {
                l.contains("registered listening socket") && l.contains(&format!("subset={name}"))
            })
            .with_context(|| format!("no registration of {name}:\n{text}"))?;
        let us: u64 = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("seen_to_registered_us="))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no seen_to_registered_us in {line}"))?;
        assert!(line.contains("service=tcp-echo"), "{line}");
        assert!(line.contains("pid="), "{line}");
        eprintln!("{name}: registered {us} µs after its listener was seen");
    }
    Ok(())
}
