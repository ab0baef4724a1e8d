//! A 1-member etcd on 127.0.0.1 (ports chosen free) for the fleet demo (`cargo xtask run
//! --fleet N`) and the fleet benchmark (`cargo xtask bench --only fleet`).

use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// How long etcd may take to answer `endpoint health`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running member.
pub struct Etcd {
    /// The process (in its own process group; it gets SIGTERM if xtask dies).
    pub child: Child,
    /// `etcd://127.0.0.1:PORT`, for `--store`.
    pub url: String,
    /// Its log.
    pub log: PathBuf,
}

/// Fails with how to install them when `etcd` or `etcdctl` is missing.
pub fn require(what: &str) -> Result<()> {
    for (bin, arg, package) in [
        ("etcd", "--version", "etcd-server"),
        ("etcdctl", "version", "etcd-client"),
    ] {
        if cmd::output(Command::new(bin).arg(arg)).is_err() {
            bail!(
                "`{bin}` not found: {what} starts a real etcd; run `cargo xtask bootstrap` (or \
                 `apt-get install {package}`)"
            );
        }
    }
    Ok(())
}

/// Starts a member named `name` with its data and log in `dir` and waits until it answers;
/// `pause` runs between checks (it sleeps, and fails to stop waiting on a signal).
pub fn start(dir: &Path, name: &str, pause: &mut dyn FnMut() -> Result<()>) -> Result<Etcd> {
    let client = free_port()?;
    let peer = free_port()?;
    let client_url = format!("http://127.0.0.1:{}", client.local_addr()?.port());
    let peer_url = format!("http://127.0.0.1:{}", peer.local_addr()?.port());
    drop((client, peer));
    let log = dir.join("etcd.log");
    let log_file =
        File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut etcd = Command::new("etcd");
    etcd.args(["--name", name])
        .arg("--data-dir")
        .arg(dir.join("etcd-data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("{name}={peer_url}")])
        // A whole desired state of many services is one transaction.
        .args(["--max-txn-ops", "20000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    crate::demo::own_group_dies_with_us(&mut etcd);
    let mut child = etcd.spawn().context("cannot start etcd")?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let waited = loop {
        if let Some(status) = child.try_wait()? {
            break Err(anyhow::anyhow!(
                "etcd exited ({status}); see {}",
                log.display()
            ));
        }
        let health = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={client_url}"))
            .args(["--dial-timeout", "1s", "endpoint", "health"])
            .output();
        if health.is_ok_and(|o| o.status.success()) {
            break Ok(());
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!(
                "etcd did not become healthy within {} s; see {}",
                READY_TIMEOUT.as_secs(),
                log.display()
            ));
        }
        if let Err(e) = pause() {
            break Err(e);
        }
    };
    if let Err(e) = waited {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(Etcd {
        child,
        url: client_url.replacen("http://", "etcd://", 1),
        log,
    })
}

/// A free TCP port on 127.0.0.1 (held while the caller picks the next).
fn free_port() -> Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")
}
