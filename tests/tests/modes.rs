//! Balancing modes: source-IP affinity (`affinity: source-ip`, Istio
//! `consistentHash.useSourceIp`) and exact weighted round-robin (`balance: round-robin`, Istio
//! `simple: ROUND_ROBIN`). Each test runs in its own network namespace (see
//! `tcpshift_tests::TestNs`); clients bind to many addresses of 127.0.0.0/8 before connecting.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::FromRawFd,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use tcpshift_tests::{
    TestNs, count_prefixes, pinned, poll_until, privileged, scaled, seed_addr, snmp, subset,
};

/// The seed service (v1 "one" on 127.0.0.1:9001, v2 "two" on 127.0.0.1:9002, port 31400) with
/// weights `v1`/`v2` and the extra service keys `extra` (e.g. `affinity: source-ip`).
fn config(v1: u32, v2: u32, extra: &str) -> String {
    format!(
        "services:\n  tcp-echo:\n    listen: 31400\n    subsets:\n      v1: 127.0.0.1:9001\n      \
         v2: 127.0.0.1:9002\n    weights: {{v1: {v1}, v2: {v2}}}\n    {extra}\n"
    )
}

/// Client address number `i`: 127.1.x.y, distinct for every `i` below 64 000.
fn client(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        1 + (i / 64_000) as u8,
        (i / 250 % 256) as u8,
        (i % 250 + 1) as u8,
    )
}

/// Connects to `to` from address `from` (bound before connecting), sends `line`, returns the
/// reply's prefix after checking the echo.
fn exchange_from(from: Ipv4Addr, to: SocketAddr, line: &str) -> Result<String> {
    // SAFETY: plain socket creation; the descriptor is owned by the TcpStream below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sockaddr = |a: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(to4) = to else {
        bail!("IPv4 only");
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let local = sockaddr(from, 0);
    // SAFETY: valid sockaddr_in of the given length.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        bail!("bind {from}: {}", std::io::Error::last_os_error());
    }
    let remote = sockaddr(*to4.ip(), to4.port());
    // SAFETY: as above.
    if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
        bail!(
            "connect {from} -> {to}: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut s = stream;
    s.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let reply = reply.strip_suffix('\n').unwrap_or(&reply);
    match reply.split_once(' ') {
        Some((prefix, echoed)) if echoed == line => Ok(prefix.to_string()),
        _ => bail!("from {from}: sent {line:?}, got {reply:?}"),
    }
}

/// The subset prefix each of `clients` client addresses reaches, checking that all `per`
/// connections of one address reach the same subset.
fn mapping(clients: u32, per: u32) -> Result<Vec<String>> {
    (0..clients)
        .map(|i| {
            let from = client(i);
            let first = exchange_from(from, seed_addr(), &format!("c{i} 0"))?;
            for k in 1..per {
                let again = exchange_from(from, seed_addr(), &format!("c{i} {k}"))?;
                ensure!(
                    again == first,
                    "client {from}: connection {k} reached {again}, the first reached {first}"
                );
            }
            Ok(first)
        })
        .collect()
}

fn count(map: &[String], prefix: &str) -> usize {
    map.iter().filter(|p| *p == prefix).count()
}

/// Waits until `status` shows subset `name` live (`true`) or not.
fn wait_subset_live(ns: &TestNs, name: &str, live: bool) -> Result<()> {
    poll_until(
        scaled(Duration::from_secs(10)),
        &format!("subset {name} live = {live}"),
        || {
            let status = ns.status()?;
            Ok((subset(&status, name).is_some_and(|s| s["live"] == live)).then_some(()))
        },
    )
}

const CLIENTS: u32 = 1000;

#[test]
fn source_ip_affinity_keeps_clients_moves_few_on_a_weight_change_and_falls_back() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    let v2 = ns.echo("127.0.0.1", 9002, "two")?;
    ns.loader(&config(80, 20, "affinity: source-ip"))?;
    assert_eq!(ns.status()?["services"][0]["mode"], "source-ip");

    // Every address always reaches one subset; about 20 % of them reach v2 (binomial over
    // 1000 addresses: sd 1.3 points).
    let before = mapping(CLIENTS, 3)?;
    let v2_share = count(&before, "two") as f64 * 100.0 / f64::from(CLIENTS);
    eprintln!(
        "80/20: {:.1} % of {CLIENTS} client addresses on v2",
        v2_share
    );
    ensure!(
        (14.0..=26.0).contains(&v2_share),
        "v2 share {v2_share:.1} %"
    );

    // 80/20 -> 70/30: the table moves 10 % of its buckets, all from v1 to v2, so about 10 % of
    // the addresses move (sd 0.95 points over 1000), none from v2 to v1.
    ns.ctl_ok(&["set-weight", "v2=30"])?;
    let after = mapping(CLIENTS, 2)?;
    let moved: Vec<(usize, &String, &String)> = before
        .iter()
        .zip(&after)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i, a, b))
        .collect();
    let moved_share = moved.len() as f64 * 100.0 / f64::from(CLIENTS);
    eprintln!("80/20 -> 70/30: {moved_share:.1} % of the client addresses moved");
    for (i, from, to) in &moved {
        ensure!(
            *from == "one" && *to == "two",
            "client {} moved from {from} to {to}: only v1 -> v2 moves are needed",
            client(*i as u32)
        );
    }
    ensure!(
        (5.0..=15.0).contains(&moved_share),
        "{moved_share:.1} % of the clients moved, expected about 10 % (the weight moved)"
    );

    // v2 killed: its clients fall back to v1, the others stay; back when v2 is back.
    ns.kill(v2)?;
    wait_subset_live(&ns, "v2", false)?;
    let down = mapping(CLIENTS / 4, 1)?;
    ensure!(
        down.iter().all(|p| p == "one"),
        "with v2 down every client reaches v1: {:?}",
        down.iter().filter(|p| *p != "one").count()
    );
    ns.echo("127.0.0.1", 9002, "two")?;
    wait_subset_live(&ns, "v2", true)?;
    let back = mapping(CLIENTS / 4, 1)?;
    ensure!(
        back[..] == after[..back.len()],
        "after v2 is back every client reaches its subset again"
    );
    let status = ns.status()?;
    let fallback_in = subset(&status, "v1").context("v1")?["counters"]["fallback_in"].clone();
    ensure!(
        fallback_in.as_u64().unwrap_or(0) as usize >= count(&after[..down.len()], "two"),
        "v1 counted the fallbacks: {fallback_in}"
    );
    Ok(())
}

/// Makes `n` connections from `clients` concurrent clients (thread `t` makes connections
/// `t, t + clients, ...`) and counts the reply prefixes.
fn concurrent_counts(n: usize, clients: usize) -> Result<BTreeMap<String, usize>> {
    let results: Vec<Result<BTreeMap<String, usize>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|t| {
                scope.spawn(move || {
                    let mine = (t..n).step_by(clients).count();
                    count_prefixes(seed_addr(), mine)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("client thread panicked")))
            .collect()
    });
    let mut total = BTreeMap::new();
    for r in results {
        for (prefix, c) in r? {
            *total.entry(prefix).or_insert(0) += c;
        }
    }
    Ok(total)
}

/// Connections split by [`concurrent_counts`], checked against the exact split `want` of `n`
/// connections. Round-robin takes a turn per socket lookup, and the kernel also looks up a
/// packet that finds no connection the way it looks up a new one: typically a segment sent
/// again (a tail-loss probe) that arrives after the server closed its end; the listener it is
/// steered to answers with a RST. So the check reads the service's cursor back: without extra
/// turns the split must be exact; every extra turn must show in the namespace's TCP counters
/// as a RST sent (the listener's answer, or the stray packet itself) or a SYN a listener
/// dropped (its retransmission is looked up again), and may move each subset's count by one.
fn round_robin_split(
    service: u32,
    n: usize,
    clients: usize,
    want: &BTreeMap<String, usize>,
) -> Result<()> {
    let cursor = || -> Result<u64> {
        let value = pinned::lookup("TS_CURSORS", service)?;
        let bytes: [u8; 8] = value.as_slice().try_into().context("a cursor of 8 bytes")?;
        Ok(u64::from_le_bytes(bytes))
    };
    let (turns_before, tcp_before) = (cursor()?, snmp::tcp()?);
    let counts = concurrent_counts(n, clients)?;
    let turns = cursor()? - turns_before;
    let tcp_after = snmp::tcp()?;
    let grew = |name: &str| {
        let at = |m: &BTreeMap<String, u64>| m.get(name).copied().unwrap_or(0);
        at(&tcp_after).saturating_sub(at(&tcp_before))
    };
    let strays = grew("OutRsts") + grew("ListenDrops");
    let tcp = snmp::changed(&tcp_before, &tcp_after);
    eprintln!(
        "round-robin, {n} connections from {clients} clients: {counts:?} (want {want:?}; \
         {turns} turns; TCP: {tcp})"
    );
    ensure!(
        turns >= n as u64,
        "{n} connections from {clients} clients took only {turns} round-robin turns"
    );
    let extra = turns - n as u64;
    ensure!(
        extra <= strays,
        "{n} connections from {clients} clients took {turns} round-robin turns, but the \
         namespace shows only {strays} packets that found no connection (TCP: {tcp})"
    );
    for (subset, &w) in want {
        let got = counts.get(subset).copied().unwrap_or(0);
        ensure!(
            got.abs_diff(w) as u64 <= extra,
            "{n} connections from {clients} clients: {counts:?}, want {want:?} \
             ({extra} extra turns)"
        );
    }
    Ok(())
}

#[test]
fn round_robin_is_exact_over_10_100_and_1000_connections_with_1_and_16_clients() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    ns.loader(&config(80, 20, "balance: round-robin"))?;
    let status = ns.status()?;
    assert_eq!(status["services"][0]["mode"], "round-robin");
    let service = status["services"][0]["id"]
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .context("status: no service id")?;
    let split =
        |one: usize, two: usize| BTreeMap::from([("one".to_string(), one), ("two".into(), two)]);
    for clients in [1, 16] {
        for n in [10, 100, 1000] {
            round_robin_split(service, n, clients, &split(n * 8 / 10, n / 5))?;
        }
    }
    // 70/30 (period 10): the next 100 connections are 70 and 30, whatever the cursor.
    ns.ctl_ok(&["set-weight", "v2=30"])?;
    for clients in [1, 16] {
        round_robin_split(service, 100, clients, &split(70, 30))?;
    }
    Ok(())
}

#[test]
fn destination_rule_load_balancer_sets_the_mode() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.1", 9001, "one")?;
    ns.echo("127.0.0.1", 9002, "two")?;
    ns.bare_loader()?;
    let manifest = |policy: &str| {
        format!(
            "services:\n  tcp-echo:\n    listen: 31400\n    subsets: {{v1: 127.0.0.1:9001, v2: \
             127.0.0.1:9002}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: tcp-echo}}\nspec:\n  host: tcp-echo\n  trafficPolicy:\n    \
             loadBalancer: {policy}\n  subsets:\n  - name: v1\n  - name: v2\n---\napiVersion: \
             networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: tcp-echo}}\nspec:\n  \
             hosts: ['*']\n  tcp:\n  - match: [{{port: 31400}}]\n    route:\n    - destination: \
             {{host: tcp-echo, subset: v1}}\n      weight: 80\n    - destination: {{host: \
             tcp-echo, subset: v2}}\n      weight: 20\n"
        )
    };
    let path = ns.file("dr.yaml");
    let file = path.display().to_string();

    std::fs::write(&path, manifest("{simple: ROUND_ROBIN}"))?;
    ns.ctl_ok(&["apply", "-f", &file])?;
    assert_eq!(ns.status()?["services"][0]["mode"], "round-robin");
    let counts = count_prefixes(seed_addr(), 10)?;
    let want = BTreeMap::from([("one".to_string(), 8), ("two".into(), 2)]);
    ensure!(counts == want, "ROUND_ROBIN at 80/20 over 10: {counts:?}");

    std::fs::write(&path, manifest("{consistentHash: {useSourceIp: true}}"))?;
    let out = ns.ctl_ok(&["apply", "-f", &file])?;
    assert_eq!(
        ns.status()?["services"][0]["mode"],
        "source-ip",
        "apply said: {out}"
    );
    let map = mapping(50, 3)?;
    ensure!(count(&map, "one") + count(&map, "two") == 50);

    // A subset-level loadBalancer that contradicts the top-level one is refused.
    let bad = manifest("{simple: ROUND_ROBIN}").replace(
        "  - name: v2\n",
        "  - name: v2\n    trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}\n",
    );
    std::fs::write(&path, bad)?;
    let out = ns.ctl(&["apply", "-f", &file])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "contradicting loadBalancers accepted"
    );
    ensure!(
        stderr.contains("subsets[1].trafficPolicy.loadBalancer")
            && stderr.contains("one mode for the whole service"),
        "{stderr}"
    );
    assert_eq!(ns.status()?["services"][0]["mode"], "source-ip");
    Ok(())
}
