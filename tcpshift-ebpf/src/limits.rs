//! Connection limits and outlier ejections on the per-connection path.
//!
//! - `TS_LOAD[slot].open` counts a subset's open connections exactly: sock_ops adds one when a
//!   connection is established on the subset (`PASSIVE_ESTABLISHED`) and takes it off when
//!   the connection closes, both with atomic adds on the one value all CPUs share.
//! - sk_lookup treats a candidate subset as *blocked* when `TS_LIMITS[slot]` says it is
//!   ejected, or has a limit its open connections have reached. It only looks when
//!   `Global::flags` has `LIMITS` (some slot has a limit or an ejection).
//!
//! What is guaranteed: the check is made when the SYN is looked up and the count moves when
//! the handshake completes, so the open connections of a subset never exceed its limit by more
//! than the handshakes to it that were in flight (SYN seen, final ACK not yet) when the limit
//! was reached. Clients that connect one after another (each connect returned before the next
//! SYN) never see more than the limit; nothing drifts per CPU.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::BPF_NOEXIST;
use tcpshift_common::{Global, SlotLoad, global_flags};

use crate::maps::{TS_LIMITS, TS_LOAD};

/// Whether any slot of the namespace has a limit or an ejection.
#[inline(always)]
pub(crate) fn limits_on(global: Option<&Global>) -> bool {
    matches!(global, Some(g) if g.flags & global_flags::LIMITS != 0)
}

/// Whether `slot` must get no new connection: ejected, or at its limit.
#[inline(always)]
pub(crate) fn blocked(slot: u32) -> bool {
    // SAFETY: the value is only read; userspace replaces entries as a whole.
    let Some(l) = (unsafe { TS_LIMITS.get(&slot) }) else {
        return false;
    };
    if l.ejected != 0 {
        return true;
    }
    let max = l.max_connections;
    if max == 0 {
        return false;
    }
    let Some(load) = TS_LOAD.get_ptr(&slot) else {
        return false;
    };
    // SAFETY: valid map value pointer for this run; an aligned 8-byte load is atomic.
    let open = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*load).open)) } as i64;
    open >= i64::from(max)
}

/// Index of [`SlotLoad::open`] among the value's `u64` words.
const OPEN: usize = 0;
/// Index of [`SlotLoad::refused`].
const REFUSED: usize = 1;
/// Index of [`SlotLoad::diverted`].
const DIVERTED: usize = 2;
const _: () = assert!(core::mem::offset_of!(SlotLoad, refused) == REFUSED * 8);
const _: () = assert!(core::mem::offset_of!(SlotLoad, diverted) == DIVERTED * 8);

/// Adds `delta` (wrapping: `u64::MAX` takes one off) to word `word` of `slot`'s load,
/// creating the entry at zero first.
#[inline(always)]
fn add(slot: u32, word: usize, delta: u64) {
    let mut p = TS_LOAD.get_ptr_mut(&slot);
    if p.is_none() {
        // Only one of racing creators succeeds; the others find its entry below.
        let _ = TS_LOAD.insert(&slot, &SlotLoad::default(), u64::from(BPF_NOEXIST));
        p = TS_LOAD.get_ptr_mut(&slot);
    }
    if let Some(p) = p {
        // SAFETY: a valid, 8-byte aligned map value of four `u64` words for this run (`word`
        // is a constant below 4); shared by all CPUs, so only changed with an atomic add.
        let _ = unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p.cast::<u64>().add(word), delta)
        };
    }
}

/// A connection was established on `slot`.
#[inline(always)]
pub(crate) fn opened(slot: u32) {
    add(slot, OPEN, 1);
}

/// A connection counted by [`opened`] closed.
#[inline(always)]
pub(crate) fn closed(slot: u32) {
    add(slot, OPEN, u64::MAX);
}

/// A new connection that chose `slot` was refused: every subset was full or ejected.
#[inline(always)]
pub(crate) fn refused(slot: u32) {
    add(slot, REFUSED, 1);
}

/// A new connection that chose `slot` went elsewhere because `slot` was full or ejected.
#[inline(always)]
pub(crate) fn diverted(slot: u32) {
    add(slot, DIVERTED, 1);
}
