//! The `tcpshiftctl status` table and the `tcpshiftctl top` screen: text renderings of a
//! [`Status`].

use std::{fmt::Write, time::Duration};

use super::{header, human_bytes, percent, table};
use crate::state::{ServiceStatus, Status, SubsetStatus};

/// The `tcpshiftctl status` table.
pub fn status_table(status: &Status) -> String {
    let observed = format!("OBSERVED({}s)", status.observed_window_secs);
    let mut rows = vec![header(&[
        "SERVICE",
        "LISTEN",
        "SUBSET",
        "BACKEND",
        "WEIGHT",
        "SHARE",
        observed.as_str(),
        "LIVE",
        "ACTIVE",
        "OPENED",
        "CLOSED",
        "RECEIVED",
        "SENT",
        "FALLBACK-OUT",
        "FALLBACK-IN",
        "MISSES",
    ])];
    for svc in &status.services {
        for (i, s) in svc.subsets.iter().enumerate() {
            let (name, listen) = if i == 0 {
                (svc.name.clone(), svc.listen.clone())
            } else {
                (String::new(), String::new())
            };
            let c = &s.counters;
            rows.push(vec![
                name,
                listen,
                s.name.clone(),
                s.backend.to_string(),
                s.weight.to_string(),
                format!("{:.1}%", s.share),
                percent(s.observed_share),
                if s.live { "yes" } else { "NO" }.to_string(),
                c.active.to_string(),
                c.opened.to_string(),
                c.closed.to_string(),
                human_bytes(c.bytes_received),
                human_bytes(c.bytes_sent),
                c.fallback_out.to_string(),
                c.fallback_in.to_string(),
                c.misses.to_string(),
            ]);
        }
    }
    let mut out = table(&rows, status.services.is_empty(), "no services");
    for svc in &status.services {
        for l in &svc.shadows {
            let _ = writeln!(
                out,
                "note: {} shadows the listener {l}: its new connections go to {}'s subsets",
                svc.name, svc.name
            );
        }
    }
    out.push_str(&crate::report::fail_closed_notes(status));
    out.push_str(&udp_table(status));
    if status.read_only {
        out.push_str("note: read-only view (not root): program ids are not shown\n");
    } else if status.accounting_program_id.is_none() {
        out.push_str(
            "note: connection accounting is off (no cgroup2 mount when tcpshift was installed): OPENED, ACTIVE, CLOSED and bytes stay 0\n",
        );
    }
    for w in &status.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out.push_str(&owners(status));
    out.push_str(&super::limits::lines(status));
    out
}

/// The owner lines under the status table: who holds each registered socket, and the sockets
/// refused because their owner may not serve the subset.
fn owners(status: &Status) -> String {
    let mut out = String::new();
    for svc in &status.services {
        for s in &svc.subsets {
            let o = &s.owner;
            if let Some(h) = &o.holder {
                let _ = writeln!(
                    out,
                    "owner: {}/{}: socket of {}, trusted: {}",
                    svc.name,
                    s.name,
                    holder(h),
                    match o.trusted_uid {
                        Some(uid) => format!("root and uid {uid}"),
                        None => "root".to_owned(),
                    }
                );
            }
            if let Some(h) = &o.last_refused {
                let _ = writeln!(
                    out,
                    "warning: {}/{}: {} socket(s) refused (last: {}): owned by neither root nor \
                     the trusted uid; if the new owner is legitimate run `tcpshiftctl accept-owner {} {}`",
                    svc.name,
                    s.name,
                    o.refused,
                    holder(h),
                    svc.name,
                    s.name
                );
            }
        }
    }
    out
}

/// `uid 0 (root), pid 12 (tcp-echo), cgroup /system.slice/x.service`.
fn holder(h: &crate::state::HolderStatus) -> String {
    let mut t = format!("uid {}", h.uid);
    if let Some(u) = &h.user {
        let _ = write!(t, " ({u})");
    }
    let _ = write!(t, ", pid {} ({})", h.pid, h.process);
    if let Some(c) = &h.cgroup {
        let _ = write!(t, ", cgroup {c}");
    }
    t
}

/// The UDP flows' table of `tcpshiftctl status` (empty when no service steers UDP).
fn udp_table(status: &Status) -> String {
    let mut rows = vec![header(&[
        "SERVICE",
        "SUBSET",
        "FLOWS",
        "DATAGRAMS",
        "FALLBACK-OUT",
        "FALLBACK-IN",
        "MISSES",
        "EXPIRED",
        "EVICTIONS",
        "TRACKED",
    ])];
    for svc in &status.services {
        for s in &svc.subsets {
            if let Some(c) = &s.udp {
                rows.push(vec![
                    svc.name.clone(),
                    s.name.clone(),
                    c.flows_started.to_string(),
                    c.datagrams.to_string(),
                    c.fallback_out.to_string(),
                    c.fallback_in.to_string(),
                    c.misses.to_string(),
                    c.expired.to_string(),
                    c.evictions.to_string(),
                    c.flows_in_table.to_string(),
                ]);
            }
        }
    }
    if rows.len() == 1 {
        return String::new();
    }
    format!(
        "\nUDP flows (idle timeout {}s):\n{}",
        status.udp_idle_timeout_secs,
        table(&rows, false, "")
    )
}

/// Width of a bar in [`top_frame`], in cells.
const BAR: usize = 30;

fn bar(percent: f64) -> String {
    let filled = ((percent.clamp(0.0, 100.0) / 100.0) * BAR as f64).round() as usize;
    format!("{}{}", "█".repeat(filled), "·".repeat(BAR - filled))
}

/// What changed between two statuses, per subset (matched by service and subset name).
struct Delta {
    steered: u64,
    opened: u64,
    received: u64,
    sent: u64,
}

fn delta(prev: Option<&Status>, svc: &ServiceStatus, s: &SubsetStatus) -> Option<Delta> {
    let p = prev?
        .services
        .iter()
        .find(|p| p.name == svc.name)?
        .subsets
        .iter()
        .find(|p| p.name == s.name)?;
    let (a, b) = (&p.counters, &s.counters);
    Some(Delta {
        steered: b.steered.saturating_sub(a.steered),
        opened: b.opened.saturating_sub(a.opened),
        received: b.bytes_received.saturating_sub(a.bytes_received),
        sent: b.bytes_sent.saturating_sub(a.bytes_sent),
    })
}

/// One screen of `tcpshiftctl top`: per service, per subset a bar of its weight and a bar of the
/// share of new connections it got since `prev` (taken `elapsed` ago) — or, for the first
/// frame, over the kernel's last [`Status::observed_window_secs`] seconds.
pub fn top_frame(status: &Status, prev: Option<&Status>, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let window = match prev {
        Some(_) => format!("last {secs:.1}s"),
        None => format!("last {}s", status.observed_window_secs),
    };
    let mut out = String::new();
    if status.services.is_empty() {
        out.push_str("(no services)\n");
    }
    for svc in &status.services {
        let deltas: Vec<Option<Delta>> = svc.subsets.iter().map(|s| delta(prev, svc, s)).collect();
        let new_total: u64 = deltas.iter().flatten().map(|d| d.steered).sum();
        let rate = match prev {
            Some(_) => format!("  {:.1} new connections/s", new_total as f64 / secs),
            None => String::new(),
        };
        let _ = writeln!(out, "{}  {}{rate}", svc.name, svc.listen);
        let name_w = svc
            .subsets
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0);
        for (s, d) in svc.subsets.iter().zip(&deltas) {
            let observed = match (prev, d) {
                (Some(_), Some(d)) if new_total > 0 => {
                    Some(d.steered as f64 * 100.0 / new_total as f64)
                }
                (Some(_), _) => None,
                (None, _) => s.observed_share,
            };
            let c = &s.counters;
            let _ = writeln!(
                out,
                "  {:<name_w$}  weight   {:>6}  {}  live {}  active {}  opened {}{}",
                s.name,
                format!("{:.1}%", s.share),
                bar(s.share),
                if s.live { "yes" } else { "NO " },
                c.active,
                c.opened,
                match d {
                    Some(d) if prev.is_some() => format!(" (+{:.1}/s)", d.opened as f64 / secs),
                    _ => String::new(),
                },
                name_w = name_w,
            );
            let _ = writeln!(
                out,
                "  {:<name_w$}  observed {:>6}  {}  in {}  out {}{}  fallbacks out {} in {}",
                "",
                percent(observed),
                bar(observed.unwrap_or(0.0)),
                human_bytes(c.bytes_received),
                human_bytes(c.bytes_sent),
                match d {
                    Some(d) if prev.is_some() => format!(
                        " ({}/s in, {}/s out)",
                        human_bytes((d.received as f64 / secs) as u64),
                        human_bytes((d.sent as f64 / secs) as u64)
                    ),
                    _ => String::new(),
                },
                c.fallback_out,
                c.fallback_in,
                name_w = name_w,
            );
            let _ = writeln!(
                out,
                "  {:<name_w$}  failures reset {}  no-reply {}  refused {}  rto {}",
                "",
                c.reset_by_backend,
                c.closed_without_reply,
                c.misses,
                c.retransmit_timeouts,
                name_w = name_w,
            );
            if let Some(u) = &s.udp {
                let _ = writeln!(
                    out,
                    "  {:<name_w$}  udp flows {}  datagrams {}  fallbacks out {} in {}  evictions {}  tracked {}",
                    "",
                    u.flows_started,
                    u.datagrams,
                    u.fallback_out,
                    u.fallback_in,
                    u.evictions,
                    u.flows_in_table,
                    name_w = name_w,
                );
            }
            if let Some(line) = super::limits::subset_line(&s.limits) {
                let _ = writeln!(out, "  {:<name_w$}  limits {line}", "", name_w = name_w);
            }
        }
        let _ = writeln!(out, "  (observed: share of new connections, {window})");
    }
    for w in &status.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::state::CounterStatus;

    fn status(v1: CounterStatus, v2: CounterStatus) -> Status {
        let subset = |name: &str, weight, share, counters| SubsetStatus {
            name: name.into(),
            backend: "127.0.0.1:9001".parse().expect("addr"),
            weight,
            share,
            live: true,
            udp: None,
            observed_share: Some(share),
            counters,
            owner: Default::default(),
            limits: Default::default(),
        };
        Status {
            netns_inode: 1,
            state_dir: PathBuf::from("/x"),
            program_id: Some(1),
            accounting_program_id: Some(2),
            observed_window_secs: 10,
            debug_events: false,
            services: vec![ServiceStatus {
                name: "tcp-echo".into(),
                id: 0,
                listen: "*:31400".into(),
                mode: "hash",
                protocol: Default::default(),
                subsets: vec![subset("v1", 80, 80.0, v1), subset("v2", 20, 20.0, v2)],
                shadows: vec![],
                fail_closed: false,
            }],
            warnings: vec![],
            read_only: false,
            udp_idle_timeout_secs: 30,
        }
    }

    #[test]
    fn status_table_has_one_row_per_subset() {
        let t = status_table(&status(
            CounterStatus {
                opened: 8,
                closed: 5,
                active: 3,
                bytes_received: 2048,
                ..Default::default()
            },
            CounterStatus::default(),
        ));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SERVICE"), "{t}");
        assert!(lines[0].contains("OBSERVED(10s)"), "{t}");
        assert!(lines[1].starts_with("tcp-echo  *:31400  v1"), "{t}");
        assert!(lines[1].contains("2.0 KiB"), "{t}");
        assert!(lines[2].trim_start().starts_with("v2"), "{t}");
        assert_eq!(lines.len(), 3, "{t}");
    }

    #[test]
    fn top_shows_the_share_of_new_connections_since_the_previous_frame() {
        let before = status(
            CounterStatus {
                steered: 100,
                ..Default::default()
            },
            CounterStatus {
                steered: 10,
                ..Default::default()
            },
        );
        let after = status(
            CounterStatus {
                steered: 130,
                ..Default::default()
            },
            CounterStatus {
                steered: 20,
                ..Default::default()
            },
        );
        let f = top_frame(&after, Some(&before), Duration::from_secs(1));
        assert!(f.contains("40.0 new connections/s"), "{f}");
        assert!(f.contains("observed  75.0%"), "{f}");
        assert!(f.contains("observed  25.0%"), "{f}");
        let first = top_frame(&after, None, Duration::ZERO);
        assert!(first.contains("observed  80.0%"), "{first}");
        assert!(first.contains("last 10s"), "{first}");
    }
}
