//! Connection accounting: a sock_ops program attached to the cgroup v2 root.
//!
//! It runs for TCP events of every socket of the host, so it first ignores everything that is
//! not a socket of this state's network namespace (`Global::netns_cookie`) and that carries no
//! `TS_SOCKTAG` storage.
//!
//! - `PASSIVE_ESTABLISHED`: the new connection carries a copy of its listener's tag (the map has
//!   `BPF_F_CLONE`). If its local address and port are a service's (looked up as the sk_lookup
//!   program does), the slot of that service in the tag is the connection's subset: the copy
//!   becomes the connection's record (`tag::OPEN`), `opened` is counted and state callbacks are
//!   enabled for this socket only.
//! - `STATE_CB` to `TCP_CLOSE`: the payload bytes received and acknowledged are added to the
//!   subset's counters, and `closed` is counted. Entering FIN_WAIT1 also enables header
//!   callbacks (for the few packets until close) to see whether the client's FIN arrives.
//! - `PARSE_HDR_OPT` (only in FIN_WAIT1/FIN_WAIT2): remembers the sequence number of a FIN.
//!
//! `Global::flags` bit `NO_SIGNALS` (a measurement switch for the benchmark, never set in
//! operation) leaves out the failure signals' callbacks: no `RTO_CB` and no reset watch after
//! an abort; the accounting above stays.
//!
//! The record is the socket's own storage. Nothing is shared between connections on this path
//! except the subset's counters, one value for all CPUs changed only by atomic adds
//! (`atomic.rs`: a few locked adds per connection, none per packet).

use core::{
    ffi::c_void,
    ptr::{addr_of, read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB,
        BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING,
        BPF_TCP_ESTABLISHED, BPF_TCP_FIN_WAIT1, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK, bpf_sock_ops,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;
use tcpshift_common::{
    Global, MAX_LISTENER_SLOTS, NO_SLOT, SockTag, global_flags, slot_service, slot_subset,
    srtt_bucket, tag, tag_flags,
};

use crate::atomic::add;
use crate::limits;
use crate::maps::{AF_INET, TS_GLOBAL, count, log_on, lookup_service, socktag};

/// `TCPHDR_FIN` in `skb_tcp_flags`.
const TCP_FIN: u32 = 0x01;
/// `TCPHDR_RST` in `skb_tcp_flags`.
const TCP_RST: u32 = 0x04;

/// One load of a context field at its constant offset (the verifier refuses anything else).
macro_rules! field {
    ($ops:expr, $($f:tt)+) => {
        // SAFETY: the context pointer is valid for the whole program run.
        unsafe { read_volatile(addr_of!((*$ops).$($f)+)) }
    };
}

#[sock_ops]
pub fn tcpshift_sock_ops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    let op = field!(ops, op);
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        established(&ctx, ops);
    } else if op == BPF_SOCK_OPS_STATE_CB {
        state_change(&ctx, ops);
    } else if op == BPF_SOCK_OPS_PARSE_HDR_OPT_CB {
        header(ops);
    } else if op == BPF_SOCK_OPS_HDR_OPT_LEN_CB {
        sending_after_close(ops);
    } else if op == BPF_SOCK_OPS_RTO_CB {
        retransmit_timeout(ops);
    }
    1
}

/// The state's settings, if the socket belongs to this state's network namespace.
#[inline(always)]
fn our_namespace(ops: *mut bpf_sock_ops) -> Option<&'static Global> {
    let global = TS_GLOBAL.get(0)?;
    // SAFETY: the helper accepts the sock_ops context.
    let cookie = unsafe { bpf_get_netns_cookie(ops.cast::<c_void>()) };
    if cookie == global.netns_cookie {
        Some(global)
    } else {
        None
    }
}

/// The socket's `TS_SOCKTAG` storage, if it has one (never creates it).
#[inline(always)]
fn tag_of(ops: *mut bpf_sock_ops) -> Option<*mut SockTag> {
    socktag(field!(ops, __bindgen_anon_2.sk))
}

/// Whether the failure signals' callbacks are wanted (off only to measure their cost).
#[inline(always)]
fn signals_on(global: &Global) -> bool {
    global.flags & global_flags::NO_SIGNALS == 0
}

#[inline(always)]
fn add_cb_flags(ctx: &SockOpsContext, ops: *mut bpf_sock_ops, flags: u32) {
    let current = field!(ops, bpf_sock_ops_cb_flags);
    if current & flags != flags {
        let _ = ctx.set_cb_flags((current | flags) as i32);
    }
}

/// A connection was established on a listening socket: is it one of ours?
#[inline(always)]
fn established(ctx: &SockOpsContext, ops: *mut bpf_sock_ops) {
    let Some(global) = our_namespace(ops) else {
        return;
    };
    let Some(t) = tag_of(ops) else {
        return;
    };
    // SAFETY: storage pointer valid for this run; only this socket's callbacks write it and
    // they run under the socket lock.
    if unsafe { read_volatile(addr_of!((*t).kind)) } != tag::LISTENER {
        return;
    }
    // Read every address field unconditionally, then choose (see sk_lookup.rs).
    let v4 = field!(ops, family) == AF_INET;
    let local4 = field!(ops, local_ip4);
    let local6 = [
        field!(ops, local_ip6[0]),
        field!(ops, local_ip6[1]),
        field!(ops, local_ip6[2]),
        field!(ops, local_ip6[3]),
    ];
    let port = field!(ops, local_port);
    let local = if v4 {
        [0, 0, 0xffff_u32.to_be(), local4]
    } else {
        local6
    };
    let Some(entry) = lookup_service(&local, port as u16) else {
        // Accepted from a registered listener but not through a service address (e.g. a
        // client connecting to the backend's own port): not tcpshift's connection.
        return;
    };
    let id = entry.id;
    let mut found = NO_SLOT;
    for i in 0..MAX_LISTENER_SLOTS {
        // SAFETY: as above; constant bounds.
        let s = unsafe { read_volatile(addr_of!((*t).listener_slots[i])) };
        if s != NO_SLOT && slot_service(s) == id {
            found = s;
            break;
        }
    }
    if found == NO_SLOT {
        return;
    }
    // SAFETY: as above.
    unsafe {
        write_volatile(addr_of!((*t).slot).cast_mut(), found);
        write_volatile(addr_of!((*t).flags).cast_mut(), tag_flags::OPEN_COUNTED);
        write_volatile(addr_of!((*t).kind).cast_mut(), tag::OPEN);
    }
    count(found, |c| add!(c.opened, 1));
    limits::opened(found);
    // State changes for the accounting, and retransmission timeouts (the timer's expiry
    // only, never a per-packet callback) unless the signals are switched off to measure
    // their cost (`global_flags::NO_SIGNALS`).
    let flags = if signals_on(global) {
        BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG
    } else {
        BPF_SOCK_OPS_STATE_CB_FLAG
    };
    add_cb_flags(ctx, ops, flags);
    if log_on(Some(global)) {
        debug!(
            ctx,
            "service {} port {}: connection opened on subset {}",
            id,
            port,
            slot_subset(found)
        );
    }
}

/// A tracked connection changes state; at close, account it.
#[inline(always)]
fn state_change(ctx: &SockOpsContext, ops: *mut bpf_sock_ops) {
    let old = field!(ops, __bindgen_anon_1.args[0]);
    let new = field!(ops, __bindgen_anon_1.args[1]);
    // Only two transitions matter: leave the others (about half of a connection's state
    // callbacks) before any lookup.
    if new != BPF_TCP_FIN_WAIT1 && new != BPF_TCP_CLOSE {
        return;
    }
    let Some(global) = our_namespace(ops) else {
        return;
    };
    let Some(t) = tag_of(ops) else {
        return;
    };
    // SAFETY: see `established`.
    if unsafe { read_volatile(addr_of!((*t).kind)) } != tag::OPEN {
        return;
    }
    if new == BPF_TCP_FIN_WAIT1 {
        // The server closed first: watch the few remaining packets for the client's FIN.
        // SAFETY: see `established`.
        unsafe {
            let f = read_volatile(addr_of!((*t).flags));
            write_volatile(
                addr_of!((*t).flags).cast_mut(),
                f | tag_flags::SERVER_CLOSED_FIRST,
            );
        }
        add_cb_flags(ctx, ops, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG);
        return;
    }
    let received = field!(ops, bytes_received);
    let acked = field!(ops, bytes_acked);
    let rcv_nxt = field!(ops, rcv_nxt);
    let snd_una = field!(ops, snd_una);
    let snd_nxt = field!(ops, snd_nxt);
    // `srtt_us` is the kernel's smoothed RTT in µs, scaled by 8.
    let srtt = srtt_bucket(field!(ops, srtt_us) >> 3);
    // SAFETY: see `established`.
    let (slot, flags, fin_seq) = unsafe {
        (
            read_volatile(addr_of!((*t).slot)),
            read_volatile(addr_of!((*t).flags)),
            read_volatile(addr_of!((*t).fin_seq)),
        )
    };
    // The kernel counts a FIN in both counters (it takes a sequence number); payload bytes do
    // not include it. The client's FIN was received if the socket went through CLOSE_WAIT or
    // CLOSING, or (server closed first) if the FIN seen in FIN_WAIT1/2 was consumed.
    let fin_in = old == BPF_TCP_CLOSE_WAIT
        || old == BPF_TCP_LAST_ACK
        || old == BPF_TCP_CLOSING
        || (old == BPF_TCP_FIN_WAIT2
            && flags & tag_flags::FIN_SEEN != 0
            && rcv_nxt == fin_seq.wrapping_add(1));
    // Our FIN was acknowledged if the socket reached FIN_WAIT2, or everything sent was acked
    // when CLOSING/LAST_ACK ended.
    let fin_out = old == BPF_TCP_FIN_WAIT2
        || ((old == BPF_TCP_CLOSING || old == BPF_TCP_LAST_ACK) && snd_una == snd_nxt);
    let received = received.saturating_sub(u64::from(fin_in));
    let sent = acked.saturating_sub(u64::from(fin_out));
    let without_reply = flags & tag_flags::SERVER_CLOSED_FIRST != 0 && sent == 0;
    // From an open state straight to CLOSE: a reset received, a timeout, or an abort by the
    // server (close with unread data, SO_LINGER 0), which sends its RST only after this
    // callback. Ask for the header callback of that RST, if one is sent: at most one
    // callback more per connection, and only for these closes.
    let abort = old == BPF_TCP_ESTABLISHED || old == BPF_TCP_CLOSE_WAIT || old == BPF_TCP_FIN_WAIT1;
    if abort && signals_on(global) {
        // SAFETY: see `established`.
        unsafe {
            write_volatile(
                addr_of!((*t).flags).cast_mut(),
                flags | tag_flags::WATCH_RESET,
            );
        }
        add_cb_flags(ctx, ops, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
    }
    // CLOSING → counters → CLOSED: a reader that sums open connections (sock_diag) skips
    // CLOSED ones and retries while it sees CLOSING, so no connection is counted twice.
    // SAFETY: see `established`.
    // Volatile accesses keep that order (BPF has no fence instruction to ask for it).
    unsafe { write_volatile(addr_of!((*t).kind).cast_mut(), tag::CLOSING) };
    // The adds are fully ordered atomics (`atomic.rs`): they stay between the two writes.
    count(slot, |c| {
        add!(c.bytes_received, received);
        add!(c.bytes_sent, sent);
        add!(c.closed, 1);
        if without_reply {
            add!(c.closed_without_reply, 1);
        }
        add!(c.srtt_histogram[srtt], 1);
    });
    if flags & tag_flags::OPEN_COUNTED != 0 {
        limits::closed(slot);
    }
    // SAFETY: see `established`.
    unsafe { write_volatile(addr_of!((*t).kind).cast_mut(), tag::CLOSED) };
    if log_on(Some(global)) {
        debug!(
            ctx,
            "service {}: connection closed on subset {} ({} bytes in, {} bytes out)",
            slot_service(slot),
            slot_subset(slot),
            received,
            sent
        );
    }
}

/// A packet arrived while the server is closing: remember the sequence number of a FIN.
#[inline(always)]
fn header(ops: *mut bpf_sock_ops) {
    if field!(ops, skb_tcp_flags) & TCP_FIN == 0 {
        return;
    }
    if our_namespace(ops).is_none() {
        return;
    }
    let Some(t) = tag_of(ops) else {
        return;
    };
    // SAFETY: see `established`.
    if unsafe { read_volatile(addr_of!((*t).kind)) } != tag::OPEN {
        return;
    }
    let data = field!(ops, __bindgen_anon_3.skb_data) as usize;
    let end = field!(ops, __bindgen_anon_4.skb_data_end) as usize;
    if data + 20 > end {
        return;
    }
    let len = field!(ops, skb_len);
    // SAFETY: bounds checked against skb_data_end just above.
    let (seq, doff) = unsafe {
        let seq = read_volatile((data + 4) as *const u32);
        let doff = read_volatile((data + 12) as *const u8);
        (u32::from_be(seq), u32::from(doff >> 4) * 4)
    };
    // The FIN's sequence number follows the segment's payload.
    let fin_seq = seq.wrapping_add(len.wrapping_sub(doff));
    // SAFETY: see `established`.
    unsafe {
        write_volatile(addr_of!((*t).fin_seq).cast_mut(), fin_seq);
        let f = read_volatile(addr_of!((*t).flags));
        write_volatile(addr_of!((*t).flags).cast_mut(), f | tag_flags::FIN_SEEN);
    }
}

/// A closed connection sends a packet: a RST after an abort counts as reset by the backend.
#[inline(always)]
fn sending_after_close(ops: *mut bpf_sock_ops) {
    // The option-length callback also runs without a packet (MSS computation): flags 0.
    let tcp_flags = field!(ops, skb_tcp_flags);
    if tcp_flags == 0 || our_namespace(ops).is_none() {
        return;
    }
    let Some(t) = tag_of(ops) else {
        return;
    };
    // SAFETY: see `established`.
    let (kind, flags, slot) = unsafe {
        (
            read_volatile(addr_of!((*t).kind)),
            read_volatile(addr_of!((*t).flags)),
            read_volatile(addr_of!((*t).slot)),
        )
    };
    if kind != tag::CLOSED || flags & tag_flags::WATCH_RESET == 0 {
        return;
    }
    // SAFETY: see `established`.
    unsafe {
        write_volatile(
            addr_of!((*t).flags).cast_mut(),
            flags & !tag_flags::WATCH_RESET,
        );
    }
    if tcp_flags & TCP_RST != 0 {
        count(slot, |c| add!(c.reset_by_backend, 1));
    }
}

/// The retransmission timer of a tracked connection expired.
#[inline(always)]
fn retransmit_timeout(ops: *mut bpf_sock_ops) {
    if our_namespace(ops).is_none() {
        return;
    }
    let Some(t) = tag_of(ops) else {
        return;
    };
    // SAFETY: see `established`.
    let (kind, slot) = unsafe {
        (
            read_volatile(addr_of!((*t).kind)),
            read_volatile(addr_of!((*t).slot)),
        )
    };
    if kind == tag::OPEN {
        count(slot, |c| add!(c.retransmit_timeouts, 1));
    }
}
