//! Connection limits and outlier ejections on the per-connection path.
//!
//! - `TS_LOAD[slot].open` counts a subset's open connections exactly: sock_ops adds one when a
//!   connection is established on the subset (`PASSIVE_ESTABLISHED`) and takes it off when
//!   the connection closes, both with atomic adds on the one value all CPUs share. After each,
//!   it refreshes the subset's byte in the service's summary entry: 1 while it is full.
//! - sk_lookup, only while `global_flags::LIMITS` is set, passes over a candidate subset
//!   that is ejected or whose open connections reached its limit ([`blocked`]): the chosen
//!   one (counted as diverted) and each one of the fallback walk. When every subset with a
//!   live socket is blocked, the connection is refused (`SK_DROP`: the kernel answers the
//!   SYN with a RST) and counted in the chosen subset's `refused` ([`refused`]).
//! - The count moves at `PASSIVE_ESTABLISHED`, so a subset never has more open connections
//!   than its limit plus the handshakes in flight that found it under its limit.

use core::intrinsics::{AtomicOrdering, atomic_xadd};
use core::ptr::{addr_of, read_volatile, write_volatile};

use aya_ebpf::bindings::BPF_NOEXIST;
use tcpshift_common::{SlotLoad, service_summary_key, slot_service, slot_subset};

use crate::maps::{TS_LIMITS, TS_LOAD};

/// Index of [`SlotLoad::open`] among the value's `u64` words.
const OPEN: usize = 0;
/// Index of [`SlotLoad::refused`].
const REFUSED: usize = 1;
/// Index of [`SlotLoad::diverted`].
const DIVERTED: usize = 2;

/// `key`'s `TS_LOAD` value, created at zero first if missing.
#[inline(always)]
fn load_of(key: u32) -> Option<*mut SlotLoad> {
    if let Some(p) = TS_LOAD.get_ptr_mut(key) {
        return Some(p);
    }
    // Only one of racing creators succeeds; the others find its entry below.
    let _ = TS_LOAD.insert(key, SlotLoad::default(), u64::from(BPF_NOEXIST));
    TS_LOAD.get_ptr_mut(key)
}

/// Adds `delta` (wrapping: `u64::MAX` takes one off) to word `word` of `slot`'s load.
#[inline(always)]
fn add(slot: u32, word: usize, delta: u64) -> Option<*mut SlotLoad> {
    let p = load_of(slot)?;
    // SAFETY: a valid, 8-byte aligned map value of four `u64` words for this run (`word`
    // is a constant below 4); shared by all CPUs, so only changed with an atomic add.
    let _ = unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p.cast::<u64>().add(word), delta)
    };
    Some(p)
}

/// Writes whether `slot` is full into its service's summary byte (sock_ops, after its count
/// moved). Read again after the write: a count that moved meanwhile on another CPU is
/// written by this one or by the other's own refresh, whichever comes last.
#[inline(always)]
fn refresh_full(slot: u32, load: *mut SlotLoad) {
    // SAFETY: the value is only read; userspace replaces entries as a whole.
    let max = match unsafe { TS_LIMITS.get(slot) } {
        Some(l) => l.max_connections,
        None => return,
    };
    if max == 0 {
        return;
    }
    let Some(summary) = load_of(service_summary_key(slot_service(slot))) else {
        return;
    };
    let byte = (slot_subset(slot) & 15) as usize;
    for _ in 0..2 {
        // SAFETY: `load` is a valid map value for this run; aligned 8-byte load.
        let open = unsafe { read_volatile(addr_of!((*load).open)) } as i64;
        let full = u8::from(open >= i64::from(max));
        // SAFETY: the summary value has 32 bytes; `byte` < 16. One byte store.
        unsafe { write_volatile(summary.cast::<u8>().add(byte), full) };
    }
}

/// Whether `slot` may not take a new connection: it is ejected, or its open connections
/// reached its limit. A slot without a `TS_LIMITS` entry is never blocked.
#[inline(always)]
pub(crate) fn blocked(slot: u32) -> bool {
    // SAFETY: the value is only read; userspace replaces entries as a whole.
    let Some(l) = (unsafe { TS_LIMITS.get(slot) }) else {
        return false;
    };
    if l.ejected != 0 {
        return true;
    }
    let max = l.max_connections;
    if max == 0 {
        return false;
    }
    let Some(load) = TS_LOAD.get_ptr(slot) else {
        return false;
    };
    // SAFETY: a valid map value for this run; aligned 8-byte load of a word other CPUs
    // change only atomically.
    let open = unsafe { read_volatile(addr_of!((*load).open)) } as i64;
    open >= i64::from(max)
}

/// Counts a new connection that chose `slot` but passed it over because it was blocked.
#[inline(always)]
pub(crate) fn diverted(slot: u32) {
    let _ = add(slot, DIVERTED, 1);
}

/// Counts a new connection refused (on the subset it chose) because every subset with a
/// live socket was blocked.
#[inline(always)]
pub(crate) fn refused(slot: u32) {
    let _ = add(slot, REFUSED, 1);
}

/// A connection was established on `slot`.
#[inline(always)]
pub(crate) fn opened(slot: u32) {
    if let Some(p) = add(slot, OPEN, 1) {
        refresh_full(slot, p);
    }
}

/// A connection counted by [`opened`] closed. Taken off an existing entry only: the entry of
/// a slot whose service or subset was deleted (userspace removed it) is not created again.
#[inline(always)]
pub(crate) fn closed(slot: u32) {
    let Some(p) = TS_LOAD.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: as in `add`: a valid, aligned map value shared by all CPUs; atomic add of
    // `u64::MAX` (takes one off) on its first word.
    let _ = unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p.cast::<u64>().add(OPEN), u64::MAX)
    };
    refresh_full(slot, p);
}
