//! The sk_lookup program: steers each new TCP connection to a service port onto the
//! listening socket of one of the service's subsets, chosen by weight.
//!
//! For every socket lookup in the network namespace:
//! 1. not TCP, or destination not a configured service (exact address, then any address):
//!    `SK_PASS` without selecting anything — the normal lookup runs;
//! 2. hash the connection, take the bucket `hash & BUCKET_MASK` of the service's active
//!    bucket table: that is the chosen subset;
//! 3. assign the chosen subset's socket; if it has none (its server exited and the kernel removed
//!    the socket from the map), try the other subsets — weighted ones first, then any — and
//!    count a fallback; if none is alive, count a miss and let the normal lookup run.

use aya_ebpf::{
    bindings::sk_action, helpers::generated::bpf_ktime_get_coarse_ns, macros::sk_lookup,
    programs::SkLookupContext,
};
use aya_log_ebpf::debug;
use tcpshift_common::{
    BUCKET_MASK, Counters, IPPROTO_TCP, MAX_SUBSETS, RECENT_SECONDS, flow_hash, mode, slot,
    table_key,
};

use crate::maps::{AF_INET, TS_BUCKETS, TS_GLOBAL, TS_SOCKETS, count, log_on, lookup_service};

#[sk_lookup]
pub fn tcpshift_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer(&ctx);
    // Whether or not a socket was assigned, let the lookup go on: with an assignment the
    // kernel uses it, without one the normal lookup runs.
    sk_action::SK_PASS
}

/// Counts a connection steered to a subset, in its total and in the recent-seconds ring.
#[inline(always)]
fn count_steered(c: &mut Counters) {
    c.steered += 1;
    // SAFETY: no preconditions.
    let second = (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32;
    c.recent[second as usize % RECENT_SECONDS].count(second);
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) {
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
    if field!(protocol) != IPPROTO_TCP as u32 {
        return;
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
    let Some(entry) = lookup_service(&local, local_port as u16) else {
        return;
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
    let hash = if entry.mode == mode::HASH_SOURCE_IP {
        flow_hash(seed, &words, 4)
    } else {
        flow_hash(seed, &words, 10)
    };
    let id = entry.id;
    let n_subsets = entry.n_subsets as u32;
    let Some(table) = TS_BUCKETS.get_ptr(table_key(id, entry.generation)) else {
        return;
    };
    // SAFETY: the table pointer is valid for this run; the index is masked to its size.
    let chosen = unsafe { (*table).subset[(hash & BUCKET_MASK) as usize] } as u32;
    let chosen_slot = slot(id, chosen);
    count(chosen_slot, |c| c.chosen += 1);
    if TS_SOCKETS.redirect_sk_lookup(ctx, chosen_slot, 0).is_ok() {
        count(chosen_slot, count_steered);
        if log {
            debug!(
                ctx,
                "service {} port {}: subset {} chosen (bucket {})",
                id,
                local_port,
                chosen,
                hash & BUCKET_MASK
            );
        }
        return;
    }
    // Fallback: weighted subsets first, then any subset.
    let weighted = entry.weighted_mask;
    for pass in 0..2u32 {
        for i in 0..MAX_SUBSETS as u32 {
            if i >= n_subsets {
                break;
            }
            let is_weighted = weighted & (1 << i) != 0;
            if i == chosen || (pass == 0) != is_weighted {
                continue;
            }
            let s = slot(id, i);
            if TS_SOCKETS.redirect_sk_lookup(ctx, s, 0).is_ok() {
                count(chosen_slot, |c| c.fallback_out += 1);
                count(s, |c| {
                    count_steered(c);
                    c.fallback_in += 1;
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
                return;
            }
        }
    }
    count(chosen_slot, |c| c.misses += 1);
    if log {
        debug!(
            ctx,
            "service {} port {}: miss, no subset has a live socket (chosen {})",
            id,
            local_port,
            chosen
        );
    }
}
