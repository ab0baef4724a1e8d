//! The connection counters (`TS_COUNTERS`) are one value per subset shared by all CPUs,
//! changed by atomic adds (and the recent-seconds ring by compare-and-exchange): counts made
//! at the same time on every CPU must add up exactly.
//! Each test runs in its own network namespace (see `tcpshift_tests::TestNs`).

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;
use tcpshift_tests::{TestNs, counter, exchange, poll_until, privileged, seed, seed_addr, subset};

/// Seconds covered by `steered_recent` (tcpshift-user's `OBSERVED_WINDOW_SECS`).
const WINDOW_SECS: u64 = 10;

/// SYNs the kernel retransmitted in the calling thread's network namespace (`TcpExt
/// TCPSynRetrans`): each one is looked up by sk_lookup again, so counted again there.
fn syn_retransmits() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let at = names
            .split_whitespace()
            .position(|n| n == "TCPSynRetrans")
            .context("no TCPSynRetrans in TcpExt")?;
        return values
            .split_whitespace()
            .nth(at)
            .context("short TcpExt line")?
            .parse()
            .context("TCPSynRetrans is not a number");
    }
    Err(anyhow!("no TcpExt lines in /proc/thread-self/net/netstat"))
}

/// Pins the calling thread to CPU `cpu` (so the clients' connections are counted on every
/// CPU: sk_lookup and sock_ops run on the CPU that sends the SYN and the final ACK).
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    ensure!(
        rc == 0,
        "sched_setaffinity(cpu {cpu}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Sum of counter `field` over both seed subsets.
fn both(status: &Value, field: &str) -> u64 {
    counter(status, "v1", field) + counter(status, "v2", field)
}

#[test]
fn counts_made_on_every_cpu_at_once_add_up_exactly() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed(&mut ns, 50, 50)?;
    ns.wait_live(Duration::from_secs(10))?;
    let cpus = thread::available_parallelism().map_or(2, |n| n.get());
    let threads = (2 * cpus).max(4);
    let per_thread = 500;
    let made = (threads * per_thread) as u64;
    let retransmits_before = syn_retransmits()?;
    let start = Instant::now();
    // Threads inherit the test thread's network namespace.
    let counts: Vec<BTreeMap<String, u64>> = thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<BTreeMap<String, u64>> {
                    pin_to(t % cpus)?;
                    let mut counts = BTreeMap::new();
                    for i in 0..per_thread {
                        let prefix = exchange(seed_addr(), &format!("client {t} line {i}"))?;
                        *counts.entry(prefix).or_insert(0) += 1;
                    }
                    Ok(counts)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow!("client thread panicked"))?)
            .collect::<Result<_>>()
    })?;
    let status = ns.status()?;
    let elapsed = start.elapsed();
    let retransmits = syn_retransmits()? - retransmits_before;
    let mut replies: BTreeMap<String, u64> = BTreeMap::new();
    for (prefix, n) in counts.into_iter().flatten() {
        *replies.entry(prefix).or_insert(0) += n;
    }
    eprintln!(
        "{made} connections from {threads} threads on {cpus} CPUs in {elapsed:?}: {replies:?}, \
         {retransmits} SYN retransmits"
    );
    ensure!(
        replies.values().sum::<u64>() == made,
        "replies: {replies:?}"
    );

    // sk_lookup: one count per lookup, so per connection plus one per retransmitted SYN.
    let lookups = made + retransmits;
    assert_eq!(both(&status, "chosen"), lookups, "chosen: {status}");
    assert_eq!(both(&status, "steered"), lookups, "steered: {status}");
    assert_eq!(both(&status, "misses"), 0, "{status}");
    assert_eq!(both(&status, "fallback_in"), 0, "{status}");
    // The recent ring counts the same lookups, by second; it covers the last 10 seconds.
    if elapsed < Duration::from_secs(WINDOW_SECS - 1) {
        assert_eq!(
            both(&status, "steered_recent"),
            lookups,
            "recent ring: {status}"
        );
    } else {
        eprintln!("clients took {elapsed:?}: the recent ring's window no longer covers them all");
        assert!(both(&status, "steered_recent") <= lookups, "{status}");
    }

    // sock_ops: exactly one opened and one closed per connection, on the subset that replied.
    let status = poll_until(
        Duration::from_secs(10),
        &format!("{made} connections accounted as closed"),
        || {
            let st = ns.status()?;
            let closed = both(&st, "closed");
            ensure!(
                closed <= made,
                "more connections closed than made: {closed} > {made}"
            );
            Ok((closed == made).then_some(st))
        },
    )?;
    for (name, prefix) in [("v1", "one"), ("v2", "two")] {
        let want = replies.get(prefix).copied().unwrap_or(0);
        assert!(want > 0, "no connection reached {name}: {replies:?}");
        assert_eq!(counter(&status, name, "opened"), want, "{name}: {status}");
        assert_eq!(counter(&status, name, "closed"), want, "{name}: {status}");
        assert_eq!(counter(&status, name, "active"), 0, "{name}: {status}");
        let histogram: u64 = subset(&status, name)
            .and_then(|s| s["counters"]["srtt_histogram"].as_array())
            .context("srtt_histogram in status")?
            .iter()
            .filter_map(Value::as_u64)
            .sum();
        assert_eq!(histogram, want, "{name}: one RTT per closed connection");
    }
    Ok(())
}
