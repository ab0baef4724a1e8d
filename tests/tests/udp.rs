//! UDP services end to end: real datagrams through tcpshift in a network namespace of the
//! test's own (see `tcpshift_tests::TestNs`), answered by `tcp-echo --udp` backends.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tcpshift_tests::{Conn, TestNs, exchange, poll_until, privileged, scaled};

/// One UDP flow: a socket bound to its own client address.
struct Flow(UdpSocket);

impl Flow {
    fn new(local: SocketAddr) -> Result<Self> {
        let s = UdpSocket::bind(local).with_context(|| format!("bind {local}"))?;
        s.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
        Ok(Self(s))
    }

    /// Sends `msg` to `to` and returns the prefix of the answer (the subset's echo).
    fn ask(&self, to: SocketAddr, msg: &str) -> Result<String> {
        self.0.send_to(msg.as_bytes(), to)?;
        let mut buf = [0u8; 2048];
        // A signal to this process (a child exiting) interrupts the wait: wait again.
        let n = loop {
            match self.0.recv_from(&mut buf) {
                Ok((n, _)) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("no answer to {msg:?} from {to}"));
                }
            }
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        match text.strip_suffix(&format!(" {msg}")) {
            Some(prefix) => Ok(prefix.to_owned()),
            None => bail!("unexpected answer {text:?} to {msg:?}"),
        }
    }
}

fn udp_config(listen: &str, v1: &str, v2: &str, w1: u32, w2: u32) -> String {
    format!(
        "services:\n  dns:\n    protocol: udp\n    listen: \"{listen}\"\n    subsets:\n      \
         v1: \"{v1}\"\n      v2: \"{v2}\"\n    weights: {{v1: {w1}, v2: {w2}}}\n"
    )
}

/// Two `tcp-echo --udp` backends ("one" on 127.0.0.1:9101, "two" on 127.0.0.1:9102) and a
/// UDP service on 127.0.0.1:5300 with weights `w1`/`w2`; returns the echoes' child indices.
fn udp_seed(ns: &mut TestNs, w1: u32, w2: u32, loader_args: &[&str]) -> Result<(usize, usize)> {
    let one = ns.echo_args(&["--udp", "--bind", "127.0.0.1", "9101", "one"])?;
    let two = ns.echo_args(&["--udp", "--bind", "127.0.0.1", "9102", "two"])?;
    let yaml = udp_config("127.0.0.1:5300", "127.0.0.1:9101", "127.0.0.1:9102", w1, w2);
    ns.loader_with(&yaml, loader_args)?;
    Ok((one, two))
}

fn service() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5300))
}

fn client(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The UDP counters of subset `name` in `status --json`.
fn udp_counter(ns: &TestNs, name: &str, field: &str) -> Result<u64> {
    let status = ns.status()?;
    let s = tcpshift_tests::subset(&status, name).context("subset in status")?;
    s["udp"][field]
        .as_u64()
        .with_context(|| format!("no udp.{field} for {name} in {s}"))
}

#[test]
fn udp_80_20_over_2000_flows() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    udp_seed(&mut ns, 80, 20, &[])?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..2000u16 {
        let flow = Flow::new(client(20_000 + i))?;
        *counts.entry(flow.ask(service(), "hello")?).or_default() += 1;
    }
    let two = *counts.get("two").unwrap_or(&0) as f64 * 100.0 / 2000.0;
    eprintln!("80/20 over 2000 UDP flows: {counts:?} -> v2 {two:.2}%");
    assert_eq!(counts.values().sum::<usize>(), 2000);
    assert!(
        (17.0..=23.0).contains(&two),
        "v2 share {two:.2}% not within 20 ± 3: {counts:?}"
    );
    // The kernel counted the same flows and datagrams.
    let flows = udp_counter(&ns, "v1", "flows_started")? + udp_counter(&ns, "v2", "flows_started")?;
    assert_eq!(flows, 2000);
    assert_eq!(
        udp_counter(&ns, "v2", "datagrams")?,
        *counts.get("two").unwrap_or(&0) as u64
    );
    Ok(())
}

#[test]
fn udp_flows_stay_on_their_subset_through_100_weight_changes() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    udp_seed(&mut ns, 50, 50, &[])?;
    let flows = (0..200u16)
        .map(|i| Flow::new(client(30_000 + i)))
        .collect::<Result<Vec<_>>>()?;
    let first = flows
        .iter()
        .map(|f| f.ask(service(), "start"))
        .collect::<Result<Vec<_>>>()?;
    assert!(first.iter().any(|p| p == "one") && first.iter().any(|p| p == "two"));

    let done = Arc::new(AtomicBool::new(false));
    let changer = {
        let done = Arc::clone(&done);
        let bin = tcpshift_tests::bin_dir().join("tcpshiftctl");
        std::thread::spawn(move || -> Result<()> {
            for round in 0..100 {
                let (a, b) = if round % 2 == 0 {
                    ("v1=100", "v2=0")
                } else {
                    ("v1=0", "v2=100")
                };
                let out = std::process::Command::new(&bin)
                    .args(["set-weight", a, b])
                    .output()?;
                if !out.status.success() {
                    done.store(true, Ordering::SeqCst);
                    bail!("set-weight: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
            done.store(true, Ordering::SeqCst);
            Ok(())
        })
    };
    let mut moved = 0;
    let mut rounds = 0;
    let mut datagrams = 0;
    while !done.load(Ordering::SeqCst) {
        for (f, want) in flows.iter().zip(&first) {
            let got = f.ask(service(), "tick").with_context(|| {
                format!(
                    "status: {}",
                    ns.status().map(|s| s.to_string()).unwrap_or_default()
                )
            })?;
            if &got != want {
                moved += 1;
            }
            datagrams += 1;
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    changer
        .join()
        .map_err(|_| anyhow::anyhow!("changer panicked"))??;
    eprintln!("{rounds} rounds, {datagrams} datagrams during 100 weight changes, {moved} moved");
    assert!(rounds >= 2, "the flows sent during the weight changes");
    assert_eq!(
        moved, 0,
        "datagrams answered by another subset than their flow's"
    );
    // The last change (v1=0, v2=100) applies to new flows.
    assert_eq!(Flow::new(client(31_000))?.ask(service(), "new")?, "two");
    Ok(())
}

#[test]
fn udp_idle_flow_chooses_again_after_the_timeout() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    udp_seed(&mut ns, 100, 0, &["--udp-idle-timeout", "1"])?;
    let flow = Flow::new(client(40_000))?;
    assert_eq!(flow.ask(service(), "a")?, "one");
    ns.ctl_ok(&["set-weight", "v1=0", "v2=100"])?;
    // Still within the timeout: the flow stays.
    assert_eq!(flow.ask(service(), "b")?, "one");
    // Idle for longer than the timeout (1 s; the kernel's coarse clock ticks every few ms):
    // the next datagram chooses again, by the new weights. Waiting is what is tested here.
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(flow.ask(service(), "c")?, "two");
    assert_eq!(udp_counter(&ns, "v1", "expired")?, 1);
    Ok(())
}

#[test]
fn udp_flows_of_a_killed_subset_fall_back_without_a_drop() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    let (_, two) = udp_seed(&mut ns, 50, 50, &[])?;
    let flows = (0..200u16)
        .map(|i| Flow::new(client(41_000 + i)))
        .collect::<Result<Vec<_>>>()?;
    let first = flows
        .iter()
        .map(|f| f.ask(service(), "start"))
        .collect::<Result<Vec<_>>>()?;
    let on_two = first.iter().filter(|p| *p == "two").count();
    assert!(on_two > 0);
    ns.kill(two)?;
    // Every flow is answered at once (a datagram lost would time out the receive), by v1.
    for round in 0..3 {
        for f in &flows {
            assert_eq!(f.ask(service(), "after")?, "one", "round {round}");
        }
    }
    assert_eq!(udp_counter(&ns, "v2", "fallback_out")?, on_two as u64);
    assert_eq!(udp_counter(&ns, "v1", "fallback_in")?, on_two as u64);
    Ok(())
}

#[test]
fn udp_over_ipv6() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo_args(&["--udp", "--bind", "::1", "9101", "one"])?;
    ns.echo_args(&["--udp", "--bind", "::1", "9102", "two"])?;
    let yaml = udp_config("[::1]:5300", "[::1]:9101", "[::1]:9102", 80, 20);
    ns.loader_with(&yaml, &[])?;
    let to: SocketAddr = "[::1]:5300".parse()?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..500u16 {
        let flow = Flow::new(format!("[::1]:{}", 20_000 + i).parse()?)?;
        let p = flow.ask(to, "v6")?;
        assert_eq!(flow.ask(to, "again")?, p, "a flow stays on its subset");
        *counts.entry(p).or_default() += 1;
    }
    eprintln!("IPv6: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 500);
    assert!(counts.get("one").is_some_and(|&n| n > 300), "{counts:?}");
    assert!(counts.get("two").is_some_and(|&n| n > 50), "{counts:?}");
    Ok(())
}

#[test]
fn a_tcp_and_a_udp_service_on_one_port_are_both_steered() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo_args(&["--bind", "127.0.0.1", "9201", "tcp-one"])?;
    ns.echo_args(&["--udp", "--bind", "127.0.0.1", "9202", "udp-one"])?;
    // And one `tcp+udp` service, whose subset serves both on one address.
    ns.echo_args(&["--bind", "127.0.0.1", "9203", "both-tcp"])?;
    ns.echo_args(&["--udp", "--bind", "127.0.0.1", "9203", "both-udp"])?;
    let yaml = "services:\n  \
        t:\n    listen: 5400\n    subsets: {v1: 127.0.0.1:9201}\n  \
        u:\n    protocol: udp\n    listen: 5400\n    subsets: {v1: 127.0.0.1:9202}\n  \
        b:\n    protocol: tcp+udp\n    listen: 5401\n    subsets: {v1: 127.0.0.1:9203}\n";
    ns.loader_with(yaml, &[])?;
    let tcp = SocketAddr::from(([127, 0, 0, 1], 5400));
    assert_eq!(exchange(tcp, "x")?, "tcp-one");
    assert_eq!(Flow::new(client(42_000))?.ask(tcp, "x")?, "udp-one");
    let both = SocketAddr::from(([127, 0, 0, 1], 5401));
    assert_eq!(Conn::open(both)?.exchange("x")?, "both-tcp");
    assert_eq!(Flow::new(client(42_001))?.ask(both, "x")?, "both-udp");
    Ok(())
}

/// The take-over guard is per protocol: a UDP server on a UDP service's port blocks it unless
/// `takeOver: true`; it does not block a TCP service on that port.
#[test]
fn a_udp_server_on_the_port_needs_take_over() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.bare_loader()?;
    ns.echo_args(&["--udp", "--bind", "127.0.0.1", "9101", "one"])?;
    ns.echo_args(&["--udp", "--bind", "127.0.0.1", "9102", "two"])?;
    ns.echo_args(&["--udp", "--bind", "0.0.0.0", "5300", "legacy"])?;
    let apply = |yaml: &str| -> Result<std::process::Output> {
        let file = ns.file("services.yaml");
        std::fs::write(&file, yaml)?;
        ns.ctl(&["apply", "-f", &file.to_string_lossy()])
    };
    let udp = udp_config("127.0.0.1:5300", "127.0.0.1:9101", "127.0.0.1:9102", 100, 0);
    let refused = apply(&udp)?;
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "applied over a UDP server");
    assert!(
        message.contains("where another server already listens: 0.0.0.0:5300 (pid "),
        "{message}"
    );
    assert_eq!(Flow::new(client(43_000))?.ask(service(), "x")?, "legacy");
    // A TCP service on the same port is not in the UDP server's way.
    let tcp = "services:\n  t:\n    listen: 5300\n    subsets: {v1: 127.0.0.1:9201}\n";
    let out = apply(tcp)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let taken = apply(&format!("{udp}    takeOver: true\n"))?;
    assert!(
        taken.status.success(),
        "{}",
        String::from_utf8_lossy(&taken.stderr)
    );
    // Its subsets' sockets are registered by the apply or the next scan.
    let mut port = 43_000;
    poll_until(Duration::from_secs(10), "datagrams steered to v1", || {
        port += 1;
        let answer = Flow::new(client(port))?.ask(service(), "x")?;
        Ok((answer == "one").then_some(()))
    })?;
    Ok(())
}
