//! Values the verifier should see as "some index below [`MAX_SUBSETS`]" rather than as one
//! of several known constants.
//!
//! [`choose`](tcpshift_common::choose) returns the subset from one of up to 16 exits, each
//! with its own constant. Older verifiers (6.1) cannot prune the states that differ only in
//! that constant once it has been marked precise — which they do for every scalar whenever
//! precision tracking meets a call to a subprogram — so the rest of the program was walked
//! once per exit and the sk_lookup program went past the 1 000 000-instruction limit.
//! [`subset_index`] passes the index through the stack, written as 8 bytes and read back as
//! 4: a fill narrower than its spill is an unknown scalar to those verifiers, so every exit
//! continues as the same state (`& (MAX_SUBSETS - 1)` bounds it again), as when the subset
//! came from a map. Newer verifiers may keep the constant; they prune well anyway.

use tcpshift_common::MAX_SUBSETS;

/// `index`, bounded below [`MAX_SUBSETS`], as a value the verifier does not track.
#[inline(always)]
pub(crate) fn subset_index(index: u32) -> u32 {
    let mut spill = 0u64;
    // SAFETY: both accesses are to the local `spill`, properly aligned (the 4-byte read is
    // of its first half). Volatile keeps the compiler from forwarding the value around the
    // stack, which is the point.
    let low = unsafe {
        core::ptr::write_volatile(&mut spill, u64::from(index));
        core::ptr::read_volatile((&raw const spill).cast::<u32>())
    };
    // bpfel: the first four bytes are the low half.
    const _: () = assert!(cfg!(target_endian = "little"));
    low & (MAX_SUBSETS as u32 - 1)
}
