//! Helpers for tcpshift's privileged integration tests.
//!
//! Every test runs in a network namespace of its own ([`TestNs`]): the test thread unshares
//! its network namespace, and the programs it starts (`tcp-echo`, `tcpshiftd`, `tcpshiftctl`)
//! inherit it. tcpshift's pinned state is per namespace, so tests cannot disturb each other
//! or the host.
//!
//! The binaries come from `$TCPSHIFT_BIN_DIR` (set by `cargo xtask test`), else from
//! `target/release`.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub mod chaos;
pub mod etcd;
pub mod fleet;
pub mod pinned;
pub mod snmp;

/// Environment variable that explicitly skips privileged tests (for unprivileged laptops).
pub const SKIP_VAR: &str = "TCPSHIFT_SKIP_PRIVILEGED";

/// Environment variable naming a file to which every skipped privileged test appends its
/// name (one a line), so that a summary reports them as skipped rather than passed.
pub const SKIPPED_FILE_VAR: &str = "TCPSHIFT_SKIPPED_FILE";

/// Checks that privileged tests can run. Returns `false` (the test should return early) only
/// when the user opted out with `TCPSHIFT_SKIP_PRIVILEGED=1`; otherwise a missing privilege
/// fails the test with the reason.
///
/// A skipped test still counts as passed for `cargo test`; so that a summary can say it was
/// skipped, its name is appended to the file named by [`SKIPPED_FILE_VAR`] when that is set
/// (`cargo xtask test` does).
pub fn privileged() -> bool {
    if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
        let test = std::thread::current()
            .name()
            .unwrap_or("(unnamed test)")
            .to_string();
        eprintln!("skipped: {test}: {SKIP_VAR}=1 (privileged tests explicitly disabled)");
        if let Some(path) = std::env::var_os(SKIPPED_FILE_VAR) {
            use std::io::Write as _;
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| writeln!(f, "{test}"));
            if let Err(e) = written {
                panic!(
                    "cannot note the skipped test in {}: {e}",
                    std::path::Path::new(&path).display()
                );
            }
        }
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test needs root (it creates a network namespace and loads BPF programs); \
             run `cargo xtask test` as root, or set {SKIP_VAR}=1 to skip privileged tests explicitly"
        );
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("note: /sys/kernel/btf/vmlinux is missing; the kernel may lack BPF support");
    }
    true
}

/// Environment variable that stretches the tests' timeouts by an integer factor (default 1).
/// `cargo xtask vm-test` sets it in its VMs: under QEMU's software emulation code runs 5–20×
/// slower than on the host (loading and verifying the eBPF programs takes seconds there).
pub const TIME_SCALE_VAR: &str = "TCPSHIFT_TEST_TIME_SCALE";

/// `d` multiplied by `$TCPSHIFT_TEST_TIME_SCALE` ([`TIME_SCALE_VAR`]); use it for every
/// timeout and every time bound a test asserts, so the suite also passes in a slow VM.
pub fn scaled(d: Duration) -> Duration {
    let factor = std::env::var(TIME_SCALE_VAR)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * factor
}

/// Directory holding tcpshiftd, tcpshiftctl and tcp-echo.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TCPSHIFT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let dir = root.join("target/release");
    assert!(
        dir.join("tcpshiftd").is_file(),
        "binaries not found in {}: run the tests with `cargo xtask test` (or set TCPSHIFT_BIN_DIR)",
        dir.display()
    );
    dir
}

fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A fresh network namespace for the calling test thread, with `lo` up.
pub struct TestNs {
    children: Vec<Child>,
    dir: tempdir::TempDir,
}

/// Minimal temporary directory (removed on drop).
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);
    impl TempDir {
        pub fn new() -> std::io::Result<Self> {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "tcpshift-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p)?;
            Ok(Self(p))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl TestNs {
    /// Unshares the calling thread's network namespace and brings `lo` up.
    pub fn new() -> Result<Self> {
        // SAFETY: affects only the calling thread (each test runs on its own thread).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!(
                "unshare(CLONE_NEWNET) failed: {} (needs root)",
                std::io::Error::last_os_error()
            );
        }
        let out = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .output()
            .context("cannot run `ip` (install iproute2)")?;
        if !out.status.success() {
            bail!(
                "ip link set lo up: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self {
            children: Vec::new(),
            dir: tempdir::TempDir::new()?,
        })
    }

    /// Starts `tcp-echo --bind ADDR PORT PREFIX` and waits until it listens.
    pub fn echo(&mut self, bind: &str, port: u16, prefix: &str) -> Result<usize> {
        self.echo_args(&["--bind", bind, &port.to_string(), prefix])
    }

    /// Starts `tcp-echo ARGS` (e.g. `["--port-in-prefix", "9000,9001", "one"]`) and waits
    /// until it listens on every port.
    pub fn echo_args(&mut self, args: &[&str]) -> Result<usize> {
        let mut child = Command::new(bin("tcp-echo"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start tcp-echo")?;
        let stdout = child.stdout.take().context("tcp-echo stdout")?;
        self.children.push(child);
        wait_for_line(stdout, "listening on", scaled(Duration::from_secs(10)))
            .with_context(|| format!("tcp-echo {args:?} did not start"))?;
        Ok(self.children.len() - 1)
    }

    /// Starts `tcpshiftd` without a configuration (services come from `tcpshiftctl apply`),
    /// its stderr going to the file [`TestNs::loader_log`] reads, and waits until tcpshift is
    /// installed.
    pub fn bare_loader(&mut self) -> Result<usize> {
        let log = std::fs::File::create(self.dir.path().join("tcpshiftd.log"))?;
        let child = Command::new(bin("tcpshiftd"))
            .args(["--log-level", "info"])
            .stderr(log)
            .spawn()
            .context("cannot start tcpshiftd")?;
        self.children.push(child);
        let idx = self.children.len() - 1;
        // Loading verifies two programs: allow for a busy machine.
        poll_until(
            Duration::from_secs(30),
            "tcpshiftd installed tcpshift",
            || Ok((self.ctl(&["status", "--json"])?.status.code() == Some(0)).then_some(())),
        )
        .with_context(|| format!("tcpshiftd's log:\n{}", self.loader_log()))?;
        Ok(idx)
    }

    /// Path of a file named `name` in this test's temporary directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `yaml` as the loader's config, starts `tcpshiftd` and waits until every subset
    /// with a running backend has a registered socket.
    pub fn loader(&mut self, yaml: &str) -> Result<usize> {
        let path = self.dir.path().join("tcpshift.yaml");
        std::fs::write(&path, yaml)?;
        let child = Command::new(bin("tcpshiftd"))
            .arg("--config")
            .arg(&path)
            .arg("--log-level")
            .arg("info")
            .spawn()
            .context("cannot start tcpshiftd")?;
        self.children.push(child);
        let idx = self.children.len() - 1;
        self.wait_live(scaled(Duration::from_secs(15)))?;
        Ok(idx)
    }

    /// Like [`TestNs::loader`], with more `tcpshiftd` arguments (e.g. `--metrics ADDR`,
    /// `--log-level debug`); its stderr goes to a file that [`TestNs::loader_log`] reads.
    pub fn loader_with(&mut self, yaml: &str, args: &[&str]) -> Result<usize> {
        let path = self.dir.path().join("tcpshift.yaml");
        std::fs::write(&path, yaml)?;
        let log = std::fs::File::create(self.dir.path().join("tcpshiftd.log"))?;
        let mut cmd = Command::new(bin("tcpshiftd"));
        cmd.arg("--config").arg(&path).args(args).stderr(log);
        if !args.contains(&"--log-level") {
            cmd.args(["--log-level", "info"]);
        }
        let child = cmd.spawn().context("cannot start tcpshiftd")?;
        self.children.push(child);
        let idx = self.children.len() - 1;
        self.wait_live(scaled(Duration::from_secs(15)))
            .with_context(|| format!("tcpshiftd's log:\n{}", self.loader_log()))?;
        // Pinned state may be live already (a restart): wait for this loader's own word that
        // it has adopted or installed it and registered every socket; fail at once if it exits.
        let timeout = scaled(Duration::from_secs(15));
        let start = Instant::now();
        while !self
            .loader_log()
            .contains("ready: every subset has a registered socket")
        {
            let problem = match self.children[idx].try_wait()? {
                Some(status) => format!("exited ({status}) before it was ready"),
                None if start.elapsed() > timeout => format!("not ready after {timeout:?}"),
                None => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            bail!("tcpshiftd {problem}; its log:\n{}", self.loader_log());
        }
        Ok(idx)
    }

    /// What the `tcpshiftd` started by [`TestNs::loader_with`] has logged so far.
    pub fn loader_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tcpshiftd.log")).unwrap_or_default()
    }

    /// Sends `signal` to child `idx` and reaps it.
    pub fn signal(&mut self, idx: usize, signal: libc::c_int) -> Result<()> {
        let c = &mut self.children[idx];
        // SAFETY: plain kill(2) on our own child, not yet reaped.
        if unsafe { libc::kill(c.id() as libc::pid_t, signal) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        c.wait().context("wait")?;
        Ok(())
    }

    /// Starts `tcpshiftd` again with the config of the last [`TestNs::loader`] call.
    pub fn restart_loader(&mut self) -> Result<usize> {
        let yaml = std::fs::read_to_string(self.dir.path().join("tcpshift.yaml"))?;
        self.loader(&yaml)
    }

    /// Like [`TestNs::restart_loader`], with more arguments, logging like
    /// [`TestNs::loader_with`].
    pub fn restart_loader_with(&mut self, args: &[&str]) -> Result<usize> {
        let yaml = std::fs::read_to_string(self.dir.path().join("tcpshift.yaml"))?;
        self.loader_with(&yaml, args)
    }

    /// Process id of child `idx`.
    pub fn pid(&self, idx: usize) -> u32 {
        self.children[idx].id()
    }

    /// Runs `tcpshiftctl ARGS` as an unprivileged user (uid/gid 65534) in this namespace.
    pub fn ctl_unprivileged(&self, args: &[&str]) -> Result<Output> {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("tcpshiftctl"))
            .args(args)
            .output()
            .context("cannot run setpriv (util-linux)")
    }

    /// SIGKILLs child `idx` and reaps it.
    pub fn kill(&mut self, idx: usize) -> Result<()> {
        let c = &mut self.children[idx];
        c.kill().context("kill")?;
        c.wait().context("wait")?;
        Ok(())
    }

    /// Waits until `status --json` shows every subset whose backend is listening as live.
    pub fn wait_live(&self, timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        loop {
            if let Ok(status) = self.status() {
                let all_live = status["services"].as_array().is_some_and(|s| !s.is_empty())
                    && subsets(&status).all(|s| s["live"] == true);
                if all_live {
                    return Ok(status);
                }
            }
            if start.elapsed() > timeout {
                bail!("subsets not live after {timeout:?}: {:?}", self.status());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `tcpshiftctl ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        Command::new(bin("tcpshiftctl"))
            .args(args)
            .output()
            .context("cannot run tcpshiftctl")
    }

    /// Runs `tcpshiftctl ARGS` and fails unless it succeeds; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        if !out.status.success() {
            bail!(
                "tcpshiftctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `tcpshiftctl status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = self.ctl_ok(&["status", "--json"])?;
        serde_json::from_str(&out).context("status --json is not JSON")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.ctl(&["uninstall"]);
    }
}

/// Calls `probe` every 20 ms until it returns `Some` (a readiness check for something the
/// kernel does asynchronously, such as accounting a closed connection), or fails after
/// `timeout` (scaled, see [`scaled`]) with `what` and the last probe's error.
pub fn poll_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let timeout = scaled(timeout);
    let start = Instant::now();
    loop {
        let last = match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if start.elapsed() > timeout {
            match last {
                Some(e) => bail!("{what}: not reached after {timeout:?}: {e:#}"),
                None => bail!("{what}: not reached after {timeout:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A counter of subset `name` in a `status --json` document (0 when absent).
pub fn counter(status: &Value, name: &str, field: &str) -> u64 {
    subset(status, name)
        .and_then(|s| s["counters"][field].as_u64())
        .unwrap_or(0)
}

/// `GET path` over HTTP/1.1 from `addr`: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5)))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(scaled(Duration::from_secs(10))))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response {response:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// Every subset object of a `status --json` document.
pub fn subsets(status: &Value) -> impl Iterator<Item = &Value> {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["subsets"].as_array().into_iter().flatten())
}

/// The subset named `name` in a `status --json` document.
pub fn subset<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    subsets(status).find(|s| s["name"] == name)
}

fn wait_for_line(stdout: ChildStdout, needle: &str, timeout: Duration) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let found = lines.by_ref().any(|l| l.is_ok_and(|l| l.contains(&needle)));
        let _ = tx.send(found);
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(timeout) {
        Ok(true) => Ok(()),
        Ok(false) => bail!("process exited before it was ready"),
        Err(_) => bail!("not ready after {timeout:?}"),
    }
}

/// Opens a connection, sends `line`, returns the reply line (without the newline). Checks
/// that the reply is `PREFIX line`, and returns the prefix.
pub fn exchange(addr: SocketAddr, line: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5)))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    reply_prefix(&reply, line)
}

/// Checks that `reply` is `PREFIX line` (one line) and returns the prefix.
fn reply_prefix(reply: &str, line: &str) -> Result<String> {
    let reply = reply.strip_suffix('\n').unwrap_or(reply);
    let (prefix, echoed) = reply
        .split_once(' ')
        .with_context(|| format!("malformed reply {reply:?}"))?;
    if echoed != line {
        bail!("echo mismatch: sent {line:?}, got {reply:?}");
    }
    Ok(prefix.to_string())
}

/// Makes `n` connections to `addr`, each echoing a distinct line, and counts reply prefixes.
pub fn count_prefixes(addr: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let prefix = exchange(addr, &format!("hello {i}"))?;
        *counts.entry(prefix).or_insert(0) += 1;
    }
    Ok(counts)
}

/// A persistent connection that exchanges lines.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects to `addr`.
    pub fn open(addr: SocketAddr) -> Result<Self> {
        let s = TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5)))?;
        s.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
        Ok(Self {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sends `line`, returns the reply's prefix after checking the echo.
    pub fn exchange(&mut self, line: &str) -> Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        reply_prefix(&reply, line)
    }
}

/// The seed configuration: service tcp-echo on port 31400, v1 on 9001, v2 on 9002.
pub fn seed_config(v1: u32, v2: u32) -> String {
    format!(
        "services:\n  tcp-echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n      v2: 127.0.0.1:9002\n    weights: {{v1: {v1}, v2: {v2}}}\n"
    )
}

/// Address clients use in the seed.
pub fn seed_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 31400))
}

/// Starts both seed backends and the loader with weights `v1`/`v2`. Returns the indices of
/// (v1, v2, loader) children.
pub fn seed(ns: &mut TestNs, v1: u32, v2: u32) -> Result<(usize, usize, usize)> {
    let a = ns.echo("127.0.0.1", 9001, "one")?;
    let b = ns.echo("127.0.0.1", 9002, "two")?;
    let l = ns.loader(&seed_config(v1, v2))?;
    Ok((a, b, l))
}

impl TestNs {
    /// Starts `tcpshiftd ARGS` without waiting for anything, its stderr going to the file
    /// [`TestNs::loader_log`] reads; `env` sets (`Some`) or removes (`None`) environment
    /// variables. Returns the child's index.
    pub fn spawn_loader(&mut self, args: &[&str], env: &[(&str, Option<&str>)]) -> Result<usize> {
        let log = std::fs::File::create(self.dir.path().join("tcpshiftd.log"))?;
        let mut cmd = Command::new(bin("tcpshiftd"));
        cmd.args(args).stderr(log);
        for (key, value) in env {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        self.children
            .push(cmd.spawn().context("cannot start tcpshiftd")?);
        Ok(self.children.len() - 1)
    }

    /// Whether child `idx` is still running (it is reaped if it has exited).
    pub fn running(&mut self, idx: usize) -> Result<bool> {
        Ok(self.children[idx].try_wait()?.is_none())
    }

    /// Sends `signal` to child `idx` without waiting for it.
    pub fn send_signal(&self, idx: usize, signal: libc::c_int) -> Result<()> {
        // SAFETY: plain kill(2) on our own child.
        if unsafe { libc::kill(self.children[idx].id() as libc::pid_t, signal) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Sends `request` (raw bytes) to `addr` and reads until the server closes the connection or
/// `timeout` (scaled) passes; returns what was read and whether the server closed it in time.
pub fn http_raw(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<(Vec<u8>, bool)> {
    let timeout = scaled(timeout);
    let mut s = TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5)))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request)?;
    let mut response = Vec::new();
    let closed = match s.read_to_end(&mut response) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(e) => return Err(e.into()),
    };
    Ok((response, closed))
}
