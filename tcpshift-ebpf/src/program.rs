use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, sk_action},
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::{map, sk_lookup},
    maps::{Array, HashMap, PerCpuHashMap, SockHash},
    programs::SkLookupContext,
};
use aya_log_ebpf::debug;
use tcpshift_common::{
    BUCKET_MASK, BucketTable, Counters, Global, IPPROTO_TCP, MAX_SERVICES, MAX_SLOTS, MAX_SUBSETS,
    RECENT_SECONDS, ServiceEntry, ServiceKey, ServiceMeta, flow_hash, global_flags, mode, slot,
    table_key,
};

#[map(name = "TS_GLOBAL")]
pub(crate) static TS_GLOBAL: Array<Global> = Array::with_max_entries(1, 0);

#[map(name = "TS_SERVICES")]
static TS_SERVICES: HashMap<ServiceKey, ServiceEntry> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "TS_BUCKETS")]
static TS_BUCKETS: HashMap<u32, BucketTable> =
    HashMap::with_max_entries(MAX_SERVICES * 2, BPF_F_NO_PREALLOC);

#[map(name = "TS_SOCKETS")]
static TS_SOCKETS: SockHash<u32> = SockHash::with_max_entries(MAX_SLOTS, 0);

#[map(name = "TS_COUNTERS")]
static TS_COUNTERS: PerCpuHashMap<u32, Counters> =
    PerCpuHashMap::with_max_entries(MAX_SLOTS, BPF_F_NO_PREALLOC);

/// Userspace-only description of each service; declared here so that it is created, pinned
/// and versioned together with the maps the data path uses.
#[map(name = "TS_META")]
static TS_META: HashMap<u32, ServiceMeta> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

pub(crate) const AF_INET: u32 = 2;

#[sk_lookup]
pub fn tcpshift_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer(&ctx);
    // Whether or not a socket was assigned, let the lookup go on: with an assignment the
    // kernel uses it, without one the normal lookup runs.
    sk_action::SK_PASS
}

/// Whether debug events are on (`Global::flags`): one branch, so that logging costs nothing
/// but this load and test while it is off.
#[inline(always)]
pub(crate) fn log_on(global: Option<&Global>) -> bool {
    matches!(global, Some(g) if g.flags & global_flags::LOG_DEBUG != 0)
}

/// The service listening on `local` (IPv6 or v4-mapped words, network order) port `port`:
/// the exact address first, then the wildcard.
#[inline(always)]
pub(crate) fn lookup_service(local: &[u32; 4], port: u16) -> Option<&'static ServiceEntry> {
    let mut key = ServiceKey {
        addr: [0; 16],
        port,
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let wildcard = key;
    key.addr = words_to_bytes(local);
    // SAFETY: the value is only read; userspace replaces entries as a whole.
    match unsafe { TS_SERVICES.get(key) } {
        Some(e) => Some(e),
        None => unsafe { TS_SERVICES.get(wildcard) },
    }
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
pub(crate) fn count(slot: u32, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = TS_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, the program is not preempted while it runs.
        f(unsafe { &mut *c });
    }
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

#[inline(always)]
pub(crate) fn words_to_bytes(w: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

// Keep the userspace-only map in the object.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn tcpshift_meta_anchor() -> *const core::ffi::c_void {
    core::ptr::addr_of!(TS_META).cast()
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
