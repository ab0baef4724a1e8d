//! Loader lifecycle, backend churn, removal and permissions (each test in its own netns).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tcpshift_tests::{
    TestNs, count_prefixes, exchange, privileged, scaled, seed, seed_addr, subset,
};

/// Polls `f` every 5 ms until it returns true; returns the time it took.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f()? {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("condition not met within {timeout:?}")
}

fn prog_exists(id: u64) -> bool {
    // BPF_PROG_GET_FD_BY_ID: attr { prog_id: u32, ... }
    let mut attr = [0u64; 16];
    attr[0] = id;
    // SAFETY: 128-byte zeroed attr with the id in the first word.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 13, attr.as_mut_ptr(), 128) };
    if fd >= 0 {
        // SAFETY: fd was just returned to us.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    false
}

#[test]
fn uninstall_leaves_nothing_and_the_port_behaves_as_without_tcpshift() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, _, loader) = seed(&mut ns, 100, 0)?;
    let status = ns.status()?;
    let dir = status["state_dir"].as_str().unwrap_or_default().to_string();
    let prog = status["program_id"].as_u64().expect("program id in status");
    assert!(std::path::Path::new(&dir).is_dir());
    assert!(prog_exists(prog));
    assert_eq!(count_prefixes(seed_addr(), 10)?.get("one"), Some(&10));

    let out = ns.ctl_ok(&["uninstall"])?;
    assert!(out.contains("removed"), "{out}");
    assert!(
        !std::path::Path::new(&dir).exists(),
        "state dir {dir} still there"
    );
    // The program is freed once the link is gone (asynchronously, after an RCU grace period).
    wait_until(Duration::from_secs(10), || Ok(!prog_exists(prog)))?;
    // Nothing listens on 31400: refused, as without tcpshift.
    let err = std::net::TcpStream::connect_timeout(&seed_addr(), Duration::from_secs(2))
        .expect_err("31400 must be refused after uninstall");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The loader notices and exits by itself.
    let pid = ns.pid(loader);
    wait_until(Duration::from_secs(5), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting to be reaped.
        Ok(stat.is_empty() || stat.split(' ').nth(2) == Some("Z"))
    })?;
    // A second uninstall is a no-op that says so.
    assert!(ns.ctl_ok(&["uninstall"])?.contains("nothing to remove"));
    Ok(())
}

#[test]
fn restarted_backend_is_registered_again_within_a_second() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, v2, _) = seed(&mut ns, 0, 100)?;
    assert_eq!(count_prefixes(seed_addr(), 20)?.get("two"), Some(&20));
    ns.kill(v2)?;
    wait_until(Duration::from_secs(2), || {
        Ok(subset(&ns.status()?, "v2").expect("v2")["live"] == false)
    })?;
    // While v2 is gone its connections fall back to v1; none is refused.
    assert_eq!(count_prefixes(seed_addr(), 20)?.get("one"), Some(&20));
    // A new v2 process on the same address: registered without any command.
    let started = Instant::now();
    ns.echo("127.0.0.1", 9002, "two")?;
    // v2 has all the weight: the first reply from "two" shows the new socket is registered.
    // (Polling with connections, not `tcpshiftctl status`, keeps the measurement free of
    // process start-up time on a loaded machine.)
    let took = wait_until(scaled(Duration::from_secs(3)), || {
        Ok(exchange(seed_addr(), "probe")? == "two")
    })?;
    eprintln!(
        "re-registration took {:?} after the new backend listened ({:?} including its start)",
        took,
        started.elapsed()
    );
    assert!(
        took < scaled(Duration::from_secs(1)),
        "re-registration took {took:?}"
    );
    assert_eq!(subset(&ns.status()?, "v2").expect("v2")["live"], true);
    assert_eq!(count_prefixes(seed_addr(), 20)?.get("two"), Some(&20));
    Ok(())
}

#[test]
fn loader_keeps_no_descriptor_of_the_backends_sockets() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (v1, v2, loader) = seed(&mut ns, 80, 20)?;
    let sockets = |pid: u32| -> Result<Vec<String>> {
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|l| l.to_string_lossy().into_owned())
            .filter(|l| l.starts_with("socket:"))
            .collect())
    };
    let backend: Vec<String> = [ns.pid(v1), ns.pid(v2)]
        .into_iter()
        .map(sockets)
        .collect::<Result<Vec<_>>>()?
        .concat();
    assert!(!backend.is_empty(), "backends hold their listening sockets");
    let held: Vec<String> = sockets(ns.pid(loader))?
        .into_iter()
        .filter(|s| backend.contains(s))
        .collect();
    assert!(held.is_empty(), "loader holds backend sockets: {held:?}");
    Ok(())
}

#[test]
fn unprivileged_user_gets_a_clear_message_and_changes_nothing() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 100, 0)?;
    let before = ns.status()?;
    for args in [
        &["status"][..],
        &["set-weight", "v2=20"][..],
        &["uninstall"][..],
    ] {
        let out = ns.ctl_unprivileged(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded as nobody");
        assert!(
            stderr.contains("root"),
            "{args:?}: message should say root is needed: {stderr}"
        );
        assert!(
            !stderr.contains("os error"),
            "{args:?}: errno dump: {stderr}"
        );
    }
    let after = ns.status()?;
    assert_eq!(before["services"], after["services"]);
    Ok(())
}

#[test]
fn bad_set_weight_values_are_refused_and_change_nothing() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 80, 20)?;
    let before = ns.status()?;
    let cases: &[&[&str]] = &[
        &["set-weight", "v3=10"],
        &["set-weight", "v2=-5"],
        &["set-weight", "v2=101"],
        &["set-weight", "v1=0", "v2=0"],
        &["set-weight", "v2=abc"],
        &["set-weight", "v2"],
        &["set-weight", "=5"],
        &["set-weight", "v2=20", "v2=30"],
        &["set-weight", "v1=60", "v2=60", "v9=1"],
        &["set-weight", "--service", "nope", "v2=20"],
        &["set-weight", "v2=99999999999999999999"],
    ];
    for args in cases {
        let out = ns.ctl(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.starts_with("tcpshiftctl: error:") || stderr.starts_with("error:"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        eprintln!("{args:?} -> {}", stderr.trim());
    }
    let after = ns.status()?;
    assert_eq!(before["services"], after["services"], "state changed");
    Ok(())
}
