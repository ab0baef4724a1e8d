//! The UDP path of the sk_lookup program: steers each datagram to a UDP service onto the UDP
//! socket of one of the service's subsets, keeping every flow on the subset it started on.
//!
//! A UDP server socket is usually unconnected, so the kernel looks up a socket for every
//! datagram. The first datagram of a flow (service, 4-tuple) chooses a subset by weight, as a
//! TCP connection does, and writes it into the flow table `TS_UDP_FLOWS` (an LRU hash); every
//! later datagram of the flow goes to that subset, whatever the weights say, until the flow
//! has been idle for longer than `Global::udp_idle_secs`: then it chooses again. A flow whose
//! subset has no live socket moves to the first weighted subset that has one, and stays there.

use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, programs::SkLookupContext};
use tcpshift_common::{
    DEFAULT_UDP_IDLE_SECS, Global, IPPROTO_UDP, MAX_SUBSETS, ServiceEntry, UdpFlow, UdpFlowKey,
    choose, flow_hash, mode, service_flags, slot,
};

use crate::maps::{TS_UDP_FLOWS, TS_UDP_SOCKETS, count_udp, lookup_service, lookup_service_proto};

/// The UDP service at `local`:`port`: a `udp` service (its own key), else a `tcp+udp` one
/// (the TCP key, whose entry says UDP).
#[inline(always)]
fn udp_service(local: &[u32; 4], port: u16) -> Option<&'static ServiceEntry> {
    if let Some(e) = lookup_service_proto(local, port, IPPROTO_UDP) {
        return Some(e);
    }
    match lookup_service(local, port) {
        Some(e) if e.flags & service_flags::UDP != 0 => Some(e),
        _ => None,
    }
}

/// Steers one datagram (see the module docs). `local` and `remote` are IPv6 or v4-mapped
/// words in network order, ports in host order.
#[inline(always)]
pub(crate) fn steer_udp(
    ctx: &SkLookupContext,
    global: Option<&Global>,
    local: [u32; 4],
    remote: [u32; 4],
    local_port: u32,
    remote_port: u32,
) {
    let Some(entry) = udp_service(&local, local_port as u16) else {
        return;
    };
    let id = entry.id;
    let n_subsets = entry.n_subsets as u32;
    let (seed, idle_secs) = match global {
        Some(g) => (g.hash_seed, g.udp_idle_secs),
        None => (0, 0),
    };
    let idle_ns = if idle_secs == 0 {
        DEFAULT_UDP_IDLE_SECS as u64
    } else {
        idle_secs as u64
    } * 1_000_000_000;
    let key = UdpFlowKey {
        remote,
        local,
        remote_port: remote_port as u16,
        local_port: local_port as u16,
        id,
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The subset this datagram asks for; the subset the flow's entry names when that entry
    // must be rewritten (`NONE`: no entry); whether the entry is current (`hit`).
    let mut previous = NONE;
    let mut hit = false;
    let chosen = match TS_UDP_FLOWS.get_ptr_mut(key) {
        // SAFETY: the value pointer is valid for this run; a concurrent datagram of the same
        // flow writes the same values.
        Some(f) => unsafe {
            let subset = (*f).subset;
            if now.wrapping_sub((*f).last_seen_ns) <= idle_ns && subset < n_subsets {
                (*f).last_seen_ns = now;
                hit = true;
                subset
            } else {
                count_udp(slot(id, subset), |c| c.expired += 1);
                previous = subset;
                new_flow(entry, seed, &key)
            }
        },
        None => new_flow(entry, seed, &key),
    };
    let chosen_slot = slot(id, chosen);
    if TS_UDP_SOCKETS
        .redirect_sk_lookup(ctx, chosen_slot, 0)
        .is_ok()
    {
        count_udp(chosen_slot, |c| c.datagrams += 1);
        if !hit {
            pin(&key, chosen, now, chosen_slot, previous, id);
        }
        return;
    }
    // Fallback: the first weighted subset that has a live socket; the flow moves there.
    if hit {
        previous = chosen;
    }
    // The service's precomputed fallback order lists the weighted subsets first: walk them
    // only, and count and pin once after the walk (one copy of that code for the verifier).
    let weighted = entry.weighted_mask;
    let mut found = NONE;
    for k in 0..MAX_SUBSETS {
        if k as u32 >= n_subsets {
            break;
        }
        let i = entry.fallback_order[k] as u32;
        if i >= MAX_SUBSETS as u32 || weighted & (1 << i) == 0 {
            break;
        }
        if i != chosen
            && TS_UDP_SOCKETS
                .redirect_sk_lookup(ctx, slot(id, i), 0)
                .is_ok()
        {
            found = i;
            break;
        }
    }
    if found != NONE {
        let i = found & (MAX_SUBSETS as u32 - 1);
        let s = slot(id, i);
        count_udp(chosen_slot, |c| c.fallback_out += 1);
        count_udp(s, |c| {
            c.datagrams += 1;
            c.fallback_in += 1;
        });
        pin(&key, i, now, s, previous, id);
        return;
    }
    count_udp(chosen_slot, |c| c.misses += 1);
}

/// Writes the flow's entry: it is now on `subset` (slot `s`), moved from `previous` (or
/// [`NONE`]).
#[inline(always)]
fn pin(key: &UdpFlowKey, subset: u32, now: u64, s: u32, previous: u32, id: u32) {
    count_udp(s, |c| c.inserted += 1);
    if previous != NONE {
        count_udp(slot(id, previous & (MAX_SUBSETS as u32 - 1)), |c| {
            c.retired += 1
        });
    }
    let flow = UdpFlow {
        subset,
        _pad: 0,
        last_seen_ns: now,
    };
    // A full table evicts its least recently used entry; a failed write only means the next
    // datagram chooses again.
    let _ = TS_UDP_FLOWS.insert(key, flow, 0);
}

/// No subset (a `u32` sentinel: fewer states for the verifier than an `Option`).
const NONE: u32 = u32::MAX;

/// The subset a new flow chooses (counted in its `flows`).
#[inline(always)]
fn new_flow(entry: &ServiceEntry, seed: u32, key: &UdpFlowKey) -> u32 {
    let c = flow_subset(entry, seed, key);
    count_udp(slot(entry.id, c), |x| x.flows += 1);
    c
}

/// The subset a new flow chooses: the range of the service's entry holding its hash.
#[inline(always)]
fn flow_subset(entry: &ServiceEntry, seed: u32, key: &UdpFlowKey) -> u32 {
    let words = [
        key.remote[0],
        key.remote[1],
        key.remote[2],
        key.remote[3],
        key.local[0],
        key.local[1],
        key.local[2],
        key.local[3],
        u32::from(key.remote_port),
        u32::from(key.local_port),
    ];
    let hash = if entry.mode == mode::HASH_SOURCE_IP {
        flow_hash(seed, &words, 4)
    } else {
        flow_hash(seed, &words, 10)
    };
    crate::opaque::subset_index(choose::by_position(entry, hash))
}
