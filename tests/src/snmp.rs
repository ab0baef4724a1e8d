//! The kernel's TCP counters of the calling thread's network namespace (`Tcp:` in
//! `/proc/thread-self/net/snmp`, `TcpExt:` in `…/netstat`), to tell what the network did
//! during a test.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

/// Every `Tcp:` and `TcpExt:` counter of the calling thread's network namespace, by name
/// (`RetransSegs`, `OutRsts`, `TWRecycled`, …).
pub fn tcp() -> Result<BTreeMap<String, u64>> {
    let mut counters = BTreeMap::new();
    for (path, table) in [
        ("/proc/thread-self/net/snmp", "Tcp:"),
        ("/proc/thread-self/net/netstat", "TcpExt:"),
    ] {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let mut rows = text.lines().filter(|l| l.starts_with(table));
        let (names, values) = rows
            .next()
            .zip(rows.next())
            .with_context(|| format!("{path}: no {table} rows"))?;
        for (name, value) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            // `MaxConn` is -1: not a counter.
            if let Ok(value) = value.parse() {
                counters.insert(name.to_string(), value);
            }
        }
    }
    Ok(counters)
}

/// The counters of `after` that differ from `before`, as `name +delta` (for a message).
pub fn changed(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let changes: Vec<String> = after
        .iter()
        .filter_map(|(name, &a)| {
            let b = before.get(name).copied().unwrap_or(0);
            (a != b).then(|| format!("{name} {:+}", a as i128 - b as i128))
        })
        .collect();
    changes.join(", ")
}
