//! Read-only access without root (issue 12): members of tcpshiftd's read group can run
//! `tcpshiftctl status`, `top`, `metrics` and `get` (the maps opened with `BPF_F_RDONLY`),
//! every change still needs root, and a user outside the group cannot read either.
//!
//! The test uses a real unprivileged user, `tcpshift-ro-test` (created with `useradd` when
//! absent), and a read group of its own, `tcpshift-ro-readers` (created with `groupadd`), so
//! that it does not depend on the machine's `tcpshift` group. It runs `tcpshiftctl` as that
//! user with `setpriv`, with and without the group.

use std::{
    os::unix::fs::MetadataExt,
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tcpshift_tests::{TestNs, bin_dir, privileged, seed_config, subset};

const READER: &str = "tcpshift-ro-test";
const GROUP: &str = "tcpshift-ro-readers";

/// `getent DATABASE NAME`'s third field (the uid or gid), creating the entry with `create`
/// when absent.
fn id_of(database: &str, name: &str, create: &[&str]) -> Result<u32> {
    let lookup = || -> Result<Option<u32>> {
        let out = Command::new("getent").args([database, name]).output()?;
        if !out.status.success() {
            return Ok(None);
        }
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let id = line.split(':').nth(2).context("getent output")?.trim();
        Ok(Some(id.parse()?))
    };
    if let Some(id) = lookup()? {
        return Ok(id);
    }
    let out = Command::new(create[0]).args(&create[1..]).output()?;
    if !out.status.success() {
        bail!(
            "{create:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    lookup()?.with_context(|| format!("{name} not found after {create:?}"))
}

/// The reader's uid and primary gid, and the read group's gid.
fn reader() -> Result<(u32, u32, u32)> {
    let gid = id_of("group", GROUP, &["groupadd", "--system", GROUP])?;
    let uid = id_of(
        "passwd",
        READER,
        &[
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            READER,
        ],
    )?;
    let primary = id_of("group", READER, &["false"])?;
    Ok((uid, primary, gid))
}

/// Runs `tcpshiftctl ARGS` as the reader, in the read group or not.
fn ctl_as_reader(in_group: bool, args: &[&str]) -> Result<Output> {
    let (uid, primary, gid) = reader()?;
    let groups = if in_group {
        format!("--groups={gid}")
    } else {
        "--clear-groups".to_owned()
    };
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={primary}"),
            &groups,
            "--",
        ])
        .arg(bin_dir().join("tcpshiftctl"))
        .args(args)
        .output()
        .context("cannot run setpriv (util-linux)")
}

fn ok(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed as {READER} in group {GROUP}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            sysctl_note()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why a read may fail on this machine: `kernel.unprivileged_bpf_disabled` (Linux < 6.5
/// applies it to opening pinned maps too).
fn sysctl_note() -> String {
    let v =
        std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").unwrap_or_default();
    format!(
        " (kernel.unprivileged_bpf_disabled = {}; kernel {})",
        v.trim(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    )
}

fn weights(status: &Value) -> Vec<Value> {
    ["v1", "v2"]
        .iter()
        .map(|n| subset(status, n).map_or(Value::Null, |s| s["weight"].clone()))
        .collect()
}

#[test]
fn the_read_group_can_read_and_cannot_write_and_others_cannot_read() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_, _, gid) = reader()?;
    let mut ns = TestNs::new()?;
    let _v1 = ns.echo("127.0.0.1", 9001, "one")?;
    let _v2 = ns.echo("127.0.0.1", 9002, "two")?;
    ns.loader_with(&seed_config(80, 20), &["--read-group", GROUP])?;
    let root_view = ns.status()?;
    let dir = std::path::PathBuf::from(
        root_view["state_dir"]
            .as_str()
            .context("state_dir in status")?,
    );

    // What the loader gave the group: the directory 0750, the maps 0640, the links root's.
    let meta = std::fs::metadata(&dir)?;
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o750, gid));
    for map in ["TS_SERVICES", "TS_COUNTERS", "TS_META", "TS_OWNERS"] {
        let m = std::fs::metadata(dir.join(map))?;
        assert_eq!((m.mode() & 0o777, m.gid()), (0o640, gid), "{map}");
    }
    let link = std::fs::metadata(dir.join("link"))?;
    assert_eq!(link.mode() & 0o777, 0o600);

    // In the group: every read works and shows what root sees.
    let status: Value = serde_json::from_str(&ok(
        &ctl_as_reader(true, &["status", "--json"])?,
        "status --json",
    )?)?;
    assert_eq!(weights(&status), weights(&root_view), "{status:#}");
    assert_eq!(
        subset(&status, "v2").map(|s| s["live"].clone()),
        Some(Value::Bool(true))
    );
    let table = ok(&ctl_as_reader(true, &["status"])?, "status")?;
    assert!(table.contains("127.0.0.1:9002"), "{table}");
    let yaml = ok(
        &ctl_as_reader(true, &["get", "services", "-o", "yaml"])?,
        "get services",
    )?;
    assert!(yaml.contains("v2: 20"), "{yaml}");
    let metrics = ok(&ctl_as_reader(true, &["metrics"])?, "metrics")?;
    assert!(
        metrics.contains("tcpshift_subset_weight{service=\"tcp-echo\",subset=\"v2\"} 20"),
        "{metrics}"
    );
    let top = ok(
        &ctl_as_reader(true, &["top", "--iterations", "1"])?,
        "top --iterations 1",
    )?;
    assert!(top.contains("tcp-echo"), "{top}");

    // In the group, every change is refused with the reason, and nothing changes.
    for args in [
        &["set-weight", "v2=50"][..],
        &["accept-owner", "tcp-echo", "v2"][..],
        &["delete", "service", "tcp-echo"][..],
        &["uninstall"][..],
    ] {
        let out = ctl_as_reader(true, args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} succeeded in the read group"
        );
        assert!(
            stderr.contains("needs root (CAP_BPF/CAP_SYS_ADMIN)"),
            "{args:?}: {stderr}"
        );
        if args[0] == "set-weight" {
            assert!(
                stderr.contains(&format!("members of group {GROUP} can only read")),
                "{args:?}: {stderr}"
            );
        }
    }
    assert_eq!(weights(&ns.status()?), weights(&root_view));

    // Outside the group: not even reading.
    for args in [&["status"][..], &["get", "services"][..], &["metrics"][..]] {
        let out = ctl_as_reader(false, args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} succeeded outside the group"
        );
        assert!(
            stderr.contains("reading tcpshift's state needs root or membership of its read group"),
            "{args:?}: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn a_read_group_that_does_not_exist_is_refused_before_anything_changes() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let ns = TestNs::new()?;
    let out = Command::new(bin_dir().join("tcpshiftd"))
        .args(["--read-group", "no-such-group-tcpshift"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--read-group no-such-group-tcpshift: no such group"),
        "{stderr}"
    );
    let status = ns.ctl(&["status"])?;
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("not installed"),
        "{status:?}"
    );
    Ok(())
}
