//! Atomic updates of values shared by all CPUs: the counters of `TS_COUNTERS` (one value per
//! slot, see `tcpshift-common` `Counters`).
//!
//! `AtomicU64` has no `fetch_add` on bpfel-unknown-none; the intrinsics lower to BPF_ATOMIC
//! instructions (BPF ISA v3, the object is built with `-Ctarget-cpu=v3`). Every one is SeqCst,
//! so the compiler keeps them in program order with the volatile accesses around them (the
//! close path's CLOSING → counters → CLOSED marks); LLVM emits the BPF_FETCH forms for the
//! 64-bit adds and the compare-and-exchange, and a plain `lock add` for the 32-bit add whose
//! result is unused. (A Relaxed fetch-add whose result is used is miscompiled by LLVM 22: it
//! becomes the plain `lock add`, which returns nothing.) On x86 each is one locked
//! instruction.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use tcpshift_common::RecentSecond;

/// A counter type the programs can add to atomically (BPF_ATOMIC add of 32 or 64 bits).
pub(crate) trait Shared: Copy {
    /// Adds `n` to the shared value at `p`.
    ///
    /// # Safety
    /// `p` must point to a live, naturally aligned value (a field of a map value) for the run.
    unsafe fn add(p: *mut Self, n: Self);
}

impl Shared for u64 {
    #[inline(always)]
    unsafe fn add(p: *mut u64, n: u64) {
        // SAFETY: the caller's promise; every writer of the value uses atomic instructions.
        let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, n) };
    }
}

impl Shared for u32 {
    #[inline(always)]
    unsafe fn add(p: *mut u32, n: u32) {
        // SAFETY: the caller's promise; every writer of the value uses atomic instructions.
        let _ = unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(p, n) };
    }
}

/// `add!(c.field, n)` / `add!(c.array[i], n)`: atomically adds `n` to a field of the shared
/// counters `c`, the `*mut Counters` that `maps::count` hands to its closure.
macro_rules! add {
    ($c:ident . $field:ident $([$i:expr])?, $n:expr) => {
        // SAFETY: `maps::count` passes a pointer to a live, aligned map value for the run;
        // the place is one of its fields (an index is bounds-checked).
        unsafe {
            $crate::atomic::Shared::add(
                core::ptr::addr_of_mut!((*$c).$field $([$i])?),
                $n,
            )
        }
    };
}
pub(crate) use add;

/// Counts one connection in the ring entry at `p` for `second`, restarting the entry if it
/// holds an older second.
///
/// The entry is one `u64` word (`RecentSecond::to_word`: second in the low half, count in
/// the high half). Whoever finds it stale tries to swap in `{second, 1}`; of racing
/// programs exactly one swap wins, and every loser (its expected old value is gone) adds
/// its one instead — to the entry the winner just restarted for the same second. So a race
/// at a second boundary neither loses nor double-counts a connection. Only a program whose
/// clock read is a whole ring length ([`tcpshift_common::RECENT_SECONDS`] seconds) behind
/// another's could add to the wrong second, which the programs' run time rules out.
///
/// # Safety
/// `p` must point to a live, 8-byte aligned `RecentSecond` (in a map value) for the run.
#[inline(always)]
pub(crate) unsafe fn count_recent(p: *mut RecentSecond, second: u32) {
    let word = p.cast::<u64>();
    // SAFETY: the caller's promise; an aligned 8-byte load is not torn, and every writer
    // of the word uses atomic instructions.
    let old = unsafe { core::ptr::read_volatile(word) };
    if RecentSecond::from_word(old).second != second {
        let fresh = RecentSecond { second, steered: 1 }.to_word();
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                word, old, fresh,
            )
        };
        if swapped {
            return;
        }
    }
    // SAFETY: as above.
    unsafe { Shared::add(word, RecentSecond::ONE_STEERED) };
}
