//! The commit path under failing map writes (privileged; needs the `failpoints` feature, which
//! `cargo xtask test` enables): a change that fails part-way is rolled back — the weights read
//! back from the kernel are the old ones and connections are still steered by them — and
//! ENOMEM answers are retried, for apply and set-weight alike.
//!
//! Each test installs tcpshift in a network namespace of its own (the test thread unshares
//! one) and removes it at the end. The failpoints are process-wide, so the tests take turns.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    process::Command,
    sync::Mutex,
};

use tcpshift::{
    EBPF_OBJECT,
    model::{Annotation, Desired, DesiredService, Listen, ServiceConfig, SubsetConfig},
    netns::Netns,
    state::{State, failpoints},
};

/// The failpoints are process-wide: one test at a time.
static TURN: Mutex<()> = Mutex::new(());

const SKIP_VAR: &str = "TCPSHIFT_SKIP_PRIVILEGED";

/// tcpshift installed in a fresh network namespace, with two backends on loopback.
struct Setup {
    netns: Netns,
    state: State,
    v1: TcpListener,
    v2: TcpListener,
}

impl Setup {
    /// `None` when privileged tests are skipped on request.
    fn new() -> Option<Self> {
        if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
            eprintln!("skipped: {SKIP_VAR}=1 (privileged tests explicitly disabled)");
            return None;
        }
        // SAFETY: unshare affects only this (test) thread's network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {} (run as root: cargo xtask test)",
            std::io::Error::last_os_error()
        );
        // A child started from this thread lives in its namespace.
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip link set lo up");
        assert!(up.success(), "ip link set lo up failed");
        let netns = Netns::current().expect("open the test namespace");
        let (state, _) = State::install(&netns, EBPF_OBJECT).expect("install tcpshift");
        let v1 = TcpListener::bind("127.0.0.1:19001").expect("bind v1");
        let v2 = TcpListener::bind("127.0.0.1:19002").expect("bind v2");
        v1.set_nonblocking(true).unwrap();
        v2.set_nonblocking(true).unwrap();
        Some(Self {
            netns,
            state,
            v1,
            v2,
        })
    }

    /// Registers the backends' sockets for every subset that has none.
    fn register(&mut self) {
        for m in self.state.missing_sockets().expect("missing sockets") {
            let socket = if m.backend == self.v1.local_addr().unwrap() {
                self.v1.as_fd()
            } else {
                self.v2.as_fd()
            };
            assert!(self.state.register_socket(&m, socket).expect("register"));
        }
    }

    /// Opens `n` connections to `port` and counts where they arrived: (v1, v2).
    fn reached(&self, port: u16, n: usize) -> (usize, usize) {
        let mut counts = (0, 0);
        for i in 0..n {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let _client = TcpStream::connect(addr).expect("connect to the service");
            // On loopback the handshake is done when connect returns: the connection waits in
            // exactly one backend's accept queue.
            match (self.v1.accept(), self.v2.accept()) {
                (Ok(_), Err(_)) => counts.0 += 1,
                (Err(_), Ok(_)) => counts.1 += 1,
                other => panic!("connection {i} to {addr}: accepted by {other:?}"),
            }
        }
        counts
    }

    /// Weights of service `name` read back from the kernel.
    fn weights(&self, name: &str) -> Option<Vec<u32>> {
        self.state
            .services()
            .expect("read services")
            .into_iter()
            .find(|v| v.config.name == name)
            .map(|v| v.config.weights())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        failpoints::disarm();
        let _ = State::uninstall(&self.netns);
    }
}

fn service(name: &str, port: u16, w1: u32, w2: u32) -> DesiredService {
    DesiredService {
        config: ServiceConfig {
            name: name.into(),
            listen: Listen::Addr(([127, 0, 0, 1], port).into()),
            subsets: vec![
                SubsetConfig {
                    name: "v1".into(),
                    addr: ([127, 0, 0, 1], 19001).into(),
                    weight: w1,
                    owner: Default::default(),
                },
                SubsetConfig {
                    name: "v2".into(),
                    addr: ([127, 0, 0, 1], 19002).into(),
                    weight: w2,
                    owner: Default::default(),
                },
            ],
            take_over: false,
            fail_closed: false,
            balance: Default::default(),
            protocol: Default::default(),
        },
        annotation: Annotation::Keep,
    }
}

fn apply(state: &mut State, services: Vec<DesiredService>) -> Result<(), String> {
    let desired = Desired {
        services,
        clear_annotations: Vec::new(),
    };
    state
        .apply_with(|_| Ok::<_, tcpshift::state::StateError>(desired))
        .map(drop)
        .map_err(|e| e.to_string())
}

#[test]
fn a_change_that_fails_part_way_is_rolled_back() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut s) = Setup::new() else { return };
    apply(
        &mut s.state,
        vec![
            service("echo", 31400, 100, 0),
            service("other", 31401, 50, 50),
        ],
    )
    .expect("first apply");
    s.register();
    assert_eq!(s.reached(31400, 5), (5, 0));

    // Fail a definition write of the new service after its first one (preparation: the
    // entries are not written yet), then the second service's entry (commit: the first
    // service's new entry is already live and must be put back).
    for point in ["definition", "entry"] {
        failpoints::arm(point, 1, u32::MAX, libc::EIO);
        let err = apply(
            &mut s.state,
            vec![
                service("echo", 31400, 0, 100),
                service("other", 31401, 100, 0),
                service("new", 31402, 1, 1),
            ],
        )
        .expect_err("the injected failure must fail the apply");
        assert!(
            failpoints::disarm() >= 1,
            "{point}: the failpoint never fired"
        );
        assert!(err.contains("Input/output error"), "{point}: {err}");
        assert_eq!(s.weights("echo"), Some(vec![100, 0]), "{point}");
        assert_eq!(s.weights("other"), Some(vec![50, 50]), "{point}");
        assert_eq!(
            s.weights("new"),
            None,
            "{point}: the new service must be gone"
        );
        assert_eq!(
            s.reached(31400, 5),
            (5, 0),
            "{point}: steered by the old weights"
        );
        assert!(
            TcpStream::connect(("127.0.0.1", 31402)).is_err(),
            "{point}: nothing may answer on the new service's address"
        );
    }

    // A set-weight that fails for good (ENOMEM past the retry) changes nothing either.
    failpoints::arm("entry", 0, u32::MAX, libc::ENOMEM);
    let err = s
        .state
        .set_weights(Some("echo"), &[("v2".into(), 100), ("v1".into(), 0)])
        .expect_err("set-weight must fail");
    assert!(failpoints::disarm() > 1, "ENOMEM was not retried");
    assert!(err.to_string().contains("Cannot allocate memory"), "{err}");
    assert_eq!(s.weights("echo"), Some(vec![100, 0]));
    assert_eq!(s.reached(31400, 5), (5, 0));

    // With nothing failing the same change goes through.
    apply(
        &mut s.state,
        vec![
            service("echo", 31400, 0, 100),
            service("other", 31401, 100, 0),
        ],
    )
    .expect("apply");
    assert_eq!(s.reached(31400, 5), (0, 5));
}

#[test]
fn enomem_is_retried_by_apply_and_set_weight() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut s) = Setup::new() else { return };
    apply(&mut s.state, vec![service("echo", 31400, 100, 0)]).expect("first apply");
    s.register();
    assert_eq!(s.reached(31400, 5), (5, 0));

    // apply: the entry write is refused three times, then accepted.
    failpoints::arm("entry", 0, 3, libc::ENOMEM);
    apply(&mut s.state, vec![service("echo", 31400, 0, 100)]).expect("apply despite ENOMEM");
    assert_eq!(failpoints::disarm(), 3);
    assert_eq!(s.weights("echo"), Some(vec![0, 100]));
    assert_eq!(s.reached(31400, 5), (0, 5));

    // set-weight goes through the same path: its entry write is retried too.
    failpoints::arm("entry", 0, 2, libc::ENOMEM);
    let (name, weights) = s
        .state
        .set_weights(None, &[("v1".into(), 100), ("v2".into(), 0)])
        .expect("set-weight despite ENOMEM");
    assert_eq!(failpoints::disarm(), 2);
    assert_eq!(name, "echo");
    assert_eq!(weights, vec![("v1".into(), 100), ("v2".into(), 0)]);
    assert_eq!(s.weights("echo"), Some(vec![100, 0]));
    assert_eq!(s.reached(31400, 5), (5, 0));
}

#[test]
fn the_dry_run_agrees_with_the_real_apply_on_a_v4_mapped_listen() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut s) = Setup::new() else { return };
    apply(&mut s.state, vec![service("echo", 31400, 100, 0)]).expect("first apply");
    s.register();
    let mut mapped = service("echo", 31400, 100, 0);
    mapped.config.listen = Listen::parse("[::ffff:127.0.0.1]:31400").unwrap();
    let desired = Desired {
        services: vec![mapped],
        clear_annotations: Vec::new(),
    };
    let dry = s
        .state
        .plan_with(|_| Ok::<_, tcpshift::state::StateError>(desired.clone()))
        .expect("dry run");
    let real = s
        .state
        .apply_with(|_| Ok::<_, tcpshift::state::StateError>(desired))
        .expect("apply");
    assert_eq!(dry, real);
    assert_eq!(
        real,
        vec![("echo".to_string(), tcpshift::model::Change::Unchanged)]
    );
    // The stored address keeps its first form, and the service is still steered.
    let status = s.state.status().expect("status");
    assert_eq!(status.services[0].listen, "127.0.0.1:31400");
    assert_eq!(s.reached(31400, 3), (3, 0));
}
