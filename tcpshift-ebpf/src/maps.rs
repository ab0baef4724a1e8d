//! Every map of the eBPF object, and the helpers the programs use to read and write them.
//!
//! What each map holds, its key and value types and who writes it are documented once, in
//! `tcpshift-common` (crate docs, "Maps"); the declarations here must match that table.

use core::{
    ffi::c_void,
    ptr::{addr_of, null_mut},
};

use aya_ebpf::{
    bindings::{BPF_F_CLONE, BPF_F_NO_PREALLOC, bpf_map_type, bpf_sock},
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap, SockHash},
};
use tcpshift_common::{
    Counters, DEFAULT_UDP_FLOWS, Global, IPPROTO_TCP, MAX_SERVICES, MAX_SLOTS, ServiceEntry,
    ServiceKey, ServiceMeta, SlotLimits, SlotLoad, SockTag, SubsetMeta, UdpCounters, UdpFlow,
    UdpFlowKey, global_flags,
};

#[map(name = "TS_GLOBAL")]
pub(crate) static TS_GLOBAL: Array<Global> = Array::with_max_entries(1, 0);

#[map(name = "TS_SERVICES")]
static TS_SERVICES: HashMap<ServiceKey, ServiceEntry> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Round-robin cursors, one per service id, shared by all CPUs (`mode::ROUND_ROBIN`).
#[map(name = "TS_CURSORS")]
pub(crate) static TS_CURSORS: Array<u64> = Array::with_max_entries(MAX_SERVICES, 0);

#[map(name = "TS_SOCKETS")]
pub(crate) static TS_SOCKETS: SockHash<u32> = SockHash::with_max_entries(MAX_SLOTS, 0);

/// Connection counters per slot, one value shared by all CPUs (updated only atomically).
#[map(name = "TS_COUNTERS")]
static TS_COUNTERS: HashMap<u32, Counters> =
    HashMap::with_max_entries(MAX_SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "TS_UDP_SOCKETS")]
pub(crate) static TS_UDP_SOCKETS: SockHash<u32> = SockHash::with_max_entries(MAX_SLOTS, 0);

#[map(name = "TS_UDP_COUNTERS")]
static TS_UDP_COUNTERS: PerCpuHashMap<u32, UdpCounters> =
    PerCpuHashMap::with_max_entries(MAX_SLOTS, BPF_F_NO_PREALLOC);

/// The UDP flow table; the loader sets its size at install (`max_entries`).
#[map(name = "TS_UDP_FLOWS")]
pub(crate) static TS_UDP_FLOWS: LruHashMap<UdpFlowKey, UdpFlow> =
    LruHashMap::with_max_entries(DEFAULT_UDP_FLOWS, 0);

/// Connection limits and ejections per slot (userspace writes, sk_lookup reads).
#[map(name = "TS_LIMITS")]
pub(crate) static TS_LIMITS: HashMap<u32, SlotLimits> =
    HashMap::with_max_entries(MAX_SLOTS + MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Open connections per slot, shared by all CPUs (the programs write it with atomic adds).
#[map(name = "TS_LOAD")]
pub(crate) static TS_LOAD: HashMap<u32, SlotLoad> =
    HashMap::with_max_entries(MAX_SLOTS + MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Userspace-only description of each service; declared here so that it is created, pinned
/// and versioned together with the maps the data path uses.
#[map(name = "TS_META")]
static TS_META: HashMap<u32, ServiceMeta> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Userspace-only description of each subset in use, keyed by slot (like `TS_META`, declared
/// here to be created, pinned and versioned with the other maps).
#[map(name = "TS_SUBSET_META")]
static TS_SUBSET_META: HashMap<u32, SubsetMeta> =
    HashMap::with_max_entries(MAX_SLOTS, BPF_F_NO_PREALLOC);

/// BTF definition of `TS_SOCKTAG`: socket-local storage, cloned into accepted connections.
/// (aya-ebpf's `SkStorage` has no `BPF_F_CLONE`; this is the same layout with the flag.)
#[repr(C)]
pub(crate) struct SockTagStorage {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SockTag,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced.
unsafe impl Sync for SockTagStorage {}

#[btf_map(name = "TS_SOCKTAG")]
static TS_SOCKTAG: SockTagStorage = SockTagStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// `AF_INET` in the programs' contexts' `family` fields.
pub(crate) const AF_INET: u32 = 2;

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
    lookup_service_proto(local, port, IPPROTO_TCP)
}

/// [`lookup_service`] for the services stored under protocol `proto`.
#[inline(always)]
pub(crate) fn lookup_service_proto(
    local: &[u32; 4],
    port: u16,
    proto: u8,
) -> Option<&'static ServiceEntry> {
    let mut key = ServiceKey {
        addr: [0; 16],
        port,
        proto,
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

/// Updates the counters of `slot` with `f` (nothing if userspace has not created them: it
/// does when it registers the subset). The value is shared by all CPUs: `f` changes it only
/// with the atomic updates of `atomic.rs` (`add!(c.field, n)`).
#[inline(always)]
pub(crate) fn count(slot: u32, f: impl FnOnce(*mut Counters)) {
    if let Some(c) = TS_COUNTERS.get_ptr_mut(slot) {
        f(c);
    }
}

/// Updates this CPU's UDP counters of `slot` with `f` (nothing if userspace has not created
/// them).
#[inline(always)]
pub(crate) fn count_udp(slot: u32, f: impl FnOnce(&mut UdpCounters)) {
    if let Some(c) = TS_UDP_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, the program is not preempted while it runs.
        f(unsafe { &mut *c });
    }
}

/// The `TS_SOCKTAG` storage of the full socket `sk`, if it has one (never creates it).
#[inline(always)]
pub(crate) fn socktag(sk: *mut bpf_sock) -> Option<*mut SockTag> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: a full socket from the context; no value to insert, no flags.
    let p = unsafe {
        bpf_sk_storage_get(
            addr_of!(TS_SOCKTAG).cast_mut().cast::<c_void>(),
            sk.cast::<c_void>(),
            null_mut(),
            0,
        )
    }
    .cast::<SockTag>();
    if p.is_null() { None } else { Some(p) }
}

/// An address as four network-order words to the 16 bytes of a [`ServiceKey`].
#[inline(always)]
fn words_to_bytes(w: &[u32; 4]) -> [u8; 16] {
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

// Keep the userspace-only map of subsets in the object.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn tcpshift_subset_meta_anchor() -> *const core::ffi::c_void {
    core::ptr::addr_of!(TS_SUBSET_META).cast()
}
