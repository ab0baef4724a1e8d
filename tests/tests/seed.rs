//! The seed end to end: Istio's TCP traffic shifting task, in the kernel.
//! Each test runs in its own network namespace (see `tcpshift_tests::TestNs`).

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use tcpshift_tests::{Conn, TestNs, count_prefixes, exchange, privileged, seed, seed_addr, subset};

fn share(counts: &std::collections::BTreeMap<String, usize>, prefix: &str) -> f64 {
    let total: usize = counts.values().sum();
    *counts.get(prefix).unwrap_or(&0) as f64 * 100.0 / total as f64
}

#[test]
fn all_v1_every_connection_answered_by_v1() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 100, 0)?;
    let counts = count_prefixes(seed_addr(), 1000)?;
    assert_eq!(counts.get("one"), Some(&1000), "{counts:?}");
    assert_eq!(counts.len(), 1, "{counts:?}");
    // The kernel counted the same: 1000 connections opened on v1. (`steered` counts lookups:
    // a SYN looked up twice on a slow machine, e.g. under emulation, counts twice there.)
    let status = ns.status()?;
    let v1 = subset(&status, "v1").expect("v1 in status");
    assert_eq!(v1["counters"]["opened"], 1000);
    assert!(v1["counters"]["steered"].as_u64().unwrap_or(0) >= 1000);
    assert_eq!(subset(&status, "v2").expect("v2")["counters"]["steered"], 0);
    Ok(())
}

#[test]
fn set_weight_v2_20_gives_about_20_percent_then_0_100_gives_all_v2() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 100, 0)?;
    let out = ns.ctl_ok(&["set-weight", "v2=20"])?;
    assert_eq!(out.trim(), "tcp-echo: v1=80 v2=20");
    let counts = count_prefixes(seed_addr(), 2000)?;
    let v2 = share(&counts, "two");
    eprintln!("80/20 over 2000 connections: {counts:?} -> v2 {v2:.2}%");
    assert!(
        (17.0..=23.0).contains(&v2),
        "v2 share {v2:.2}% not within 20 ± 3: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 2000);

    ns.ctl_ok(&["set-weight", "v1=0", "v2=100"])?;
    let counts = count_prefixes(seed_addr(), 500)?;
    assert_eq!(counts.get("two"), Some(&500), "{counts:?}");
    Ok(())
}

#[test]
fn set_weight_takes_effect_for_the_very_next_connection() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 100, 0)?;
    for round in 0..20 {
        let (w1, w2, want) = if round % 2 == 0 {
            ("v1=0", "v2=100", "two")
        } else {
            ("v1=100", "v2=0", "one")
        };
        ns.ctl_ok(&["set-weight", w1, w2])?;
        assert_eq!(exchange(seed_addr(), "next")?, want, "round {round}");
    }
    Ok(())
}

#[test]
fn open_connection_keeps_its_version_after_a_weight_change() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 100, 0)?;
    let mut before = Conn::open(seed_addr())?;
    assert_eq!(before.exchange("first")?, "one");
    ns.ctl_ok(&["set-weight", "v1=0", "v2=100"])?;
    assert_eq!(exchange(seed_addr(), "new")?, "two");
    for i in 0..10 {
        assert_eq!(before.exchange(&format!("again {i}"))?, "one");
    }
    Ok(())
}

#[test]
fn ports_that_are_not_configured_are_not_steered() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 100, 0)?;
    ns.echo("127.0.0.1", 9100, "direct")?;
    // A port with its own listener keeps reaching it.
    for i in 0..50 {
        assert_eq!(
            exchange(SocketAddr::from(([127, 0, 0, 1], 9100)), &format!("x{i}"))?,
            "direct"
        );
    }
    // The backends' own ports still reach them directly.
    assert_eq!(
        exchange(SocketAddr::from(([127, 0, 0, 1], 9002)), "direct to v2")?,
        "two"
    );
    // A port nobody listens on is refused, as without tcpshift.
    let err = std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], 31401)),
        Duration::from_secs(2),
    )
    .expect_err("nothing listens on 31401");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let status = ns.status()?;
    let steered: u64 = ["v1", "v2"]
        .iter()
        .map(|s| {
            subset(&status, s).expect("subset")["counters"]["steered"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(steered, 0, "only the service port is steered");
    Ok(())
}

#[test]
fn loader_killed_steering_continues_and_restart_keeps_weights() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, _, loader) = seed(&mut ns, 100, 0)?;
    ns.kill(loader)?;
    let counts = count_prefixes(seed_addr(), 200)?;
    assert_eq!(
        counts.get("one"),
        Some(&200),
        "steering after SIGKILL: {counts:?}"
    );
    ns.ctl_ok(&["set-weight", "v2=100"])?;
    let counts = count_prefixes(seed_addr(), 200)?;
    assert_eq!(
        counts.get("two"),
        Some(&200),
        "set-weight without loader: {counts:?}"
    );
    // Restart: the config says 100/0 but the kernel's 0/100 must survive.
    ns.restart_loader()?;
    let status = ns.status()?;
    assert_eq!(subset(&status, "v1").expect("v1")["weight"], 0);
    assert_eq!(subset(&status, "v2").expect("v2")["weight"], 100);
    let counts = count_prefixes(seed_addr(), 200)?;
    assert_eq!(counts.get("two"), Some(&200), "after restart: {counts:?}");
    Ok(())
}

#[test]
fn v2_killed_every_new_connection_goes_to_v1_none_refused() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, v2, _) = seed(&mut ns, 50, 50)?;
    ns.kill(v2)?;
    let counts = count_prefixes(seed_addr(), 500)?;
    assert_eq!(counts.get("one"), Some(&500), "{counts:?}");
    let status = ns.status()?;
    let v2s = subset(&status, "v2").expect("v2");
    assert_eq!(v2s["live"], false);
    let fallbacks = v2s["counters"]["fallback_out"].as_u64().unwrap_or(0);
    assert!(
        fallbacks > 150,
        "about half of 500 connections chose v2 and fell back: {fallbacks}"
    );
    assert_eq!(
        subset(&status, "v1").expect("v1")["counters"]["fallback_in"].as_u64(),
        Some(fallbacks)
    );
    Ok(())
}
