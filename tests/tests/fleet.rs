//! A fleet end to end: a 3-member etcd cluster on loopback and 3 nodes, each a network
//! namespace with its own tcp-echo v1/v2 and a tcpshiftd working in it through `--netns`,
//! whose store connection stays on the host's loopback. Changes go through
//! `tcpshiftctl --store`; every node is checked with real connections. Also: a store behind
//! TLS (client certificates) and user/password authentication, and a host rebooted while
//! the store is down.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tcpshift_tests::{
    bin_dir,
    etcd::EtcdCluster,
    exchange,
    fleet::{Node, fleet, in_netns, store_ctl, store_ctl_ok},
    poll_until, privileged, seed_addr, seed_config,
};

/// One exchange with the seed's address from 127.0.0.1:`port`; the reply's prefix.
fn from_port(port: u16) -> Result<String> {
    use std::{
        io::{Read, Write},
        os::fd::FromRawFd,
    };
    // SAFETY: a new socket; the fd is owned by the TcpStream below (or closed on error).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned only here.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let addr = |port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    let local = addr(port);
    let remote = addr(seed_addr().port());
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: setsockopt/bind/connect on our socket with live, correctly sized arguments.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            bail!("bind {port}: {}", std::io::Error::last_os_error());
        }
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            bail!("connect from {port}: {}", std::io::Error::last_os_error());
        }
    }
    let mut stream = stream;
    stream.write_all(b"seed\n")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.split(' ').next().unwrap_or_default().to_string())
}

#[test]
fn seed_all_v1_then_20_v2_applied_once_reaches_every_node() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (cluster, nodes, _) = fleet("seed", &[])?;
    let url = cluster.url();
    for n in &nodes {
        let counts = n.count(200)?;
        assert_eq!(counts.get("one"), Some(&200), "node {}: {counts:?}", n.name);
    }
    let out = store_ctl_ok(&url, &["set-weight", "v2=20"])?;
    assert!(out.contains("tcp-echo: v1=80 v2=20"), "{out}");
    for n in &nodes {
        n.wait_weights(80, 20)?;
        let counts = n.count(1000)?;
        let two = *counts.get("two").unwrap_or(&0);
        assert_eq!(counts.values().sum::<usize>(), 1000, "{counts:?}");
        assert!(
            (120..=280).contains(&two),
            "node {}: about 20 % v2 expected: {counts:?}",
            n.name
        );
    }
    // Every node reports itself in sync, through the store.
    let nodes_json: Value =
        serde_json::from_str(&store_ctl_ok(&url, &["get", "nodes", "-o", "json"])?)?;
    let listed = poll_until(Duration::from_secs(15), "3 nodes in sync", || {
        let v: Value = serde_json::from_str(&store_ctl_ok(&url, &["get", "nodes", "-o", "json"])?)?;
        let all = v.as_array().cloned().unwrap_or_default();
        Ok((all.len() == 3 && all.iter().all(|n| n["in_sync"] == true)).then_some(all))
    })
    .with_context(|| format!("{nodes_json}"))?;
    assert_eq!(listed.len(), 3);
    // One hash seed for the fleet: the same 4-tuple (fixed source ports above the ephemeral
    // range, so no earlier connection holds them) reaches the same
    // subset on every node.
    let picks = nodes
        .iter()
        .map(|n| in_netns(&n.path, || (0..64).map(|k| from_port(62000 + k)).collect()))
        .collect::<Result<Vec<Vec<String>>>>()?;
    assert!(picks[0].iter().any(|p| p == "two"), "{picks:?}");
    assert!(picks.iter().all(|p| *p == picks[0]), "{picks:?}");
    // A local change on a following host is refused, naming the store; --local overrides.
    let refused = nodes[0].ctl(&["set-weight", "v2=50"])?;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("follows the fleet store") && err.contains("--local"),
        "{err}"
    );
    assert_eq!(nodes[0].weights()?, Some((80, 20)));
    Ok(())
}

#[test]
fn all_members_stopped_nodes_keep_steering_then_changes_flow_again() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (mut cluster, nodes, _) = fleet("down", &[])?;
    let url = cluster.url();
    store_ctl_ok(&url, &["set-weight", "v2=20"])?;
    for n in &nodes {
        n.wait_weights(80, 20)?;
    }
    for i in 0..cluster.len() {
        cluster.kill(i)?;
    }
    // Fail static: every node notices, keeps its weights and answers every connection.
    for n in &nodes {
        poll_until(
            Duration::from_secs(30),
            "the node sees the store down",
            || {
                let out = n.ctl(&["status"])?;
                Ok(String::from_utf8_lossy(&out.stdout)
                    .contains("UNREACHABLE")
                    .then_some(()))
            },
        )
        .with_context(|| n.log())?;
        let counts = n.count(300)?;
        assert_eq!(counts.values().sum::<usize>(), 300, "{counts:?}");
        assert!(counts.contains_key("two"), "{counts:?}");
        assert_eq!(n.weights()?, Some((80, 20)));
    }
    for i in 0..cluster.len() {
        cluster.restart(i)?;
    }
    cluster.wait_healthy()?;
    poll_until(
        Duration::from_secs(30),
        "set-weight after the restart",
        || {
            Ok(store_ctl(&url, &["set-weight", "v2=60"])?
                .status
                .success()
                .then_some(()))
        },
    )?;
    for n in &nodes {
        n.wait_weights(40, 60)?;
        let p = in_netns(&n.path, || exchange(seed_addr(), "after"))?;
        assert!(p == "one" || p == "two");
    }
    Ok(())
}

#[test]
fn eight_concurrent_writers_lose_nothing_and_bad_input_is_refused() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (cluster, nodes, _) = fleet("writers", &[])?;
    let url = cluster.url();
    // 8 writers, each adding its own service: every one must be there afterwards.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            let file = cluster.dir().join(format!("svc{i}.yaml"));
            std::thread::spawn(move || -> Result<()> {
                std::fs::write(
                    &file,
                    format!(
                        "services:\n  w{i}:\n    listen: {}\n    subsets:\n      a: 127.0.0.1:{}\n    weights: {{a: 100}}\n",
                        32000 + i,
                        33000 + i
                    ),
                )?;
                store_ctl_ok(&url, &["apply", "-f", &file.to_string_lossy()])?;
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    let listed = store_ctl_ok(&url, &["get", "services", "-o", "json"])?;
    for i in 0..8 {
        assert!(listed.contains(&format!("\"w{i}\"")), "w{i} lost: {listed}");
    }
    for n in &nodes {
        poll_until(Duration::from_secs(20), "9 services on the node", || {
            let out = n.ctl(&["get", "services", "-o", "json"])?;
            let text = String::from_utf8_lossy(&out.stdout);
            Ok((0..8)
                .all(|i| text.contains(&format!("\"w{i}\"")))
                .then_some(()))
        })
        .with_context(|| n.log())?;
    }
    // Bad input: refused with the local message, nothing written (the revision stays).
    let before: Value = serde_json::from_str(&store_ctl_ok(&url, &["status", "--json"])?)?;
    let bad = store_ctl(&url, &["set-weight", "--service", "tcp-echo", "v3=20"])?;
    assert!(!bad.status.success());
    let local = nodes[0].ctl(&["--local", "set-weight", "--service", "tcp-echo", "v3=20"])?;
    assert!(!local.status.success());
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr),
        String::from_utf8_lossy(&local.stderr),
        "the store refuses bad input with the local message"
    );
    let after: Value = serde_json::from_str(&store_ctl_ok(&url, &["status", "--json"])?)?;
    assert_eq!(before["revision"], after["revision"]);
    Ok(())
}

#[test]
fn hundred_changes_while_the_leader_is_killed_and_restarted_every_node_ends_on_the_last()
-> Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    if !privileged() {
        return Ok(());
    }
    let (mut cluster, nodes, _) = fleet("leader", &[])?;
    let url = cluster.url();
    // Clients on every node for the whole run: every connection must be answered.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let made = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (stop, failed, made) = (stop.clone(), failed.clone(), made.clone());
            let path = n.path.clone();
            std::thread::spawn(move || {
                in_netns(&path, move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        match exchange(seed_addr(), &format!("c{i}")) {
                            Ok(_) => made.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                        i += 1;
                    }
                    Ok(())
                })
            })
        })
        .collect();
    let mut killed = None;
    for v2 in 1..=100u32 {
        if v2 == 30 {
            let leader = cluster.leader()?;
            cluster.kill(leader)?;
            killed = Some(leader);
        }
        if v2 == 60
            && let Some(leader) = killed.take()
        {
            cluster.restart(leader)?;
        }
        poll_until(
            Duration::from_secs(30),
            &format!("set-weight v2={v2}"),
            || {
                Ok(store_ctl(&url, &["set-weight", &format!("v2={v2}")])?
                    .status
                    .success()
                    .then_some(()))
            },
        )?;
    }
    for n in &nodes {
        n.wait_weights(0, 100)?;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    assert!(made.load(Ordering::Relaxed) > 0);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed connections");
    for n in &nodes {
        let counts = n.count(50)?;
        assert_eq!(counts.get("two"), Some(&50), "node {}: {counts:?}", n.name);
    }
    Ok(())
}

/// A TCP relay on loopback to `upstream` that the test can break (every connection closed,
/// new ones refused at once) and mend.
struct Relay {
    port: u16,
    broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start(upstream: std::net::SocketAddr) -> Result<Self> {
        use std::{
            net::{TcpListener, TcpStream},
            sync::{Arc, Mutex, atomic::AtomicBool},
        };
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let broken = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (b, o) = (broken.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if b.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let pairs = [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ];
                if let Ok(mut all) = o.lock() {
                    all.extend(client.try_clone());
                    all.extend(server.try_clone());
                }
                for (from, to) in pairs {
                    if let (Ok(mut from), Ok(mut to)) = (from, to) {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        Ok(Self { port, broken, open })
    }

    fn set_broken(&self, broken: bool) {
        self.broken
            .store(broken, std::sync::atomic::Ordering::SeqCst);
        if broken && let Ok(mut all) = self.open.lock() {
            for s in all.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[test]
fn a_node_cut_from_the_store_falls_behind_keeps_steering_and_catches_up() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (cluster, mut nodes, _) = fleet("cut", &[])?;
    let url = cluster.url();
    // Node 2 reaches the store only through a relay to member 0.
    let member0: std::net::SocketAddr = url
        .trim_start_matches("etcd://")
        .split(',')
        .next()
        .context("a member")?
        .parse()?;
    let relay = Relay::start(member0)?;
    nodes[2].kill_daemon()?;
    nodes[2].start(&format!("etcd://127.0.0.1:{}", relay.port))?;
    store_ctl_ok(&url, &["set-weight", "v2=20"])?;
    for n in &nodes {
        n.wait_weights(80, 20)?;
    }
    relay.set_broken(true);
    poll_until(
        Duration::from_secs(40),
        "node 2 sees the store down",
        || {
            let out = nodes[2].ctl(&["status"])?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .contains("UNREACHABLE")
                .then_some(()))
        },
    )
    .with_context(|| nodes[2].log())?;
    store_ctl_ok(&url, &["set-weight", "v2=50"])?;
    nodes[0].wait_weights(50, 50)?;
    nodes[1].wait_weights(50, 50)?;
    // Behind, failing static: still 80/20, every connection answered.
    let counts = nodes[2].count(200)?;
    assert_eq!(counts.values().sum::<usize>(), 200, "{counts:?}");
    assert_eq!(nodes[2].weights()?, Some((80, 20)));
    relay.set_broken(false);
    nodes[2].wait_weights(50, 50)?;
    Ok(())
}

#[test]
fn a_node_killed_while_changes_happen_converges_when_started_again() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (cluster, mut nodes, _) = fleet("restart", &[])?;
    let url = cluster.url();
    nodes[1].kill_daemon()?;
    for v2 in [10, 20, 30, 40, 45] {
        store_ctl_ok(&url, &["set-weight", &format!("v2={v2}")])?;
    }
    nodes[0].wait_weights(55, 45)?;
    // The kernel of the stopped node kept steering with what it had.
    assert_eq!(nodes[1].weights()?, Some((100, 0)));
    let counts = nodes[1].count(100)?;
    assert_eq!(counts.get("one"), Some(&100), "{counts:?}");
    nodes[1].start(&url)?;
    nodes[1].wait_weights(55, 45)?;
    Ok(())
}

#[test]
fn a_host_rebooted_with_the_store_down_steers_as_soon_as_the_store_answers() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut cluster = EtcdCluster::start(1)?;
    let url = cluster.url();
    let seed = cluster.dir().join("seed.yaml");
    std::fs::write(&seed, seed_config(70, 30))?;
    store_ctl_ok(&url, &["apply", "-f", &seed.to_string_lossy()])?;
    cluster.kill(0)?;
    // A freshly booted host: a new namespace, nothing pinned, the store down.
    let mut node = Node::new("reboot", 0, &[])?;
    assert!(
        !node.ctl(&["status", "--json"])?.status.success(),
        "a fresh namespace has no tcpshift state"
    );
    node.start(&url)?;
    // Meanwhile tcpshiftd installs tcpshift with no service, keeps running and retries; it
    // says the store is unreachable (log, local status); the port is not steered.
    poll_until(
        Duration::from_secs(20),
        "tcpshiftd reports the store unreachable",
        || {
            let out = node.ctl(&["status"])?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok((out.status.success() && text.contains("UNREACHABLE")).then_some(text))
        },
    )
    .with_context(|| format!("tcpshiftd's log:\n{}", node.log()))?;
    assert!(
        node.log().contains("fleet store unreachable"),
        "{}",
        node.log()
    );
    assert_eq!(node.weights()?, None, "no service before the store answers");
    let refused = in_netns(&node.path, || Ok(exchange(seed_addr(), "x").is_err()))?;
    assert!(refused, "nothing serves the port before the store answers");
    if let Some(daemon) = node.daemon.as_mut() {
        assert!(daemon.try_wait()?.is_none(), "tcpshiftd must keep running");
    }
    // The store answers: the node steers the fleet's state without a restart.
    cluster.restart(0)?;
    cluster.wait_healthy()?;
    node.wait_weights(70, 30)?;
    let counts = node.count(500)?;
    let two = *counts.get("two").unwrap_or(&0);
    assert_eq!(counts.values().sum::<usize>(), 500, "{counts:?}");
    assert!((100..=200).contains(&two), "about 30 % v2: {counts:?}");
    // And follows the next change.
    store_ctl_ok(&url, &["set-weight", "v2=0"])?;
    node.wait_weights(100, 0)?;
    let counts = node.count(100)?;
    assert_eq!(counts.get("one"), Some(&100), "{counts:?}");
    Ok(())
}

/// An etcd member behind TLS with client-certificate authentication and, once
/// [`SecureEtcd::enable_auth`] ran, user/password authentication. Certificates are made with
/// `openssl` in a temporary directory: a CA, the member's certificate (for 127.0.0.1), a
/// client certificate, and a second CA that signed nothing of this member.
struct SecureEtcd {
    dir: PathBuf,
    port: u16,
    child: Child,
}

/// `openssl ARGS` in `dir`; fails with its stderr.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("cannot run openssl (Debian's openssl package)")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A CA `NAME.pem`/`NAME.key` in `dir`.
fn make_ca(dir: &Path, name: &str) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    )
}

/// A certificate `NAME.pem`/`NAME.key` in `dir` signed by `ca`, with the extensions `ext`.
fn make_cert(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), ext)?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    )
}

impl SecureEtcd {
    fn start() -> Result<Self> {
        tcpshift_tests::etcd::require_etcd();
        let dir = std::env::temp_dir().join(format!("tcpshift-etcd-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        make_ca(&dir, "ca")?;
        make_ca(&dir, "other-ca")?;
        make_cert(
            &dir,
            "ca",
            "server",
            "etcd",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        make_cert(
            &dir,
            "ca",
            "client",
            "tcpshift-node",
            "extendedKeyUsage=clientAuth\n",
        )?;
        let ports: Vec<u16> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<_>>()?;
        let client = format!("https://127.0.0.1:{}", ports[0]);
        let peer = format!("http://127.0.0.1:{}", ports[1]);
        let log = File::create(dir.join("etcd.log"))?;
        let child = Command::new("etcd")
            .current_dir(&dir)
            .args(["--name", "secure", "--data-dir", "data"])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("secure={peer}")])
            .args(["--cert-file", "server.pem", "--key-file", "server.key"])
            .args(["--trusted-ca-file", "ca.pem", "--client-cert-auth"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start etcd")?;
        let etcd = Self {
            dir,
            port: ports[0],
            child,
        };
        poll_until(
            Duration::from_secs(30),
            "the TLS etcd member healthy",
            || {
                Ok(etcd
                    .etcdctl(&["endpoint", "health"])?
                    .status
                    .success()
                    .then_some(()))
            },
        )
        .with_context(|| std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default())?;
        Ok(etcd)
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// `etcdctl` over TLS with the client certificate (and `--user` when given).
    fn etcdctl(&self, args: &[&str]) -> Result<Output> {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://127.0.0.1:{}", self.port))
            .arg(format!("--cacert={}", self.file("ca.pem")))
            .arg(format!("--cert={}", self.file("client.pem")))
            .arg(format!("--key={}", self.file("client.key")))
            .args(["--command-timeout", "3s", "--dial-timeout", "2s"])
            .args(args)
            .output()
            .context("cannot run etcdctl")
    }

    /// Adds user root with `password` and turns authentication on.
    fn enable_auth(&self, password: &str) -> Result<()> {
        for args in [
            vec!["user", "add", &format!("root:{password}")],
            vec!["auth", "enable"],
        ] {
            let out = self.etcdctl(&args)?;
            if !out.status.success() {
                bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    }

    fn url(&self) -> String {
        format!("etcds://127.0.0.1:{}", self.port)
    }
}

impl Drop for SecureEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_store_behind_tls_and_a_password_is_followed_and_wrong_credentials_are_refused() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let etcd = SecureEtcd::start()?;
    etcd.enable_auth("s3cret-fleet")?;
    std::fs::write(etcd.dir.join("password"), "s3cret-fleet\n")?;
    std::fs::write(etcd.dir.join("wrong-password"), "guess\n")?;
    std::fs::write(etcd.dir.join("seed.yaml"), seed_config(100, 0))?;
    let (ca, other_ca, cert, key) = (
        etcd.file("ca.pem"),
        etcd.file("other-ca.pem"),
        etcd.file("client.pem"),
        etcd.file("client.key"),
    );
    let (password, wrong) = (etcd.file("password"), etcd.file("wrong-password"));
    let url = etcd.url();
    let flags = |ca: &str, password: &str| -> Vec<String> {
        [
            "--store-ca",
            ca,
            "--store-cert",
            cert.as_str(),
            "--store-key",
            key.as_str(),
            "--store-user",
            "root",
            "--store-password-file",
            password,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let ctl = |flags: &[String], args: &[&str]| -> Result<Output> {
        Command::new(bin_dir().join("tcpshiftctl"))
            .args(["--store", &url])
            .args(flags)
            .args(args)
            .output()
            .context("cannot run tcpshiftctl")
    };
    let good = flags(&ca, &password);
    let seed = etcd.file("seed.yaml");
    let out = ctl(&good, &["apply", "-f", &seed])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The data is really there, behind the password.
    let listed = etcd.etcdctl(&[
        "--user",
        "root:s3cret-fleet",
        "get",
        "--prefix",
        "--keys-only",
        "/tcpshift/v1/desired/services/",
    ])?;
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("tcp-echo"),
        "{listed:?}"
    );

    // A wrong password and a wrong CA are refused, saying why, and write nothing.
    let out = ctl(&flags(&ca, &wrong), &["set-weight", "v2=50"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot connect to the store") && err.contains("authentication failed"),
        "{err}"
    );
    eprintln!("wrong password: {err}");
    let out = ctl(&flags(&other_ca, &password), &["set-weight", "v2=50"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("wrong CA: {err}");
    assert!(!out.status.success());
    assert!(
        err.contains("cannot connect to the store") && err.contains("certificate"),
        "{err}"
    );
    // Without a client certificate the member refuses the TLS handshake.
    let out = ctl(
        &[
            "--store-ca".into(),
            ca.clone(),
            "--store-user".into(),
            "root".into(),
            "--store-password-file".into(),
            password.clone(),
        ],
        &["get", "services"],
    )?;
    assert!(!out.status.success(), "no client certificate: refused");

    // A node follows the store over TLS with the password.
    let mut node = Node::new("tls", 0, &[])?;
    let node_flags = good.iter().map(String::as_str).collect::<Vec<_>>();
    node.start_with(&url, &node_flags)?;
    node.wait_weights(100, 0)?;
    let out = ctl(&good, &["set-weight", "v2=20"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.wait_weights(80, 20)?;
    let counts = node.count(500)?;
    let two = *counts.get("two").unwrap_or(&0);
    assert_eq!(counts.values().sum::<usize>(), 500, "{counts:?}");
    assert!((50..=150).contains(&two), "about 20 % v2: {counts:?}");
    let status = ctl(&good, &["get", "nodes"])?;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains(&node.name),
        "{status:?}"
    );

    // A node with a wrong password keeps retrying and says why.
    let mut bad = Node::new("tls", 1, &[])?;
    let bad_flags = flags(&ca, &wrong);
    bad.start_with(
        &url,
        &bad_flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    poll_until(
        Duration::from_secs(20),
        "the node with a wrong password logs why",
        || Ok(bad.log().contains("authentication failed").then_some(())),
    )
    .with_context(|| bad.log())?;
    assert_eq!(bad.weights()?, None);
    Ok(())
}
