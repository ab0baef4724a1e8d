//! Never take a port another server already serves, unless asked (`takeOver: true`): the
//! refusal through `tcpshiftctl apply` and `tcpshiftd --config` (start and SIGHUP), the
//! take-over itself, and listeners that start later on a steered port. Each test runs in its
//! own network namespace.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpshift_tests::{
    TestNs, count_prefixes, exchange, poll_until, privileged, seed_addr, seed_config,
};

const PORT: u16 = 2222;

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

/// A `services:` document: service `legacy-port` on [`PORT`] over v1 (9001) and v2 (9002).
fn services(take_over: bool) -> String {
    let extra = if take_over {
        "    takeOver: true\n"
    } else {
        ""
    };
    format!(
        "services:\n  legacy-port:\n    listen: {PORT}\n    subsets:\n      v1: 127.0.0.1:9001\n      v2: 127.0.0.1:9002\n    weights: {{v1: 50, v2: 50}}\n{extra}"
    )
}

/// Both subsets and the server the service would shadow (`0.0.0.0:2222`, answering
/// `legacy`); returns the latter's pid.
fn backends(ns: &mut TestNs) -> Result<u32> {
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    let legacy = ns.echo("0.0.0.0", PORT, "legacy")?;
    Ok(ns.pid(legacy))
}

fn apply(ns: &TestNs, yaml: &str, extra: &[&str]) -> Result<std::process::Output> {
    let file = ns.file("services.yaml");
    std::fs::write(&file, yaml)?;
    let path = file.to_string_lossy().into_owned();
    let mut args = vec!["apply"];
    args.extend_from_slice(extra);
    args.extend(["-f", path.as_str()]);
    ns.ctl(&args)
}

/// The refusal names the listener's address, pid, process and user, and the way to take it
/// over.
fn assert_names_the_listener(message: &str, pid: u32) {
    for part in [
        "service \"legacy-port\" would listen on *:2222, where another server already listens: \
         0.0.0.0:2222 (pid ",
        &format!("pid {pid}, process \"tcp-echo\", user root)"),
        "`takeOver: true`",
    ] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
}

fn shadows(status: &Value) -> Vec<Value> {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["shadows"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[test]
fn apply_refuses_a_port_another_server_listens_on_and_changes_nothing() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.bare_loader()?;
    let pid = backends(&mut ns)?;
    let before = ns.ctl_ok(&["status", "--json"])?;

    for extra in [&[][..], &["--dry-run"][..]] {
        let out = apply(&ns, &services(false), extra)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert_names_the_listener(&stderr, pid);
    }

    assert_eq!(ns.ctl_ok(&["status", "--json"])?, before);
    // The server still gets its connections.
    assert_eq!(exchange(addr(), "hello")?, "legacy");
    Ok(())
}

#[test]
fn take_over_steers_the_port_and_status_names_the_shadowed_listener() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.bare_loader()?;
    let pid = backends(&mut ns)?;
    let out = apply(&ns, &services(true), &[])?;
    ensure!(
        out.status.success(),
        "apply with takeOver: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.wait_live(Duration::from_secs(15))?;

    let counts = count_prefixes(addr(), 200)?;
    assert_eq!(counts.get("legacy"), None, "{counts:?}");
    assert_eq!(
        counts.get("one").unwrap_or(&0) + counts.get("two").unwrap_or(&0),
        200,
        "{counts:?}"
    );

    let status = ns.status()?;
    let shadowed = shadows(&status);
    assert_eq!(shadowed.len(), 1, "{status}");
    assert_eq!(shadowed[0]["address"], "0.0.0.0:2222");
    assert_eq!(shadowed[0]["pid"], pid);
    assert_eq!(shadowed[0]["process"], "tcp-echo");
    assert_eq!(shadowed[0]["user"], "root");
    let table = ns.ctl_ok(&["status"])?;
    assert!(
        table.contains(&format!(
            "note: legacy-port shadows the listener 0.0.0.0:2222 (pid {pid}, process \"tcp-echo\", user root)"
        )),
        "{table}"
    );

    // An existing service is not refused for the listener it already shadows.
    let out = apply(
        &ns,
        &services(false).replace("{v1: 50, v2: 50}", "{v1: 100, v2: 0}"),
        &[],
    )?;
    ensure!(
        out.status.success(),
        "re-apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(exchange(addr(), "again")?, "one");
    Ok(())
}

#[test]
fn the_loader_refuses_a_config_that_shadows_a_server_at_start_and_on_sighup() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let pid = backends(&mut ns)?;
    let config = ns.file("refused.yaml");
    std::fs::write(&config, services(false))?;
    let loader = ns.spawn_loader(&["--config", &config.to_string_lossy()], &[])?;
    poll_until(Duration::from_secs(30), "tcpshiftd exits", || {
        Ok((!ns.running(loader)?).then_some(()))
    })?;
    let log = ns.loader_log();
    assert!(log.contains("cannot apply the configuration"), "{log}");
    assert_names_the_listener(&log, pid);
    assert_eq!(exchange(addr(), "hello")?, "legacy");

    // A running loader refuses a reload that adds the service, and keeps what it has.
    let loader = ns.loader_with(&seed_config(100, 0), &[])?;
    let path = ns.file("tcpshift.yaml");
    let seed_services = seed_config(100, 0);
    let added = services(false).replace("services:\n", "");
    std::fs::write(&path, format!("{seed_services}{added}"))?;
    let before = ns.ctl_ok(&["status", "--json"])?;
    ns.send_signal(loader, libc::SIGHUP)?;
    poll_until(Duration::from_secs(15), "the reload is refused", || {
        Ok(ns
            .loader_log()
            .contains("reload refused, nothing changed")
            .then_some(()))
    })?;
    assert_names_the_listener(&ns.loader_log(), pid);
    let after: Value = serde_json::from_str(&ns.ctl_ok(&["status", "--json"])?)?;
    let before: Value = serde_json::from_str(&before)?;
    let names = |s: &Value| -> Vec<String> {
        s["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(names(&after), names(&before));
    assert_eq!(names(&after), ["tcp-echo"]);
    assert_eq!(exchange(addr(), "hello")?, "legacy");
    assert_eq!(exchange(seed_addr(), "seed")?, "one");
    Ok(())
}

#[test]
fn a_listener_started_later_on_a_steered_port_is_warned_once_and_shown() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    ns.loader_with(&seed_config(100, 0), &["--scan-interval-ms", "50"])?;
    assert!(shadows(&ns.status()?).is_empty());

    let late = ns.echo("127.0.0.1", 31400, "late")?;
    let late_pid = ns.pid(late);
    let warning = "tcp-echo shadows the listener 127.0.0.1:31400";
    poll_until(
        Duration::from_secs(15),
        "the late listener is warned about",
        || Ok(ns.loader_log().contains(warning).then_some(())),
    )
    .with_context(|| ns.loader_log())?;
    // A second late listener: once it is warned about, later scans have run, and the first
    // was still warned about only once.
    ns.echo("::1", 31400, "late6")?;
    poll_until(
        Duration::from_secs(15),
        "the second listener is warned about",
        || {
            Ok(ns
                .loader_log()
                .contains("tcp-echo shadows the listener [::1]:31400")
                .then_some(()))
        },
    )
    .with_context(|| ns.loader_log())?;
    let log = ns.loader_log();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains(warning) && l.contains("WARN")),
        "{log}"
    );

    let status = ns.status()?;
    let shadowed = shadows(&status);
    assert_eq!(shadowed.len(), 2, "{status}");
    assert!(
        shadowed
            .iter()
            .any(|s| s["address"] == "127.0.0.1:31400" && s["pid"] == late_pid),
        "{status}"
    );
    let metrics = ns.ctl_ok(&["metrics"])?;
    assert!(
        metrics.contains("tcpshift_shadowed_listeners{service=\"tcp-echo\"} 2"),
        "{metrics}"
    );
    // The seed still steers: the late listener gets nothing.
    let counts = count_prefixes(seed_addr(), 50)?;
    assert_eq!(counts.get("one"), Some(&50), "{counts:?}");
    Ok(())
}
