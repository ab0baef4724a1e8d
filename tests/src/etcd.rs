//! Real etcd clusters for the fleet-store tests.
//!
//! [`EtcdCluster::start`] starts 1 or more `etcd` processes (Debian's `etcd-server`) on
//! loopback ports chosen free by the test, each with its own data directory in a temporary
//! directory, and waits until every member answers `etcdctl endpoint health` (a member is
//! healthy once the cluster has a leader). Members can be killed and restarted; everything
//! is stopped and removed on drop.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::poll_until;

/// One etcd member.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A cluster of etcd processes on 127.0.0.1.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    dir: PathBuf,
}

/// Fails with a clear message when `etcd` or `etcdctl` is missing.
pub fn require_etcd() {
    for (bin, arg, package) in [
        ("etcd", "--version", "etcd-server"),
        ("etcdctl", "version", "etcd-client"),
    ] {
        let found = Command::new(bin)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "`{bin}` not found: the fleet-store tests start real etcd processes; install \
             Debian's {package} with `cargo xtask bootstrap` (or `apt-get install {package}`)"
        );
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 (held open together while choosing).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot find free loopback ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

impl EtcdCluster {
    /// Starts an `n`-member cluster and waits until every member is healthy.
    pub fn start(n: usize) -> Result<Self> {
        require_etcd();
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("tcpshift-etcd-{id}"));
        std::fs::create_dir_all(&dir)?;
        let ports = free_ports(2 * n)?;
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.join(format!("m{i}.etcd")),
                log: dir.join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            token: format!("tcpshift-test-{id}"),
            dir,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let state = if m.data_dir.exists() {
            "existing"
        } else {
            "new"
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // A whole desired state of many services is one transaction.
            .args(["--max-txn-ops", "20000"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start etcd")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member (never, after [`EtcdCluster::start`]).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `etcd://127.0.0.1:P1,127.0.0.1:P2,...` (every member).
    pub fn url(&self) -> String {
        self.url_of(&(0..self.members.len()).collect::<Vec<_>>())
    }

    /// `etcd://...` naming only the members `which`.
    pub fn url_of(&self, which: &[usize]) -> String {
        let hosts: Vec<String> = which
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.members[i].client_port))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Runs `etcdctl ARGS` against member `i`.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> Result<Output> {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint(i)))
            .args(["--command-timeout", "2s", "--dial-timeout", "1s"])
            .args(args)
            .output()
            .context("cannot run etcdctl")
    }

    /// Runs `etcdctl ARGS` against member `i`; fails unless it succeeds; returns stdout.
    pub fn etcdctl_ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.etcdctl(i, args)?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?} on member {i} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn running(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .collect()
    }

    /// Waits until every running member answers `endpoint health` (the cluster has a leader).
    pub fn wait_healthy(&self) -> Result<()> {
        for i in self.running() {
            poll_until(
                Duration::from_secs(30),
                &format!("etcd member {i} healthy"),
                || {
                    let out = self.etcdctl(i, &["endpoint", "health"])?;
                    Ok(out.status.success().then_some(()))
                },
            )
            .with_context(|| format!("etcd member {i}'s log:\n{}", self.log(i)))?;
        }
        Ok(())
    }

    /// The index of the current leader (asked of a running member).
    pub fn leader(&self) -> Result<usize> {
        poll_until(Duration::from_secs(15), "an etcd leader", || {
            for i in self.running() {
                let Ok(out) = self.etcdctl_ok(i, &["endpoint", "status", "-w", "json"]) else {
                    continue;
                };
                let status: Value = serde_json::from_str(&out)?;
                let header = &status[0]["Status"]["header"];
                let leader = status[0]["Status"]["leader"].as_u64();
                if let Some(leader) = leader
                    && leader != 0
                    && header["member_id"].as_u64() == Some(leader)
                {
                    return Ok(Some(i));
                }
                // Ask the leader's id of the cluster and find its index by name.
                let members: Value =
                    serde_json::from_str(&self.etcdctl_ok(i, &["member", "list", "-w", "json"])?)?;
                for m in members["members"].as_array().into_iter().flatten() {
                    if m["ID"].as_u64() == leader
                        && let Some(name) = m["name"].as_str()
                        && let Some(idx) = self.members.iter().position(|x| x.name == name)
                    {
                        return Ok(Some(idx));
                    }
                }
            }
            Ok(None)
        })
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.members[i].child.take() {
            c.kill().context("kill etcd")?;
            c.wait().context("wait etcd")?;
        }
        Ok(())
    }

    /// Starts member `i` again (same data directory) without waiting.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        if self.members[i].child.is_none() {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// What member `i` has logged.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    /// The temporary directory holding the members' data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
