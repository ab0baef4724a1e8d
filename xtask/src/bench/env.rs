//! The benchmark's network namespace and the programs running in it, cleaned up on drop.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cmd::{self, say};

/// Prefix of the benchmark's namespace names; the rest is the pid of `cargo xtask bench`.
pub const NETNS_PREFIX: &str = "tcpshift-bench-";

/// How long a program may take to listen, or tcpshiftd to register every socket.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a program gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Poll interval.
const POLL: Duration = Duration::from_millis(50);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes Ctrl-C and SIGTERM stop the benchmark at the next check (then it cleans up).
pub fn install_signal_handler() -> Result<()> {
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")
}

/// Fails when the user asked to stop.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d` unless interrupted.
fn nap(d: Duration) -> Result<()> {
    check_interrupted()?;
    thread::sleep(d);
    check_interrupted()
}

/// A long-running program started in the namespace.
struct Proc {
    name: String,
    child: Child,
}

/// The namespace, the programs started in it and where they log.
pub struct Env {
    name: String,
    path: PathBuf,
    bins: PathBuf,
    logs: PathBuf,
    procs: Vec<Proc>,
    tcpshiftd: Option<Proc>,
    cleaned: bool,
}

impl Env {
    /// Removes namespaces left by benchmark runs that died, then creates
    /// `tcpshift-bench-<pid>` with `lo` up.
    pub fn create(bins: &Path, logs: &Path) -> Result<Env> {
        remove_stale(bins);
        let name = format!("{NETNS_PREFIX}{}", std::process::id());
        cmd::output(Command::new("ip").args(["netns", "add", &name]))
            .context("cannot create the benchmark's network namespace (is iproute2 installed?)")?;
        let env = Env {
            path: PathBuf::from("/run/netns").join(&name),
            name,
            bins: bins.to_path_buf(),
            logs: logs.to_path_buf(),
            procs: Vec::new(),
            tcpshiftd: None,
            cleaned: false,
        };
        cmd::output(Command::new("ip").args(["-n", &env.name, "link", "set", "lo", "up"]))?;
        say(format_args!("network namespace {} (lo up)", env.name));
        Ok(env)
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A binary of the build.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    /// `program` run inside the namespace with `nsenter --net`, which keeps this mount
    /// namespace (and so bpffs at /sys/fs/bpf, unlike `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `program args` in the namespace and fails unless it succeeds; returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = cmd::output(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running program with its output in `logs/<log>.log`, and waits until
    /// something listens on `port` in the namespace.
    pub fn start(&mut self, name: &str, mut command: Command, log: &str, port: u16) -> Result<()> {
        let proc = spawn(name, &mut command, &self.logs.join(format!("{log}.log")))?;
        self.procs.push(proc);
        let idx = self.procs.len() - 1;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.procs[idx].child.try_wait()? {
                bail!(
                    "{name} exited ({status}) before listening on port {port}; see {}",
                    cmd::short(&self.logs.join(format!("{log}.log"))).display()
                );
            }
            if self.listening(port)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{name} did not listen on port {port} within {READY_TIMEOUT:?}");
            }
            nap(POLL)?;
        }
    }

    /// Like [`Env::start`], for a UDP server: waits until a UDP socket is bound to `port`.
    pub fn start_udp(
        &mut self,
        name: &str,
        mut command: Command,
        log: &str,
        port: u16,
    ) -> Result<()> {
        let proc = spawn(name, &mut command, &self.logs.join(format!("{log}.log")))?;
        self.procs.push(proc);
        let idx = self.procs.len() - 1;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.procs[idx].child.try_wait()? {
                bail!("{name} exited ({status}) before binding UDP port {port}");
            }
            let out = self.run("ss", &["-Hlun", &format!("sport = :{port}")])?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{name} did not bind UDP port {port} within {READY_TIMEOUT:?}");
            }
            nap(POLL)?;
        }
    }

    /// Whether something listens on TCP `port` in the namespace.
    pub fn listening(&self, port: u16) -> Result<bool> {
        let out = self.run("ss", &["-Hltn", &format!("sport = :{port}")])?;
        Ok(!out.trim().is_empty())
    }

    /// Fails naming a long-running program that exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited unexpectedly ({status})", p.name);
            }
        }
        Ok(())
    }

    /// Starts tcpshiftd with `config` and waits until every subset has a live socket.
    pub fn tcpshift_up(&mut self, config: &Path) -> Result<()> {
        self.tcpshift_up_with(config, &[])
    }

    /// [`Env::tcpshift_up`] with more tcpshiftd arguments (e.g. a measurement switch).
    pub fn tcpshift_up_with(&mut self, config: &Path, extra: &[&str]) -> Result<()> {
        if self.tcpshiftd.is_some() {
            bail!("tcpshiftd is already running");
        }
        let mut c = Command::new(self.bin("tcpshiftd"));
        c.arg("--config")
            .arg(config)
            .arg("--netns")
            .arg(&self.path)
            .args(extra)
            .env("NO_COLOR", "1");
        self.tcpshiftd = Some(spawn(
            "tcpshiftd",
            &mut c,
            &self.logs.join("tcpshiftd.log"),
        )?);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(d) = self.tcpshiftd.as_mut()
                && let Some(status) = d.child.try_wait()?
            {
                self.tcpshiftd = None;
                bail!(
                    "tcpshiftd exited ({status}); see {}",
                    cmd::short(&self.logs.join("tcpshiftd.log")).display()
                );
            }
            let why = match self.status() {
                Ok(s) if all_live(&s) => return Ok(()),
                Ok(_) => "not every subset is live".to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("tcpshift was not ready within {READY_TIMEOUT:?}: {why}");
            }
            nap(POLL)?;
        }
    }

    /// Uninstalls tcpshift from the namespace (tcpshiftd notices and exits) and stops
    /// tcpshiftd if it still runs.
    pub fn tcpshift_down(&mut self) -> Result<()> {
        let result = self.uninstall();
        if let Some(d) = self.tcpshiftd.take() {
            stop(d, Duration::from_secs(2));
        }
        result
    }

    fn uninstall(&self) -> Result<()> {
        let mut c = Command::new(self.bin("tcpshiftctl"));
        c.arg("--netns").arg(&self.path).arg("uninstall");
        cmd::output(&mut c).map(drop)
    }

    /// `tcpshiftctl status --json` of the namespace.
    pub fn status(&self) -> Result<Value> {
        let mut c = Command::new(self.bin("tcpshiftctl"));
        c.arg("--netns").arg(&self.path).args(["status", "--json"]);
        let out = cmd::output(&mut c)?;
        serde_json::from_slice(&out.stdout).context("cannot parse `tcpshiftctl status --json`")
    }

    /// Runs `tcpshift-load ARGS` in the namespace (killed after `timeout`) and returns the
    /// record it printed.
    pub fn load(&self, load: &Path, args: &[String], timeout: Duration) -> Result<String> {
        let out_path = self.logs.join("tcpshift-load.out");
        let err_path = self.logs.join("tcpshift-load.err");
        let mut c = self.command(load);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).context("cannot create the load's output file")?)
            .stderr(File::create(&err_path).context("cannot create the load's error file")?)
            .process_group(0);
        let shown = format!("tcpshift-load {}", args.join(" "));
        let mut child = c.spawn().with_context(|| format!("cannot start {shown}"))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if INTERRUPTED.load(Ordering::SeqCst) || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                check_interrupted()?;
                bail!("{shown} did not finish within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            bail!("{shown} failed ({status}): {}", err.trim());
        }
        let out = std::fs::read_to_string(&out_path)
            .with_context(|| format!("cannot read {}", out_path.display()))?;
        Ok(out.trim().to_string())
    }

    /// Stops everything, uninstalls tcpshift and deletes the namespace; reports problems
    /// without failing. Runs once (also on drop).
    pub fn clean_up(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        if let Some(d) = self.tcpshiftd.take() {
            stop(d, STOP_GRACE);
        }
        if self.path.exists() {
            // Nothing to uninstall is not an error worth reporting.
            let _ = self.uninstall();
        }
        for p in self.procs.drain(..).rev() {
            stop(p, STOP_GRACE);
        }
        match cmd::output(Command::new("ip").args(["netns", "delete", &self.name])) {
            Ok(_) => say(format_args!("removed network namespace {}", self.name)),
            Err(e) => say(format_args!("warning: {e:#}")),
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.clean_up();
    }
}

/// Whether every subset of every service in a `status --json` is live.
fn all_live(status: &Value) -> bool {
    let services = status["services"].as_array();
    services.is_some_and(|s| !s.is_empty())
        && services.into_iter().flatten().all(|s| {
            s["subsets"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|x| x["live"] == true)
        })
}

/// Starts `command` in its own process group with stdout and stderr to `log`; it gets
/// SIGTERM if xtask dies.
fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Proc> {
    let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = file
        .try_clone()
        .with_context(|| format!("cannot reopen {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0);
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", cmd::show(command)))?;
    Ok(Proc {
        name: name.to_string(),
        child,
    })
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop(mut p: Proc, grace: Duration) {
    if let Ok(Some(_)) = p.child.try_wait() {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(p.child.id()) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if exited(&mut p.child, grace).is_none() {
        let _ = p.child.kill();
        let _ = p.child.wait();
        say(format_args!("{} did not stop on SIGTERM; killed", p.name));
    }
}

fn exited(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// Deletes `tcpshift-bench-<pid>` namespaces whose `cargo xtask bench` is gone (a run that
/// was killed), uninstalling tcpshift from them first.
fn remove_stale(bins: &Path) {
    let Ok(out) = cmd::output(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        if pid
            .parse::<u32>()
            .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            continue;
        }
        let path = Path::new("/run/netns").join(name);
        let _ = Command::new(bins.join("tcpshiftctl"))
            .arg("--netns")
            .arg(&path)
            .arg("uninstall")
            .output();
        if cmd::output(Command::new("ip").args(["netns", "delete", name])).is_ok() {
            say(format_args!("removed stale network namespace {name}"));
        }
    }
}

/// A cgroup (v2) that holds `cargo xtask bench` and so every process it starts: its CPU time
/// is what the benchmark used, whatever else runs on the machine.
pub struct Cgroup {
    path: PathBuf,
    home: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/<name>` and moves this process into it. `None` (with a note)
    /// where there is no cgroup v2 hierarchy to use.
    pub fn enter(name: &str) -> Option<Cgroup> {
        let result = (|| -> Result<Cgroup> {
            let mounts = std::fs::read_to_string("/proc/self/mounts")?;
            let mount = mounts
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
                    (kind == "cgroup2").then(|| PathBuf::from(dir))
                })
                .next()
                .context("no cgroup2 file system is mounted")?;
            let own = std::fs::read_to_string("/proc/self/cgroup")?;
            let rel = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .context("this process has no cgroup v2 membership")?;
            let home = mount.join(rel.trim_start_matches('/'));
            let path = mount.join(name);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let cg = Cgroup { path, home };
            cg.move_self(&cg.path)?;
            Ok(cg)
        })();
        match result {
            Ok(cg) => {
                say(format_args!(
                    "CPU time is measured in cgroup {}",
                    cg.path.display()
                ));
                Some(cg)
            }
            Err(e) => {
                say(format_args!(
                    "note: no CPU-time figures ({e:#}); throughput and latency are measured as usual"
                ));
                None
            }
        }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn move_self(&self, to: &Path) -> Result<()> {
        let procs = to.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("cannot move this process into {}", to.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.move_self(&self.home.clone()) {
            say(format_args!("warning: {e:#}"));
            return;
        }
        // The children are gone by now; their exit may take a moment to be accounted.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        say(format_args!(
            "warning: cannot remove cgroup {}",
            self.path.display()
        ));
    }
}
