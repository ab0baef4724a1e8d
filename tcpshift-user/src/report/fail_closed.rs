//! The fail-closed notes under `tcpshiftctl status` and `tcpshiftctl get services`.

use std::fmt::Write as _;

use crate::{model::ServiceView, state::Status};

/// One note per fail-closed service: what happens to its connections while no subset is live
/// (its `MISSES` are then refused connections).
pub fn fail_closed_notes(status: &Status) -> String {
    notes(
        status
            .services
            .iter()
            .filter(|s| s.fail_closed)
            .map(|s| (s.name.as_str(), s.subsets.iter().any(|x| x.live))),
    )
}

/// The same notes for `tcpshiftctl get services` (from the kernel's services).
pub fn fail_closed_view_notes(views: &[ServiceView]) -> String {
    notes(
        views
            .iter()
            .filter(|v| v.config.fail_closed)
            .map(|v| (v.config.name.as_str(), v.live.iter().any(|l| *l))),
    )
}

fn notes<'a>(services: impl Iterator<Item = (&'a str, bool)>) -> String {
    let mut out = String::new();
    for (name, any_live) in services {
        let now = if any_live {
            ""
        } else {
            " (no subset is live now: its new connections are refused)"
        };
        let _ = writeln!(
            out,
            "note: {name} fails closed: while no subset has a live socket its new connections are refused (counted as MISSES), never passed to another socket on its address{now}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_per_fail_closed_service_says_whether_it_refuses_now() {
        let out = notes([("a", true), ("b", false)].into_iter());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].starts_with("note: a fails closed:"), "{out}");
        assert!(!lines[0].contains("no subset is live now"), "{out}");
        assert!(lines[1].contains("no subset is live now"), "{out}");
    }
}
