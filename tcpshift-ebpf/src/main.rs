//! tcpshift's eBPF programs, built for `bpfel-unknown-none` and embedded in `tcpshiftd`.
//!
//! - `sk_lookup`: steers each new TCP connection to a service port onto the listening socket
//!   of one of the service's subsets, chosen by weight.
//! - `sock_ops`: attached to the cgroup v2 root, accounts the connections established on the
//!   subsets' sockets (opened, closed, bytes).
//! - `udp`: the UDP path of `sk_lookup`: each datagram of a flow to the subset the flow
//!   started on (the flow table), new flows by weight.
//! - `limits`: connection limits and outlier ejections on the per-connection path (open
//!   connections counted exactly per subset, full or ejected subsets skipped).
//! - `opaque`: the chosen subset's index as the verifier should see it (one state, not one
//!   per possible index).
//! - `maps`: the maps both programs share and the helpers that read and write them. What
//!   each map holds, and who writes it, is documented once, in `tcpshift-common`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The round-robin cursor, `limits.rs`'s open-connection count and the shared counters
// (`atomic.rs`) need atomic adds:
// `AtomicU64::fetch_add` is not available on bpfel-unknown-none, the intrinsic (BPF_ATOMIC,
// with BPF_FETCH for the cursor: kernel >= 5.12) is.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod atomic;
#[cfg(target_arch = "bpf")]
mod limits;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod opaque;
#[cfg(target_arch = "bpf")]
mod sk_lookup;
#[cfg(target_arch = "bpf")]
mod sock_ops;
#[cfg(target_arch = "bpf")]
mod udp;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("tcpshift-ebpf only builds for the BPF target: run `cargo xtask build`");
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
