//! Progressive rollouts driven by tcpshiftd (issue 14), with real connections in the test's
//! own network namespace: a healthy v2 promoted through every step, a v2 that resets 30 % of
//! its connections rolled back, a v2 without traffic never promoted, tcpshiftd killed during a
//! pause going on at the same step, and the manual commands.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpshift_tests::{
    TestNs, counter, exchange, poll_until, privileged, scaled, seed_addr, seed_config,
};

/// Clients connecting to the service until stopped (at most 20 000 connections), each
/// sending one line: the prefixes answered, and the failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(Vec<String>, Vec<String>)>,
}

impl Traffic {
    fn start() -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let (mut ok, mut failed) = (Vec::new(), Vec::new());
            for i in 0..20_000 {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                match exchange(seed_addr(), &format!("line{i}")) {
                    Ok(prefix) => ok.push(prefix),
                    Err(e) => failed.push(format!("{e:#}")),
                }
                // Pace the clients: about 100 connections a second.
                thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        });
        Traffic { stop, handle }
    }

    fn stop(self) -> Result<(Vec<String>, Vec<String>)> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("traffic thread panicked"))
    }
}

/// The one rollout, from `rollout status --json`.
fn rollout(ns: &TestNs) -> Result<Value> {
    let out = ns.ctl_ok(&["rollout", "status", "--json"])?;
    let all: Value = serde_json::from_str(&out).context("rollout status --json")?;
    all.get(0).cloned().context("no rollout")
}

fn phase(r: &Value) -> &str {
    r["state"]["phase"].as_str().unwrap_or("")
}

/// Waits until the rollout's phase is `want`; fails at once on another final phase.
fn wait_phase(ns: &TestNs, want: &str, timeout: Duration) -> Result<Value> {
    poll_until(timeout, &format!("rollout phase {want}"), || {
        let r = rollout(ns)?;
        let p = phase(&r);
        ensure!(
            p == want || !matches!(p, "Promoted" | "Aborted"),
            "rollout ended {p}: {}",
            r["state"]["message"]
        );
        Ok((p == want).then_some(r))
    })
}

/// The reasons of the rollout's history, in order.
fn reasons(r: &Value) -> Vec<String> {
    r["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

fn weights(ns: &TestNs) -> Result<(u64, u64)> {
    let status = ns.status()?;
    let w = |n: &str| {
        tcpshift_tests::subset(&status, n)
            .and_then(|s| s["weight"].as_u64())
            .unwrap_or(u64::MAX)
    };
    Ok((w("v1"), w("v2")))
}

#[test]
fn a_healthy_canary_is_promoted_through_every_step() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    tcpshift_tests::seed(&mut ns, 100, 0)?;
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    let traffic = Traffic::start();
    ns.ctl_ok(&[
        "rollout",
        "start",
        "tcp-echo",
        "--canary",
        "v2",
        "--steps",
        "20,50,100",
        "--interval",
        "1s",
        "--min-connections",
        "3",
    ])?;
    let r = wait_phase(&ns, "Promoted", Duration::from_secs(30))?;
    let (ok, failed) = traffic.stop()?;
    ensure!(failed.is_empty(), "failed connections: {failed:?}");
    let weights_set: Vec<String> = r["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "SetWeight")
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    ensure!(
        weights_set.len() == 3,
        "one SetWeight per step: {weights_set:?}"
    );
    for (msg, w) in weights_set.iter().zip(["v2 20%", "v2 50%", "v2 100%"]) {
        ensure!(msg.contains(w), "{msg:?} should set {w}");
    }
    ensure!(
        weights(&ns)? == (0, 100),
        "promoted weights: {:?}",
        weights(&ns)?
    );
    ensure!(
        ok.iter().any(|p| p == "two"),
        "v2 got traffic during the rollout"
    );
    // After the promotion, every connection reaches v2.
    for i in 0..10 {
        ensure!(exchange(seed_addr(), &format!("after{i}"))? == "two");
    }
    Ok(())
}

#[test]
fn a_canary_resetting_30_percent_is_rolled_back_and_v1_never_fails() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo_args(&[
        "--bind",
        "127.0.0.1",
        "--fault-reset-percent",
        "30",
        "9002",
        "two",
    ])?;
    ns.loader(&seed_config(100, 0))?;
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    let traffic = Traffic::start();
    // interval 1 s, failureLimit 1: aborted at the second failed check.
    ns.ctl_ok(&[
        "rollout",
        "start",
        "tcp-echo",
        "--canary",
        "v2",
        "--steps",
        "50,100",
        "--interval",
        "1s",
        "--min-connections",
        "3",
        "--failure-limit",
        "1",
    ])?;
    let started = Instant::now();
    let r = wait_phase(&ns, "Aborted", Duration::from_secs(30))?;
    let took = started.elapsed();
    let (ok, failed) = traffic.stop()?;
    // interval × (failureLimit + 1) + one interval, with room for a loaded machine.
    ensure!(
        took <= scaled(Duration::from_secs(3)) + Duration::from_secs(2),
        "rolled back after {took:?}"
    );
    ensure!(
        reasons(&r) == ["SetWeight", "CheckFailed", "Aborted"],
        "history: {}",
        r["history"]
    );
    let aborted = r["history"][2]["message"].as_str().unwrap_or("");
    ensure!(
        aborted.contains("failure-rate canary") && aborted.contains("drained to 0%"),
        "{aborted}"
    );
    ensure!(weights(&ns)?.1 == 0, "canary drained: {:?}", weights(&ns)?);
    ensure!(
        !failed.is_empty() && ok.iter().any(|p| p == "one"),
        "{} ok, {} failed",
        ok.len(),
        failed.len()
    );
    // No connection of v1 failed: the kernel counted none reset, closed without reply or
    // refused on v1.
    let status = ns.status()?;
    for field in ["reset_by_backend", "closed_without_reply", "misses"] {
        ensure!(counter(&status, "v1", field) == 0, "v1 {field}: {status}");
    }
    ensure!(counter(&status, "v2", "reset_by_backend") > 0, "{status}");
    for i in 0..10 {
        ensure!(exchange(seed_addr(), &format!("after{i}"))? == "one");
    }
    Ok(())
}

#[test]
fn a_canary_without_traffic_stays_inconclusive_and_is_not_promoted() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    tcpshift_tests::seed(&mut ns, 100, 0)?;
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    ns.ctl_ok(&[
        "rollout",
        "start",
        "tcp-echo",
        "--canary",
        "v2",
        "--steps",
        "20,100",
        "--interval",
        "1s",
        "--min-connections",
        "3",
    ])?;
    // Default inconclusiveLimit 3: the fourth inconclusive check in a row pauses.
    let r = wait_phase(&ns, "Paused", Duration::from_secs(20))?;
    ensure!(
        reasons(&r)
            == [
                "SetWeight",
                "Inconclusive",
                "Inconclusive",
                "Inconclusive",
                "Paused"
            ],
        "history: {}",
        r["history"]
    );
    ensure!(r["state"]["canary_weight"] == 20, "{r}");
    ensure!(weights(&ns)? == (80, 20));
    Ok(())
}

const DOC: &str = "\
apiVersion: tcpshift.io/v1alpha1
kind: Rollout
metadata:
  name: echo
spec:
  service: tcp-echo
  stableSubset: v1
  canarySubset: v2
  steps:
  - setWeight: 30
  - pause: {duration: 6s}
  - setWeight: 100
  analysis:
    interval: 1s
    minConnections: 3
    metrics:
    - name: failure-rate
      thresholdRange: {max: 1}
";

#[test]
fn tcpshiftd_killed_mid_pause_resumes_at_the_same_step_and_pause() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, _, loader) = tcpshift_tests::seed(&mut ns, 100, 0)?;
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    let traffic = Traffic::start();
    let file = ns.file("rollout.yaml");
    std::fs::write(&file, DOC)?;
    let out = ns.ctl_ok(&["apply", "-f", file.to_str().context("path")?])?;
    ensure!(out.contains("rollout/echo started"), "{out}");
    // Wait until at least 2 s of the 6 s pause have passed, then kill tcpshiftd.
    let before = poll_until(Duration::from_secs(20), "2s of the pause", || {
        let r = rollout(&ns)?;
        let secs = r["state"]["pause_elapsed"]["secs"].as_u64().unwrap_or(0);
        Ok((secs >= 2).then_some(r))
    })?;
    ns.kill(loader)?;
    let stored = rollout(&ns)?;
    ensure!(
        stored["state"]["step"] == before["state"]["step"],
        "{stored}"
    );
    ensure!(
        stored["state"]["pause_elapsed"]["secs"].as_u64() >= Some(2),
        "{stored}"
    );
    ns.restart_loader()?;
    let r = wait_phase(&ns, "Promoted", Duration::from_secs(30))?;
    let (_, failed) = traffic.stop()?;
    ensure!(failed.is_empty(), "failed connections: {failed:?}");
    let set: Vec<&Value> = r["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "SetWeight")
        .collect();
    ensure!(
        set.len() == 2,
        "no step twice, none skipped: {}",
        r["history"]
    );
    // The pause went on from where it was: promoted no earlier than the 6 s in total.
    let first = set[0]["at"].as_u64().unwrap_or(0);
    let last = set[1]["at"].as_u64().unwrap_or(0);
    ensure!(
        last >= first + 5,
        "pause kept its length: {first} -> {last}"
    );
    ensure!(weights(&ns)? == (0, 100));
    Ok(())
}

#[test]
fn promote_pause_resume_abort_by_hand_and_set_weight_pauses() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    tcpshift_tests::seed(&mut ns, 100, 0)?;
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    let file = ns.file("rollout.yaml");
    std::fs::write(&file, DOC.replace("{duration: 6s}", "{}"))?;
    ns.ctl_ok(&["apply", "-f", file.to_str().context("path")?])?;
    let r = wait_phase(&ns, "Paused", Duration::from_secs(10))?;
    ensure!(weights(&ns)? == (70, 30), "{r}");
    // promote passes the `pause: {}`.
    ns.ctl_ok(&["rollout", "promote", "echo"])?;
    ensure!(phase(&rollout(&ns)?) == "Promoted");
    ensure!(weights(&ns)? == (0, 100));
    // The first rollout is over: a second one, back to v1 (stable v2, canary v1), may start.
    std::fs::write(
        &file,
        DOC.replace("name: echo", "name: back")
            .replace(
                "stableSubset: v1\n  canarySubset: v2",
                "stableSubset: v2\n  canarySubset: v1",
            )
            .replace("{duration: 6s}", "{duration: 1h}"),
    )?;
    ns.ctl_ok(&["apply", "-f", file.to_str().context("path")?])?;
    ensure!(weights(&ns)? == (30, 70));
    // A manual set-weight pauses it and says so.
    ns.ctl_ok(&["set-weight", "v1=50"])?;
    let r = poll_until(Duration::from_secs(10), "paused by set-weight", || {
        let out = ns.ctl_ok(&["rollout", "status", "back", "--json"])?;
        let v: Value = serde_json::from_str(&out)?;
        Ok((phase(&v[0]) == "Paused").then(|| v[0].clone()))
    })?;
    let why = r["state"]["message"].as_str().unwrap_or("");
    ensure!(why.contains("changed by hand"), "{why}");
    // resume writes the rollout's weights again; pause holds; abort drains.
    ns.ctl_ok(&["rollout", "resume", "back"])?;
    ensure!(weights(&ns)? == (30, 70));
    ns.ctl_ok(&["rollout", "pause", "back"])?;
    let out = ns.ctl_ok(&["rollout", "status", "back"])?;
    ensure!(out.contains("phase    Paused"), "{out}");
    ns.ctl_ok(&["rollout", "abort", "back"])?;
    ensure!(
        weights(&ns)? == (0, 100),
        "abort drains the canary, v1 (v2 is its stable)"
    );
    let history = ns.ctl_ok(&["rollout", "history", "back"])?;
    for reason in ["SetWeight", "Paused", "Resumed", "Aborted"] {
        ensure!(history.contains(reason), "{history}");
    }
    Ok(())
}

#[test]
fn abort_forget_drains_the_canary_and_removes_the_record() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    tcpshift_tests::seed(&mut ns, 100, 0)?;
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    let file = ns.file("rollout.yaml");
    std::fs::write(&file, DOC.replace("{duration: 6s}", "{}"))?;
    ns.ctl_ok(&["apply", "-f", file.to_str().context("path")?])?;
    wait_phase(&ns, "Paused", Duration::from_secs(10))?;
    ensure!(weights(&ns)? == (70, 30));
    // Under way: --forget aborts first (canary to 0), then removes the record.
    let out = ns.ctl_ok(&["rollout", "abort", "--forget", "echo"])?;
    ensure!(out.contains("rollout/echo aborted and forgotten"), "{out}");
    ensure!(weights(&ns)? == (100, 0), "canary drained");
    let out = ns.ctl_ok(&["rollout", "status"])?;
    ensure!(out.contains("(no rollouts)"), "{out}");
    let gone = ns.ctl(&["rollout", "history", "echo"])?;
    ensure!(!gone.status.success());
    ensure!(
        String::from_utf8_lossy(&gone.stderr).contains("no rollout named \"echo\""),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    // A rollout that is over is forgotten without touching the weights.
    ns.ctl_ok(&["apply", "-f", file.to_str().context("path")?])?;
    ns.ctl_ok(&["rollout", "promote", "echo"])?;
    ensure!(weights(&ns)? == (0, 100));
    ns.ctl_ok(&["rollout", "abort", "--forget", "echo"])?;
    ensure!(
        weights(&ns)? == (0, 100),
        "a promoted rollout is only forgotten"
    );
    let again = ns.ctl(&["rollout", "abort", "--forget", "echo"])?;
    ensure!(
        String::from_utf8_lossy(&again.stderr).contains("no rollout"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    Ok(())
}

#[test]
fn a_canary_delaying_its_replies_is_not_seen_by_srtt() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo_args(&[
        "--bind",
        "127.0.0.1",
        "--fault-delay-ms",
        "300",
        "9002",
        "two",
    ])?;
    ns.loader(&seed_config(100, 0))?;
    ns.wait_live(scaled(Duration::from_secs(10)))?;
    // The delay is there: a reply of v2, straight from its port, takes at least 300 ms.
    let t = Instant::now();
    ensure!(exchange("127.0.0.1:9002".parse()?, "direct")? == "two");
    ensure!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let traffic: Vec<Traffic> = (0..4).map(|_| Traffic::start()).collect();
    let file = ns.file("rollout.yaml");
    std::fs::write(
        &file,
        DOC.replace("{duration: 6s}", "{duration: 3s}").replace(
            "    - name: failure-rate\n      thresholdRange: {max: 1}\n",
            "    - name: failure-rate\n      thresholdRange: {max: 1}\n    - name: srtt-p90\n      maxOverStable: 1\n",
        ),
    )?;
    ns.ctl_ok(&["apply", "-f", file.to_str().context("path")?])?;
    let r = wait_phase(&ns, "Promoted", Duration::from_secs(60))?;
    let mut failed = Vec::new();
    for t in traffic {
        failed.extend(t.stop()?.1);
    }
    ensure!(failed.is_empty(), "failed connections: {failed:?}");
    // The last judged interval had srtt values for both, about equal (loopback: below 1 ms,
    // the histogram's bucket bound), 300 ms of application delay notwithstanding.
    let srtt = r["state"]["last"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["metric"] == "srtt-p90")
        .cloned()
        .context("srtt-p90 judged")?;
    let canary = srtt["canary"].as_f64().context("canary srtt value")?;
    ensure!(canary < 10.0, "canary srtt-p90 {canary} ms: {srtt}");
    ensure!(srtt["passed"] == true, "{srtt}");
    Ok(())
}
