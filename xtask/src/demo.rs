//! `cargo xtask run`: Istio's "TCP Traffic Shifting" task on one machine. Two tcp-echo servers
//! (v1 answers "one", v2 answers "two") listen on loopback, tcpshiftd steers the service port
//! to them by weight, and the demo shows the split while you shift traffic with tcpshiftctl.
//! On Ctrl-C (or SIGTERM, or when a program it started dies) it stops everything it started
//! and uninstalls tcpshift from the network namespace.

use std::{
    fmt,
    io::{BufRead, BufReader, IsTerminal, Read},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    build::{Profile, build},
    cmd::{self, say},
};

/// How long a tcp-echo may take to print `listening on`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long tcpshiftd may take until every subset is live.
const LIVE_TIMEOUT: Duration = Duration::from_secs(15);
/// Poll interval while starting up.
const POLL: Duration = Duration::from_millis(100);
/// Poll interval for children while the demo runs.
const TICK: Duration = Duration::from_millis(200);
/// How often the demo looks at `tcpshiftctl status`.
const SUMMARY_EVERY: Duration = Duration::from_secs(2);
/// How long a child gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Ports of the demo (the defaults are the seed task's).
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Service port the clients connect to; nothing listens on it, tcpshift steers it.
    #[arg(long, default_value_t = 31400, value_name = "PORT")]
    pub port: u16,
    /// Port of tcp-echo v1 (prefixes replies with "one").
    #[arg(long, default_value_t = 9001, value_name = "PORT")]
    pub v1_port: u16,
    /// Port of tcp-echo v2 (prefixes replies with "two").
    #[arg(long, default_value_t = 9002, value_name = "PORT")]
    pub v2_port: u16,
    /// Run the fleet demo instead: a 1-member etcd on loopback and N nodes (network
    /// namespaces, each with tcp-echo v1/v2 and a tcpshiftd following the store); one
    /// `tcpshiftctl --store set-weight` moves them all (see `demo_fleet`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub fleet: Option<u16>,
}

/// The user asked the demo to stop (Ctrl-C or SIGTERM).
#[derive(Debug)]
pub(crate) struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// SIGINT and SIGTERM, delivered to a channel.
pub(crate) struct Signals(Receiver<()>);

impl Signals {
    pub(crate) fn install() -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        ctrlc::set_handler(move || {
            let _ = tx.send(());
        })
        .context("cannot install the Ctrl-C handler")?;
        Ok(Signals(rx))
    }

    /// Sleeps for `d`; fails with [`Interrupted`] as soon as a signal arrives.
    pub(crate) fn sleep(&self, d: Duration) -> Result<()> {
        match self.0.recv_timeout(d) {
            Ok(()) => Err(Interrupted.into()),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => Ok(()),
        }
    }
}

/// A program the demo started.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
}

/// Everything the demo started, so that it can clean up.
struct Demo {
    bins: PathBuf,
    echoes: Vec<Proc>,
    daemon: Option<Proc>,
}

/// Runs the demo until Ctrl-C / SIGTERM, then cleans up.
pub fn run(args: &DemoArgs) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "the demo loads BPF programs into this network namespace and must run as root \
             (e.g. `sudo -E env PATH=\"$PATH\" cargo xtask run`)"
        );
    }
    args.check()?;
    if let Some(nodes) = args.fleet {
        return crate::demo_fleet::run(args, usize::from(nodes));
    }
    let bins = build(Profile::Release)?;
    let signals = Signals::install()?;
    let mut demo = Demo {
        bins,
        echoes: Vec::new(),
        daemon: None,
    };
    let result = demo
        .start(args, &signals)
        .and_then(|()| demo.watch(&signals));
    match &result {
        Err(e) if e.is::<Interrupted>() => say("stopping (signal received); cleaning up"),
        _ => say("stopping; cleaning up"),
    }
    demo.clean_up();
    match result {
        Err(e) if e.is::<Interrupted>() => Ok(()),
        other => other,
    }
}

impl DemoArgs {
    fn check(&self) -> Result<()> {
        let mut ports = [self.port, self.v1_port, self.v2_port];
        ports.sort_unstable();
        if ports[0] == 0 || ports.windows(2).any(|w| w[0] == w[1]) {
            bail!("--port, --v1-port and --v2-port must be three different non-zero ports");
        }
        Ok(())
    }

    pub(crate) fn subsets(&self) -> [(&'static str, u16, &'static str); 2] {
        [("v1", self.v1_port, "one"), ("v2", self.v2_port, "two")]
    }
}

impl Demo {
    /// Starts both tcp-echo servers and tcpshiftd, and waits until steering works.
    fn start(&mut self, args: &DemoArgs, signals: &Signals) -> Result<()> {
        for (subset, port, word) in args.subsets() {
            self.start_echo(subset, port, word, signals)?;
        }
        let config = self.write_config(args)?;
        if self.status().is_ok() {
            say(
                "note: tcpshift is already installed in this network namespace; tcpshiftd adopts \
                 it (keeping its weights) and the demo uninstalls it when it stops",
            );
        }
        let mut daemon = Command::new(self.bin("tcpshiftd"));
        daemon.arg("--config").arg(&config);
        self.daemon = Some(spawn("tcpshiftd", daemon, None)?);
        self.wait_live(signals)?;
        print_instructions(args, &self.bin("tcpshiftctl"));
        Ok(())
    }

    fn start_echo(&mut self, subset: &str, port: u16, word: &str, signals: &Signals) -> Result<()> {
        let mut echo = Command::new(self.bin("tcp-echo"));
        echo.args(["--bind", "127.0.0.1", &port.to_string(), word]);
        let (ready_tx, ready) = mpsc::channel();
        let name = format!("tcp-echo {subset}");
        let mut proc = spawn(&name, echo, Some(ready_tx))?;
        let waited = wait_ready(&mut proc, &ready, port, signals);
        self.echoes.push(proc);
        waited
    }

    /// Writes the seed's routing (all traffic to v1) as tcpshiftd's configuration.
    fn write_config(&self, args: &DemoArgs) -> Result<PathBuf> {
        let dir = self
            .bins
            .parent()
            .context("the binaries' directory has no parent")?
            .join("demo");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("tcpshift.yaml");
        let (port, v1, v2) = (args.port, args.v1_port, args.v2_port);
        let yaml = format!(
            r#"services:
  tcp-echo:
    listen: {port}
    subsets:
      v1: 127.0.0.1:{v1}
      v2: 127.0.0.1:{v2}
    weights: {{v1: 100, v2: 0}}
"#
        );
        std::fs::write(&path, yaml).with_context(|| format!("cannot write {}", path.display()))?;
        say(format_args!("wrote {}", cmd::short(&path).display()));
        Ok(path)
    }

    /// Polls `tcpshiftctl status --json` until every subset is live.
    fn wait_live(&mut self, signals: &Signals) -> Result<()> {
        let deadline = Instant::now() + LIVE_TIMEOUT;
        loop {
            self.check_children()?;
            let why = match self.status() {
                Ok(status) if all_live(&status) => break,
                Ok(status) => format!("not every subset is live: {}", summary(&status)),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "tcpshift was not ready within {} s: {why}",
                    LIVE_TIMEOUT.as_secs()
                );
            }
            signals.sleep(POLL)?;
        }
        say("tcpshiftd is steering; every subset is live");
        Ok(())
    }

    /// Prints the split whenever it changes, until a signal arrives or a child dies.
    fn watch(&mut self, signals: &Signals) -> Result<()> {
        let mut last = String::new();
        let mut next = Instant::now();
        loop {
            self.check_children()?;
            if Instant::now() >= next {
                let line = match self.status() {
                    Ok(status) => summary(&status),
                    Err(e) => format!("status unavailable: {e:#}"),
                };
                if line != last {
                    println!("{line}");
                    last = line;
                }
                next += SUMMARY_EVERY;
            }
            signals.sleep(TICK)?;
        }
    }

    /// Fails naming the first program that exited.
    fn check_children(&mut self) -> Result<()> {
        for proc in self.echoes.iter_mut().chain(self.daemon.as_mut()) {
            if let Some(status) = proc.child.try_wait().context("cannot check a child")? {
                bail!("{} exited unexpectedly ({status})", proc.name);
            }
        }
        Ok(())
    }

    fn status(&self) -> Result<Value> {
        let mut ctl = Command::new(self.bin("tcpshiftctl"));
        let out = cmd::output(ctl.args(["status", "--json"]))?;
        serde_json::from_slice(&out.stdout).context("cannot parse `tcpshiftctl status --json`")
    }

    /// Stops tcpshiftd, uninstalls tcpshift, stops the tcp-echo servers; reports each step.
    fn clean_up(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            stop(daemon);
            self.uninstall();
        }
        for echo in self.echoes.drain(..) {
            stop(echo);
        }
        say("demo stopped; everything it started is cleaned up");
    }

    fn uninstall(&self) {
        let mut ctl = Command::new(self.bin("tcpshiftctl"));
        match cmd::output(ctl.arg("uninstall")) {
            Ok(out) => say(format_args!(
                "tcpshiftctl uninstall: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            )),
            Err(e) => say(format_args!("warning: {e:#}")),
        }
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }
}

/// Starts `cmd` in its own process group (so Ctrl-C reaches only the demo, which then stops
/// it in order) and passes its output through, prefixed with its name. With `ready`, the first
/// stdout line containing `listening on` is reported there.
pub(crate) fn spawn(name: &str, mut cmd: Command, ready: Option<Sender<()>>) -> Result<Proc> {
    if !std::io::stdout().is_terminal() {
        cmd.env("NO_COLOR", "1"); // tcpshiftd's log colours are noise in a file
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    own_group_dies_with_us(&mut cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", cmd::show(&cmd)))?;
    let prefix = format!("[{name}] ");
    if let Some(out) = child.stdout.take() {
        forward(out, prefix.clone(), ready);
    }
    if let Some(err) = child.stderr.take() {
        forward(err, prefix, None);
    }
    Ok(Proc {
        name: name.to_string(),
        child,
    })
}

/// Puts `cmd` in its own process group (so Ctrl-C reaches only the demo, which then stops
/// it in order) and has it get SIGTERM if the demo dies without cleaning up.
pub(crate) fn own_group_dies_with_us(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Passes `from` through line by line on a thread.
fn forward(from: impl Read + Send + 'static, prefix: String, mut ready: Option<Sender<()>>) {
    thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            println!("{prefix}{line}");
            if line.contains("listening on")
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(());
            }
        }
    });
}

/// Waits until a tcp-echo says it listens; fails if it exits first or takes too long.
pub(crate) fn wait_ready(
    proc: &mut Proc,
    ready: &Receiver<()>,
    port: u16,
    signals: &Signals,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match ready.try_recv() {
            Ok(()) => return Ok(()),
            Err(TryRecvError::Disconnected) => {
                let how = describe_exit(exited(&mut proc.child, Duration::from_secs(1)));
                bail!(
                    "{} stopped before listening ({how}); is port {port} already in use?",
                    proc.name
                );
            }
            Err(TryRecvError::Empty) => {}
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not print `listening on` within {} s; is port {port} already in use?",
                proc.name,
                READY_TIMEOUT.as_secs()
            );
        }
        signals.sleep(POLL)?;
    }
}

/// Asks `proc` to stop (SIGTERM, then SIGKILL after a grace period) and reports it.
pub(crate) fn stop(mut proc: Proc) {
    let pid = proc.child.id();
    if let Ok(Some(status)) = proc.child.try_wait() {
        say(format_args!(
            "{} (pid {pid}) had already exited ({status})",
            proc.name
        ));
        return;
    }
    if let Ok(raw) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is our child, not yet reaped.
        unsafe { libc::kill(raw, libc::SIGTERM) };
    }
    let status = exited(&mut proc.child, STOP_GRACE).or_else(|| {
        let _ = proc.child.kill();
        proc.child.wait().ok()
    });
    say(format_args!(
        "stopped {} (pid {pid}, {})",
        proc.name,
        describe_exit(status)
    ));
}

/// Waits up to `within` for `child` to exit.
fn exited(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

fn describe_exit(status: Option<ExitStatus>) -> String {
    status.map_or_else(|| "still running".into(), |s| s.to_string())
}

/// Whether `status --json` shows at least one service and every subset live.
pub(crate) fn all_live(status: &Value) -> bool {
    let services = services(status);
    !services.is_empty()
        && services.iter().all(|svc| {
            let subsets = svc["subsets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            !subsets.is_empty() && subsets.iter().all(|s| s["live"] == Value::Bool(true))
        })
}

/// One line: `tcp-echo: v1 w=80 steered=12 | v2 w=20 steered=3`.
pub(crate) fn summary(status: &Value) -> String {
    let lines: Vec<String> = services(status)
        .iter()
        .map(|svc| {
            let subsets = svc["subsets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let parts: Vec<String> = subsets
                .iter()
                .map(|s| {
                    let live = if s["live"] == Value::Bool(true) {
                        ""
                    } else {
                        " (not live)"
                    };
                    format!(
                        "{} w={} steered={}{live}",
                        text(&s["name"]),
                        text(&s["weight"]),
                        text(&s["counters"]["steered"])
                    )
                })
                .collect();
            format!("{}: {}", text(&svc["name"]), parts.join(" | "))
        })
        .collect();
    if lines.is_empty() {
        return "no services".into();
    }
    lines.join("; ")
}

fn services(status: &Value) -> &[Value] {
    status["services"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A JSON scalar without quotes (`?` when absent).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".into(),
        other => other.to_string(),
    }
}

fn print_instructions(args: &DemoArgs, ctl: &Path) {
    let ctl = cmd::short(ctl);
    let ctl = ctl.display();
    let port = args.port;
    println!(
        r#"
tcp-echo is reachable on 127.0.0.1:{port}: 100% of new connections go to v1 ("one").
In another terminal, send some traffic; every reply should start with "one"
(-N ends the connection with the input; Debian's netcat-openbsd waits forever without it):

    for i in $(seq 1 10); do (date; sleep 1) | nc -N 127.0.0.1 {port}; done

Then shift 20% of new connections to v2, check, and send the traffic again
(about 2 replies in 10 should start with "two"):

    {ctl} set-weight v2=20
    {ctl} status

Or let tcpshiftd roll v2 out by itself, 5 % -> 20 % -> 50 % -> 100 %, each step held
10 s and judged by the kernel's TCP signals (keep the traffic loop running: a canary
without traffic is not promoted), rolled back at once if v2 fails:

    {ctl} rollout start tcp-echo --canary v2 --steps 5,20,50,100 --interval 10s
    {ctl} rollout status        # phase, step, weights, last values, why
    {ctl} rollout abort         # or pause / resume / promote; then: rollout history

The split is shown below when it changes. Press Ctrl-C to stop and clean up.
"#
    );
}
