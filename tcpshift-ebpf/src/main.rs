//! tcpshift's data path: an sk_lookup program that steers each new TCP connection to a
//! service port onto the listening socket of one of the service's subsets, chosen by weight.
//!
//! For every socket lookup in the network namespace:
//! 1. not TCP, or destination not a configured service (exact address, then any address):
//!    `SK_PASS` without selecting anything — the normal lookup runs;
//! 2. hash the connection, take the bucket `hash & BUCKET_MASK` of the service's active
//!    bucket table: that is the chosen subset;
//! 3. assign the chosen subset's socket; if it has none (its server exited and the kernel removed
//!    the socket from the map), try the other subsets — weighted ones first, then any — and
//!    count a fallback; if none is alive, count a miss and let the normal lookup run.
//!
//! And a sock_ops program (`sock_ops.rs`), attached to the cgroup v2 root, that accounts the
//! connections established on the subsets' sockets: opened, closed, bytes.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program;
#[cfg(target_arch = "bpf")]
mod sock_ops;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("tcpshift-ebpf only builds for the BPF target: run `cargo xtask build`");
}
