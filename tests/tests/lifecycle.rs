//! Loader lifecycle, backend churn, removal and permissions (each test in its own netns).

use std::{
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tcpshift_tests::{
    Conn, TestNs, bin_dir, count_prefixes, exchange, privileged, scaled, seed, seed_addr,
    seed_config, subset,
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

/// Whether the kernel still has the BPF object `id`, asked with `BPF_PROG_GET_FD_BY_ID` (13) or
/// `BPF_MAP_GET_FD_BY_ID` (14): attr { id: u32, ... }.
fn bpf_object_exists(cmd: libc::c_long, id: u64) -> bool {
    let mut attr = [0u64; 16];
    attr[0] = id;
    // SAFETY: 128-byte zeroed attr with the id in the first word.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128) };
    if fd >= 0 {
        // SAFETY: fd was just returned to us.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    false
}

fn prog_exists(id: u64) -> bool {
    bpf_object_exists(13, id)
}

fn map_exists(id: u64) -> bool {
    bpf_object_exists(14, id)
}

/// The ids of the programs (behind the pinned links) and maps pinned in a state directory,
/// read with bpftool.
fn pinned_objects(dir: &std::path::Path) -> Result<(Vec<u64>, Vec<u64>)> {
    let (mut progs, mut maps) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_link = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with("link"));
        let kind = if is_link { "link" } else { "map" };
        let out = Command::new("bpftool")
            .args(["-j", kind, "show", "pinned"])
            .arg(&path)
            .output()
            .context("cannot run bpftool (install the bpftool package)")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bpftool {kind} show pinned {}", path.display()))?;
        if is_link {
            progs.push(v["prog_id"].as_u64().context("no prog_id")?);
        } else {
            maps.push(v["id"].as_u64().context("no map id")?);
        }
    }
    Ok((progs, maps))
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

    // Every kernel object tcpshift pinned: both programs (through their links) and the maps.
    let (progs, maps) = pinned_objects(std::path::Path::new(&dir))?;
    assert!(
        progs.contains(&prog),
        "{progs:?} lacks the sk_lookup program {prog}"
    );
    assert!(
        progs.len() >= 2,
        "sk_lookup and sock_ops links expected: {progs:?}"
    );
    assert!(maps.len() >= 7, "maps expected: {maps:?}");

    let out = ns.ctl_ok(&["uninstall"])?;
    assert!(out.contains("removed"), "{out}");
    assert!(
        !std::path::Path::new(&dir).exists(),
        "state dir {dir} still there"
    );
    // Programs and maps are freed once the pins and links are gone (asynchronously, after an
    // RCU grace period).
    wait_until(scaled(Duration::from_secs(10)), || {
        Ok(progs.iter().all(|&p| !prog_exists(p)) && maps.iter().all(|&m| !map_exists(m)))
    })
    .with_context(|| {
        let left: Vec<_> = progs.iter().filter(|&&p| prog_exists(p)).collect();
        let maps_left: Vec<_> = maps.iter().filter(|&&m| map_exists(m)).collect();
        format!("still there: programs {left:?}, maps {maps_left:?}")
    })?;
    // Nothing listens on 31400: refused, as without tcpshift.
    let err = std::net::TcpStream::connect_timeout(&seed_addr(), Duration::from_secs(2))
        .expect_err("31400 must be refused after uninstall");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The loader notices and exits by itself.
    let pid = ns.pid(loader);
    wait_until(scaled(Duration::from_secs(5)), || {
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
    wait_until(scaled(Duration::from_secs(2)), || {
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

/// Runs `cmd` to its end (killing it after `timeout`) and returns its output.
fn run_to_exit(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn")?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "still running after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child.wait_with_output()?)
}

/// The weight of subset `name` in a `status --json` document.
fn weight(status: &serde_json::Value, name: &str) -> Option<u64> {
    subset(status, name).and_then(|s| s["weight"].as_u64())
}

#[test]
fn upgrade_in_place_keeps_weights_sockets_and_connections() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 80, 20)?;
    let before = ns.status()?;
    let old_prog = before["program_id"].as_u64().expect("program id in status");
    let old_accounting = before["accounting_program_id"].as_u64();
    let mut long = Conn::open(seed_addr())?;
    let long_prefix = long.exchange("before the upgrade")?;

    // New connections all along, every reply checked (threads inherit the test's namespace).
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = exchange(seed_addr(), &format!("load {i}")) {
                    failures.push(format!("connection {i}: {e:#}"));
                }
                i += 1;
                done.store(i, Ordering::Relaxed);
            }
            (i, failures)
        })
    };
    wait_until(scaled(Duration::from_secs(10)), || {
        Ok(done.load(Ordering::Relaxed) >= 20)
    })?;

    // A second tcpshiftd takes over from the first (one per namespace), adopts the state and
    // replaces the (identical) programs in place.
    let started = Instant::now();
    ns.loader_with(&seed_config(80, 20), &["--takeover", "--reload-program"])?;
    let mut new_prog = old_prog;
    wait_until(scaled(Duration::from_secs(30)), || {
        new_prog = ns.status()?["program_id"].as_u64().unwrap_or(old_prog);
        Ok(new_prog != old_prog)
    })?;
    let took = started.elapsed();
    // Keep the load going for a while on the new program.
    let after_swap = done.load(Ordering::Relaxed);
    wait_until(scaled(Duration::from_secs(10)), || {
        Ok(done.load(Ordering::Relaxed) >= after_swap + 100)
    })?;
    stop.store(true, Ordering::Relaxed);
    let (connections, failures) = load.join().expect("load thread");
    // tcpshiftd logs the replacement right after the kernel made it.
    let last_line = match old_accounting {
        Some(_) => "replaced the sock_ops program in place",
        None => "replaced the sk_lookup program in place",
    };
    wait_until(scaled(Duration::from_secs(10)), || {
        Ok(ns.loader_log().contains(last_line))
    })
    .with_context(|| format!("log: {}", ns.loader_log()))?;
    let log = ns.loader_log();
    eprintln!(
        "sk_lookup program {old_prog} -> {new_prog} within {took:?} of starting the second tcpshiftd; {connections} connections during the test; its log:\n{log}"
    );
    assert!(
        failures.is_empty(),
        "{} of {connections} connections failed during the upgrade: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        log.contains("replaced the sk_lookup program in place"),
        "log: {log}"
    );

    // The long-lived connection was never touched.
    assert_eq!(long.exchange("after the upgrade")?, long_prefix);
    // Weights, sockets and settings are the kernel's as before.
    let after = ns.status()?;
    assert_eq!(weight(&after, "v1"), Some(80));
    assert_eq!(weight(&after, "v2"), Some(20));
    assert_eq!(subset(&after, "v1").expect("v1")["live"], true);
    assert_eq!(subset(&after, "v2").expect("v2")["live"], true);
    if let Some(old_accounting) = old_accounting {
        let new_accounting = after["accounting_program_id"].as_u64();
        assert!(
            new_accounting.is_some_and(|id| id != old_accounting),
            "sock_ops program not replaced: {old_accounting} -> {new_accounting:?}"
        );
        assert!(
            log.contains("replaced the sock_ops program in place"),
            "log: {log}"
        );
    }
    // The old program is freed (asynchronously, after an RCU grace period).
    wait_until(scaled(Duration::from_secs(10)), || {
        Ok(!prog_exists(old_prog))
    })?;
    if let Some(old_accounting) = old_accounting {
        wait_until(scaled(Duration::from_secs(10)), || {
            Ok(!prog_exists(old_accounting))
        })?;
    }
    // The new program splits with the same seed and weights.
    let counts = count_prefixes(seed_addr(), 200)?;
    let one = counts.get("one").copied().unwrap_or(0);
    let two = counts.get("two").copied().unwrap_or(0);
    assert_eq!(one + two, 200, "{counts:?}");
    assert!(
        (130..=190).contains(&one),
        "split after the upgrade: {counts:?}"
    );
    Ok(())
}

#[test]
fn same_version_restart_keeps_the_running_program() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, _, loader) = seed(&mut ns, 80, 20)?;
    let before = ns.status()?;
    let prog = before["program_id"].as_u64().expect("program id in status");
    ns.kill(loader)?;
    ns.loader_with(&seed_config(80, 20), &[])?;
    wait_until(scaled(Duration::from_secs(30)), || {
        Ok(ns
            .loader_log()
            .contains("running programs are this version's"))
    })
    .with_context(|| format!("log: {}", ns.loader_log()))?;
    let log = ns.loader_log();
    assert!(!log.contains("replaced"), "log: {log}");
    let after = ns.status()?;
    assert_eq!(after["program_id"].as_u64(), Some(prog));
    assert_eq!(
        after["accounting_program_id"],
        before["accounting_program_id"]
    );
    Ok(())
}

#[test]
fn foreign_layout_is_refused_with_a_migration_message() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, _, loader) = seed(&mut ns, 80, 20)?;
    let dir = ns.status()?["state_dir"]
        .as_str()
        .context("state_dir")?
        .to_string();
    ns.kill(loader)?;

    // Make the state look like another version's: `Global { magic: u64, layout_version: u32,
    // .. }`, so the version is bytes 8..12 (native endian).
    let global = format!("{dir}/TS_GLOBAL");
    let key = ["key", "hex", "00", "00", "00", "00"];
    let out = Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned", &global])
        .args(key)
        .output()
        .context("cannot run bpftool")?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lookup: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut value: Vec<u8> = lookup["value"]
        .as_array()
        .context("value")?
        .iter()
        .map(|b| {
            let b = b.as_str().unwrap_or_default().trim_start_matches("0x");
            u8::from_str_radix(b, 16).context("value byte")
        })
        .collect::<Result<_>>()?;
    assert_eq!(value.len(), 32, "{lookup}");
    value[8..12].copy_from_slice(&99u32.to_ne_bytes());
    let hex: Vec<String> = value.iter().map(|b| format!("{b:02x}")).collect();
    let out = Command::new("bpftool")
        .args(["map", "update", "pinned", &global])
        .args(key)
        .args(["value", "hex"])
        .args(&hex)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let check = |what: &str, out: &Output| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{what}: {}", stderr.trim());
        assert!(!out.status.success(), "{what} accepted a foreign layout");
        for needle in [
            "layout version 99",
            "will not adopt",
            "tcpshiftctl uninstall",
        ] {
            assert!(
                stderr.contains(needle),
                "{what}: no {needle:?} in: {stderr}"
            );
        }
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    };
    let config = ns.file("tcpshift.yaml");
    let out = run_to_exit(
        Command::new(bin_dir().join("tcpshiftd"))
            .arg("--config")
            .arg(&config),
        scaled(Duration::from_secs(30)),
    )?;
    check("tcpshiftd", &out);
    check("tcpshiftctl status", &ns.ctl(&["status"])?);
    // Still there, unchanged: nobody adopted or replaced it.
    assert!(std::path::Path::new(&global).exists());

    // The way out the message names: uninstall (without reading the maps), start again.
    let out = ns.ctl_ok(&["uninstall"])?;
    assert!(out.contains("removed"), "{out}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} still there");
    ns.restart_loader()?;
    let status = ns.status()?;
    assert_eq!(weight(&status, "v1"), Some(80));
    assert_eq!(weight(&status, "v2"), Some(20));
    Ok(())
}
