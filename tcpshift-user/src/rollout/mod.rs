//! Progressive rollouts above the model: the `Rollout` document ([`parse`]), the signals of an
//! interval from the kernel's counters ([`signals`]), and the driver that applies a decision
//! to the state ([`drive`]), and its fleet form ([`fleet`]: driven once, judged on every
//! node's signals). The decision logic itself is pure, in [`crate::model::rollout`].

pub mod drive;
pub mod fleet;
pub mod parse;
pub mod signals;

pub use parse::{is_rollout_document, parse_rollouts, without_rollouts};
