//! Only the rightful owner's socket gets a subset's traffic (issue 12).
//!
//! The attack: with the seed at 50/50 (both backends run by root), v2's server dies and an
//! unprivileged user (uid 65534) listens on v2's address. With default settings tcpshift
//! trusts the owner of the first socket registered for a subset (and root): the hijacker's
//! socket is refused — no connection reaches it, the refusal is logged, counted and shown —
//! while the legitimate server, started again, is registered at once.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tcpshift_tests::{
    TestNs, bin_dir, count_prefixes, poll_until, privileged, scaled, seed_addr, seed_config, subset,
};

/// The unprivileged user of the attack (`nobody`).
const HIJACKER_UID: u32 = 65534;

/// A `tcp-echo` run as another user (killed and reaped on drop).
struct Foreign(Child);

impl Foreign {
    /// Starts `tcp-echo --bind 127.0.0.1 PORT PREFIX` as `uid`/`gid` and waits until it
    /// listens.
    fn echo(uid: u32, port: u16, prefix: &str) -> Result<Self> {
        let mut child = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ])
            .arg(bin_dir().join("tcp-echo"))
            .args(["--bind", "127.0.0.1", &port.to_string(), prefix])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run setpriv (util-linux)")?;
        let stdout = child.stdout.take().context("tcp-echo stdout")?;
        let me = Self(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let found = lines
                .by_ref()
                .any(|l| l.is_ok_and(|l| l.contains("listening on")));
            let _ = tx.send(found);
            for _ in lines {}
        });
        match rx.recv_timeout(scaled(Duration::from_secs(10))) {
            Ok(true) => Ok(me),
            _ => bail!("tcp-echo as uid {uid} on port {port} did not start"),
        }
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn v2(status: &Value) -> Result<&Value> {
    subset(status, "v2").context("no subset v2 in status")
}

/// The largest `seen_to_registered_us` of the log lines registering v2 after line `after`.
fn v2_registrations_us(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("registered listening socket") && l.contains("subset=v2"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("seen_to_registered_us="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

#[test]
fn a_hijacked_backend_address_gets_no_connection_and_the_owner_gets_it_back() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let _v1 = ns.echo("127.0.0.1", 9001, "one")?;
    let v2_idx = ns.echo("127.0.0.1", 9002, "two")?;
    ns.loader_with(&seed_config(50, 50), &[])?;
    let status = ns.status()?;
    assert_eq!(v2(&status)?["owner"]["trusted_uid"], 0, "{status:#}");
    assert_eq!(v2(&status)?["owner"]["holder"]["uid"], 0, "{status:#}");
    assert_eq!(
        v2(&status)?["owner"]["holder"]["pid"],
        ns.pid(v2_idx),
        "{status:#}"
    );

    // v2's server dies; uid 65534 listens on its address.
    ns.kill(v2_idx)?;
    poll_until(Duration::from_secs(5), "v2 not live", || {
        Ok((v2(&ns.status()?)?["live"] == false).then_some(()))
    })?;
    let hijacker = Foreign::echo(HIJACKER_UID, 9002, "evil")?;
    let status = poll_until(Duration::from_secs(5), "the hijacker refused", || {
        let s = ns.status()?;
        Ok((v2(&s)?["owner"]["refused"] == 1).then_some(s))
    })
    .with_context(|| format!("tcpshiftd's log:\n{}", ns.loader_log()))?;
    let owner = &v2(&status)?["owner"];
    assert_eq!(v2(&status)?["live"], false, "{status:#}");
    assert_eq!(owner["last_refused"]["uid"], HIJACKER_UID, "{status:#}");
    assert_eq!(owner["last_refused"]["pid"], hijacker.pid(), "{status:#}");
    assert_eq!(owner["last_refused"]["process"], "tcp-echo", "{status:#}");

    // Not one connection reaches the hijacker: v2's share falls back to v1.
    let counts = count_prefixes(seed_addr(), 200)?;
    assert_eq!(counts.get("evil"), None, "{counts:?}");
    assert_eq!(counts.get("one"), Some(&200), "{counts:?}");

    // Seen again by every scan, the same socket is counted and logged once.
    let log = ns.loader_log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused to register a listening socket"))
        .collect();
    assert_eq!(refusals.len(), 1, "{log}");
    let line = refusals[0];
    for needle in [
        "127.0.0.1:9002",
        &format!("uid={HIJACKER_UID}"),
        &format!("pid={}", hijacker.pid()),
        "process=tcp-echo",
        "cgroup=",
        "WARN",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
    assert_eq!(v2(&ns.status()?)?["owner"]["refused"], 1);
    let metrics = ns.ctl_ok(&["metrics"])?;
    assert!(
        metrics.contains(
            "tcpshift_socket_registrations_refused_total{service=\"tcp-echo\",subset=\"v2\"} 1"
        ),
        "{metrics}"
    );
    let table = ns.ctl_ok(&["status"])?;
    assert!(
        table.contains("refused") && table.contains(&format!("uid {HIJACKER_UID}")),
        "{table}"
    );

    // The hijacker goes, the legitimate server comes back: registered within a second.
    drop(hijacker);
    let before = v2_registrations_us(&ns.loader_log()).len();
    let v2_idx = ns.echo("127.0.0.1", 9002, "two")?;
    let status = poll_until(Duration::from_secs(5), "v2 live again", || {
        let s = ns.status()?;
        Ok((v2(&s)?["live"] == true).then_some(s))
    })?;
    assert_eq!(
        v2(&status)?["owner"]["holder"]["pid"],
        ns.pid(v2_idx),
        "{status:#}"
    );
    let took = poll_until(Duration::from_secs(5), "the registration logged", || {
        Ok(v2_registrations_us(&ns.loader_log()).get(before).copied())
    })?;
    assert!(took < 1_000_000, "seen_to_registered_us={took}");
    let counts = count_prefixes(seed_addr(), 100)?;
    assert!(counts.get("two").is_some_and(|n| *n > 0), "{counts:?}");
    assert_eq!(counts.get("evil"), None, "{counts:?}");
    Ok(())
}

#[test]
fn an_operator_accepts_a_new_owner() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let _v1 = ns.echo("127.0.0.1", 9001, "one")?;
    let v2_idx = ns.echo("127.0.0.1", 9002, "two")?;
    ns.loader_with(&seed_config(50, 50), &[])?;
    ns.kill(v2_idx)?;
    poll_until(Duration::from_secs(5), "v2 not live", || {
        Ok((v2(&ns.status()?)?["live"] == false).then_some(()))
    })?;
    // v2 now runs as another user: refused until the operator accepts it.
    let moved = Foreign::echo(HIJACKER_UID, 9002, "moved")?;
    poll_until(Duration::from_secs(5), "the new owner refused", || {
        Ok((v2(&ns.status()?)?["owner"]["refused"] == 1).then_some(()))
    })?;
    let out = ns.ctl_ok(&["accept-owner", "tcp-echo", "v2"])?;
    assert!(out.contains("no longer bound to uid 0"), "{out}");
    let status = poll_until(Duration::from_secs(5), "v2 live as the new owner", || {
        let s = ns.status()?;
        Ok((v2(&s)?["live"] == true).then_some(s))
    })?;
    assert_eq!(
        v2(&status)?["owner"]["trusted_uid"],
        HIJACKER_UID,
        "{status:#}"
    );
    assert_eq!(
        v2(&status)?["owner"]["holder"]["pid"],
        moved.pid(),
        "{status:#}"
    );
    let counts = count_prefixes(seed_addr(), 100)?;
    assert!(counts.get("moved").is_some_and(|n| *n > 0), "{counts:?}");
    // Unknown names are errors that say what exists.
    let out = ns.ctl(&["accept-owner", "tcp-echo", "v9"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no subset named \"v9\" (subsets: v1, v2)"),
        "{err}"
    );
    Ok(())
}

#[test]
fn an_explicit_user_rule_registers_only_that_users_socket() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let _v1 = ns.echo("127.0.0.1", 9001, "one")?;
    let legit = Foreign::echo(HIJACKER_UID, 9002, "two")?;
    let config = "services:\n  tcp-echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n      v2: {address: \"127.0.0.1:9002\", user: nobody}\n    weights: {v1: 50, v2: 50}\n";
    ns.loader_with(config, &[])?;
    let status = ns.status()?;
    assert_eq!(
        v2(&status)?["owner"]["holder"]["uid"],
        HIJACKER_UID,
        "{status:#}"
    );
    assert_eq!(
        v2(&status)?["owner"]["holder"]["pid"],
        legit.pid(),
        "{status:#}"
    );
    let counts = count_prefixes(seed_addr(), 100)?;
    assert!(counts.get("two").is_some_and(|n| *n > 0), "{counts:?}");

    // Another user's socket is refused, and so is root's: the rule names the only owner.
    drop(legit);
    poll_until(Duration::from_secs(5), "v2 not live", || {
        Ok((v2(&ns.status()?)?["live"] == false).then_some(()))
    })?;
    let wrong = Foreign::echo(HIJACKER_UID - 1, 9002, "wrong")?;
    poll_until(Duration::from_secs(5), "the wrong user refused", || {
        Ok((v2(&ns.status()?)?["owner"]["refused"] == 1).then_some(()))
    })
    .with_context(|| format!("tcpshiftd's log:\n{}", ns.loader_log()))?;
    let counts = count_prefixes(seed_addr(), 100)?;
    assert_eq!(counts.get("wrong"), None, "{counts:?}");
    drop(wrong);
    let root = ns.echo("127.0.0.1", 9002, "root")?;
    poll_until(Duration::from_secs(5), "root refused", || {
        Ok((v2(&ns.status()?)?["owner"]["refused"] == 2).then_some(()))
    })?;
    let counts = count_prefixes(seed_addr(), 100)?;
    assert_eq!(counts.get("root"), None, "{counts:?}");
    ns.kill(root)?;

    // The rightful owner comes back: registered again.
    let legit = Foreign::echo(HIJACKER_UID, 9002, "two")?;
    let status = poll_until(Duration::from_secs(5), "v2 live again", || {
        let s = ns.status()?;
        Ok((v2(&s)?["live"] == true).then_some(s))
    })?;
    assert_eq!(
        v2(&status)?["owner"]["holder"]["pid"],
        legit.pid(),
        "{status:#}"
    );
    // `get services` and a re-apply keep the rule: it lives in the pinned state.
    let yaml = ns.ctl_ok(&["get", "services", "-o", "yaml"])?;
    assert!(
        yaml.contains("address: 127.0.0.1:9002") && yaml.contains("user: 65534"),
        "{yaml}"
    );
    let applied = ns.ctl_ok(&[
        "apply",
        "-f",
        ns.file("tcpshift.yaml").to_str().context("path")?,
    ])?;
    assert!(applied.contains("unchanged"), "{applied}");
    Ok(())
}

/// A cgroup v2 child made for a test under the cgroup2 mount of `/proc/self/mountinfo`
/// (removed on drop, once its processes are gone).
struct TestCgroup {
    /// Where it is mounted here.
    dir: std::path::PathBuf,
    /// Its path as `/proc/PID/cgroup` shows it.
    path: String,
}

impl TestCgroup {
    fn new(name: &str) -> Result<Self> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        let (root, mount) = info
            .lines()
            .find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                post.starts_with("cgroup2 ").then_some(())?;
                let f: Vec<&str> = pre.split_whitespace().collect();
                Some((f.get(3)?.to_string(), f.get(4)?.to_string()))
            })
            .context("no cgroup2 mount in /proc/self/mountinfo")?;
        let dir = std::path::Path::new(&mount).join(name);
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let path = format!("{}/{name}", root.trim_end_matches('/'));
        Ok(Self { dir, path })
    }

    fn enter(&self, pid: u32) -> Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move pid {pid} into {}", self.dir.display()))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_cgroup_rule_registers_only_sockets_held_in_that_cgroup() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cgroup = TestCgroup::new(&format!("tcpshift-test-{}", std::process::id()))?;
    let result = (|| -> Result<()> {
        let mut ns = TestNs::new()?;
        let _v1 = ns.echo("127.0.0.1", 9001, "one")?;
        let inside = ns.echo("127.0.0.1", 9002, "two")?;
        cgroup.enter(ns.pid(inside))?;
        let config = format!(
            "services:\n  tcp-echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n      v2: {{address: \"127.0.0.1:9002\", cgroup: \"{}\"}}\n    weights: {{v1: 50, v2: 50}}\n",
            cgroup.path
        );
        ns.loader_with(&config, &[])?;
        let status = ns.status()?;
        assert_eq!(
            v2(&status)?["owner"]["holder"]["cgroup"],
            cgroup.path.as_str(),
            "{status:#}"
        );
        ns.kill(inside)?;
        poll_until(Duration::from_secs(5), "v2 not live", || {
            Ok((v2(&ns.status()?)?["live"] == false).then_some(()))
        })?;
        // Root's socket outside the cgroup is refused.
        let outside = ns.echo("127.0.0.1", 9002, "outside")?;
        poll_until(Duration::from_secs(5), "the outsider refused", || {
            Ok((v2(&ns.status()?)?["owner"]["refused"] == 1).then_some(()))
        })
        .with_context(|| format!("tcpshiftd's log:\n{}", ns.loader_log()))?;
        let counts = count_prefixes(seed_addr(), 100)?;
        assert_eq!(counts.get("outside"), None, "{counts:?}");
        // Moved into the cgroup, the same server is registered by the next scan.
        cgroup.enter(ns.pid(outside))?;
        poll_until(Duration::from_secs(5), "v2 live from the cgroup", || {
            Ok((v2(&ns.status()?)?["live"] == true).then_some(()))
        })?;
        let counts = count_prefixes(seed_addr(), 100)?;
        assert!(counts.get("outside").is_some_and(|n| *n > 0), "{counts:?}");
        Ok(())
    })();
    drop(cgroup);
    result
}

/// Connects `n` times to `addr`: how many were refused, and the reply prefixes of the others.
fn attempts(addr: std::net::SocketAddr, n: usize) -> Result<(usize, BTreeMap<String, usize>)> {
    let mut refused = 0;
    let mut answered = BTreeMap::new();
    for i in 0..n {
        match std::net::TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5))) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(e) => bail!("connection {i} to {addr}: {e}"),
            Ok(stream) => {
                drop(stream);
                let prefix = tcpshift_tests::exchange(addr, &format!("hello {i}"))?;
                *answered.entry(prefix).or_insert(0) += 1;
            }
        }
    }
    Ok((refused, answered))
}

/// Sum of a counter over the service's subsets.
fn total(status: &Value, field: &str) -> u64 {
    tcpshift_tests::subsets(status)
        .map(|s| s["counters"][field].as_u64().unwrap_or(0))
        .sum()
}

const FAIL_CLOSED: &str = "services:\n  tcp-echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n      v2: 127.0.0.1:9002\n    weights: {v1: 50, v2: 50}\n    failClosed: true\n";

#[test]
fn fail_closed_refuses_while_no_subset_is_live_and_steers_again_once_one_is() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let v1 = ns.echo("127.0.0.1", 9001, "one")?;
    let v2 = ns.echo("127.0.0.1", 9002, "two")?;
    ns.loader_with(FAIL_CLOSED, &[])?;
    let status = ns.status()?;
    assert_eq!(status["services"][0]["fail_closed"], true, "{status:#}");
    let yaml = ns.ctl_ok(&["get", "services", "-o", "yaml"])?;
    assert!(yaml.contains("failClosed: true"), "{yaml}");
    let table = ns.ctl_ok(&["status"])?;
    assert!(table.contains("note: tcp-echo fails closed"), "{table}");

    // Both backends die; an unprivileged process binds the service's own address.
    ns.kill(v1)?;
    ns.kill(v2)?;
    poll_until(Duration::from_secs(5), "no subset live", || {
        let s = ns.status()?;
        Ok(tcpshift_tests::subsets(&s)
            .all(|x| x["live"] == false)
            .then_some(()))
    })?;
    let misses_before = total(&ns.status()?, "misses");
    let rogue = Foreign::echo(HIJACKER_UID, seed_addr().port(), "rogue")?;
    let (refused, answered) = attempts(seed_addr(), 50)?;
    assert_eq!(refused, 50, "answered: {answered:?}");
    assert!(answered.is_empty(), "{answered:?}");
    assert_eq!(total(&ns.status()?, "misses") - misses_before, 50);
    let table = ns.ctl_ok(&["status"])?;
    assert!(table.contains("no subset is live now"), "{table}");

    // v2 is back: steered again as soon as its socket is registered, none to the rogue.
    let v2 = ns.echo("127.0.0.1", 9002, "two")?;
    poll_until(Duration::from_secs(5), "v2 live again", || {
        Ok((v2_live(&ns)?).then_some(()))
    })?;
    let counts = count_prefixes(seed_addr(), 50)?;
    assert_eq!(counts.get("two"), Some(&50), "{counts:?}");

    // The same outage without failClosed (today's pass-through): the rogue gets them. This is
    // what the flag prevents.
    let passing = FAIL_CLOSED.replace("failClosed: true", "failClosed: false");
    let path = ns.file("pass-through.yaml");
    std::fs::write(&path, passing)?;
    let out = ns.ctl_ok(&["apply", "-f", path.to_str().context("path")?])?;
    assert!(out.contains("service/tcp-echo"), "{out}");
    assert_eq!(ns.status()?["services"][0]["fail_closed"], false);
    ns.kill(v2)?;
    poll_until(Duration::from_secs(5), "v2 not live", || {
        Ok((!v2_live(&ns)?).then_some(()))
    })?;
    let (refused, answered) = attempts(seed_addr(), 20)?;
    assert_eq!(refused, 0, "{answered:?}");
    assert_eq!(answered.get("rogue"), Some(&20), "{answered:?}");
    drop(rogue);
    Ok(())
}

fn v2_live(ns: &TestNs) -> Result<bool> {
    Ok(v2(&ns.status()?)?["live"] == true)
}
