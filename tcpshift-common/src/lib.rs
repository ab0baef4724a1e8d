//! Types shared by the tcpshift eBPF programs (`tcpshift-ebpf`) and the userspace side
//! (`tcpshift-user`).
//!
//! Every type stored in a BPF map is `#[repr(C)]` plain data with explicit padding, and its
//! size is checked at compile time: the kernel and userspace must agree on every byte, and a
//! pinned map created by one version must be readable by the next. Changing any of these
//! layouts requires bumping [`LAYOUT_VERSION`].
//!
//! # Maps
//!
//! This table is the one description of tcpshift's maps (docs/design.md points here). Every map
//! but `AYA_LOGS` is pinned under the namespace's state directory,
//! `/sys/fs/bpf/tcpshift/netns-<inode>/`, by its name ([`PINNED_MAPS`]).
//!
//! | map | kind | key | value | who writes |
//! |---|---|---|---|---|
//! | `TS_GLOBAL` | array, 1 entry | `0` | [`Global`]: magic, layout version, hash seed, flags (debug events), netns cookie | loader (at install; flags by `tcpshiftd --log-level`) |
//! | `TS_SERVICES` | hash, no prealloc | [`ServiceKey`]: `{addr[16], port, proto}` | [`ServiceEntry`]: id, mode, subsets, flags ([`service_flags`]: fail-closed), weights and the ranges derived from them | userspace |
//! | `TS_SOCKETS` | sockhash | [`slot`]: `id * MAX_SUBSETS + subset` | the subset's listening socket | loader (the kernel removes closed sockets) |
//! | `TS_COUNTERS` | hash, no prealloc, one value shared by all CPUs (atomic adds) | [`slot`] | [`Counters`] | the programs (userspace creates each slot's zeroed entry) |
//! | `TS_CURSORS` | array, [`MAX_SERVICES`] entries | service id | `u64`: the service's round-robin cursor, shared by all CPUs ([`mode::ROUND_ROBIN`]; atomic fetch-add by sk_lookup) | sk_lookup (never written by userspace) |
//! | `TS_META` | hash, no prealloc | service id | [`ServiceMeta`]: name, listen address, number of subsets, protocols | userspace (never read by the programs) |
//! | `TS_SUBSET_META` | hash, no prealloc | [`slot`] | [`SubsetMeta`]: a subset's name and backend address, one entry per subset in use | userspace (never read by the programs) |
//! | `TS_SOCKTAG` | sk_storage, `BPF_F_CLONE` | a socket | [`SockTag`]: a listener's slots, or a connection's slot, state and client FIN | loader (listeners), sock_ops (connections) |
//! | `TS_ROUTES` | hash, no prealloc | service id | annotation: little-endian `u16` length + up to 1 022 bytes (the Istio VirtualService a service was routed by, JSON) | `tcpshiftctl apply` (created on first use, not in the eBPF object, never read by the programs) |
//! | `TS_ROLLOUTS` | hash, no prealloc | rollout name (64 bytes, NUL-padded) | little-endian `u32` length + JSON of the rollout's spec, state and history | `tcpshiftctl rollout`, `apply` and tcpshiftd (created on first use, never read by the programs) |
//! | `TS_OWNERS` | hash, no prealloc | [`slot`] | who may serve the subset (the uid trusted at first registration), who holds its socket, refusals (`tcpshift-user` `state/owners.rs`) | the registrar: tcpshiftd and `tcpshiftctl apply` (created on first use, not in the eBPF object, never read by the programs) |
//! | `TS_OWNER_RULES` | hash, no prealloc | [`slot`] | the subset's explicit owner rule (uid, cgroup path); an entry only for a subset that has one | `tcpshiftctl apply` and tcpshiftd (created on first use, not in the eBPF object, never read by the programs) |
//! | `TS_UDP_SOCKETS` | sockhash | [`slot`] | the subset's UDP socket (a `tcp+udp` service has one in each sockhash under the same slot) | loader (the kernel removes closed sockets) |
//! | `TS_UDP_COUNTERS` | per-CPU hash | [`slot`] | [`UdpCounters`] | sk_lookup (userspace creates each UDP slot's zeroed entry) |
//! | `TS_UDP_FLOWS` | LRU hash, `max_entries` set at install | [`UdpFlowKey`]: service id, 4-tuple | [`UdpFlow`]: subset, last datagram time | sk_lookup (the kernel evicts the least recently used entry when full) |
//! | `TS_LIMITS` | hash, no prealloc | [`slot`], and [`service_summary_key`] per service | [`SlotLimits`]: connection limit, ejected (read by sk_lookup), the outlier-detection settings and ejection record | userspace (`state/limits.rs`: apply of a traffic policy, tcpshiftd's outlier loop) |
//! | `TS_LOAD` | hash, no prealloc | [`slot`], and [`service_summary_key`] per service | [`SlotLoad`]: open connections (exact, atomic), refused at the limit, diverted | the programs only (sock_ops creates the entry; userspace reads it, removes it with the service) |
//! | `AYA_LOGS` | ring buffer | — | aya-log debug events | the programs (not pinned: held by the programs) |
//!
//! **Weights are kept in one place**: [`ServiceEntry::weights`]. The ranges the data path picks
//! a subset with ([`ServiceEntry::bounds`]) are derived from them and written in the same entry;
//! everything that shows weights reads them back from the kernel.
//!
//! The data path reads `TS_SERVICES` (one or two lookups) and one `TS_SOCKETS` entry per new
//! connection, and picks the subset from the entry itself ([`choose`]): O(1) in the number of
//! services, at most [`MAX_SUBSETS`] comparisons.
//!
//! The sock_ops program (connection accounting) finds a connection's subset through
//! `TS_SOCKTAG`: userspace tags every registered listening socket with its slots, the kernel
//! clones the tag into each connection accepted from it (`BPF_F_CLONE`), and the program turns
//! the clone into the connection's own record when the connection is established.
#![no_std]

pub mod choose;

/// Magic stored in [`Global::magic`]: "tcpshift" in ASCII.
pub const MAGIC: u64 = u64::from_be_bytes(*b"tcpshift");
/// Version of the pinned map layout. Bumped on any change to a type below or to the set of maps.
pub const LAYOUT_VERSION: u32 = 6;

/// Maximum number of services per network namespace.
pub const MAX_SERVICES: u32 = 16_384;
/// Maximum number of subsets (versions) per service.
pub const MAX_SUBSETS: usize = 16;
/// Number of positions a service's hash space is divided into (granularity 1/16 384, finer
/// than 1/10 000): a connection's flow hash picks a position, and each subset owns a range of
/// positions ([`ServiceEntry::bounds`]).
pub const NUM_BUCKETS: usize = 16_384;
/// Mask applied to a flow hash to pick a position.
pub const BUCKET_MASK: u32 = NUM_BUCKETS as u32 - 1;
/// Maximum number of socket / counter slots (`MAX_SERVICES * MAX_SUBSETS`).
pub const MAX_SLOTS: u32 = MAX_SERVICES * MAX_SUBSETS as u32;
/// Maximum length of a service name, in bytes.
pub const SERVICE_NAME_LEN: usize = 64;
/// Maximum length of a subset name, in bytes.
pub const SUBSET_NAME_LEN: usize = 32;

/// Names of the maps, as declared in the eBPF object and pinned under the state directory.
pub mod map_names {
    /// See [`super::Global`].
    pub const GLOBAL: &str = "TS_GLOBAL";
    /// See [`super::ServiceEntry`].
    pub const SERVICES: &str = "TS_SERVICES";
    /// Sockets of the subsets, keyed by [`super::slot`].
    pub const SOCKETS: &str = "TS_SOCKETS";
    /// See [`super::Counters`].
    pub const COUNTERS: &str = "TS_COUNTERS";
    /// See [`super::ServiceMeta`].
    pub const META: &str = "TS_META";
    /// See [`super::SubsetMeta`].
    pub const SUBSET_META: &str = "TS_SUBSET_META";
    /// Who may serve each subset (trusted uid, holder, refusals): userspace-only, created on
    /// first use (not declared in the eBPF object, never read by the programs).
    pub const OWNERS: &str = "TS_OWNERS";
    /// Explicit owner rules of the subsets that have one: userspace-only, created on first
    /// use (not declared in the eBPF object, never read by the programs).
    pub const OWNER_RULES: &str = "TS_OWNER_RULES";
    /// See [`super::SockTag`].
    pub const SOCKTAG: &str = "TS_SOCKTAG";
    /// Per-service annotations: userspace-only, created by the first `tcpshiftctl apply` that
    /// stores one (not declared in the eBPF object).
    pub const ROUTES: &str = "TS_ROUTES";
    /// Progressive rollouts (spec, state, history as JSON): userspace-only, created by the
    /// first `tcpshiftctl rollout start` or `apply` of a `Rollout` (not declared in the eBPF
    /// object, never read by the programs).
    pub const ROLLOUTS: &str = "TS_ROLLOUTS";
    /// Round-robin cursors, one `u64` per service id ([`super::mode::ROUND_ROBIN`]).
    pub const CURSORS: &str = "TS_CURSORS";
    /// UDP sockets of the subsets, keyed by [`super::slot`].
    pub const UDP_SOCKETS: &str = "TS_UDP_SOCKETS";
    /// See [`super::UdpCounters`].
    pub const UDP_COUNTERS: &str = "TS_UDP_COUNTERS";
    /// See [`super::UdpFlow`].
    pub const UDP_FLOWS: &str = "TS_UDP_FLOWS";
    /// See [`super::SlotLimits`].
    pub const LIMITS: &str = "TS_LIMITS";
    /// See [`super::SlotLoad`].
    pub const LOAD: &str = "TS_LOAD";
    /// Every map of the eBPF object, in the order they are pinned (not [`ROUTES`] and the
    /// other maps created on first use, which are not in the object).
    pub const ALL: [&str; 13] = [
        GLOBAL,
        SERVICES,
        SOCKETS,
        COUNTERS,
        META,
        SOCKTAG,
        CURSORS,
        UDP_SOCKETS,
        UDP_COUNTERS,
        UDP_FLOWS,
        LIMITS,
        LOAD,
        SUBSET_META,
    ];
}

/// Every map name that can be pinned in a namespace's state directory: the maps of the eBPF
/// object ([`map_names::ALL`]) and those userspace creates on first use
/// ([`map_names::ROUTES`], [`map_names::ROLLOUTS`], [`map_names::OWNERS`],
/// [`map_names::OWNER_RULES`]).
pub const PINNED_MAPS: &[&str] = &[
    map_names::GLOBAL,
    map_names::SERVICES,
    map_names::SOCKETS,
    map_names::COUNTERS,
    map_names::META,
    map_names::SOCKTAG,
    map_names::ROUTES,
    map_names::ROLLOUTS,
    map_names::CURSORS,
    map_names::UDP_SOCKETS,
    map_names::UDP_COUNTERS,
    map_names::UDP_FLOWS,
    map_names::LIMITS,
    map_names::LOAD,
    map_names::SUBSET_META,
    map_names::OWNERS,
    map_names::OWNER_RULES,
];
const _: () = assert!(PINNED_MAPS.len() == map_names::ALL.len() + 4);

/// Name of the sk_lookup program in the eBPF object.
pub const PROGRAM_SK_LOOKUP: &str = "tcpshift_sk_lookup";
/// Name of the sock_ops program (connection accounting) in the eBPF object.
pub const PROGRAM_SOCK_OPS: &str = "tcpshift_sock_ops";

/// IANA protocol number of TCP, as used in [`ServiceKey::proto`].
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol number of UDP, as used in [`ServiceKey::proto`] of `udp` services.
pub const IPPROTO_UDP: u8 = 17;

/// Values of [`ServiceMeta::protocols`]: which protocols a service steers. A `tcp` or
/// `tcp+udp` service is stored under a [`ServiceKey`] with [`IPPROTO_TCP`] (the TCP path's one
/// lookup stays as it was; `tcp+udp` also sets [`service_flags::UDP`]), a `udp` service under
/// [`IPPROTO_UDP`].
pub mod protocols {
    /// The service steers TCP connections. 0 (an entry written before UDP existed) means TCP.
    pub const TCP: u8 = 1;
    /// The service steers UDP flows.
    pub const UDP: u8 = 2;
}

/// Default idle timeout of a UDP flow, in seconds ([`Global::udp_idle_secs`]): 30 s, the
/// kernel's conntrack UDP timeout (`nf_conntrack_udp_timeout`). Clients behind NAT already
/// keep flows alive more often than that, so a flow that survives their NAT survives here.
pub const DEFAULT_UDP_IDLE_SECS: u32 = 30;
/// Default number of entries of `TS_UDP_FLOWS` (about 4.5 MiB of kernel memory).
pub const DEFAULT_UDP_FLOWS: u32 = 65_536;

/// How a service picks a subset for a new connection ([`ServiceEntry::mode`], see [`choose`]).
pub mod mode {
    /// Hash of the connection's 4-tuple (the default): every new connection is placed
    /// independently, a retransmitted SYN lands in the same bucket.
    pub const HASH_CONNECTION: u8 = 0;
    /// Hash of the client address only: one client always reaches the same subset while the
    /// weights do not change (source-IP affinity). The hash is seeded by the namespace's seed
    /// (shared by a fleet) and the ranges depend on the weights only, so every host maps a
    /// client alike, and a weight change moves only the positions between the old and the new
    /// range bounds.
    pub const HASH_SOURCE_IP: u8 = 1;
    /// Exact weighted round-robin: a per-service cursor in `TS_CURSORS`, shared by all CPUs
    /// and advanced with an atomic fetch-add, gives each new connection the next position of a
    /// balanced weighted sequence of [`super::ServiceEntry::rr_period`] positions, computed
    /// from the weights ([`super::choose::round_robin`]).
    pub const ROUND_ROBIN: u8 = 2;
}

/// Bits of [`ServiceEntry::flags`].
pub mod service_flags {
    /// Fail closed: when no subset of the service has a live socket, sk_lookup refuses the
    /// connection (`SK_DROP`: the kernel answers the SYN with a RST) instead of letting the
    /// normal lookup run, so no other socket bound to the service's address can receive it.
    /// Without it (the default) such a connection sees the normal lookup, as without tcpshift.
    pub const FAIL_CLOSED: u16 = 1;
    /// A service stored under its TCP key (`protocol: tcp+udp`) that also steers UDP flows:
    /// the UDP path looks up the UDP key first, then the TCP key, and takes the TCP key's
    /// entry only when it has this bit.
    pub const UDP: u16 = 8;
}

/// Bits of [`Global::flags`].
pub mod global_flags {
    /// Emit aya-log debug events (subset chosen, fallback, miss, connection opened and
    /// closed). Off by default; `tcpshiftd --log-level debug` sets it while it runs.
    pub const LOG_DEBUG: u32 = 1;
    /// Some slot of this namespace has a connection limit or is ejected (`TS_LIMITS` has an
    /// entry that matters): only then does sk_lookup look candidates up in `TS_LIMITS`, so a
    /// namespace without limits pays one bit test per connection.
    pub const LIMITS: u32 = 2;
    /// A measurement switch, never set in normal operation: new connections do not ask for
    /// the failure signals' callbacks (retransmission timeouts, the header callback that sees
    /// a reset after an abort), so that the benchmark can compare the programs' cost with and
    /// without them. Set only by tcpshiftd's hidden `--measure-without-signals`.
    pub const NO_SIGNALS: u32 = 4;
}

/// Settings for the whole namespace (`TS_GLOBAL[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Global {
    /// Always [`MAGIC`] once initialised.
    pub magic: u64,
    /// [`LAYOUT_VERSION`] of whoever created the maps.
    pub layout_version: u32,
    /// Seed mixed into every flow hash, chosen at install time.
    pub hash_seed: u32,
    /// See [`global_flags`].
    pub flags: u32,
    /// Idle timeout of a UDP flow, in seconds: a flow whose last datagram is older chooses
    /// its subset again. 0 means [`DEFAULT_UDP_IDLE_SECS`].
    pub udp_idle_secs: u32,
    /// Cookie of the network namespace this state belongs to (`SO_NETNS_COOKIE`). The sock_ops
    /// program is attached to the cgroup v2 root and sees every socket of the host: it ignores
    /// every socket whose namespace cookie differs.
    pub netns_cookie: u64,
}

/// Key of `TS_SERVICES`: where a service listens.
///
/// `addr` is an IPv6 address (IPv4 as `::ffff:a.b.c.d`); all zeros means "any local address".
/// The data path first looks up the exact destination address, then the wildcard.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Destination address, network byte order.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// [`IPPROTO_TCP`] (or, later, [`IPPROTO_UDP`]).
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}

/// Value of `TS_SERVICES`: everything the data path needs to steer one service.
///
/// Written by userspace as one map update, which is what makes a weight change atomic: the
/// weights and the ranges derived from them are in this one value, which the kernel replaces
/// as a whole (a no-prealloc hash map links the new element in place of the old one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Service id: index of its slots in `TS_SOCKETS`/`TS_COUNTERS` and key in `TS_META`.
    pub id: u32,
    /// [`mode::ROUND_ROBIN`]: length of the weighted sequence, the sum of the weights (the
    /// cursor is taken modulo this). 0 in the other modes.
    pub rr_period: u32,
    /// Selection mode, see [`mode`].
    pub mode: u8,
    /// Number of subsets in use (indices `0..n_subsets`).
    pub n_subsets: u8,
    /// Per-service options, see [`service_flags`] (0: none).
    pub flags: u16,
    /// Bit `i` set when subset `i` has a weight above zero (fallback order).
    pub weighted_mask: u32,
    /// Relative weight of each subset: the source of truth for weights.
    pub weights: [u32; MAX_SUBSETS],
    /// The hash modes' ranges: subset `i` owns the positions `bounds[i - 1] .. bounds[i]` of
    /// the [`NUM_BUCKETS`] positions (`0 .. bounds[0]` for subset 0), each as many as the
    /// weights give it (largest remainder); the last subset with a weight ends at
    /// [`NUM_BUCKETS`], a subset without weight owns an empty range. Derived from `weights`
    /// by userspace and written with them.
    pub bounds: [u16; MAX_SUBSETS],
    /// The order in which the data path tries the other subsets when the chosen one has no
    /// live socket: subsets with a weight above 0 first, then the rest, each group by index
    /// (entries `0..n_subsets`; computed by userspace so that the program walks a list).
    pub fallback_order: [u8; MAX_SUBSETS],
}

/// Per-subset counters (`TS_COUNTERS`): one value shared by all CPUs, every field changed
/// only by atomic adds (the recent ring also by compare-and-exchange, see [`RecentSecond`]).
/// They count per-connection events, not packets, so sharing costs a few locked adds per
/// connection and the map's memory does not grow with the number of CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// New connections whose hash chose this subset.
    pub chosen: u64,
    /// New connections assigned to this subset's socket (chosen here or by fallback).
    pub steered: u64,
    /// Connections assigned here because the chosen subset had no live socket.
    pub fallback_in: u64,
    /// Connections that chose this subset but had to go elsewhere (no live socket).
    pub fallback_out: u64,
    /// Connections refused because no subset had a live socket: SYN lookups for which the
    /// chosen subset (counted here) and every fallback had no listening socket (sk_lookup).
    /// The lookup then goes on without an assignment, so the kernel answers the SYN with a RST
    /// (a refused SYN is not retransmitted: one count per connection) — unless some other
    /// socket listens on the service's own address, which tcpshift does not know.
    pub misses: u64,
    /// Connections established on this subset's socket through the service address (sock_ops).
    pub opened: u64,
    /// Of those, connections closed (sock_ops). Active connections: `opened - closed`.
    pub closed: u64,
    /// Payload bytes received from clients by connections that are closed (FIN excluded).
    pub bytes_received: u64,
    /// Payload bytes sent to clients and acknowledged by connections that are closed.
    pub bytes_sent: u64,
    /// Closed connections reset by the backend: its socket went from an open state
    /// (ESTABLISHED, CLOSE_WAIT, FIN_WAIT1) straight to CLOSE and then sent a RST — the server
    /// closed with unread data, with `SO_LINGER` 0, or shut down. A RST received from the
    /// client is not counted.
    pub reset_by_backend: u64,
    /// Closed connections the backend closed first (its FIN before the client's) without a
    /// payload byte acknowledged by the client: "closed without a reply".
    pub closed_without_reply: u64,
    /// Retransmission timeouts on this subset's connections (`BPF_SOCK_OPS_RTO_CB`, one per
    /// expiry of the timer, so one connection can count several).
    pub retransmit_timeouts: u64,
    /// Connections steered here in each of the last [`RECENT_SECONDS`] seconds, a ring indexed
    /// by `second % RECENT_SECONDS` (seconds of `CLOCK_MONOTONIC_COARSE`): the observed share
    /// of new connections over the last seconds, without any sampling by userspace.
    pub recent: [RecentSecond; RECENT_SECONDS],
    /// Smoothed RTT of closed connections at close, a log2 histogram: see [`srtt_bucket`].
    /// `u32` counts (wrapping after 4 294 967 295 connections in one bucket); readers widen
    /// them to `u64`.
    pub srtt_histogram: [u32; SRTT_BUCKETS],
}

/// Number of buckets of [`Counters::srtt_histogram`].
pub const SRTT_BUCKETS: usize = 16;

/// The [`Counters::srtt_histogram`] bucket of a smoothed RTT of `srtt_us` microseconds:
/// bucket 0 holds RTTs below 32 µs, bucket `b` in `1..15` those in `[2^(b+4), 2^(b+5))` µs
/// (bucket 1: 32–63 µs, bucket 10: 16.4–32.8 ms), bucket 15 those from 2^19 µs (524 ms) up.
#[inline(always)]
pub const fn srtt_bucket(srtt_us: u32) -> usize {
    let mut v = srtt_us >> 5;
    if v == 0 {
        return 0;
    }
    // 1 + floor(log2(v)), by halving steps the verifier sees as straight-line code.
    let mut b = 1;
    if v >= 1 << 16 {
        v >>= 16;
        b += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        b += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        b += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        b += 2;
    }
    if v >= 1 << 1 {
        b += 1;
    }
    if b > SRTT_BUCKETS - 1 {
        SRTT_BUCKETS - 1
    } else {
        b
    }
}

/// Lower bound, in microseconds, of [`Counters::srtt_histogram`] bucket `bucket` (0 for
/// bucket 0); the bucket's upper bound is the next bucket's lower bound.
pub const fn srtt_bucket_floor_us(bucket: usize) -> u32 {
    if bucket == 0 { 0 } else { 1 << (bucket + 4) }
}

/// Length of the [`Counters::recent`] ring, in seconds.
pub const RECENT_SECONDS: usize = 16;

/// One second of [`Counters::recent`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecentSecond {
    /// The second (`CLOCK_MONOTONIC_COARSE` / 10⁹, truncated to 32 bits) these counts are for;
    /// an entry whose second is not the one asked for is stale and counts 0.
    pub second: u32,
    /// Connections steered to the subset during that second.
    pub steered: u32,
}

impl RecentSecond {
    /// Adding this to the entry read as one little-endian `u64` counts one connection:
    /// `second` is its low half, `steered` its high half (a wrap of `steered` carries out
    /// of the word, never into `second`). The programs update the shared entry this way
    /// (`tcpshift-ebpf` `atomic.rs`).
    pub const ONE_STEERED: u64 = 1 << 32;

    /// The entry read as one little-endian `u64` word: `second | steered << 32`.
    #[inline(always)]
    pub const fn from_word(word: u64) -> Self {
        Self {
            second: word as u32,
            steered: (word >> 32) as u32,
        }
    }

    /// This entry as one `u64` word: `second | steered << 32` (see [`Self::from_word`]).
    #[inline(always)]
    pub const fn to_word(self) -> u64 {
        self.second as u64 | (self.steered as u64) << 32
    }
}

/// Number of slots one listening socket can be tagged with (one per service using it).
pub const MAX_LISTENER_SLOTS: usize = 8;
/// Unused entry of [`SockTag::listener_slots`].
pub const NO_SLOT: u32 = u32::MAX;

/// What a [`SockTag`] describes ([`SockTag::kind`]).
pub mod tag {
    /// A registered listening socket (or a connection accepted from one that tcpshift does not
    /// account, e.g. one made directly to the backend's own address).
    pub const LISTENER: u32 = 1;
    /// An open connection of [`super::SockTag::slot`], counted in `opened`.
    pub const OPEN: u32 = 2;
    /// The connection is being closed: its bytes are being added to the counters.
    pub const CLOSING: u32 = 3;
    /// The connection is closed and accounted in `closed` and the byte counters.
    pub const CLOSED: u32 = 4;
}

/// Bits of [`SockTag::flags`].
pub mod tag_flags {
    /// A FIN from the client was seen; [`super::SockTag::fin_seq`] is its sequence number.
    pub const FIN_SEEN: u32 = 1;
    /// The server closed first (the socket entered FIN_WAIT1 before the client's FIN).
    pub const SERVER_CLOSED_FIRST: u32 = 2;
    /// The socket went from an open state straight to CLOSE: a RST it sends next is counted
    /// in [`super::Counters::reset_by_backend`] (the flag is cleared by the first packet).
    pub const WATCH_RESET: u32 = 4;
    /// The connection was counted in its slot's [`super::SlotLoad::open`]: its close takes it
    /// off again (and only then, so no connection is taken off twice or without being added).
    pub const OPEN_COUNTED: u32 = 8;
}

/// Value of `TS_SOCKTAG`, a socket-local storage (`BPF_MAP_TYPE_SK_STORAGE` with
/// `BPF_F_CLONE`).
///
/// Userspace writes it on every listening socket it registers, with the slots the socket serves
/// ([`tag::LISTENER`]). The kernel copies it into every connection accepted from that listener;
/// when such a connection is established through a service address, the sock_ops program finds
/// the slot of that service in the copy and turns it into the connection's record
/// ([`tag::OPEN`], then [`tag::CLOSING`], [`tag::CLOSED`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockTag {
    /// See [`tag`].
    pub kind: u32,
    /// Connection: its slot.
    pub slot: u32,
    /// Connection: sequence number of the client's FIN, when [`tag_flags::FIN_SEEN`].
    pub fin_seq: u32,
    /// See [`tag_flags`].
    pub flags: u32,
    /// Listener: the slots it is registered for, [`NO_SLOT`] when unused. At most one slot per
    /// service.
    pub listener_slots: [u32; MAX_LISTENER_SLOTS],
}

impl Default for SockTag {
    fn default() -> Self {
        Self {
            kind: tag::LISTENER,
            slot: NO_SLOT,
            fin_seq: 0,
            flags: 0,
            listener_slots: [NO_SLOT; MAX_LISTENER_SLOTS],
        }
    }
}

/// Value of `TS_SUBSET_META`, keyed by [`slot`]: one subset's static description, an entry
/// for each subset in use of a service ([`ServiceMeta::n_subsets`]). Never read by the data
/// path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubsetMeta {
    /// Name, NUL-padded UTF-8.
    pub name: [u8; SUBSET_NAME_LEN],
    /// Backend address (IPv4 as `::ffff:a.b.c.d`), network byte order.
    pub addr: [u8; 16],
    /// Backend port, host byte order.
    pub port: u16,
    /// 4 or 6: the family the backend address was written in.
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 5],
}

/// Value of `TS_META`: what userspace needs to show and re-register a service, with the
/// [`SubsetMeta`] entries of its subsets in `TS_SUBSET_META`. Never read by the data path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    /// Service name, NUL-padded UTF-8.
    pub name: [u8; SERVICE_NAME_LEN],
    /// The `TS_SERVICES` key this service is stored under.
    pub key: ServiceKey,
    /// 0 when listening on any address, otherwise 4 or 6.
    pub listen_family: u8,
    /// Number of subsets: `TS_SUBSET_META` holds the entries of slots `0..n_subsets` of this
    /// service, indices matching [`ServiceEntry::weights`].
    pub n_subsets: u8,
    /// See [`protocols`] (0 means TCP only).
    pub protocols: u8,
    /// Explicit padding.
    pub _pad: u8,
}

/// Why a subset was ejected ([`SlotLimits::reason`]).
pub mod eject_reason {
    /// Not ejected (or never was).
    pub const NONE: u32 = 0;
    /// `consecutiveGatewayErrors` connection errors in a row (resets by the backend, closes
    /// without a reply, refused, retransmission timeouts).
    pub const GATEWAY_ERRORS: u32 = 1;
    /// `consecutive5xxErrors` errors in a row (for TCP: the same errors).
    pub const ERRORS_5XX: u32 = 2;
}

/// Value of `TS_LIMITS`: a slot's connection limit and outlier state.
///
/// Written by userspace only, as a whole (applying a traffic policy, the outlier loop); the
/// sk_lookup program reads [`SlotLimits::max_connections`] and [`SlotLimits::ejected`] of a
/// candidate subset. A slot without an entry has no limit and is never ejected. The open
/// connections the limit is compared with live in another map, [`SlotLoad`], which only the
/// programs write (a whole-value update from userspace would lose their increments).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotLimits {
    /// Most open connections (`connectionPool.tcp.maxConnections`); 0: no limit.
    pub max_connections: u32,
    /// 1 while the subset is ejected: it gets no new connection (open ones stay).
    pub ejected: u32,
    /// Outlier detection: errors in a row that eject (0: outlier detection off).
    pub consecutive_errors: u32,
    /// Outlier detection: the most subsets of the service ejected at once, in percent.
    pub max_ejection_percent: u32,
    /// Outlier detection: how often the failure counters are read, in milliseconds.
    pub interval_ms: u32,
    /// Outlier detection: the first ejection's length, in milliseconds (× times ejected).
    pub base_ejection_ms: u32,
    /// How many times the subset was ejected (the ejection's length is `base × times`).
    pub times_ejected: u32,
    /// Why it was ejected last: see [`eject_reason`].
    pub reason: u32,
    /// When the last ejection began, milliseconds since the Unix epoch (0: never).
    pub ejected_at_ms: u64,
    /// When the current ejection ends, milliseconds since the Unix epoch.
    pub eject_until_ms: u64,
    /// Errors in a row counted so far (reset by a connection that went well).
    pub errors_in_row: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// Explicit padding (room for later fields).
    pub _reserved: u64,
}

/// Value of `TS_LOAD`: a slot's load, written by the programs only with atomic adds (one
/// value shared by all CPUs, so the count is exact whatever CPU a connection opens or closes
/// on).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotLoad {
    /// Open connections: +1 at `PASSIVE_ESTABLISHED`, -1 at close (sock_ops). Read as `i64`
    /// and clamped at 0 (a slot reused while connections of its previous service close).
    pub open: u64,
    /// New connections refused because every subset of the service was full or ejected
    /// (counted on the subset the hash chose; sk_lookup).
    pub refused: u64,
    /// New connections that chose this subset but were passed over because it was full or
    /// ejected: they went to another subset, or were refused (sk_lookup).
    pub diverted: u64,
    /// Explicit padding.
    pub _pad: u64,
}

/// Key of a service's summary entry in `TS_LIMITS` and `TS_LOAD` (after every slot key).
///
/// The sk_lookup program reads these two entries once per connection instead of one entry
/// per candidate subset (the fallback loop is unrolled and the verifier's budget is tight):
/// - in `TS_LIMITS` (written by userspace with the slots' entries): `ejected` is the mask of
///   ejected subsets, `max_connections` the mask of subsets with a limit;
/// - in `TS_LOAD` (written by sock_ops): the 16 bytes of `open` and `refused` are one byte per
///   subset, 1 while the subset's open connections are at its limit ([`full_mask`]).
#[inline(always)]
pub const fn service_summary_key(id: u32) -> u32 {
    MAX_SLOTS + id
}

/// The mask of full subsets from the two words of a summary `TS_LOAD` entry: byte `i`
/// (little-endian, 0 or 1) becomes bit `i`, without a branch.
#[inline(always)]
pub const fn full_mask(lo: u64, hi: u64) -> u32 {
    const GATHER: u64 = 0x0102_0408_1020_4080;
    ((lo.wrapping_mul(GATHER) >> 56) | ((hi.wrapping_mul(GATHER) >> 56) << 8)) as u32
}

/// Slot of subset `subset` of service `id` in `TS_SOCKETS` and `TS_COUNTERS`.
#[inline(always)]
pub const fn slot(id: u32, subset: u32) -> u32 {
    id * MAX_SUBSETS as u32 + subset
}

/// Subset index of a slot (inverse of [`slot`], with [`slot_service`]).
#[inline(always)]
pub const fn slot_subset(slot: u32) -> u32 {
    slot % MAX_SUBSETS as u32
}

/// Service id of a slot (inverse of [`slot`]).
#[inline(always)]
pub const fn slot_service(slot: u32) -> u32 {
    slot / MAX_SUBSETS as u32
}

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Flow hash (MurmurHash3 mixing of 32-bit words) of up to ten words.
///
/// The data path hashes `[remote addr (4 words), local addr (4 words), remote port, local
/// port]` for [`mode::HASH_CONNECTION`] and only the remote address for
/// [`mode::HASH_SOURCE_IP`]; userspace uses the same function in tests and benchmarks.
#[inline(always)]
pub const fn flow_hash(seed: u32, words: &[u32; 10], n: usize) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < 10 {
        if i < n {
            h = mix(h, words[i]);
        }
        i += 1;
    }
    finish(h ^ (n as u32 * 4))
}

/// Key of `TS_UDP_FLOWS`: one UDP flow of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    /// Remote (client) address, IPv6 or v4-mapped, four network-order words.
    pub remote: [u32; 4],
    /// Local (service) address, likewise.
    pub local: [u32; 4],
    /// Remote port, host byte order.
    pub remote_port: u16,
    /// Local port, host byte order.
    pub local_port: u16,
    /// Service id.
    pub id: u32,
}

/// Value of `TS_UDP_FLOWS`: the subset a flow is pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFlow {
    /// Subset index.
    pub subset: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// `CLOCK_MONOTONIC_COARSE` time of the flow's last datagram, in nanoseconds.
    pub last_seen_ns: u64,
}

/// Per-subset counters of a UDP service (`TS_UDP_COUNTERS`, one per CPU, summed by
/// userspace).
///
/// Flow table entries are written only by the program and removed only by the kernel's LRU,
/// so the evictions of a subset are `inserted - retired - (entries of the subset now in
/// the table)`, computed by userspace when it reads the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Flows that chose this subset: first datagrams of new flows, and datagrams of flows
    /// idle for longer than the timeout (they choose again).
    pub flows: u64,
    /// Datagrams assigned to this subset's socket.
    pub datagrams: u64,
    /// Flows moved here because their subset had no live socket (counted once per flow: the
    /// flow stays here).
    pub fallback_in: u64,
    /// Flows moved away from this subset because it had no live socket.
    pub fallback_out: u64,
    /// Datagrams for this subset dropped to the normal lookup because no subset had a live
    /// socket.
    pub misses: u64,
    /// Flow table entries written with this subset (new keys).
    pub inserted: u64,
    /// Flow table entries of this subset given to another subset (idle flow choosing
    /// again, or fallback).
    pub retired: u64,
    /// Flows whose entry had expired (idle longer than the timeout) when a datagram came.
    pub expired: u64,
}

macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
assert_size!(Global, 32);
assert_size!(ServiceKey, 20);
assert_size!(
    ServiceEntry,
    16 + 4 * MAX_SUBSETS + 2 * MAX_SUBSETS + MAX_SUBSETS
);
assert_size!(RecentSecond, 8);
// The programs update a ring entry as one word (`RecentSecond::to_word`): its memory must be
// that word, second in the low half.
#[cfg(target_endian = "little")]
const _: () = {
    let r = RecentSecond {
        second: 0x0102_0304,
        steered: 0x0a0b_0c0d,
    };
    // SAFETY: `RecentSecond` is two `u32`s without padding, 8 bytes (asserted above).
    let word = unsafe { core::mem::transmute::<RecentSecond, u64>(r) };
    assert!(word == r.to_word() && word == 0x0a0b_0c0d_0102_0304);
    let back = RecentSecond::from_word(word);
    assert!(back.second == r.second && back.steered == r.steered);
};
assert_size!(Counters, 96 + 8 * RECENT_SECONDS + 4 * SRTT_BUCKETS);
const _: () = assert!(core::mem::size_of::<Counters>().is_multiple_of(16));
assert_size!(SubsetMeta, 56);
assert_size!(ServiceMeta, 64 + 20 + 4);
assert_size!(SockTag, 16 + 4 * MAX_LISTENER_SLOTS);
assert_size!(UdpFlowKey, 40);
assert_size!(UdpFlow, 16);
assert_size!(UdpCounters, 64);
assert_size!(SlotLimits, 64);
assert_size!(SlotLoad, 32);
const _: () = assert!(MAX_SUBSETS <= 32, "weighted_mask is a u32");
const _: () = assert!(
    srtt_bucket(0) == 0
        && srtt_bucket(31) == 0
        && srtt_bucket(32) == 1
        && srtt_bucket(63) == 1
        && srtt_bucket(64) == 2
        && srtt_bucket(20_000) == 10
        && srtt_bucket((1 << 19) - 1) == 14
        && srtt_bucket(1 << 19) == 15
        && srtt_bucket(u32::MAX) == 15
        && srtt_bucket_floor_us(10) <= 20_000
        && srtt_bucket_floor_us(11) > 20_000
);
const _: () = assert!(
    NUM_BUCKETS.is_power_of_two() && NUM_BUCKETS >= 10_000 && NUM_BUCKETS <= u16::MAX as usize
);
const _: () = assert!(
    full_mask(0x0100_0000_0000_0001, 0x0001_0000_0000_0100) == 0x4000 | 0x0200 | 0x0080 | 1
        && full_mask(0, 0) == 0
        && full_mask(0x0101_0101_0101_0101, 0x0101_0101_0101_0101) == 0xffff
);
const _: () = assert!(MAX_SLOTS as u64 + MAX_SERVICES as u64 <= u32::MAX as u64);

#[cfg(feature = "user")]
mod user {
    use super::*;

    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: #[repr(C)], only integer fields and arrays of them, no implicit padding
            // (sizes are asserted above), every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
            // SAFETY: as above.
            unsafe impl bytemuck::Zeroable for $t {}
            // SAFETY: as above.
            unsafe impl bytemuck::Pod for $t {}
        )*};
    }
    pod!(
        Global,
        ServiceKey,
        ServiceEntry,
        Counters,
        RecentSecond,
        SubsetMeta,
        ServiceMeta,
        SockTag,
        UdpFlowKey,
        UdpFlow,
        UdpCounters,
        SlotLimits,
        SlotLoad
    );
}
