//! Connection limits and outlier ejection (issue 18), with real connections in the test's own
//! network namespace: limits enforced by sk_lookup against the kernel's exact count of open
//! connections (`TS_LOAD`), ejections decided by tcpshiftd from the kernel's failure signals
//! and applied through `TS_LIMITS`. Everything is read back from `tcpshiftctl status --json`
//! (`subsets[].limits`).

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tcpshift_tests::{
    Conn, TestNs, exchange, pinned, poll_until, privileged, scaled, seed_addr, subset,
};

/// `subsets[name].limits[field]` of a status document, as a number (0 when absent).
fn limit(status: &Value, name: &str, field: &str) -> u64 {
    subset(status, name)
        .and_then(|s| s["limits"][field].as_u64())
        .unwrap_or(0)
}

/// `subsets[name].limits.outlier`, `Null` when outlier detection is off.
fn outlier(status: &Value, name: &str) -> Value {
    subset(status, name).map_or(Value::Null, |s| s["limits"]["outlier"].clone())
}

/// Opens `n` connections one after another, each exchanging a line, and keeps them open;
/// returns them with the prefix of the backend each reached.
fn hold(addr: SocketAddr, n: usize) -> Result<(Vec<Conn>, BTreeMap<String, usize>)> {
    let mut conns = Vec::with_capacity(n);
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let mut c = Conn::open(addr).with_context(|| format!("connection {i}"))?;
        let prefix = c.exchange(&format!("held {i}"))?;
        *counts.entry(prefix).or_insert(0) += 1;
        conns.push(c);
    }
    Ok((conns, counts))
}

const LIMITED: &str = "services:
  tcp-echo:
    listen: 31400
    subsets:
      v1: 127.0.0.1:9001
      v2: {address: 127.0.0.1:9002, maxConnections: 20}
    weights: {v1: 20, v2: 80}
";

#[test]
fn connection_limit_sends_the_rest_to_v1_and_survives_a_restart() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    let loader = ns.loader(LIMITED)?;
    let (conns, counts) = hold(seed_addr(), 50)?;
    ensure!(
        counts.get("two") == Some(&20) && counts.get("one") == Some(&30),
        "50 held connections with maxConnections 20 on v2: expected 20 on v2 and 30 on v1, got {counts:?}"
    );
    let status = ns.status()?;
    ensure!(
        limit(&status, "v2", "open") == 20 && limit(&status, "v1", "open") == 30,
        "the kernel's open counts: {:?}",
        subset(&status, "v2")
    );
    ensure!(limit(&status, "v2", "max_connections") == 20);
    // Hashing at 20/80 chose v2 for about 40 of 50: those beyond the limit were diverted.
    ensure!(
        limit(&status, "v2", "diverted") >= 1,
        "no connection counted as diverted from the full v2: {:?}",
        subset(&status, "v2")
    );

    // The count is in a pinned map: a tcpshiftd killed and started again finds it as it was,
    // and v2 stays full.
    ns.kill(loader)?;
    ns.restart_loader()?;
    let status = ns.status()?;
    ensure!(
        limit(&status, "v2", "open") == 20 && limit(&status, "v1", "open") == 30,
        "open counts after a restart: {status}"
    );
    let (more, counts) = hold(seed_addr(), 10)?;
    ensure!(
        counts.get("one") == Some(&10),
        "v2 is full: 10 more connections must all reach v1, got {counts:?}"
    );
    drop(more);

    // Closing v2's connections frees it: the count goes back down and v2 takes new ones.
    drop(conns);
    poll_until(Duration::from_secs(10), "open counts back to 0", || {
        let s = ns.status()?;
        Ok((limit(&s, "v1", "open") == 0 && limit(&s, "v2", "open") == 0).then_some(()))
    })?;
    let (_again, counts) = hold(seed_addr(), 30)?;
    ensure!(
        counts.get("two").copied().unwrap_or(0) >= 1,
        "v2 gets connections again once below its limit: {counts:?}"
    );
    Ok(())
}

#[test]
fn all_subsets_full_refuses_at_once_and_counts() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    ns.loader(
        "services:
  tcp-echo:
    listen: 31400
    subsets: {v1: 127.0.0.1:9001, v2: 127.0.0.1:9002}
    weights: {v1: 50, v2: 50}
    maxConnections: 3
",
    )?;
    let (held, counts) = hold(seed_addr(), 6)?;
    ensure!(
        counts.get("one") == Some(&3) && counts.get("two") == Some(&3),
        "6 connections with 3 allowed on each subset: {counts:?}"
    );
    // The next connections find every subset full: refused by a RST, not left to time out.
    for i in 0..3 {
        match TcpStream::connect_timeout(&seed_addr(), scaled(Duration::from_secs(5))) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            Err(e) => bail!("connection {i} beyond every limit: expected refused, got {e}"),
            Ok(_) => bail!("connection {i} beyond every limit was accepted"),
        }
    }
    let status = ns.status()?;
    let refused =
        limit(&status, "v1", "refused_at_limit") + limit(&status, "v2", "refused_at_limit");
    ensure!(
        refused == 3,
        "refused at the limit: counted {refused}, expected 3: {status}"
    );
    // One closes: a new connection is accepted again.
    drop(held);
    poll_until(Duration::from_secs(10), "open counts back to 0", || {
        let s = ns.status()?;
        Ok((limit(&s, "v1", "open") + limit(&s, "v2", "open") == 0).then_some(()))
    })?;
    exchange(seed_addr(), "after")?;
    Ok(())
}

/// Makes `n` connections one after another; returns (prefixes of those that worked, failures).
fn attempts(n: usize) -> (BTreeMap<String, usize>, usize) {
    let mut ok = BTreeMap::new();
    let mut failed = 0;
    for i in 0..n {
        match exchange(seed_addr(), &format!("try {i}")) {
            Ok(p) => *ok.entry(p).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    (ok, failed)
}

#[test]
fn a_resetting_subset_is_ejected_and_returns_when_healthy() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    let bad = ns.echo_args(&[
        "--bind",
        "127.0.0.1",
        "--fault-reset-percent",
        "100",
        "9002",
        "two",
    ])?;
    // Long enough for the checks made while v2 is ejected, on a slow (emulated) machine too.
    let ejection = scaled(Duration::from_secs(3)).as_secs();
    ns.loader(&format!(
        "services:
  tcp-echo:
    listen: 31400
    subsets: {{v1: 127.0.0.1:9001, v2: 127.0.0.1:9002}}
    weights: {{v1: 50, v2: 50}}
    outlierDetection:
      consecutiveGatewayErrors: 3
      interval: 200ms
      baseEjectionTime: {ejection}s
      maxEjectionPercent: 50
"
    ))?;
    // Connections until v2 is ejected: each one that reaches v2 is reset.
    let mut failures = 0;
    poll_until(Duration::from_secs(20), "v2 ejected", || {
        failures += attempts(4).1;
        let s = ns.status()?;
        Ok((outlier(&s, "v2")["ejected"] == true).then_some(()))
    })?;
    ensure!(
        failures >= 3,
        "ejected after {failures} failures, fewer than the 3 configured"
    );
    let s = ns.status()?;
    let o = outlier(&s, "v2");
    ensure!(
        o["times_ejected"] == 1
            && o["reason"] == "consecutiveGatewayErrors"
            && o["ejected_since_ms"].as_u64().unwrap_or(0) > 0,
        "v2's ejection record: {o}"
    );
    ensure!(outlier(&s, "v1")["ejected"] == false);
    // Ejected: v2's share goes to v1, with no failed connection.
    let (ok, failed) = attempts(40);
    ensure!(
        failed == 0 && ok.get("one") == Some(&40),
        "while v2 is ejected: {failed} failed, replies {ok:?}"
    );
    ensure!(
        outlier(&ns.status()?, "v2")["ejected"] == true,
        "v2 came back too early"
    );

    // v2's backend is healthy again: after its ejection time it gets connections again.
    ns.kill(bad)?;
    ns.echo("127.0.0.1", 9002, "two")?;
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    poll_until(Duration::from_secs(15), "v2 returned", || {
        let s = ns.status()?;
        Ok((outlier(&s, "v2")["ejected"] == false).then_some(()))
    })?;
    let (ok, failed) = attempts(40);
    ensure!(
        failed == 0 && ok.get("two").copied().unwrap_or(0) >= 5,
        "after the ejection: {failed} failed, replies {ok:?}"
    );
    Ok(())
}

#[test]
fn max_ejection_percent_keeps_subsets_in() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    for (port, prefix) in [("9002", "two"), ("9003", "three")] {
        ns.echo_args(&[
            "--bind",
            "127.0.0.1",
            "--fault-reset-percent",
            "100",
            port,
            prefix,
        ])?;
    }
    // 10 % of 3 subsets: one may be ejected (none was yet), a second may not.
    ns.loader(
        "services:
  tcp-echo:
    listen: 31400
    subsets: {v1: 127.0.0.1:9001, v2: 127.0.0.1:9002, v3: 127.0.0.1:9003}
    weights: {v1: 34, v2: 33, v3: 33}
    outlierDetection: {consecutiveGatewayErrors: 2, interval: 100ms, baseEjectionTime: 60s, maxEjectionPercent: 10}
",
    )?;
    let ejected = |s: &Value| {
        ["v2", "v3"]
            .iter()
            .filter(|n| outlier(s, n)["ejected"] == true)
            .count()
    };
    poll_until(Duration::from_secs(20), "one subset ejected", || {
        attempts(6);
        Ok((ejected(&ns.status()?) >= 1).then_some(()))
    })?;
    // The other keeps failing, past its threshold, for many intervals: it stays in.
    let held = poll_until(
        Duration::from_secs(20),
        "the other past its threshold",
        || {
            attempts(6);
            let s = ns.status()?;
            let other = ["v2", "v3"]
                .into_iter()
                .find(|n| outlier(&s, n)["ejected"] == false)
                .context("both ejected")?;
            let errors = outlier(&s, other)["errors_in_row"].as_u64().unwrap_or(0);
            Ok((errors >= 4).then_some(s))
        },
    )?;
    ensure!(
        ejected(&held) == 1 && outlier(&held, "v1")["ejected"] == false,
        "maxEjectionPercent 10 of 3 subsets: exactly one ejected, got {held}"
    );
    Ok(())
}

#[test]
fn a_destination_rule_traffic_policy_applies() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    ns.bare_loader()?;
    let file = ns.file("dr.yaml");
    std::fs::write(
        &file,
        "services:
  tcp-echo:
    listen: 31400
    subsets: {v1: 127.0.0.1:9001, v2: 127.0.0.1:9002}
    weights: {v1: 20, v2: 80}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: tcp-echo-destination
spec:
  host: tcp-echo
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 7, interval: 1s, baseEjectionTime: 30s}
    tls: {mode: DISABLE}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool:
        tcp: {maxConnections: 4}
",
    )?;
    let out = ns.ctl(&["apply", "-f", &file.display().to_string()])?;
    ensure!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("the rest is ignored"),
        "the ignored tls is warned about: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    // Connections are counted per subset (sock_ops) whether or not limits are enforced.
    let (_held, counts) = hold(seed_addr(), 5)?;
    let s = ns.status()?;
    for (name, prefix) in [("v1", "one"), ("v2", "two")] {
        let n = counts.get(prefix).copied().unwrap_or(0) as u64;
        ensure!(limit(&s, name, "open") == n, "open count of {name}: {s}");
    }
    let o = outlier(&s, "v1");
    ensure!(
        o["consecutive_errors"] == 7 && o["interval_ms"] == 1000 && o["base_ejection_ms"] == 30000,
        "outlierDetection from the DestinationRule: {o}"
    );
    ensure!(limit(&s, "v1", "max_connections") == 0 && limit(&s, "v2", "max_connections") == 4);
    Ok(())
}

/// Whether any TCP socket of this namespace has local port `port` (the backends' ends of the
/// service's connections), read with `ss`.
fn sockets_on(port: u16) -> Result<bool> {
    let out = std::process::Command::new("ss")
        .args(["-Htan", &format!("sport = :{port}")])
        .output()
        .context("cannot run ss (install iproute2)")?;
    ensure!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The listening sockets are on the backends' own ports, not on the service port.
    Ok(!out.stdout.iter().all(u8::is_ascii_whitespace))
}

#[test]
fn deleting_a_service_removes_its_load_and_a_new_one_starts_at_zero() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    ns.bare_loader()?;
    let file = ns.file("limited.yaml");
    std::fs::write(
        &file,
        "services:
  tcp-echo:
    listen: 31400
    subsets: {v1: 127.0.0.1:9001, v2: 127.0.0.1:9002}
    weights: {v1: 50, v2: 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: tcp-echo-destination
spec:
  host: tcp-echo
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 3}
",
    )?;
    let apply = || -> Result<()> {
        ns.ctl_ok(&["apply", "-f", &file.display().to_string()])?;
        ns.wait_live(scaled(Duration::from_secs(10)))?;
        Ok(())
    };
    apply()?;
    let (held, counts) = hold(seed_addr(), 6)?;
    ensure!(
        counts.get("one") == Some(&3) && counts.get("two") == Some(&3),
        "6 connections with 3 allowed on each subset: {counts:?}: {}",
        ns.status()?
    );
    // The only service has id 0: slots 0 and 1, and the service's summary entry.
    let load = pinned::map_keys("TS_LOAD")?;
    ensure!(
        load.len() == 3 && load[..2] == [0, 1],
        "TS_LOAD of one service with two subsets: {load:?}"
    );

    // Deleted with its connections still open: every entry of the service goes.
    ns.ctl_ok(&["delete", "service", "tcp-echo"])?;
    for map in ["TS_LOAD", "TS_LIMITS"] {
        let keys = pinned::map_keys(map)?;
        ensure!(keys.is_empty(), "{map} after the delete: {keys:?}");
    }
    // The deleted service's connections close afterwards: their closes leave nothing behind.
    drop(held);
    poll_until(
        Duration::from_secs(10),
        "the held connections closed",
        || Ok((!sockets_on(31400)?).then_some(())),
    )?;
    let keys = pinned::map_keys("TS_LOAD")?;
    ensure!(
        keys.is_empty(),
        "TS_LOAD after the deleted service's connections closed: {keys:?}"
    );

    // The same service again takes the same slots and counts from 0: 3 on each, then full.
    apply()?;
    let s = ns.status()?;
    ensure!(
        limit(&s, "v1", "open") == 0 && limit(&s, "v2", "open") == 0,
        "open counts of the new service: {s}"
    );
    let (_held, counts) = hold(seed_addr(), 6)?;
    ensure!(
        counts.get("one") == Some(&3) && counts.get("two") == Some(&3),
        "the new service with 3 allowed on each subset: {counts:?}"
    );
    let s = ns.status()?;
    ensure!(
        limit(&s, "v1", "open") == 3 && limit(&s, "v2", "open") == 3,
        "open counts of the new service: {s}"
    );
    match TcpStream::connect_timeout(&seed_addr(), scaled(Duration::from_secs(5))) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => bail!("a 7th connection: expected refused, got {e}"),
        Ok(_) => bail!("a 7th connection was accepted: the new service's count is off"),
    }
}
