//! What `tcpshiftctl` prints: every table goes through [`columns`].
//!
//! - [`status`]: the `status` table and the `top` screen, from a [`crate::state::Status`];
//! - [`services`]: `get services`, `get virtualservice` and the result of `apply`.

mod fail_closed;
mod limits;
mod services;
mod status;

pub use fail_closed::{fail_closed_notes, fail_closed_view_notes};
pub use services::{applied, change_word, services_table, virtual_services_table};
pub use status::{status_table, top_frame};

/// Bytes with a binary unit: `57 B`, `1.2 KiB`, `3.4 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A share in percent with one decimal, or `-` when unknown.
fn percent(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{v:.1}%"),
        None => "-".to_string(),
    }
}

/// Left-aligned columns separated by two spaces, trailing spaces trimmed (every table the
/// CLI prints).
pub fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A table's header row.
fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// [`columns`], followed by `(NONE)` when there is nothing to list.
fn table(rows: &[Vec<String>], empty: bool, none: &str) -> String {
    let mut out = columns(rows);
    if empty {
        out.push_str(&format!("({none})\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human_readable() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
