//! The short variant of the fault suite (`cargo xtask chaos` runs the full one): under a
//! sustained load, weight changes, loader kill/stop and restart, in-place upgrade, backend
//! kill and restart and malformed input lose no connection.

use anyhow::Result;
use tcpshift_tests::{
    chaos::{self, Options},
    privileged,
};

#[test]
fn short_fault_suite_loses_no_connection() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let report = chaos::run(&Options::short(), &mut |line| eprintln!("chaos: {line}"))?;
    eprintln!("{}", report.table());
    // Every phase carried load: a table of zeros without connections would prove nothing.
    for row in &report.rows {
        assert!(row.attempted > 0, "no connection during {:?}", row.fault);
    }
    chaos::check(&report)
}
