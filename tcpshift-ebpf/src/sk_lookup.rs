//! The sk_lookup program: steers each new TCP connection to a service port onto the
//! listening socket of one of the service's subsets, chosen by weight.
//!
//! For every socket lookup in the network namespace:
//! 1. not TCP, or destination not a configured service (exact address, then any address):
//!    `SK_PASS` without selecting anything — the normal lookup runs;
//! 2. pick a subset from the service's entry ([`choose_subset`]): the range holding the hash of
//!    the connection (or of the client address only, for source-IP affinity), or the next
//!    position of the service's shared round-robin cursor in its weighted sequence;
//! 3. assign the chosen subset's socket; if it has none (its server exited and the kernel removed
//!    the socket from the map), try the other subsets in the service's precomputed fallback
//!    order — weighted ones first, then any ([`next_candidate`]) — and count a fallback; if none
//!    is alive, count a miss and let the normal lookup run — or, for a fail-closed service
//!    (`service_flags::FAIL_CLOSED`), refuse the connection (`SK_DROP`), so that no other
//!    socket bound to the service's address receives it.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::addr_of_mut,
};

use aya_ebpf::{
    bindings::sk_action, helpers::generated::bpf_ktime_get_coarse_ns, macros::sk_lookup,
    programs::SkLookupContext,
};
use aya_log_ebpf::debug;
use tcpshift_common::{
    Counters, IPPROTO_TCP, IPPROTO_UDP, MAX_SUBSETS, RECENT_SECONDS, ServiceEntry, choose,
    flow_hash, global_flags, mode, service_flags, slot,
};

use crate::atomic::{add, count_recent};
use crate::maps::{AF_INET, TS_CURSORS, TS_GLOBAL, TS_SOCKETS, count, log_on, lookup_service};
use crate::opaque::subset_index;

#[sk_lookup]
pub fn tcpshift_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SK_PASS whether or not a socket was assigned: with an assignment the kernel uses it,
    // without one the normal lookup runs. SK_DROP only for a fail-closed service none of
    // whose subsets has a live socket.
    steer(&ctx)
}

/// Counts a connection steered to a subset, in its total and in the recent-seconds ring.
#[inline(always)]
fn count_steered(c: *mut Counters) {
    add!(c.steered, 1);
    // SAFETY: no preconditions.
    let second = (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32;
    // SAFETY: `count` passes a live, aligned map value; the index is below the ring's length.
    unsafe {
        count_recent(
            addr_of_mut!((*c).recent[second as usize % RECENT_SECONDS]),
            second,
        )
    };
}

/// Steers one lookup; returns the program's verdict.
#[inline(always)]
fn steer(ctx: &SkLookupContext) -> u32 {
    let sk = ctx.lookup;
    // Every context field is read with a single load at a constant offset: the verifier
    // refuses loads through a context pointer the compiler has moved.
    macro_rules! field {
        ($f:ident) => {
            // SAFETY: the context pointer is valid for the whole program run.
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).$f)) }
        };
        ($f:ident[$i:literal]) => {
            // SAFETY: as above; constant index within the array.
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).$f[$i])) }
        };
    }
    let protocol = field!(protocol);
    if protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32 {
        return sk_action::SK_PASS;
    }
    let v4 = field!(family) == AF_INET;
    let local_port = field!(local_port);
    let remote_port = u32::from(field!(remote_port));
    // Read every address field unconditionally, then choose: loads inside the branches would
    // be merged by the compiler into one load through a selected context pointer.
    let local4 = field!(local_ip4);
    let remote4 = field!(remote_ip4);
    let local6 = [
        field!(local_ip6[0]),
        field!(local_ip6[1]),
        field!(local_ip6[2]),
        field!(local_ip6[3]),
    ];
    let remote6 = [
        field!(remote_ip6[0]),
        field!(remote_ip6[1]),
        field!(remote_ip6[2]),
        field!(remote_ip6[3]),
    ];
    let mapped = 0xffff_u32.to_be();
    let (local, remote) = if v4 {
        ([0, 0, mapped, local4], [0, 0, mapped, remote4])
    } else {
        (local6, remote6)
    };
    if protocol == IPPROTO_UDP as u32 {
        crate::udp::steer_udp(
            ctx,
            TS_GLOBAL.get(0),
            local,
            remote,
            local_port,
            remote_port,
        );
        return sk_action::SK_PASS;
    }
    let Some(entry) = lookup_service(&local, local_port as u16) else {
        return sk_action::SK_PASS;
    };
    let global = TS_GLOBAL.get(0);
    let seed = match global {
        Some(g) => g.hash_seed,
        None => 0,
    };
    let log = log_on(global);
    let words = [
        remote[0],
        remote[1],
        remote[2],
        remote[3],
        local[0],
        local[1],
        local[2],
        local[3],
        remote_port,
        local_port,
    ];
    let id = entry.id;
    let Some(chosen) = choose_subset(entry, seed, &words) else {
        return sk_action::SK_PASS;
    };
    let chosen_slot = slot(id, chosen);
    count(chosen_slot, |c| add!(c.chosen, 1));
    let limits = match global {
        Some(g) => g.flags & global_flags::LIMITS != 0,
        None => false,
    };
    let blocked = limits && crate::limits::blocked(chosen_slot);
    if blocked {
        crate::limits::diverted(chosen_slot);
    } else if TS_SOCKETS.redirect_sk_lookup(ctx, chosen_slot, 0).is_ok() {
        count(chosen_slot, count_steered);
        if log {
            debug!(
                ctx,
                "service {} port {}: subset {} chosen", id, local_port, chosen
            );
        }
        return sk_action::SK_PASS;
    }
    let (next, skipped) = next_candidate(ctx, entry, chosen, limits);
    if let Some(i) = next {
        count(chosen_slot, |c| add!(c.fallback_out, 1));
        count(slot(id, i), |c| {
            count_steered(c);
            add!(c.fallback_in, 1);
        });
        if log {
            debug!(
                ctx,
                "service {} port {}: subset {} has no live socket, fell back to subset {}",
                id,
                local_port,
                chosen,
                i
            );
        }
        return sk_action::SK_PASS;
    }
    if blocked || skipped {
        // Every subset with a live socket is full or ejected: refuse now (a RST).
        crate::limits::refused(chosen_slot);
        if log {
            debug!(
                ctx,
                "service {} port {}: refused, every subset full or ejected (chosen {})",
                id,
                local_port,
                chosen
            );
        }
        return sk_action::SK_DROP;
    }
    count(chosen_slot, |c| add!(c.misses, 1));
    if log {
        debug!(
            ctx,
            "service {} port {}: miss, no subset has a live socket (chosen {})",
            id,
            local_port,
            chosen
        );
    }
    miss_verdict(entry.flags)
}

/// The verdict when no subset has a live socket: refuse (fail-closed service) or let the
/// normal lookup run.
#[inline(always)]
fn miss_verdict(flags: u16) -> u32 {
    if flags & service_flags::FAIL_CLOSED != 0 {
        sk_action::SK_DROP
    } else {
        sk_action::SK_PASS
    }
}

/// The subset a new connection takes, by its service's [`ServiceEntry::mode`]: the range
/// holding the hash of the 4-tuple, or of the client address only
/// ([`choose::by_position`]), or the next position of the service's round-robin cursor in
/// its weighted sequence ([`choose::round_robin`]). `None` when the cursor cannot be read
/// (never, once loaded: `TS_CURSORS` is an array).
#[inline(always)]
fn choose_subset(entry: &ServiceEntry, seed: u32, words: &[u32; 10]) -> Option<u32> {
    let index = match entry.mode {
        mode::ROUND_ROBIN => {
            let cursor = TS_CURSORS.get_ptr_mut(entry.id)?;
            // SAFETY: the pointer is to a live, aligned u64 of an array map value; every CPU
            // updates it only atomically, so one fetch-add per connection hands out each
            // position once, whichever CPUs the connections arrive on. (SeqCst, not Relaxed:
            // LLVM 22 lowers a relaxed fetch-add to BPF's plain `lock add`, which returns
            // nothing, and then reads the addend as the result.)
            let position =
                unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(cursor, 1) };
            choose::round_robin(entry, position)
        }
        mode::HASH_SOURCE_IP => choose::by_position(entry, flow_hash(seed, words, 4)),
        _ => choose::by_position(entry, flow_hash(seed, words, 10)),
    };
    Some(subset_index(index))
}

/// Assigns the first subset of the service's fallback order, other than `chosen`, that has a
/// live socket (and, with `limits`, is not [`crate::limits::blocked`]), and returns its
/// index; `None` when no subset has one (the caller counts a miss). The `bool` says whether
/// a subset was passed over as blocked. The order (weighted subsets first, then the rest) is computed by userspace
/// ([`ServiceEntry::fallback_order`]), so this is one pass over at most `n_subsets` entries.
#[inline(always)]
fn next_candidate(
    ctx: &SkLookupContext,
    entry: &ServiceEntry,
    chosen: u32,
    limits: bool,
) -> (Option<u32>, bool) {
    let n = entry.n_subsets as usize;
    let mut skipped = false;
    for k in 0..MAX_SUBSETS {
        if k >= n {
            break;
        }
        let i = entry.fallback_order[k] as u32;
        if i == chosen || i >= MAX_SUBSETS as u32 {
            continue;
        }
        if limits && crate::limits::blocked(slot(entry.id, i)) {
            skipped = true;
            continue;
        }
        if TS_SOCKETS
            .redirect_sk_lookup(ctx, slot(entry.id, i), 0)
            .is_ok()
        {
            return (Some(i), skipped);
        }
    }
    (None, skipped)
}
