//! `tcpshiftctl apply` with the Kubernetes Gateway API flavour of Istio's tcp-echo sample
//! (Gateway, Services, TCPRoute), and `get tcproute`, `get gateway`, `get destinationrule`.
//! Each test runs in its own network namespace (see `tcpshift_tests::TestNs`).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;
use tcpshift_tests::{TestNs, count_prefixes, privileged};

/// A fixture of `tcpshift-user/tests/fixtures/<dir>/`.
fn fixture(dir: &str, name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tcpshift-user/tests/fixtures")
        .join(dir)
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

fn get_json(ns: &TestNs, what: &[&str]) -> Result<Value> {
    let mut args = vec!["get"];
    args.extend(what);
    args.extend(["-o", "json"]);
    serde_json::from_str(&ns.ctl_ok(&args)?).context("get -o json is not JSON")
}

#[test]
fn istio_gateway_api_sample_all_v1_then_20_v2_and_get_tcproute() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.2", 9000, "one")?;
    ns.echo("127.0.0.3", 9000, "two")?;
    ns.bare_loader()?;

    // Where the pods are, then the sample's all-v1 manifest, unchanged.
    let out = ns.ctl_ok(&[
        "apply",
        "-f",
        &fixture("istio", "tcp-echo-services.yaml"),
        "-f",
        &fixture("gateway-api", "tcp-echo-all-v1.yaml"),
    ])?;
    assert!(out.contains("service/tcp-echo created"), "{out}");
    let counts = count_prefixes(ingress(), 300)?;
    assert_eq!(counts.get("one"), Some(&300), "{counts:?}");

    // The TCPRoute alone, weighted 80/20: the Services are remembered from the first apply.
    let out = ns.ctl_ok(&[
        "apply",
        "-f",
        &fixture("gateway-api", "tcp-echo-20-v2.yaml"),
    ])?;
    assert!(out.contains("service/tcp-echo reweighted"), "{out}");
    let counts = count_prefixes(ingress(), 2000)?;
    let v2 = share(&counts, "two");
    eprintln!("gateway-api 20-v2 over 2000 connections: {counts:?} -> v2 {v2:.2}%");
    assert!((17.0..=23.0).contains(&v2), "v2 {v2:.2}%: {counts:?}");

    // The route as applied, weights from the kernel.
    let yaml = ns.ctl_ok(&["get", "tcproute", "tcp-echo", "-o", "yaml"])?;
    eprintln!("{yaml}");
    for line in [
        "apiVersion: gateway.networking.k8s.io/v1alpha2",
        "kind: TCPRoute",
        "  name: tcp-echo",
        "  - name: tcp-echo-gateway",
        "    sectionName: tcp-31400",
        "    - name: tcp-echo-v1",
        "      port: 9000",
        "      weight: 80",
        "    - name: tcp-echo-v2",
        "      weight: 20",
    ] {
        assert!(
            yaml.lines().any(|l| l == line),
            "{line:?} missing in:\n{yaml}"
        );
    }
    ns.ctl_ok(&["set-weight", "v1=50", "v2=50"])?;
    let route = get_json(&ns, &["tcproute", "tcp-echo"])?;
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][1]["weight"], 50);

    // What `get tcproute` prints applies again.
    let path = ns.file("route.yaml");
    std::fs::write(&path, &yaml)?;
    ns.ctl_ok(&["apply", "-f", &path.display().to_string()])?;
    let route = get_json(&ns, &["tcproute", "tcp-echo"])?;
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][1]["weight"], 20);

    // The gateway and the subsets, read back.
    let gws = get_json(&ns, &["gateway"])?;
    assert_eq!(gws[0]["kind"], "Gateway");
    assert_eq!(gws[0]["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(gws[0]["spec"]["listeners"][0]["port"], 31400);
    let dr = get_json(&ns, &["destinationrule", "tcp-echo"])?;
    assert_eq!(dr["spec"]["subsets"][1]["name"], "v2");

    // An unknown TCPRoute is an error that names the ones there are.
    let out = ns.ctl(&["get", "tcproute", "nope"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TCPRoutes: tcp-echo"));

    // The sample's cleanup.
    let out = ns.ctl_ok(&[
        "delete",
        "-f",
        &fixture("gateway-api", "tcp-echo-all-v1.yaml"),
    ])?;
    assert_eq!(out.trim(), "service/tcp-echo deleted");
    Ok(())
}

#[test]
fn istio_gateway_and_destinationrule_read_back() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut ns = TestNs::new()?;
    ns.echo("127.0.0.2", 9000, "one")?;
    ns.echo("127.0.0.3", 9000, "two")?;
    ns.bare_loader()?;
    ns.ctl_ok(&[
        "apply",
        "-f",
        &fixture("istio", "tcp-echo-services.yaml"),
        "-f",
        &fixture("istio", "tcp-echo-all-v1.yaml"),
    ])?;
    let gw = get_json(&ns, &["gateway", "tcp-echo-gateway"])?;
    assert_eq!(gw["apiVersion"], "networking.istio.io/v1");
    assert_eq!(gw["spec"]["servers"][0]["port"]["number"], 31400);
    assert_eq!(gw["spec"]["servers"][0]["port"]["protocol"], "TCP");
    let table = ns.ctl_ok(&["get", "destinationrule"])?;
    assert!(table.contains("tcp-echo\tv1,v2"), "{table}");
    Ok(())
}
