//! The connection-limit and ejection lines under `status` and in `top`.

use std::fmt::Write;

use crate::state::{LimitStatus, Status};

/// `open 12 of 20, refused at the limit 3, diverted 7` — `None` when the subset has no limit,
/// no ejection and nothing was refused or diverted.
pub(super) fn subset_line(l: &LimitStatus) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(max) = l.max_connections {
        parts.push(format!("open {} of {max}", l.open));
    }
    if l.refused_at_limit > 0 || l.max_connections.is_some() {
        parts.push(format!("refused at the limit {}", l.refused_at_limit));
    }
    if l.diverted > 0 || l.max_connections.is_some() {
        parts.push(format!("diverted {}", l.diverted));
    }
    if let Some(o) = &l.outlier {
        if o.ejected {
            parts.push(format!(
                "EJECTED since {} until {} ({} errors in a row, {}), ejection {}",
                clock(o.ejected_since_ms),
                clock(o.ejected_until_ms),
                o.consecutive_errors,
                o.reason.as_deref().unwrap_or("?"),
                o.times_ejected
            ));
        } else {
            parts.push(format!(
                "not ejected ({} of {} errors in a row; ejected {} time(s){})",
                o.errors_in_row,
                o.consecutive_errors,
                o.times_ejected,
                if o.ejected_since_ms > 0 {
                    format!(", last at {}", clock(o.ejected_since_ms))
                } else {
                    String::new()
                }
            ));
        }
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// `HH:MM:SS` (UTC) of a time in ms since the Unix epoch.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02} UTC",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60
    )
}

/// One `limits: SERVICE/SUBSET: ...` line per subset with a limit or outlier detection.
pub(super) fn lines(status: &Status) -> String {
    let mut out = String::new();
    for svc in &status.services {
        for s in &svc.subsets {
            if let Some(line) = subset_line(&s.limits) {
                let _ = writeln!(out, "limits: {}/{}: {line}", svc.name, s.name);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::OutlierStatus;

    #[test]
    fn lines_say_open_of_max_and_ejection() {
        assert_eq!(subset_line(&LimitStatus::default()), None);
        let l = LimitStatus {
            max_connections: Some(20),
            open: 12,
            refused_at_limit: 3,
            diverted: 7,
            outlier: Some(OutlierStatus {
                ejected: true,
                ejected_since_ms: 3_600_000,
                ejected_until_ms: 3_630_000,
                times_ejected: 2,
                reason: Some("consecutiveGatewayErrors".into()),
                consecutive_errors: 5,
                ..Default::default()
            }),
        };
        assert_eq!(
            subset_line(&l).as_deref(),
            Some(
                "open 12 of 20, refused at the limit 3, diverted 7, EJECTED since 01:00:00 UTC \
                 until 01:00:30 UTC (5 errors in a row, consecutiveGatewayErrors), ejection 2"
            )
        );
    }
}
