//! Fleet rollouts (issues 14 and 13 together): a 3-member etcd cluster on loopback and 3
//! nodes, each a network namespace with its own tcp-echo v1/v2 and a tcpshiftd following the
//! store; the rollout is started with `tcpshiftctl --store`, driven by one node's tcpshiftd and
//! judged on the sum of every node's signals; every node is checked with real connections.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpshift_tests::{
    counter, exchange,
    fleet::{Node, fleet, in_netns, store_ctl_ok},
    poll_until, privileged, seed_addr,
};

/// One node's clients' answered prefixes and failures.
type Outcome = (Vec<String>, Vec<String>);

/// Clients on every node until stopped: each node's [`Outcome`].
struct Traffic {
    stop: Arc<AtomicBool>,
    handles: Vec<thread::JoinHandle<Result<Outcome>>>,
}

impl Traffic {
    fn start(nodes: &[Node]) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = nodes
            .iter()
            .map(|n| {
                let (stop, path) = (stop.clone(), n.path.clone());
                thread::spawn(move || {
                    in_netns(&path, move || {
                        let (mut ok, mut failed) = (Vec::new(), Vec::new());
                        let mut i = 0u64;
                        while !stop.load(Ordering::SeqCst) && i < 20_000 {
                            match exchange(seed_addr(), &format!("line{i}")) {
                                Ok(prefix) => ok.push(prefix),
                                Err(e) => failed.push(format!("{e:#}")),
                            }
                            i += 1;
                            thread::sleep(Duration::from_millis(10));
                        }
                        Ok((ok, failed))
                    })
                })
            })
            .collect();
        Traffic { stop, handles }
    }

    fn stop(self) -> Result<Vec<Outcome>> {
        self.stop.store(true, Ordering::SeqCst);
        self.handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?
            })
            .collect()
    }
}

/// The fleet's one rollout (`--store rollout status --json`).
fn rollout(url: &str) -> Result<Value> {
    let all: Value = serde_json::from_str(&store_ctl_ok(url, &["rollout", "status", "--json"])?)?;
    all.get(0).cloned().context("no rollout in the store")
}

fn phase(r: &Value) -> &str {
    r["state"]["phase"].as_str().unwrap_or("")
}

/// Waits for phase `want` (fails at once on another final phase).
fn wait_phase(url: &str, want: &str, timeout: Duration, nodes: &[Node]) -> Result<Value> {
    poll_until(timeout, &format!("fleet rollout phase {want}"), || {
        let r = rollout(url)?;
        let p = phase(&r);
        ensure!(
            p == want || !matches!(p, "Promoted" | "Aborted"),
            "rollout ended {p}: {}",
            r["state"]["message"]
        );
        Ok((p == want).then_some(r))
    })
    .with_context(|| {
        let logs: Vec<String> = nodes
            .iter()
            .map(|n| format!("--- {}:\n{}", n.name, n.log()))
            .collect();
        logs.join("\n")
    })
}

fn events<'a>(r: &'a Value, reason: &str) -> Vec<&'a Value> {
    r["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == reason)
        .collect()
}

#[test]
fn a_healthy_canary_is_promoted_on_every_node_driven_once_on_the_sum_of_their_signals() -> Result<()>
{
    if !privileged() {
        return Ok(());
    }
    let (cluster, nodes, _) = fleet("ok", &[])?;
    let url = cluster.url();
    let traffic = Traffic::start(&nodes);
    let out = store_ctl_ok(
        &url,
        &[
            "rollout",
            "start",
            "tcp-echo",
            "--canary",
            "v2",
            "--steps",
            "20,50,100",
            "--interval",
            "2s",
            "--min-connections",
            "5",
        ],
    )?;
    ensure!(out.contains("phase    Progressing"), "{out}");
    let r = wait_phase(&url, "Promoted", Duration::from_secs(90), &nodes)?;
    let per_node = traffic.stop()?;
    for (n, (ok, failed)) in nodes.iter().zip(&per_node) {
        ensure!(failed.is_empty(), "node {}: failed {failed:?}", n.name);
        ensure!(
            ok.iter().any(|p| p == "two"),
            "node {} never reached v2",
            n.name
        );
    }
    // Driven once: one SetWeight per step, not one per node.
    let set: Vec<String> = events(&r, "SetWeight")
        .iter()
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    ensure!(set.len() == 3, "one SetWeight per step: {set:?}");
    for (msg, w) in set.iter().zip(["v2 20%", "v2 50%", "v2 100%"]) {
        ensure!(msg.contains(w), "{msg:?} should set {w}");
    }
    let driver = r["driver"]
        .as_str()
        .context("the record names its driver")?;
    ensure!(nodes.iter().any(|n| n.name == driver), "driver {driver}");
    for n in &nodes {
        n.wait_weights(0, 100)?;
    }
    // The driver judged the sum of the three nodes' signals.
    let log = nodes
        .iter()
        .find(|n| n.name == driver)
        .map(Node::log)
        .unwrap_or_default();
    ensure!(
        log.contains("judged the fleet's interval") && log.contains("nodes=3"),
        "{log}"
    );
    // Every node saw the promotion through the store, with no local rollout of its own.
    let local = nodes[0].ctl(&["rollout", "status"])?;
    ensure!(String::from_utf8_lossy(&local.stdout).contains("(no rollouts)"));
    Ok(())
}

#[test]
fn a_canary_resetting_30_percent_everywhere_is_aborted_on_every_node_and_v1_never_fails()
-> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (cluster, nodes, _) = fleet("reset", &["--fault-reset-percent", "30"])?;
    let url = cluster.url();
    let traffic = Traffic::start(&nodes);
    store_ctl_ok(
        &url,
        &[
            "rollout",
            "start",
            "tcp-echo",
            "--canary",
            "v2",
            "--steps",
            "50,100",
            "--interval",
            "2s",
            "--min-connections",
            "5",
            "--failure-limit",
            "1",
        ],
    )?;
    let r = wait_phase(&url, "Aborted", Duration::from_secs(60), &nodes)?;
    for n in &nodes {
        n.wait_weights(100, 0)?;
    }
    let per_node = traffic.stop()?;
    ensure!(
        per_node.iter().any(|(_, failed)| !failed.is_empty()),
        "the faulty canary failed some connections"
    );
    let reasons: Vec<&str> = r["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["reason"].as_str().unwrap_or(""))
        .collect();
    // One step taken, one failed check tolerated (failureLimit 1), then the rollback (a
    // check judged on too few connections in between would be Inconclusive, not a step).
    let judged: Vec<&str> = reasons
        .iter()
        .copied()
        .filter(|r| *r != "Inconclusive")
        .collect();
    ensure!(
        judged == ["SetWeight", "CheckFailed", "Aborted"],
        "history: {}",
        r["history"]
    );
    let aborted = events(&r, "Aborted")[0]["message"].as_str().unwrap_or("");
    ensure!(
        aborted.contains("failure-rate canary") && aborted.contains("drained to 0%"),
        "{aborted}"
    );
    // No connection of v1 failed on any node; the canary's resets were seen.
    let mut resets = 0;
    for n in &nodes {
        let status = n.status()?;
        for field in ["reset_by_backend", "closed_without_reply", "misses"] {
            ensure!(
                counter(&status, "v1", field) == 0,
                "node {} v1 {field}: {status}",
                n.name
            );
        }
        resets += counter(&status, "v2", "reset_by_backend");
        let after = in_netns(&n.path, || {
            (0..10)
                .map(|i| exchange(seed_addr(), &format!("after{i}")))
                .collect::<Result<Vec<_>>>()
        })?;
        ensure!(after.iter().all(|p| p == "one"), "{after:?}");
    }
    ensure!(resets > 0);
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
  - pause: {duration: 10s}
  - setWeight: 100
  analysis:
    interval: 1s
    minConnections: 3
";

#[test]
fn the_driving_node_killed_mid_pause_another_node_goes_on_from_the_same_step() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (cluster, mut nodes, _) = fleet("takeover", &[])?;
    let url = cluster.url();
    let traffic = Traffic::start(&nodes);
    let file = cluster.dir().join("rollout.yaml");
    std::fs::write(&file, DOC)?;
    let out = store_ctl_ok(&url, &["apply", "-f", &file.to_string_lossy()])?;
    ensure!(
        out.contains("rollout/echo started in the fleet store"),
        "{out}"
    );
    for n in &nodes {
        n.wait_weights(70, 30)?;
    }
    // At least 3 s of the 10 s pause judged, then the driving node's tcpshiftd is killed.
    let before = poll_until(Duration::from_secs(60), "3s of the pause", || {
        let r = rollout(&url)?;
        let secs = r["state"]["pause_elapsed"]["secs"].as_u64().unwrap_or(0);
        Ok((secs >= 3 && r["driver"].is_string()).then_some(r))
    })?;
    let first = before["driver"].as_str().unwrap_or("").to_string();
    let killed = nodes
        .iter()
        .position(|n| n.name == first)
        .context("driver is a node")?;
    nodes[killed].kill_daemon()?;
    let stored = rollout(&url)?;
    ensure!(
        stored["state"]["step"] == before["state"]["step"],
        "{stored}"
    );
    // Another node takes over from the stored step and pause.
    let taken = poll_until(Duration::from_secs(30), "another driver", || {
        let r = rollout(&url)?;
        Ok(r["driver"]
            .as_str()
            .is_some_and(|d| d != first)
            .then_some(r))
    })?;
    ensure!(taken["state"]["step"] == before["state"]["step"], "{taken}");
    ensure!(
        taken["state"]["pause_elapsed"]["secs"].as_u64() >= Some(3),
        "the pause went on from where it was: {taken}"
    );
    let r = wait_phase(&url, "Promoted", Duration::from_secs(60), &nodes)?;
    let per_node = traffic.stop()?;
    for (i, (_, failed)) in per_node.iter().enumerate() {
        ensure!(failed.is_empty(), "node {i}: {failed:?}");
    }
    let set = events(&r, "SetWeight");
    ensure!(
        set.len() == 2,
        "no step twice, none skipped: {}",
        r["history"]
    );
    let (t0, t1) = (
        set[0]["at"].as_u64().unwrap_or(0),
        set[1]["at"].as_u64().unwrap_or(0),
    );
    ensure!(t1 >= t0 + 9, "the pause kept its length: {t0} -> {t1}");
    for (i, n) in nodes.iter().enumerate() {
        if i != killed {
            n.wait_weights(0, 100)?;
        }
    }
    // The killed node's kernel kept steering with what it had; started again, it catches up.
    ensure!(nodes[killed].weights()? == Some((70, 30)));
    nodes[killed].start(&url)?;
    nodes[killed].wait_weights(0, 100)?;
    Ok(())
}

#[test]
fn store_set_weight_pauses_resume_rewrites_and_abort_forget_drains_every_node() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (cluster, nodes, _) = fleet("manual", &[])?;
    let url = cluster.url();
    let file = cluster.dir().join("rollout.yaml");
    std::fs::write(&file, DOC.replace("{duration: 10s}", "{duration: 1h}"))?;
    store_ctl_ok(&url, &["apply", "-f", &file.to_string_lossy()])?;
    for n in &nodes {
        n.wait_weights(70, 30)?;
    }
    // A local rollout change on a node that follows the store is refused, naming the store.
    let local = nodes[0].ctl(&["rollout", "pause", "echo"])?;
    ensure!(!local.status.success());
    let err = String::from_utf8_lossy(&local.stderr);
    ensure!(err.contains("follows the fleet store"), "{err}");
    // A fleet set-weight pauses the rollout (the driver notices) and says so.
    store_ctl_ok(&url, &["set-weight", "v2=50"])?;
    let r = wait_phase(&url, "Paused", Duration::from_secs(30), &nodes)?;
    let why = r["state"]["message"].as_str().unwrap_or("");
    ensure!(why.contains("changed by hand (v1=50 v2=50"), "{why}");
    // resume writes the rollout's weights again, on every node.
    let out = store_ctl_ok(&url, &["rollout", "resume", "echo"])?;
    ensure!(out.contains("phase    Progressing"), "{out}");
    for n in &nodes {
        n.wait_weights(70, 30)?;
    }
    // abort --forget drains the canary everywhere and removes the record.
    let out = store_ctl_ok(&url, &["rollout", "abort", "--forget", "echo"])?;
    ensure!(out.contains("rollout/echo aborted and forgotten"), "{out}");
    for n in &nodes {
        n.wait_weights(100, 0)?;
    }
    let out = store_ctl_ok(&url, &["rollout", "status"])?;
    ensure!(out.contains("(no rollouts)"), "{out}");
    Ok(())
}
