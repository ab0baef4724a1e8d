//! tcpshiftd as the packaged unit runs it: a non-root user holding only the capabilities
//! `packaging/tcpshiftd.service` grants (read from the unit, so the documented set is the
//! tested set), through the seed scenario, a weight change by root's tcpshiftctl and a
//! restart that adopts the pinned state.
//!
//! The daemon's user cannot write the machine's `/sys/fs/bpf/tcpshift` (root's, 0700; the unit
//! hands it to the `tcpshift` user in `ExecStartPre`), so the test gives tcpshift a bpffs of its
//! own: a mount namespace with a fresh bpffs whose `tcpshift/` belongs to the daemon's user,
//! as the unit arranges. Every tcpshift command of the test runs in that mount namespace and
//! in the test's own network namespace.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tcpshift_tests::{
    TestNs, bin_dir, count_prefixes, poll_until, privileged, seed_addr, seed_config, subsets,
};

/// The unprivileged user and group the daemon runs as (`nobody`/`nogroup`).
const UID: u32 = 65534;

/// The capabilities `AmbientCapabilities=` of the packaged unit names (e.g. `CAP_SYS_ADMIN`).
fn documented_capabilities() -> Result<Vec<String>> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/tcpshiftd.service");
    let text =
        fs::read_to_string(&unit).with_context(|| format!("cannot read {}", unit.display()))?;
    let caps: Vec<String> = text
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .context("no AmbientCapabilities= in the unit")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let bounding = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("no CapabilityBoundingSet= in the unit")?;
    assert_eq!(
        bounding.split_whitespace().collect::<Vec<_>>(),
        caps,
        "the unit's bounding set differs from its ambient set"
    );
    Ok(caps)
}

/// Bit number of a capability (linux/capability.h).
fn cap_bit(name: &str) -> Result<u32> {
    Ok(match name {
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_FOWNER" => 3,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => bail!("capability {other} unknown to this test: add its bit"),
    })
}

/// A mount namespace with a bpffs of its own at /sys/fs/bpf, held open by a sleeping process.
struct BpffsNs {
    holder: Child,
}

impl BpffsNs {
    fn new() -> Result<Self> {
        let script = format!(
            "mount -t bpf bpf /sys/fs/bpf && \
             install -d -o {UID} -g {UID} -m 0700 /sys/fs/bpf/tcpshift && \
             echo ready && exec sleep 100000"
        );
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run unshare (util-linux)")?;
        let mut line = String::new();
        let stdout = holder.stdout.take().context("holder's stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = holder.kill();
            let _ = holder.wait();
            bail!("cannot set up a mount namespace with its own bpffs");
        }
        Ok(Self { holder })
    }

    /// `PROGRAM` run in this mount namespace (and the caller's network namespace).
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Root's `tcpshiftctl ARGS` in this mount namespace; fails unless it succeeds.
    fn ctl(&self, args: &[&str]) -> Result<String> {
        let out: Output = self
            .command(&bin_dir().join("tcpshiftctl"))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "tcpshiftctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.ctl(&["status", "--json"])?)?)
    }

    /// Starts tcpshiftd as uid/gid 65534 holding exactly `caps` (ambient, inheritable and
    /// bounding), logging to `log`.
    fn daemon(&self, caps: &[String], config: &Path, log: &Path) -> Result<Daemon> {
        let list: Vec<String> = caps
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        let set = format!("-all,{}", list.join(","));
        let child = self
            .command(Path::new("setpriv"))
            .arg(format!("--reuid={UID}"))
            .arg(format!("--regid={UID}"))
            .arg("--clear-groups")
            .arg(format!("--inh-caps={set}"))
            .arg(format!("--ambient-caps={set}"))
            .arg(format!("--bounding-set={set}"))
            .arg("--")
            .arg(bin_dir().join("tcpshiftd"))
            .arg("--config")
            .arg(config)
            .args(["--log-level", "info"])
            .stderr(fs::File::create(log)?)
            .spawn()
            .context("cannot start tcpshiftd through nsenter and setpriv")?;
        Ok(Daemon(child))
    }

    /// Waits until `log` says the daemon is ready (every subset's socket registered).
    fn wait_ready(&self, daemon: &mut Daemon, log: &Path) -> Result<()> {
        poll_until(Duration::from_secs(30), "tcpshiftd ready", || {
            let text = fs::read_to_string(log).unwrap_or_default();
            if let Some(status) = daemon.0.try_wait()? {
                bail!("tcpshiftd exited ({status}); its log:\n{text}");
            }
            Ok(text
                .contains("ready: every subset has a registered socket")
                .then_some(()))
        })
        .with_context(|| format!("its log:\n{}", fs::read_to_string(log).unwrap_or_default()))?;
        let status = self.status()?;
        assert!(subsets(&status).all(|s| s["live"] == true), "{status}");
        Ok(())
    }
}

impl Drop for BpffsNs {
    fn drop(&mut self) {
        let _ = self.ctl(&["uninstall"]);
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// tcpshiftd, killed when dropped.
struct Daemon(Child);

impl Daemon {
    /// Stops it with SIGTERM and checks it exited cleanly.
    fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child, not yet reaped.
        if unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        let status = self.0.wait()?;
        assert!(status.success(), "tcpshiftd exited with {status}");
        Ok(())
    }

    /// The `Uid:`, `CapEff:` and `CapAmb:` lines of /proc/PID/status.
    fn credentials(&self) -> Result<(String, u64, u64)> {
        let text = fs::read_to_string(format!("/proc/{}/status", self.0.id()))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .with_context(|| format!("no {name} in /proc/PID/status"))
        };
        let hex = |name: &str| -> Result<u64> { Ok(u64::from_str_radix(field(name)?, 16)?) };
        Ok((field("Uid:")?.to_owned(), hex("CapEff:")?, hex("CapAmb:")?))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn share(counts: &std::collections::BTreeMap<String, usize>, prefix: &str) -> f64 {
    let total: usize = counts.values().sum();
    *counts.get(prefix).unwrap_or(&0) as f64 * 100.0 / total.max(1) as f64
}

#[test]
fn tcpshiftd_as_a_non_root_user_with_only_the_documented_capabilities_runs_the_seed() -> Result<()>
{
    if !privileged() {
        return Ok(());
    }
    let caps = documented_capabilities()?;
    let mask = caps
        .iter()
        .map(|c| cap_bit(c).map(|b| 1u64 << b))
        .sum::<Result<u64>>()?;
    let mut ns = TestNs::new()?;
    let bpffs = BpffsNs::new()?;
    // The backends run as root, as another user's processes would.
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    let config: PathBuf = ns.file("tcpshift.yaml");
    fs::write(&config, seed_config(100, 0))?;
    for p in [config.as_path(), config.parent().context("config dir")?] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
    }
    let log = ns.file("tcpshiftd.log");

    let mut daemon = bpffs.daemon(&caps, &config, &log)?;
    bpffs.wait_ready(&mut daemon, &log)?;
    let (uid, eff, amb) = daemon.credentials()?;
    assert_eq!(
        uid.split_whitespace().collect::<Vec<_>>(),
        ["65534"; 4],
        "not running as the unprivileged user"
    );
    assert_eq!(
        eff, mask,
        "effective capabilities {eff:#x}, documented {caps:?}"
    );
    assert_eq!(
        amb, mask,
        "ambient capabilities {amb:#x}, documented {caps:?}"
    );

    // The seed: all v1, then root's tcpshiftctl shifts 20 % to v2.
    let counts = count_prefixes(seed_addr(), 200)?;
    assert_eq!(counts.get("one"), Some(&200), "{counts:?}");
    let out = bpffs.ctl(&["set-weight", "v2=20"])?;
    assert_eq!(out.trim(), "tcp-echo: v1=80 v2=20");
    let counts = count_prefixes(seed_addr(), 1000)?;
    let v2 = share(&counts, "two");
    assert!(
        (15.0..=25.0).contains(&v2),
        "v2 {v2:.1} % at 80/20: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 1000, "{counts:?}");

    // Restarted, it adopts the state it pinned (and replaces the programs in place if they
    // differ) with the same capabilities, keeping the kernel's weights.
    daemon.stop()?;
    bpffs.ctl(&["set-weight", "v1=0", "v2=100"])?;
    let mut daemon = bpffs.daemon(&caps, &config, &log)?;
    bpffs.wait_ready(&mut daemon, &log)?;
    let text = fs::read_to_string(&log)?;
    assert!(text.contains("adopted pinned state"), "{text}");
    let counts = count_prefixes(seed_addr(), 100)?;
    assert_eq!(counts.get("two"), Some(&100), "{counts:?}");

    // Root's `tcpshiftctl apply` pins a map of its own (the annotations) into the daemon's
    // state; the daemon keeps working with it: a restarted backend is registered again.
    let services = ns.file("services.yaml");
    fs::write(
        &services,
        "services:\n  extra:\n    listen: 31401\n    subsets: {v1: 127.0.0.1:9003}\n",
    )?;
    bpffs.ctl(&["apply", "-f", &services.display().to_string()])?;
    ns.echo("127.0.0.1", 9003, "three")?;
    poll_until(
        Duration::from_secs(15),
        "extra's backend registered",
        || {
            if let Some(status) = daemon.0.try_wait()? {
                bail!(
                    "tcpshiftd exited ({status}); its log:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let status = bpffs.status()?;
            Ok(subsets(&status).all(|s| s["live"] == true).then_some(()))
        },
    )?;
    let counts = count_prefixes(SocketAddr::from(([127, 0, 0, 1], 31401)), 20)?;
    assert_eq!(counts.get("three"), Some(&20), "{counts:?}");
    // ... and after a restart, which applies the configuration next to it.
    daemon.stop()?;
    let mut daemon = bpffs.daemon(&caps, &config, &log)?;
    bpffs.wait_ready(&mut daemon, &log)?;
    daemon.stop()?;
    Ok(())
}
