//! Reading the calling thread's namespace's pinned maps back with `bpftool`, to check what
//! the kernel holds rather than what `tcpshiftctl` shows.

use std::{os::unix::fs::MetadataExt, process::Command};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// The pinned map `name` (e.g. `TS_LOAD`) of the calling thread's network namespace.
pub fn map_path(name: &str) -> Result<String> {
    let ino = std::fs::metadata("/proc/thread-self/ns/net")
        .context("cannot read this thread's network namespace")?
        .ino();
    Ok(format!("/sys/fs/bpf/tcpshift/netns-{ino}/{name}"))
}

/// Every entry of the pinned map `name` as (key bytes, value bytes), read with `bpftool map
/// dump pinned … -j` (tcpshift's maps carry no BTF: raw bytes). A per-CPU map's entries have
/// no single `value` and are refused.
pub fn dump(name: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = map_path(name)?;
    bpftool(&["map", "dump", "pinned", &path])?
        .as_array()
        .context("bpftool dump is not a list")?
        .iter()
        .map(|entry| {
            let key = bytes(&entry["key"]).with_context(|| format!("{name}: a key"))?;
            let value =
                bytes(&entry["value"]).with_context(|| format!("{name}: a value (not per CPU)"))?;
            Ok((key, value))
        })
        .collect()
}

/// The keys of the pinned map `name`, whose keys are `u32` (slots, service ids), sorted.
pub fn map_keys(name: &str) -> Result<Vec<u32>> {
    let mut keys = Vec::new();
    for (key, _) in dump(name)? {
        let key: [u8; 4] = key
            .as_slice()
            .try_into()
            .with_context(|| format!("{name}: a key of {} bytes, expected 4", key.len()))?;
        keys.push(u32::from_le_bytes(key));
    }
    keys.sort_unstable();
    Ok(keys)
}

/// bpftool's `["0x01", "0x00", …]` as bytes.
pub fn bytes(v: &Value) -> Result<Vec<u8>> {
    v.as_array()
        .context("not a byte list")?
        .iter()
        .map(|b| {
            let s = b.as_str().context("byte is not a string")?;
            u8::from_str_radix(s.trim_start_matches("0x"), 16).with_context(|| format!("{s:?}"))
        })
        .collect()
}

/// The value at `key` of the pinned map `name` whose keys are `u32` (an array map: a service
/// id's round-robin cursor, …), read with `bpftool map lookup pinned … -j`.
pub fn lookup(name: &str, key: u32) -> Result<Vec<u8>> {
    let path = map_path(name)?;
    let key_bytes = key.to_le_bytes().map(|b| format!("0x{b:02x}"));
    let mut args = vec!["map", "lookup", "pinned", &path, "key"];
    args.extend(key_bytes.iter().map(String::as_str));
    bytes(&bpftool(&args)?["value"]).with_context(|| format!("{name}[{key}]: the value"))
}

/// `bpftool ARGS -j`'s answer.
fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .args(args)
        .arg("-j")
        .output()
        .context("cannot run bpftool (cargo xtask bootstrap installs it)")?;
    ensure!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("bpftool -j is not JSON")
}
