//! Kernel memory per service (issue 15): 10 000 two-subset services, each with its two
//! listening sockets registered, a connection through each subset and a weight change, cost
//! at most 2 KiB of kernel memory each, by the kernel's own accounting (`memlock` of every
//! pinned map, which for a hash map without preallocation counts the elements it holds).
//!
//! The test works in a network namespace of its own thread (`unshare(CLONE_NEWNET)`) and
//! drives the library directly, as the benchmark's `populate` does: registering 20 000
//! sockets through tcpshiftd's `/proc` scan would take far longer and measure the same maps.

use std::{
    collections::BTreeMap,
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    path::Path,
    process::Command,
    time::Duration,
};

use tcpshift::{
    config::Config,
    model::Weights,
    netns::Netns,
    state::{OwnerCheck, SocketHolder, State, state_dir},
};
use tcpshift_tests::{privileged, scaled};

/// Services in the measurement.
const SERVICES: u32 = 10_000;
/// The goal: bytes of kernel memory per two-subset service.
const GOAL_BYTES: u64 = 2048;
/// Services applied per `apply` call (the benchmark's chunk).
const CHUNK: usize = 250;

/// `memlock` of every map pinned in `dir`, by name (links and programs are skipped).
fn memlock(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).expect("read the state directory") {
        let path = entry.expect("a state directory entry").path();
        // A pinned link refuses the read-only flag: not a map, skipped.
        let Ok(fd) = tcpshift::state::open_pinned_read_only(&path) else {
            continue;
        };
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
            .expect("read the map's fdinfo");
        if !info.lines().any(|l| l.starts_with("map_type:")) {
            continue;
        }
        let bytes = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no memlock in the fdinfo of {}: {info}", path.display()));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        out.insert(name.unwrap_or_default(), bytes);
    }
    out
}

/// Services sharing one pair of backend sockets: as many as a listener's tag has room for
/// (`tcpshift_common::MAX_LISTENER_SLOTS`), so that every connection is accounted, with
/// 2 500 listening sockets instead of 20 000 (the test process may open 20 000 files at most).
const PER_BACKEND: u32 = tcpshift_common::MAX_LISTENER_SLOTS as u32;

/// The backend port of service `i`.
fn backend_port(i: u32) -> u16 {
    10_000 + (i / PER_BACKEND) as u16
}

/// The configuration of services `0..n`: service `i` listens on 127.0.0.1:(20000 + i), its subsets on
/// 127.0.1.1 and 127.0.2.1 port [`backend_port`], round-robin so that two connections reach
/// both.
fn config(n: u32, v1: u32, v2: u32) -> String {
    let mut yaml = String::from("services:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  s{i}:\n    listen: 127.0.0.1:{}\n    balance: round-robin\n    subsets: \
             {{v1: 127.0.1.1:{p}, v2: 127.0.2.1:{p}}}\n    weights: {{v1: {v1}, v2: {v2}}}\n",
            20_000 + i,
            p = backend_port(i),
        ));
    }
    yaml
}

/// Applies `path`'s services in chunks, retrying a chunk while the kernel's element caches
/// refill (see the benchmark's `populate`).
fn apply(state: &mut State, path: &Path) {
    let config = Config::from_file(path).expect("the generated configuration parses");
    for chunk in config.services.chunks(CHUNK) {
        let mut attempts = 0;
        while let Err(e) = state.apply(chunk, Weights::FromConfig) {
            attempts += 1;
            assert!(attempts < 100, "cannot apply: {e:#}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Accepts one connection on `listener`, waiting for it with poll(2).
fn accept_one(listener: &TcpListener, service: u32, subset: &str) {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = scaled(Duration::from_secs(5)).as_millis() as i32;
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, timeout) };
    assert_eq!(
        ready, 1,
        "service s{service}: no connection reached {subset}"
    );
    listener
        .accept()
        .unwrap_or_else(|e| panic!("service s{service}: accept on {subset}: {e}"));
}

/// Applies `path`'s services (50/50), registers every missing socket as tcpshiftd does (with
/// the holder's owner record) and makes two connections to each service not yet connected
/// (`connected` of them are): round-robin 50/50 sends the first to v1, the second to v2.
fn populate(
    state: &mut State,
    path: &Path,
    listeners: &[(TcpListener, TcpListener)],
    connected: &mut u32,
) {
    apply(state, path);
    let holder = SocketHolder {
        uid: 0,
        pid: std::process::id() as i32,
        comm: "memory".into(),
        inode: 0,
        cgroup: None,
    };
    let missing = state.missing_sockets().expect("missing sockets");
    let n = missing.len();
    let mut registered = 0;
    for m in missing {
        let (v1, v2) = &listeners[usize::from(m.backend.port() - 10_000)];
        let l = if m.index == 0 { v1 } else { v2 };
        let check = state
            .register_owned_socket(&m, l.as_fd(), &holder)
            .expect("register");
        if matches!(check, OwnerCheck::Registered { .. }) {
            registered += 1;
        }
    }
    assert_eq!(registered, n, "every subset's socket registered");
    let services = Config::from_file(path).expect("parses").services.len() as u32;
    for i in *connected..services {
        let addr = SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16));
        let (v1, v2) = &listeners[usize::from(backend_port(i) - 10_000)];
        let a = TcpStream::connect(addr).expect("connect");
        accept_one(v1, i, "v1");
        let b = TcpStream::connect(addr).expect("connect");
        accept_one(v2, i, "v2");
        drop((a, b));
    }
    *connected = services;
}

#[test]
fn ten_thousand_two_subset_services_cost_at_most_2_kib_each() {
    if !privileged() {
        return;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        version >= (6, 4),
        "kernel {} counts a hash map's memory from max_entries, not its elements (Linux 6.4 \
         and later do): this test needs such a kernel",
        release.trim()
    );
    // SAFETY: unshare only changes this test thread's network namespace.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("run ip");
    assert!(up.success(), "ip link set lo up");

    let netns = Netns::current().expect("this thread's namespace");
    let dir = state_dir(&netns);
    let tmp = std::env::temp_dir().join(format!("tcpshift-memory-{}", std::process::id()));
    fs::create_dir_all(&tmp).expect("temp dir");
    let write = |name: &str, n: u32, v1: u32, v2: u32| {
        let path = tmp.join(name);
        fs::write(&path, config(n, v1, v2)).expect("write the configuration");
        path
    };

    let (mut state, _) = State::install(&netns, tcpshift::EBPF_OBJECT).expect("install");
    let empty = memlock(&dir);
    let mut listeners = Vec::new();
    for i in (0..SERVICES).step_by(PER_BACKEND as usize) {
        let port = backend_port(i);
        let v1 = TcpListener::bind(("127.0.1.1", port)).expect("bind v1");
        let v2 = TcpListener::bind(("127.0.2.1", port)).expect("bind v2");
        listeners.push((v1, v2));
    }
    // One service in steady state, then all of them: the difference is what services cost,
    // without the fixed cost of maps created on first use (`TS_OWNERS`' bucket array).
    let mut connected = 0;
    populate(
        &mut state,
        &write("one-a.yaml", 1, 50, 50),
        &listeners,
        &mut connected,
    );
    apply(&mut state, &write("one-b.yaml", 1, 70, 30));
    let one = memlock(&dir);
    populate(
        &mut state,
        &write("all-a.yaml", SERVICES, 50, 50),
        &listeners,
        &mut connected,
    );
    // A weight change of every service: steady state after it.
    apply(&mut state, &write("all-b.yaml", SERVICES, 70, 30));
    let all = memlock(&dir);

    let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
    let added = u64::from(SERVICES - 1);
    let per_service = (total(&all) - total(&one)) / added;
    let mut report = format!(
        "kernel memory (memlock) with {SERVICES} two-subset services: {} bytes; with one: {}; \
         installed with none: {}; {per_service} bytes per service added\n",
        total(&all),
        total(&one),
        total(&empty),
    );
    for (name, bytes) in &all {
        let before = one.get(name).copied().unwrap_or(0);
        report.push_str(&format!(
            "  {name:<16} {bytes:>10} bytes, {:>10} with none, {:>5} per service added\n",
            empty.get(name).copied().unwrap_or(0),
            bytes.saturating_sub(before) / added
        ));
    }
    eprintln!("{report}");
    drop(state);
    State::uninstall(&netns).expect("uninstall");
    let _ = fs::remove_dir_all(&tmp);
    assert!(
        per_service <= GOAL_BYTES,
        "{per_service} bytes per service, goal {GOAL_BYTES}\n{report}"
    );
}
