//! `cargo xtask run --fleet N`: the fleet on one machine. A 1-member etcd listens on
//! 127.0.0.1 (ports chosen free), N "nodes" are network namespaces of their own, each with
//! tcp-echo v1/v2 and a tcpshiftd working in it through `--netns` and following the store
//! (its store connection stays on the host's loopback). The demo applies the seed (all v1)
//! to the store, shows connections per node, runs one `tcpshiftctl --store set-weight
//! v2=20` and shows every node moving; then it prints how to play and the split of every
//! node whenever it changes. Ctrl-C (or SIGTERM, or a program it started dying) stops
//! everything it started, uninstalls tcpshift from the namespaces and removes them and the
//! store's data.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    build::{Profile, build},
    cmd::{self, say},
    demo::{self, DemoArgs, Interrupted, Proc, Signals},
};

/// How long the nodes may take to steer a change.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval while waiting.
const POLL: Duration = Duration::from_millis(100);
/// How often the split of every node is looked at while the demo runs.
const SUMMARY_EVERY: Duration = Duration::from_secs(2);
/// Connections sent to each node to show its split.
const SAMPLE: usize = 200;

/// One node: a network namespace with its backends and its tcpshiftd.
struct Node {
    name: String,
    netns: String,
    path: PathBuf,
    echoes: Vec<Proc>,
    daemon: Option<Proc>,
}

/// Everything the fleet demo started, so that it can clean up.
struct Fleet {
    bins: PathBuf,
    dir: PathBuf,
    etcd: Option<Proc>,
    url: String,
    nodes: Vec<Node>,
}

/// Runs the fleet demo with `n` nodes until Ctrl-C / SIGTERM, then cleans up.
pub fn run(args: &DemoArgs, n: usize) -> Result<()> {
    crate::etcd::require("the fleet demo")?;
    let bins = build(Profile::Release)?;
    let signals = Signals::install()?;
    let dir = bins
        .parent()
        .context("the binaries' directory has no parent")?
        .join("demo")
        .join(format!("fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut fleet = Fleet {
        bins,
        dir,
        etcd: None,
        url: String::new(),
        nodes: Vec::new(),
    };
    let result = fleet
        .start(args, n, &signals)
        .and_then(|()| fleet.show_one_change(args, &signals))
        .and_then(|()| {
            print_instructions(&fleet, args);
            fleet.watch(&signals)
        });
    match &result {
        Err(e) if e.is::<Interrupted>() => say("stopping (signal received); cleaning up"),
        _ => say("stopping; cleaning up"),
    }
    fleet.clean_up();
    match result {
        Err(e) if e.is::<Interrupted>() => Ok(()),
        other => other,
    }
}

impl Fleet {
    /// Starts etcd and the nodes, applies the seed through the store and waits until every
    /// node steers it.
    fn start(&mut self, args: &DemoArgs, n: usize, signals: &Signals) -> Result<()> {
        self.start_etcd(signals)?;
        for i in 1..=n {
            self.start_node(args, i, signals)?;
        }
        let seed = self.dir.join("tcp-echo-all-v1.yaml");
        std::fs::write(&seed, seed_yaml(args))
            .with_context(|| format!("cannot write {}", seed.display()))?;
        let seed = seed.to_string_lossy().into_owned();
        let out = self.store_ctl(&["apply", "-f", &seed])?;
        say(format_args!(
            "tcpshiftctl --store {} apply -f {}: {}",
            self.url,
            cmd::short(Path::new(&seed)).display(),
            out.trim().replace('\n', "; ")
        ));
        self.wait_weights(100, 0, signals)?;
        say(format_args!("every node steers the seed (v1=100 v2=0)"));
        Ok(())
    }

    fn start_etcd(&mut self, signals: &Signals) -> Result<()> {
        let etcd = crate::etcd::start(&self.dir, "fleet-demo", &mut || signals.sleep(POLL))?;
        self.url = etcd.url.clone();
        say(format_args!(
            "etcd is up: {} (log {})",
            self.url,
            cmd::short(&etcd.log).display()
        ));
        self.etcd = Some(Proc {
            name: "etcd".into(),
            child: etcd.child,
        });
        Ok(())
    }

    fn start_node(&mut self, args: &DemoArgs, i: usize, signals: &Signals) -> Result<()> {
        let name = format!("node{i}");
        let netns = format!("tsfleet-demo-{}-{name}", std::process::id());
        cmd::run(Command::new("ip").args(["netns", "add", &netns]))?;
        let path = PathBuf::from(format!("/run/netns/{netns}"));
        self.nodes.push(Node {
            name: name.clone(),
            netns,
            path: path.clone(),
            echoes: Vec::new(),
            daemon: None,
        });
        cmd::run(nsenter(&path, "ip").args(["link", "set", "lo", "up"]))?;
        for (subset, port, word) in args.subsets() {
            let mut echo = nsenter(&path, &self.bin("tcp-echo").to_string_lossy());
            echo.args(["--bind", "127.0.0.1", &port.to_string(), word]);
            let (ready_tx, ready) = mpsc::channel();
            let mut proc = demo::spawn(&format!("{name} tcp-echo {subset}"), echo, Some(ready_tx))?;
            let waited = demo::wait_ready(&mut proc, &ready, port, signals);
            self.newest()?.echoes.push(proc);
            waited?;
        }
        let mut daemon = Command::new(self.bin("tcpshiftd"));
        daemon
            .arg("--netns")
            .arg(&path)
            .args(["--store", &self.url, "--node", &name]);
        let proc = demo::spawn(&format!("{name} tcpshiftd"), daemon, None)?;
        self.newest()?.daemon = Some(proc);
        Ok(())
    }

    /// The node started last.
    fn newest(&mut self) -> Result<&mut Node> {
        self.nodes.last_mut().context("no node started")
    }

    /// Shows every node all-v1, runs one `set-weight v2=20` on the store and shows every
    /// node moving.
    fn show_one_change(&mut self, args: &DemoArgs, signals: &Signals) -> Result<()> {
        println!(
            "\n{SAMPLE} connections to 127.0.0.1:{} on each node:",
            args.port
        );
        self.print_counts(args.port)?;
        println!("\n$ tcpshiftctl --store {} set-weight v2=20", self.url);
        let out = self.store_ctl(&["set-weight", "v2=20"])?;
        print!("{out}");
        self.wait_weights(80, 20, signals)?;
        println!("\nevery node steers v1=80 v2=20; {SAMPLE} connections on each node again:");
        self.print_counts(args.port)?;
        println!();
        Ok(())
    }

    fn print_counts(&self, port: u16) -> Result<()> {
        for node in &self.nodes {
            let counts = count(&node.path, port, SAMPLE)?;
            let shown: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("  {:<6} {}", node.name, shown.join(" "));
        }
        Ok(())
    }

    /// Waits until every node's kernel holds v1/v2 with every subset live.
    fn wait_weights(&mut self, v1: u64, v2: u64, signals: &Signals) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_children()?;
            let mut behind = Vec::new();
            for node in &self.nodes {
                let ok = self
                    .status(node)
                    .is_ok_and(|s| demo::all_live(&s) && weights(&s) == Some((v1, v2)));
                if !ok {
                    behind.push(node.name.clone());
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "not every node steered v1={v1} v2={v2} within {} s: {} did not",
                    READY_TIMEOUT.as_secs(),
                    behind.join(", ")
                );
            }
            signals.sleep(POLL)?;
        }
    }

    /// Prints every node's split whenever it changes, until a signal arrives or a child dies.
    fn watch(&mut self, signals: &Signals) -> Result<()> {
        let mut last = String::new();
        loop {
            self.check_children()?;
            let lines: Vec<String> = self
                .nodes
                .iter()
                .map(|node| match self.status(node) {
                    Ok(s) => format!("  {:<6} {}", node.name, demo::summary(&s)),
                    Err(e) => format!("  {:<6} status unavailable: {e:#}", node.name),
                })
                .collect();
            let text = lines.join("\n");
            if text != last {
                println!("{text}");
                last = text;
            }
            signals.sleep(SUMMARY_EVERY)?;
        }
    }

    /// Fails naming the first program that exited.
    fn check_children(&mut self) -> Result<()> {
        let procs = self
            .nodes
            .iter_mut()
            .flat_map(|n| n.echoes.iter_mut().chain(n.daemon.as_mut()))
            .chain(self.etcd.as_mut());
        for proc in procs {
            if let Some(status) = proc.child.try_wait().context("cannot check a child")? {
                bail!("{} exited unexpectedly ({status})", proc.name);
            }
        }
        Ok(())
    }

    /// `tcpshiftctl --netns PATH status --json` of `node`.
    fn status(&self, node: &Node) -> Result<Value> {
        let mut ctl = Command::new(self.bin("tcpshiftctl"));
        ctl.arg("--netns")
            .arg(&node.path)
            .args(["status", "--json"]);
        let out = cmd::output(&mut ctl)?;
        serde_json::from_slice(&out.stdout).context("cannot parse `tcpshiftctl status --json`")
    }

    /// `tcpshiftctl --store URL ARGS`; its stdout.
    fn store_ctl(&self, args: &[&str]) -> Result<String> {
        let mut ctl = Command::new(self.bin("tcpshiftctl"));
        ctl.args(["--store", &self.url]).args(args);
        let out = cmd::output(&mut ctl)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops every tcpshiftd, uninstalls tcpshift from the namespaces, stops the backends,
    /// removes the namespaces, stops etcd and removes its data; reports each step.
    fn clean_up(&mut self) {
        for node in &mut self.nodes {
            if let Some(daemon) = node.daemon.take() {
                demo::stop(daemon);
            }
        }
        for node in &self.nodes {
            let mut ctl = Command::new(self.bin("tcpshiftctl"));
            ctl.arg("--netns").arg(&node.path).arg("uninstall");
            if let Err(e) = cmd::output(&mut ctl) {
                say(format_args!("warning: {} uninstall: {e:#}", node.name));
            }
        }
        for mut node in self.nodes.drain(..) {
            for echo in node.echoes.drain(..) {
                demo::stop(echo);
            }
            if let Err(e) = cmd::output(Command::new("ip").args(["netns", "del", &node.netns])) {
                say(format_args!("warning: {e:#}"));
            }
        }
        if let Some(etcd) = self.etcd.take() {
            demo::stop(etcd);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            say(format_args!(
                "warning: cannot remove {}: {e}",
                self.dir.display()
            ));
        }
        say("fleet demo stopped; everything it started is cleaned up");
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }
}

/// `nsenter --net=PATH PROGRAM` (not `ip netns exec`, which remounts /sys and hides bpffs).
fn nsenter(path: &Path, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", path.display())).arg(program);
    c
}

/// The seed (all traffic to v1) as tcpshift's service file.
fn seed_yaml(args: &DemoArgs) -> String {
    format!(
        "services:\n  tcp-echo:\n    listen: {}\n    subsets:\n      v1: 127.0.0.1:{}\n      \
         v2: 127.0.0.1:{}\n    weights: {{v1: 100, v2: 0}}\n",
        args.port, args.v1_port, args.v2_port
    )
}

/// tcp-echo's (v1, v2) weights in `status --json`.
fn weights(status: &Value) -> Option<(u64, u64)> {
    let svc = status["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "tcp-echo")?;
    let weight = |name: &str| {
        svc["subsets"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)?["weight"]
            .as_u64()
    };
    Some((weight("v1")?, weight("v2")?))
}

/// `n` connections to 127.0.0.1:`port` inside the namespace at `path`; the replies'
/// first words counted.
fn count(path: &Path, port: u16, n: usize) -> Result<BTreeMap<String, usize>> {
    let ns = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace descriptor we hold; it moves only this new thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .with_context(|| format!("cannot connect to {addr}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"fleet demo\n")?;
            stream.shutdown(std::net::Shutdown::Write)?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            let word = reply.split_whitespace().next().unwrap_or("(empty)");
            *counts.entry(word.to_string()).or_insert(0) += 1;
        }
        Ok(counts)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the connection thread panicked"))?
}

fn print_instructions(fleet: &Fleet, args: &DemoArgs) {
    let ctl = cmd::short(&fleet.bin("tcpshiftctl"));
    let ctl = ctl.display();
    let url = &fleet.url;
    let first = fleet.nodes.first().map_or("", |n| n.netns.as_str());
    let port = args.port;
    println!(
        r#"The fleet runs: etcd at {url}, nodes {nodes}.
In another terminal (as root), change every node at once through the store:

    export TCPSHIFT_STORE={url}
    {ctl} set-weight v2=50
    {ctl} status          # every node: reachable, applied revision, in sync, weights
    {ctl} get nodes

Send traffic inside one node (its network namespace is /run/netns/{first}):

    for i in $(seq 1 10); do echo hi | nsenter --net=/run/netns/{first} nc -N 127.0.0.1 {port}; done

A local change on a node is refused (it would diverge from the fleet) unless --local:

    {ctl} --netns /run/netns/{first} set-weight v2=0

The split of every node is shown below when it changes. Press Ctrl-C to stop and clean up.
"#,
        nodes = fleet
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
}
