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
    // Every fault's phase carried load: a table of zeros without connections would prove
    // nothing (goal_met fails such a row too; this names it).
    for row in report.rows.iter().filter(|r| r.is_fault) {
        assert!(row.attempted > 0, "no connection during {:?}", row.fault);
    }
    // Every record of the load is counted in exactly one row.
    assert_eq!(report.counted(), report.records, "{}", report.table());
    assert!(report.records > 0);
    chaos::check(&report)
}
