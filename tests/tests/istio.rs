//! `tcpshiftctl apply` with Istio's manifests, many services, IPv6, bad files and concurrent
//! applies. Each test runs in its own network namespace (see `tcpshift_tests::TestNs`).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tcpshift_tests::{TestNs, bin_dir, count_prefixes, exchange, privileged};

/// A fixture of `tcpshift-user/tests/fixtures/istio/`.
fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tcpshift-user/tests/fixtures/istio")
        .join(name)
        .display()
        .to_string()
}

fn ingress() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 31400))
}

fn share(counts: &BTreeMap<String, usize>, prefix: &str) -> f64 {
    let total: usize = counts.values().sum();
    *counts.get(prefix).unwrap_or(&0) as f64 * 100.0 / total.max(1) as f64
}

/// The seed's two "pods": v1 ("one") at 127.0.0.2:9000, v2 ("two") at 127.0.0.3:9000, and a
/// tcpshiftd without configuration.
fn seed_pods(ns: &mut TestNs) -> Result<()> {
    ns.echo("127.0.0.2", 9000, "one")?;
    ns.echo("127.0.0.3", 9000, "two")?;
    ns.bare_loader()?;
    Ok(())
}

/// `tcpshiftctl apply -f F1 -f F2 ...`; fails unless it succeeds.
fn apply(ns: &TestNs, files: &[&str]) -> Result<String> {
    let mut args = vec!["apply"];
    for f in files {
        args.extend(["-f", f]);
    }
    ns.ctl_ok(&args)
}

/// `tcpshiftctl get ... -o json`, parsed.
fn get_json(ns: &TestNs, what: &[&str]) -> Result<Value> {
    let mut args = vec!["get"];
    args.extend(what);
    args.extend(["-o", "json"]);
    serde_json::from_str(&ns.ctl_ok(&args)?).context("get -o json is not JSON")
}

/// (subset, weight) of a service in `get services -o json`.
fn weights(services: &Value, service: &str) -> Vec<(String, u64)> {
    services["services"][service]["weights"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(u64::MAX)))
                .collect()
        })
        .unwrap_or_default()
}

fn pairs(p: &[(&str, u64)]) -> Vec<(String, u64)> {
    p.iter().map(|(s, w)| (s.to_string(), *w)).collect()
}

#[test]
fn seed_manifests_all_v1_then_20_v2_and_get_virtualservice() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed_pods(&mut ns)?;

    // Steps 1 and 2 of the seed: where the pods are, then Istio's tcp-echo-all-v1.yaml.
    let out = apply(
        &ns,
        &[
            &fixture("tcp-echo-services.yaml"),
            &fixture("tcp-echo-all-v1.yaml"),
        ],
    )?;
    assert!(out.contains("service/tcp-echo created"), "{out}");
    let status = ns.status()?;
    assert!(
        tcpshift_tests::subsets(&status).all(|s| s["live"] == true),
        "apply registers the sockets at once: {status}"
    );
    let counts = count_prefixes(ingress(), 500)?;
    assert_eq!(counts.get("one"), Some(&500), "{counts:?}");

    // Step 4: tcp-echo-20-v2.yaml alone.
    let out = apply(&ns, &[&fixture("tcp-echo-20-v2.yaml")])?;
    assert!(out.contains("service/tcp-echo reweighted"), "{out}");
    let counts = count_prefixes(ingress(), 2000)?;
    let v2 = share(&counts, "two");
    eprintln!("20-v2 over 2000 connections: {counts:?} -> v2 {v2:.2}%");
    assert!((17.0..=23.0).contains(&v2), "v2 {v2:.2}%: {counts:?}");

    // Step 5: the VirtualService as the kernel has it.
    let yaml = ns.ctl_ok(&["get", "virtualservice", "tcp-echo", "-o", "yaml"])?;
    eprintln!("{yaml}");
    for line in [
        "kind: VirtualService",
        "  name: tcp-echo",
        "    - port: 31400",
        "        host: tcp-echo",
        "          number: 9000",
        "        subset: v1",
        "      weight: 80",
        "        subset: v2",
        "      weight: 20",
        "  - tcp-echo-gateway",
    ] {
        assert!(
            yaml.lines().any(|l| l == line),
            "{line:?} missing in:\n{yaml}"
        );
    }
    let vs = get_json(&ns, &["virtualservice", "tcp-echo"])?;
    let route = &vs["spec"]["tcp"][0]["route"];
    assert_eq!(route[0]["weight"], 80);
    assert_eq!(route[1]["weight"], 20);
    assert_eq!(route[1]["destination"]["subset"], "v2");

    // Weights read back from the kernel: a set-weight shows in the VirtualService.
    ns.ctl_ok(&["set-weight", "v1=50", "v2=50"])?;
    let vs = get_json(&ns, &["virtualservice", "tcp-echo"])?;
    assert_eq!(vs["spec"]["tcp"][0]["route"][0]["weight"], 50);

    // What `get` prints applies again, and changes nothing.
    let path = ns.file("vs.yaml");
    std::fs::write(&path, &yaml)?;
    apply(&ns, &[&path.display().to_string()])?;
    let services = get_json(&ns, &["services"])?;
    assert_eq!(
        weights(&services, "tcp-echo"),
        pairs(&[("v1", 80), ("v2", 20)])
    );

    // The older API versions of the same objects.
    for version in ["v1beta1", "v1alpha3"] {
        let text = std::fs::read_to_string(fixture("tcp-echo-50-50.yaml"))?.replace(
            "networking.istio.io/v1\n",
            &format!("networking.istio.io/{version}\n"),
        );
        let path = ns.file(&format!("50-50-{version}.yaml"));
        std::fs::write(&path, text)?;
        apply(&ns, &[&path.display().to_string()])?;
        let services = get_json(&ns, &["services"])?;
        assert_eq!(
            weights(&services, "tcp-echo"),
            pairs(&[("v1", 50), ("v2", 50)])
        );
        let vs = get_json(&ns, &["virtualservice", "tcp-echo"])?;
        assert_eq!(vs["apiVersion"], format!("networking.istio.io/{version}"));
    }

    // The seed's cleanup: delete what tcp-echo-all-v1.yaml applied.
    let out = ns.ctl_ok(&["delete", "-f", &fixture("tcp-echo-all-v1.yaml")])?;
    assert_eq!(out.trim(), "service/tcp-echo deleted");
    let err = std::net::TcpStream::connect_timeout(&ingress(), Duration::from_secs(2))
        .expect_err("nothing is steered on 31400 any more");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let out = ns.ctl(&["delete", "service", "tcp-echo"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found: service/tcp-echo"));
    Ok(())
}

#[test]
fn a_thousand_services_in_one_file_each_steered_to_its_own_backend() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    const N: u16 = 1000;
    const BACKENDS: u16 = 20_000; // subsets v1 at 20000 + 2i, v2 at 20001 + 2i
    const LISTEN: u16 = 30_000; // service i listens on 30000 + i
    let mut ns = TestNs::new()?;
    // One process, 2000 ports, each reply tagged with the port that accepted it.
    let ports: Vec<String> = (0..2 * N).map(|p| (BACKENDS + p).to_string()).collect();
    ns.echo_args(&[
        "--bind",
        "127.0.0.1",
        "--port-in-prefix",
        &ports.join(","),
        "b",
    ])?;
    ns.bare_loader()?;

    // One file: a services document with every backend, then one VirtualService per service:
    // i % 3 == 0 all to v1, 1 all to v2, 2 half and half.
    let mut yaml = String::from("services:\n");
    for i in 0..N {
        let v1 = BACKENDS + 2 * i;
        writeln!(
            yaml,
            "  svc-{i}: {{subsets: {{v1: 127.0.0.1:{v1}, v2: 127.0.0.1:{}}}}}",
            v1 + 1
        )?;
    }
    for i in 0..N {
        let route = match i % 3 {
            0 => "[{destination: {host: svc-I, subset: v1}}]".to_owned(),
            1 => "[{destination: {host: svc-I, subset: v2}, weight: 7}]".to_owned(),
            _ => "[{destination: {host: svc-I, subset: v1}, weight: 1}, \
                  {destination: {host: svc-I, subset: v2}, weight: 1}]"
                .to_owned(),
        }
        .replace('I', &i.to_string());
        write!(
            yaml,
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  \
             name: svc-{i}\nspec:\n  hosts: [\"svc-{i}\"]\n  tcp:\n  - match: [{{port: {}}}]\n    \
             route: {route}\n",
            LISTEN + i
        )?;
    }
    let path = ns.file("many.yaml");
    std::fs::write(&path, &yaml)?;
    let start = Instant::now();
    let out = apply(&ns, &[&path.display().to_string()])?;
    eprintln!(
        "applied {N} services ({} bytes of YAML) in {:?}",
        yaml.len(),
        start.elapsed()
    );
    assert_eq!(out.matches(" created: ").count(), usize::from(N), "{out}");

    let services = get_json(&ns, &["services"])?;
    assert_eq!(
        services["services"].as_object().map(|m| m.len()),
        Some(usize::from(N))
    );
    let status = ns.status()?;
    let live = tcpshift_tests::subsets(&status)
        .filter(|s| s["live"] == true)
        .count();
    assert_eq!(live, 2 * usize::from(N), "every subset has its socket");

    let start = Instant::now();
    let mut halves = [0usize; 2];
    for i in 0..N {
        let addr = SocketAddr::from(([127, 0, 0, 1], LISTEN + i));
        let got = exchange(addr, &format!("to svc-{i}"))?;
        let v1 = format!("b:{}", BACKENDS + 2 * i);
        let v2 = format!("b:{}", BACKENDS + 2 * i + 1);
        match i % 3 {
            0 => ensure!(got == v1, "svc-{i}: expected {v1}, got {got}"),
            1 => ensure!(got == v2, "svc-{i}: expected {v2}, got {got}"),
            _ => {
                ensure!(got == v1 || got == v2, "svc-{i}: got {got}");
                halves[usize::from(got == v2)] += 1;
            }
        }
    }
    eprintln!(
        "{N} connections, one per service, in {:?}; 50/50 services: {halves:?}",
        start.elapsed()
    );
    assert!(halves[0] > 100 && halves[1] > 100, "{halves:?}");
    Ok(())
}

#[test]
fn ipv6_listen_address_ipv6_clients_and_dual_stack_backends() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    // "dual": tcp-echo's default dual-stack [::] socket; "six": IPv6 only, on ::1.
    ns.echo_args(&["9301", "dual"])?;
    ns.echo("::1", 9302, "six")?;
    ns.bare_loader()?;
    let yaml = r#"services:
  v6:
    listen: "[::1]:31500"
    subsets:
      dual: 127.0.0.1:9301
      six: "[::1]:9302"
  any:
    subsets:
      dual: "[::1]:9301"
  v4only:
    listen: 127.0.0.1:31502
    subsets:
      dual: 127.0.0.1:9301
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: v6
spec:
  hosts: ["v6"]
  tcp:
  - match:
    - port: 31500
    route:
    - destination: {host: v6, subset: dual}
      weight: 50
    - destination: {host: v6, subset: six}
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: any
spec:
  hosts: ["any"]
  tcp:
  - match:
    - port: 31501
    route:
    - destination: {host: any, subset: dual, port: {number: 9301}}
"#;
    let path = ns.file("v6.yaml");
    std::fs::write(&path, yaml)?;
    apply(&ns, &[&path.display().to_string()])?;
    let services = get_json(&ns, &["services"])?;
    assert_eq!(services["services"]["v6"]["listen"], "[::1]:31500");
    assert_eq!(services["services"]["any"]["listen"], 31501);
    assert_eq!(services["services"]["v4only"]["listen"], "127.0.0.1:31502");

    // An IPv6 client to an IPv6 listen address: both backends, about half each.
    let v6: SocketAddr = "[::1]:31500".parse()?;
    let counts = count_prefixes(v6, 400)?;
    eprintln!("[::1]:31500 50/50: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 400);
    let dual = share(&counts, "dual");
    assert!((40.0..=60.0).contains(&dual), "{counts:?}");
    // IPv4 clients to that port are not steered (nothing listens on 127.0.0.1:31500).
    let err = std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], 31500)),
        Duration::from_secs(2),
    )
    .expect_err("31500 is only steered on ::1");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    // Any local address: IPv4 and IPv6 clients both reach the dual-stack backend.
    for addr in ["127.0.0.1:31501", "[::1]:31501"] {
        let counts = count_prefixes(addr.parse()?, 100)?;
        assert_eq!(counts.get("dual"), Some(&100), "{addr}: {counts:?}");
    }
    // A given IPv4 address: steered there, not on ::1.
    let counts = count_prefixes("127.0.0.1:31502".parse()?, 50)?;
    assert_eq!(counts.get("dual"), Some(&50), "{counts:?}");
    let err = std::net::TcpStream::connect_timeout(&"[::1]:31502".parse()?, Duration::from_secs(2))
        .expect_err("31502 is only steered on 127.0.0.1");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    let vs = get_json(&ns, &["virtualservice", "v6"])?;
    assert_eq!(vs["spec"]["tcp"][0]["match"][0]["port"], 31500);
    Ok(())
}

#[test]
fn a_bad_file_leaves_the_running_split_as_it_was() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed_pods(&mut ns)?;
    apply(
        &ns,
        &[
            &fixture("tcp-echo-services.yaml"),
            &fixture("tcp-echo-all-v1.yaml"),
        ],
    )?;
    apply(&ns, &[&fixture("tcp-echo-20-v2.yaml")])?;
    let snapshot = |ns: &TestNs| -> Result<(Value, Value, Value)> {
        let mut status = ns.status()?;
        // Only the definition and the weights; counters move with traffic.
        if let Some(services) = status["services"].as_array_mut() {
            for s in services {
                for sub in s["subsets"].as_array_mut().into_iter().flatten() {
                    sub["counters"] = Value::Null;
                    sub["observed_share"] = Value::Null;
                }
            }
        }
        status["warnings"] = Value::Null;
        Ok((
            status["services"].clone(),
            get_json(ns, &["services"])?,
            get_json(ns, &["virtualservice"])?,
        ))
    };
    let before = snapshot(&ns)?;

    // A file whose first documents are fine and whose last one is not: nothing applies.
    let good_then_bad = format!(
        "services:\n  extra:\n    listen: 31600\n    subsets: {{v1: 127.0.0.2:9000}}\n---\n{}---\n{}",
        std::fs::read_to_string(fixture("tcp-echo-50-50.yaml"))?,
        std::fs::read_to_string(fixture("bad-weight.yaml"))?
    );
    let mixed = ns.file("good-then-bad.yaml");
    std::fs::write(&mixed, good_then_bad)?;
    // Fine alone, but a listen conflict with the service in the kernel.
    let conflict = ns.file("conflict.yaml");
    std::fs::write(
        &conflict,
        "services:\n  other:\n    listen: 31400\n    subsets: {v1: 127.0.0.2:9000}\n",
    )?;
    let cases: Vec<(String, &str)> = vec![
        (fixture("bad-weight.yaml"), "bad-weight.yaml:20:15: "),
        (
            fixture("unknown-subset.yaml"),
            "unknown-subset.yaml:19:17: ",
        ),
        (fixture("unknown-field.yaml"), "unknown-field.yaml:16:7: "),
        (fixture("wrong-types.yaml"), "wrong-types.yaml:16:15: "),
        (fixture("port-mismatch.yaml"), "port-mismatch.yaml:16:19: "),
        (fixture("truncated.yaml"), "truncated.yaml:15:9: "),
        (mixed.display().to_string(), "good-then-bad.yaml:52:15: "),
        (conflict.display().to_string(), "conflict.yaml:3:13: "),
        (
            fixture("no-such-file.yaml"),
            "no-such-file.yaml: cannot read",
        ),
    ];
    for (file, expected) in &cases {
        let out = ns.ctl(&["apply", "-f", file])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stderr}");
        assert!(!out.status.success(), "{file} was accepted");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr:?}");
        assert_eq!(snapshot(&ns)?, before, "after {file}");
    }
    // The split still runs at 80/20.
    let counts = count_prefixes(ingress(), 1000)?;
    let v2 = share(&counts, "two");
    assert!((16.0..=24.0).contains(&v2), "v2 {v2:.2}%: {counts:?}");
    Ok(())
}

#[test]
fn subsets_added_and_removed_by_reapplying() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    seed_pods(&mut ns)?;
    ns.echo("127.0.0.4", 9000, "three")?;
    apply(
        &ns,
        &[
            &fixture("tcp-echo-services.yaml"),
            &fixture("tcp-echo-20-v2.yaml"),
        ],
    )?;
    // Add v3: the weights in the kernel stay, v3 gets 0.
    let three = ns.file("three.yaml");
    std::fs::write(
        &three,
        "services:\n  tcp-echo:\n    subsets:\n      v1: 127.0.0.2:9000\n      v2: 127.0.0.3:9000\n      v3: 127.0.0.4:9000\n",
    )?;
    let out = apply(&ns, &[&three.display().to_string()])?;
    assert!(out.contains("service/tcp-echo configured"), "{out}");
    let services = get_json(&ns, &["services"])?;
    assert_eq!(
        weights(&services, "tcp-echo"),
        pairs(&[("v1", 80), ("v2", 20), ("v3", 0)])
    );
    // Route to v3 only.
    let to_v3 = ns.file("to-v3.yaml");
    std::fs::write(
        &to_v3,
        std::fs::read_to_string(fixture("tcp-echo-all-v1.yaml"))?
            .replace("subset: v1\n", "subset: v3\n")
            .replace(
                "      version: v2\n",
                "      version: v2\n  - name: v3\n    labels:\n      version: v3\n",
            ),
    )?;
    apply(&ns, &[&to_v3.display().to_string()])?;
    let counts = count_prefixes(ingress(), 200)?;
    assert_eq!(counts.get("three"), Some(&200), "{counts:?}");
    // Remove v2 (and v1): only v3 is left, still serving.
    let only = ns.file("only-v3.yaml");
    std::fs::write(
        &only,
        "services:\n  tcp-echo:\n    subsets:\n      v3: 127.0.0.4:9000\n",
    )?;
    apply(&ns, &[&only.display().to_string()])?;
    let services = get_json(&ns, &["services"])?;
    assert_eq!(weights(&services, "tcp-echo"), pairs(&[("v3", 100)]));
    // v3 moved from index 2 to 0: its socket is registered again by apply.
    let counts = count_prefixes(ingress(), 200)?;
    assert_eq!(counts.get("three"), Some(&200), "{counts:?}");
    // Deleting the VirtualService deletes the service it routes.
    let out = ns.ctl_ok(&["delete", "virtualservice", "tcp-echo"])?;
    assert_eq!(out.trim(), "service/tcp-echo deleted");
    let out = ns.ctl_ok(&["get", "services"])?;
    assert!(out.contains("(no services)"), "{out}");
    Ok(())
}

#[test]
fn eight_processes_applying_concurrently_lose_nothing() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    const WRITERS: u16 = 8;
    const ROUNDS: u16 = 3;
    let mut ns = TestNs::new()?;
    seed_pods(&mut ns)?;
    // Writer k applies, in one file: its own service own-k-r and the shared service, routed
    // by its own VirtualService with weights (k + 1, 8 - k).
    let mut files = Vec::new();
    for r in 0..ROUNDS {
        for k in 0..WRITERS {
            let yaml = format!(
                "services:\n  own-{k}-{r}:\n    listen: {}\n    subsets: {{v1: 127.0.0.2:9000}}\n  \
                 shared:\n    listen: 31400\n    subsets: {{v1: 127.0.0.2:9000, v2: 127.0.0.3:9000}}\n\
                 ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  \
                 name: shared-from-{k}\nspec:\n  hosts: [\"*\"]\n  tcp:\n  - route:\n    - \
                 destination: {{host: shared, subset: v1}}\n      weight: {}\n    - destination: \
                 {{host: shared, subset: v2}}\n      weight: {}\n",
                32000 + r * 100 + k,
                k + 1,
                WRITERS - k
            );
            let path = ns.file(&format!("writer-{k}-{r}.yaml"));
            std::fs::write(&path, yaml)?;
            files.push((k, r, path));
        }
    }
    // The shared service exists before the writers start, so that every concurrent
    // set-weight on it has something to change and must succeed.
    let initial = ns.file("shared.yaml");
    std::fs::write(
        &initial,
        "services:\n  shared:\n    listen: 31400\n    subsets: {v1: 127.0.0.2:9000, v2: \
         127.0.0.3:9000}\n    weights: {v1: 1, v2: 1}\n",
    )?;
    apply(&ns, &[&initial.display().to_string()])?;
    for r in 0..ROUNDS {
        let mut children = Vec::new();
        for (k, _, path) in files.iter().filter(|(_, fr, _)| *fr == r) {
            let child = Command::new(bin_dir().join("tcpshiftctl"))
                .arg("apply")
                .arg("-f")
                .arg(path)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            children.push((format!("apply by writer {k}, round {r}"), child));
        }
        // set-weight processes run at the same time: they too take the lock, and each must
        // succeed.
        for i in 0..4 {
            let child = Command::new(bin_dir().join("tcpshiftctl"))
                .args(["set-weight", "--service", "shared", "v1=1", "v2=1"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            children.push((format!("set-weight {i}, round {r}"), child));
        }
        for (what, child) in children {
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "{what} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    let services = get_json(&ns, &["services"])?;
    let map = services["services"].as_object().context("services")?;
    for r in 0..ROUNDS {
        for k in 0..WRITERS {
            assert!(
                map.contains_key(&format!("own-{k}-{r}")),
                "own-{k}-{r} lost"
            );
        }
    }
    assert_eq!(map.len(), usize::from(WRITERS * ROUNDS) + 1);
    // No write was lost: the last round's set-weights and applies all succeeded, so the
    // shared service is exactly one writer's version: its weights and the VirtualService
    // recorded with them come from the same file (or from the last set-weight, 1/1).
    let w = weights(&services, "shared");
    let vs: Value = get_json(&ns, &["services"])?;
    let table = ns.ctl_ok(&["get", "services", "shared"])?;
    eprintln!("{table}");
    let from = table
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default()
        .to_owned();
    let k: u64 = from
        .strip_prefix("shared-from-")
        .and_then(|k| k.parse().ok())
        .with_context(|| format!("virtual service {from:?} in {table}"))?;
    let expected = pairs(&[("v1", k + 1), ("v2", u64::from(WRITERS) - k)]);
    assert!(
        w == expected || w == pairs(&[("v1", 1), ("v2", 1)]),
        "shared has {w:?}, from {from} ({vs})"
    );
    Ok(())
}

#[test]
fn apply_needs_tcpshift_installed_but_not_a_running_loader() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.2", 9000, "one")?;
    // Not installed: refused, and it says what to do.
    let out = ns.ctl(&["apply", "-f", &fixture("tcp-echo-services.yaml")])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tcpshift is not installed in this network namespace")
            && stderr.contains("start the loader first: tcpshiftd"),
        "{stderr}"
    );
    // Installed, loader gone: apply writes the maps and registers what listens, and says
    // that nothing will register a backend that starts later.
    let loader = ns.bare_loader()?;
    ns.kill(loader)?;
    let out = ns.ctl(&[
        "apply",
        "-f",
        &fixture("tcp-echo-services.yaml"),
        "-f",
        &fixture("tcp-echo-all-v1.yaml"),
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "warning: service/tcp-echo subset v2 (127.0.0.3:9000): nothing listens there, so \
             it has no registered socket and tcpshiftd is not running: start its server and \
             tcpshiftd, or it will receive no connections"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("note: tcpshiftd is not running in this network namespace"),
        "{stderr}"
    );
    let counts = count_prefixes(ingress(), 100)?;
    assert_eq!(counts.get("one"), Some(&100), "{counts:?}");
    // v2's server starts later: without a loader nothing registers it by itself, but the
    // next apply does (it registers whatever listens now for the services it touches).
    ns.echo("127.0.0.3", 9000, "two")?;
    apply(&ns, &[&fixture("tcp-echo-50-50.yaml")])?;
    let status = ns.status()?;
    assert_eq!(
        tcpshift_tests::subset(&status, "v2").map(|s| s["live"].clone()),
        Some(Value::Bool(true)),
        "apply registered v2, whose server listens now: {status}"
    );
    let counts = count_prefixes(ingress(), 400)?;
    let v2 = share(&counts, "two");
    assert!((40.0..=60.0).contains(&v2), "v2 {v2:.2}%: {counts:?}");
    Ok(())
}
