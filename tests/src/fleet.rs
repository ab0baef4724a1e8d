//! Fixtures of the fleet tests (`fleet.rs`, `fleet_rollout.rs`): nodes, each a network
//! namespace of its own (`/run/netns/NAME`) with tcp-echo v1/v2 and a tcpshiftd following a
//! fleet store through `--netns` (its store connection stays on the host's loopback), and
//! [`fleet`]: a 3-member etcd cluster ([`EtcdCluster`]) with 3 nodes following it.

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{bin_dir, count_prefixes, etcd::EtcdCluster, poll_until, seed_addr, seed_config};

/// One node: a network namespace of its own, its backends and its tcpshiftd. Everything is
/// stopped and removed on drop (the namespace's tcpshift uninstalled first).
pub struct Node {
    /// The namespace's name, also the node's name in the store (`--node`).
    pub name: String,
    /// `/run/netns/NAME`.
    pub path: PathBuf,
    echoes: Vec<Child>,
    /// The running tcpshiftd, if any.
    pub daemon: Option<Child>,
    log: PathBuf,
}

impl Node {
    /// Creates the namespace, brings `lo` up and starts tcp-echo v1 (`one`, port 9001) and
    /// v2 (`two`, port 9002, with the extra `v2_args`, e.g. a fault) in it.
    pub fn new(tag: &str, i: usize, v2_args: &[&str]) -> Result<Self> {
        let name = format!("tsfleet-{}-{tag}-{i}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let mut node = Self {
            log: std::env::temp_dir().join(format!("{name}.log")),
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
            echoes: Vec::new(),
            daemon: None,
        };
        run(node.nsenter("ip").args(["link", "set", "lo", "up"]))?;
        for (port, prefix, extra) in [(9001, "one", &[][..]), (9002, "two", v2_args)] {
            let child = node
                .nsenter(&bin_dir().join("tcp-echo").to_string_lossy())
                .args(["--bind", "127.0.0.1"])
                .args(extra)
                .args([&port.to_string(), prefix])
                .stdout(Stdio::null())
                .spawn()
                .context("cannot start tcp-echo")?;
            node.echoes.push(child);
        }
        Ok(node)
    }

    /// `program` run inside the namespace (`nsenter --net=PATH`).
    pub fn nsenter(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path.display())).arg(program);
        c
    }

    /// Starts tcpshiftd following `url` as this node.
    pub fn start(&mut self, url: &str) -> Result<()> {
        self.start_with(url, &[])
    }

    /// Starts tcpshiftd following `url` as this node, with `extra` arguments (TLS, user); its
    /// log is appended to the node's log ([`Node::log`]).
    pub fn start_with(&mut self, url: &str, extra: &[&str]) -> Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let child = Command::new(bin_dir().join("tcpshiftd"))
            .arg("--netns")
            .arg(&self.path)
            .args(["--store", url, "--node", &self.name, "--log-level", "info"])
            .args(extra)
            .stderr(log)
            .spawn()
            .context("cannot start tcpshiftd")?;
        self.daemon = Some(child);
        Ok(())
    }

    /// Kills the node's tcpshiftd (if running) and waits for it.
    pub fn kill_daemon(&mut self) -> Result<()> {
        if let Some(mut c) = self.daemon.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// What the node's tcpshiftd logged so far (every start of it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `tcpshiftctl --netns PATH ARGS` (the local host's view).
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        Command::new(bin_dir().join("tcpshiftctl"))
            .arg("--netns")
            .arg(&self.path)
            .args(args)
            .output()
            .context("cannot run tcpshiftctl")
    }

    /// `tcpshiftctl status --json` of this node, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = self.ctl(&["status", "--json"])?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The kernel's weights (v1, v2) of tcp-echo on this node, once both sockets are live.
    pub fn weights(&self) -> Result<Option<(u64, u64)>> {
        let Ok(status) = self.status() else {
            return Ok(None);
        };
        let w = |n: &str| crate::subset(&status, n).map(|s| s["weight"].as_u64());
        let live = ["v1", "v2"]
            .iter()
            .all(|n| crate::subset(&status, n).is_some_and(|s| s["live"] == true));
        Ok(match (w("v1"), w("v2")) {
            (Some(Some(a)), Some(Some(b))) if live => Some((a, b)),
            _ => None,
        })
    }

    /// Waits until the kernel holds weights v1/v2 with both sockets live.
    pub fn wait_weights(&self, v1: u64, v2: u64) -> Result<()> {
        poll_until(
            Duration::from_secs(30),
            &format!("node {} at v1={v1} v2={v2}", self.name),
            || Ok((self.weights()? == Some((v1, v2))).then_some(())),
        )
        .with_context(|| format!("tcpshiftd's log:\n{}", self.log()))
    }

    /// `n` connections to the seed's address inside this node, reply prefixes counted.
    pub fn count(&self, n: usize) -> Result<BTreeMap<String, usize>> {
        in_netns(&self.path, move || count_prefixes(seed_addr(), n))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.kill_daemon();
        for c in &mut self.echoes {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.ctl(&["uninstall"]);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs `cmd`, which must succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Runs `f` on a thread that has entered the network namespace at `path`.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace fd we hold; affects only this new thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the connection thread panicked"))?
}

/// `tcpshiftctl --store URL ARGS`.
pub fn store_ctl(url: &str, args: &[&str]) -> Result<Output> {
    Command::new(bin_dir().join("tcpshiftctl"))
        .args(["--store", url])
        .args(args)
        .output()
        .context("cannot run tcpshiftctl")
}

/// `tcpshiftctl --store URL ARGS`, which must succeed; its stdout.
pub fn store_ctl_ok(url: &str, args: &[&str]) -> Result<String> {
    let out = store_ctl(url, args)?;
    if !out.status.success() {
        bail!(
            "tcpshiftctl --store {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A 3-member cluster, 3 nodes following it (tag `tag`, v2 started with `v2_args`), and the
/// seed (all v1) applied through the store and reached by every node; the seed's file.
pub fn fleet(tag: &str, v2_args: &[&str]) -> Result<(EtcdCluster, Vec<Node>, PathBuf)> {
    let cluster = EtcdCluster::start(3)?;
    let url = cluster.url();
    let mut nodes = (0..3)
        .map(|i| Node::new(tag, i, v2_args))
        .collect::<Result<Vec<_>>>()?;
    for n in &mut nodes {
        n.start(&url)?;
    }
    let seed = cluster.dir().join("seed.yaml");
    std::fs::write(&seed, seed_config(100, 0))?;
    store_ctl_ok(&url, &["apply", "-f", &seed.to_string_lossy()])?;
    for n in &nodes {
        n.wait_weights(100, 0)?;
    }
    Ok((cluster, nodes, seed))
}
