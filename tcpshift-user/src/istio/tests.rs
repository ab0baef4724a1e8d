//! Tests of parsing and resolving an apply, from the fixtures in `tests/fixtures/istio`.

use super::*;
use crate::model::{Annotation, Listen, ServiceView, SubsetConfig};
use crate::weights::MAX_WEIGHT;
use proptest::prelude::*;
use std::net::SocketAddr;
use tcpshift_common::MAX_SUBSETS;

const ALL_V1: &str = include_str!("../../tests/fixtures/istio/tcp-echo-all-v1.yaml");
const V2_20: &str = include_str!("../../tests/fixtures/istio/tcp-echo-20-v2.yaml");
const FIFTY: &str = include_str!("../../tests/fixtures/istio/tcp-echo-50-50.yaml");
const SERVICES: &str = include_str!("../../tests/fixtures/istio/tcp-echo-services.yaml");
const BAD_WEIGHT: &str = include_str!("../../tests/fixtures/istio/bad-weight.yaml");
const UNKNOWN_SUBSET: &str = include_str!("../../tests/fixtures/istio/unknown-subset.yaml");
const UNKNOWN_FIELD: &str = include_str!("../../tests/fixtures/istio/unknown-field.yaml");
const WRONG_TYPES: &str = include_str!("../../tests/fixtures/istio/wrong-types.yaml");
const PORT_MISMATCH: &str = include_str!("../../tests/fixtures/istio/port-mismatch.yaml");
const TRUNCATED: &str = include_str!("../../tests/fixtures/istio/truncated.yaml");

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Parses each (name, text) as one file of one apply.
fn manifest(files: &[(&str, &str)]) -> Result<Manifest, ApplyError> {
    let mut m = Manifest::default();
    for (name, text) in files {
        m.extend(Manifest::parse(text, name)?);
    }
    Ok(m)
}

fn plan(files: &[(&str, &str)], current: &[ServiceView]) -> Result<Plan, ApplyError> {
    manifest(files)?.resolve(current)
}

fn err(files: &[(&str, &str)], current: &[ServiceView]) -> String {
    match plan(files, current) {
        Ok(p) => panic!("expected an error, got {p:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(msg.contains(part), "{msg:?} does not contain {part:?}");
    }
}

/// The kernel after applying `plan` on top of `current` (what State::apply_with does).
fn kernel_after(current: &[ServiceView], plan: &Plan) -> Vec<ServiceView> {
    let mut out: Vec<ServiceView> = current.to_vec();
    let desired = plan.desired();
    for d in desired.services {
        let annotation = match &d.annotation {
            Annotation::Set(a) => Some(a.clone()),
            _ => None,
        };
        match out.iter_mut().find(|v| v.config.name == d.config.name) {
            Some(v) => {
                v.live = vec![true; d.config.subsets.len()];
                v.config = d.config;
                if annotation.is_some() {
                    v.annotation = annotation;
                }
            }
            None => out.push(ServiceView {
                id: out.len() as u32,
                live: vec![true; d.config.subsets.len()],
                config: d.config,
                annotation,
            }),
        }
    }
    for name in desired.clear_annotations {
        if let Some(v) = out.iter_mut().find(|v| v.config.name == name) {
            v.annotation = None;
        }
    }
    out.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    out
}

fn weights_of(p: &Plan, service: &str) -> Vec<(String, u32)> {
    p.services
        .iter()
        .find(|s| s.config.name == service)
        .map(|s| {
            s.config
                .subsets
                .iter()
                .map(|s| (s.name.clone(), s.weight))
                .collect()
        })
        .unwrap_or_default()
}

fn seed_kernel() -> Vec<ServiceView> {
    let p = plan(&[("services.yaml", SERVICES), ("all-v1.yaml", ALL_V1)], &[]).unwrap();
    kernel_after(&[], &p)
}

#[test]
fn seed_all_v1_then_20_v2() {
    let p = plan(
        &[
            ("tcp-echo-services.yaml", SERVICES),
            ("tcp-echo-all-v1.yaml", ALL_V1),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(p.services.len(), 1);
    let svc = &p.services[0];
    assert_eq!(svc.config.name, "tcp-echo");
    assert_eq!(svc.config.listen, Listen::Any { port: 31400 });
    assert_eq!(
        svc.config.subsets,
        vec![
            SubsetConfig {
                name: "v1".into(),
                addr: addr("127.0.0.2:9000"),
                weight: 100,
                owner: Default::default(),
            },
            SubsetConfig {
                name: "v2".into(),
                addr: addr("127.0.0.3:9000"),
                weight: 0,
                owner: Default::default(),
            },
        ]
    );
    assert_eq!(
        svc.route,
        Some(RouteInfo {
            virtual_service: "tcp-echo".into(),
            namespace: None,
            api_version: "networking.istio.io/v1".into(),
            hosts: vec!["*".into()],
            gateways: vec!["tcp-echo-gateway".into()],
            route: 0,
            tcp_route: None,
        })
    );
    assert_eq!(
        p.objects,
        [
            "destinationrule.networking.istio.io/tcp-echo-destination accepted: host \
             tcp-echo, subsets v1 (127.0.0.2:9000), v2 (127.0.0.3:9000)",
            "gateway.networking.istio.io/tcp-echo-gateway accepted: port 31400/TCP \
             (tcpshift keeps no gateway state: this is the listen port of the routes bound \
             to it)",
            "virtualservice.networking.istio.io/tcp-echo accepted: routes service tcp-echo",
        ]
    );
    assert!(p.warnings.is_empty());

    // Step 4 of the seed: the 20-v2 file alone, against the kernel.
    let kernel = kernel_after(&[], &p);
    let p = plan(&[("tcp-echo-20-v2.yaml", V2_20)], &kernel).unwrap();
    assert_eq!(
        weights_of(&p, "tcp-echo"),
        [("v1".into(), 80), ("v2".into(), 20)]
    );
    assert_eq!(p.services[0].config.listen, Listen::Any { port: 31400 });
    let p = plan(&[("50-50.yaml", FIFTY)], &kernel).unwrap();
    assert_eq!(
        weights_of(&p, "tcp-echo"),
        [("v1".into(), 50), ("v2".into(), 50)]
    );
    // All three in one file, in any order.
    let all = format!("{V2_20}---\n{SERVICES}---\n{ALL_V1}");
    let p = plan(&[("all.yaml", &all)], &[]);
    assert_contains(
        &p.unwrap_err().to_string(),
        &["VirtualService tcp-echo is defined twice"],
    );
    let all = format!("{V2_20}---\n{SERVICES}");
    let p = plan(&[("all.yaml", &all)], &[]).unwrap();
    assert_eq!(
        weights_of(&p, "tcp-echo"),
        [("v1".into(), 80), ("v2".into(), 20)]
    );
}

#[test]
fn every_api_version() {
    for v in VERSIONS {
        let text = ALL_V1.replace("networking.istio.io/v1\n", &format!("{GROUP}/{v}\n"));
        let p = plan(&[("s.yaml", SERVICES), ("a.yaml", &text)], &[]).unwrap();
        assert_eq!(
            weights_of(&p, "tcp-echo"),
            [("v1".into(), 100), ("v2".into(), 0)]
        );
        assert_eq!(
            p.services[0].route.as_ref().map(|r| r.api_version.clone()),
            Some(format!("{GROUP}/{v}"))
        );
    }
    let text = ALL_V1.replace(
        "networking.istio.io/v1\nkind: Gateway",
        "networking.istio.io/v2\nkind: Gateway",
    );
    assert_eq!(
        err(&[("a.yaml", &text)], &[]),
        "a.yaml:3:13: apiVersion: unsupported version \"v2\" of networking.istio.io; \
         expected one of networking.istio.io/v1, networking.istio.io/v1beta1, \
         networking.istio.io/v1alpha3"
    );
}

#[test]
fn error_fixtures() {
    let kernel = seed_kernel();
    let cases: &[(&str, &str, &str)] = &[
        (
            "bad-weight.yaml",
            BAD_WEIGHT,
            "bad-weight.yaml:20:15: VirtualService tcp-echo: spec.tcp[0].route[1].weight: \
             weight -20 is negative; expected an integer in 0..=1000000",
        ),
        (
            "unknown-subset.yaml",
            UNKNOWN_SUBSET,
            "unknown-subset.yaml:19:17: VirtualService tcp-echo: \
             spec.tcp[0].route[1].destination.subset: service \"tcp-echo\" has no subset \
             \"v3\" (its subsets: v1 (127.0.0.2:9000), v2 (127.0.0.3:9000)); declare its \
             address in the `services:` document, e.g. `services: {tcp-echo: {subsets: \
             {..., v3: 127.0.0.4:9000}}}`",
        ),
        (
            "unknown-field.yaml",
            UNKNOWN_FIELD,
            "unknown-field.yaml:16:7: VirtualService tcp-echo: spec.tcp[0].route[0]: \
             unknown field `wieght`, expected `destination` or `weight`",
        ),
        (
            "wrong-types.yaml",
            WRONG_TYPES,
            "wrong-types.yaml:16:15: VirtualService tcp-echo: spec.tcp[0].route[0].weight: \
             weight \"80\" is a string; expected an integer in 0..=1000000 (without quotes)",
        ),
        (
            "port-mismatch.yaml",
            PORT_MISMATCH,
            "port-mismatch.yaml:16:19: VirtualService tcp-echo: \
             spec.tcp[0].route[0].destination.port.number: port 9001 is not the port of \
             the subset's address (subset v1 listens on 127.0.0.2:9000): a destination \
             port is the port the subset's server listens on, like a Kubernetes service \
             port; expected 9000, or leave `port` out",
        ),
        (
            "truncated.yaml",
            TRUNCATED,
            "truncated.yaml:15:9: found unexpected end of stream, while scanning a quoted \
             scalar at line 15 column 7",
        ),
    ];
    for (name, text, expected) in cases {
        let message = err(&[(name, text)], &kernel);
        assert_eq!(&message, expected, "{name}");
    }
}

/// Every error case, with exactly what it prints (the kernel holds the seed's service).
#[test]
fn error_messages() {
    let kernel = seed_kernel();
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty", "".into(), "f.yaml: no YAML documents; expected Istio VirtualService, DestinationRule or Gateway objects and/or a tcpshift `services:` document"),
        ("comments only", "# x\n---\n# y\n".into(), "f.yaml: no YAML documents; expected Istio VirtualService, DestinationRule or Gateway objects and/or a tcpshift `services:` document"),
        ("scalar doc", "hello\n".into(), "f.yaml:1:1: the document is the string \"hello\"; expected networking.istio.io VirtualService, DestinationRule and Gateway objects, gateway.networking.k8s.io Gateway and TCPRoute objects, core v1 Services, and tcpshift `services:` documents"),
        ("list doc", "- a\n- b\n".into(), "f.yaml:1:1: the document is a list; expected networking.istio.io VirtualService, DestinationRule and Gateway objects, gateway.networking.k8s.io Gateway and TCPRoute objects, core v1 Services, and tcpshift `services:` documents"),
        ("no kind", "apiVersion: networking.istio.io/v1\nmetadata: {name: a}\n".into(), "f.yaml:1:1: missing field `kind`; expected VirtualService, DestinationRule or Gateway"),
        ("no apiVersion", "kind: VirtualService\nmetadata: {name: a}\n".into(), "f.yaml:1:1: missing field `apiVersion`; expected networking.istio.io/v1"),
        ("k8s deployment", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: tcp-echo}\nspec: {}\n".into(), "f.yaml:2:7: kind: Deployment (apps/v1) is not something tcpshift applies; it applies networking.istio.io VirtualService, DestinationRule and Gateway objects, gateway.networking.k8s.io Gateway and TCPRoute objects, core v1 Services, and tcpshift `services:` documents (where the subsets' servers listen is said by the `services:` document, not by Kubernetes Services or Deployments)"),
        ("serviceentry", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec: {}\n".into(), "f.yaml:2:7: kind: networking.istio.io kind \"ServiceEntry\" is not supported; tcpshift applies VirtualService, DestinationRule and Gateway"),
        ("kind int", "apiVersion: networking.istio.io/v1\nkind: 5\n".into(), "f.yaml:2:7: kind: got the number 5; expected a string"),
        ("wrong apiVersion for VS", "apiVersion: v1\nkind: VirtualService\n".into(), "f.yaml:1:13: apiVersion: \"v1\" is not Istio's networking API; expected one of networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3"),
        ("neither", "foo: bar\n".into(), "f.yaml:1:1: neither a tcpshift `services:` document nor a Kubernetes object (no `apiVersion` and `kind`); expected networking.istio.io VirtualService, DestinationRule and Gateway objects, gateway.networking.k8s.io Gateway and TCPRoute objects, core v1 Services, and tcpshift `services:` documents"),
        ("second doc bad", format!("{V2_20}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g}}\nspec:\n  servers:\n  - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: ['*']\n"), "f.yaml:34:46: Gateway g: spec.servers[0].port.protocol: protocol \"HTTP\" is not supported: tcpshift steers plain TCP connections in the kernel, without a proxy; expected TCP"),
        ("bad name", V2_20.replace("name: tcp-echo\nspec", "name: TCP_Echo\nspec"), "f.yaml:6:9: VirtualService TCP_Echo: metadata.name: invalid name \"TCP_Echo\"; expected a Kubernetes object name: 1 to 253 characters from a-z 0-9 - ., starting and ending with a letter or digit"),
        ("missing name", V2_20.replace("  name: tcp-echo\nspec", "  namespace: x\nspec"), "f.yaml:6:3: VirtualService: metadata: missing field `name`"),
        ("http", V2_20.replace("  tcp:\n", "  http:\n  - route: [{destination: {host: x}}]\n  tcp:\n"), "f.yaml:13:3: VirtualService tcp-echo: spec.http: HTTP routes are not supported: tcpshift steers TCP connections in the kernel, without a proxy; use `tcp` routes"),
        ("no tcp", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: ['*']}\n".into(), "f.yaml:4:7: VirtualService a: spec: no `tcp` routes; expected at least one, e.g. `tcp: [{match: [{port: 31400}], route: [{destination: {host: tcp-echo, subset: v1}}]}]`"),
        ("hosts string", V2_20.replace("  hosts:\n  - \"*\"\n", "  hosts: \"*\"\n"), "f.yaml:8:10: VirtualService tcp-echo: spec.hosts: invalid type: string \"*\", expected a sequence"),
        ("port string", V2_20.replace("- port: 31400", "- port: \"31400\""), "f.yaml:14:13: VirtualService tcp-echo: spec.tcp[0].match[0].port: port \"31400\" is a string; expected a port number in 1..=65535 (without quotes)"),
        ("port 0", V2_20.replace("- port: 31400", "- port: 0"), "f.yaml:14:13: VirtualService tcp-echo: spec.tcp[0].match[0].port: port 0 is out of range; expected a port number in 1..=65535"),
        ("port big", V2_20.replace("- port: 31400", "- port: 70000"), "f.yaml:14:13: VirtualService tcp-echo: spec.tcp[0].match[0].port: port 70000 is out of range; expected a port number in 1..=65535"),
        ("weight float", V2_20.replace("weight: 80", "weight: 80.5"), "f.yaml:21:15: VirtualService tcp-echo: spec.tcp[0].route[0].weight: weight 80.5 is not an integer; expected an integer in 0..=1000000"),
        ("weight big", V2_20.replace("weight: 80", "weight: 1000001"), "f.yaml:21:15: VirtualService tcp-echo: spec.tcp[0].route[0].weight: weight 1000001 is too large; expected an integer in 0..=1000000 (weights are relative)"),
        // Too large for any 64-bit integer (issue 20): the same message.
        ("weight beyond u64", V2_20.replace("weight: 80", "weight: 99999999999999999999"), "f.yaml:21:15: VirtualService tcp-echo: spec.tcp[0].route[0].weight: weight 99999999999999999999 is too large; expected an integer in 0..=1000000 (weights are relative)"),
        ("weight beyond u128", V2_20.replace("weight: 80", "weight: 999999999999999999999999999999999999999999"), "f.yaml:21:15: VirtualService tcp-echo: spec.tcp[0].route[0].weight: weight 1e42 is too large; expected an integer in 0..=1000000 (weights are relative)"),
        ("services weight beyond u64", "services:\n  x:\n    listen: 5\n    subsets: {a: 127.0.0.1:1}\n    weights: {a: 99999999999999999999}\n".into(), "f.yaml:5:18: services.x.weights.a: weight 99999999999999999999 is too large; expected an integer in 0..=1000000 (weights are relative)"),
        ("port beyond u64", V2_20.replace("- port: 31400", "- port: 99999999999999999999"), "f.yaml:14:13: VirtualService tcp-echo: spec.tcp[0].match[0].port: port 99999999999999999999 is out of range; expected a port number in 1..=65535"),
        ("all zero", V2_20.replace("weight: 80", "weight: 0").replace("weight: 20", "weight: 0"), "f.yaml:16:5: VirtualService tcp-echo: spec.tcp[0].route: all weights are 0 (a missing weight counts as 0 when a route has several destinations); at least one destination needs a weight above 0, e.g. `weight: 100`"),
        ("two hosts", V2_20.replacen("host: tcp-echo", "host: other", 1), "f.yaml:23:15: VirtualService tcp-echo: spec.tcp[0].route[1].destination.host: host \"tcp-echo\" differs from \"other\" of the route's first destination; the destinations of one route must be subsets of one service (a tcpshift service has one listen port and one set of weights): give each service its own route"),
        ("unknown host", V2_20.replace("host: tcp-echo", "host: nope"), "f.yaml:17:15: VirtualService tcp-echo: spec.tcp[0].route[0].destination.host: no tcpshift service named \"nope\" (services: tcp-echo): declare it with its subsets' addresses in a `services:` document of this apply (e.g. `services: {nope: {subsets: {v1: 127.0.0.2:9000}}}`) or in the loader's configuration"),
        ("dup subset", V2_20.replace("subset: v2", "subset: v1"), "f.yaml:26:17: VirtualService tcp-echo: spec.tcp[0].route[1].destination.subset: subset \"v1\" is named twice in this route; name each subset once"),
        ("no subset multi", V2_20.replace("        subset: v2\n", ""), "f.yaml:23:9: VirtualService tcp-echo: spec.tcp[0].route[1].destination: no `subset`; when a route has several destinations each names a subset"),
        ("source labels", V2_20.replace("- port: 31400", "- port: 31400\n      sourceLabels: {app: x}"), "f.yaml:15:21: VirtualService tcp-echo: spec.tcp[0].match[0].sourceLabels: `sourceLabels` is not supported: tcpshift steers every new connection to the port; remove it"),
        ("two ports", V2_20.replace("- port: 31400", "- port: 31400\n    - port: 31401"), "f.yaml:15:13: VirtualService tcp-echo: spec.tcp[0].match[1].port: a second port (31401) for one route (the first is 31400); a tcpshift service listens on one port: give each port its own route and service"),
        ("port not in gateway", ALL_V1.replace("- port: 31400", "- port: 31401"), "f.yaml:43:13: VirtualService tcp-echo: spec.tcp[0].match[0].port: port 31401 is not a port of the gateways this VirtualService is bound to (tcp-echo-gateway: 31400); expected one of their server ports"),
        ("dest port mismatch", V2_20.replace("number: 9000\n        subset: v2", "number: 9001\n        subset: v2"), "f.yaml:25:19: VirtualService tcp-echo: spec.tcp[0].route[1].destination.port.number: port 9001 is not the port of the subset's address (subset v2 listens on 127.0.0.3:9000): a destination port is the port the subset's server listens on, like a Kubernetes service port; expected 9000, or leave `port` out"),
        ("dr unknown subset", ALL_V1.replace("  - name: v2\n", "  - name: v3\n"), "f.yaml:28:11: DestinationRule tcp-echo-destination: spec.subsets[1].name: service \"tcp-echo\" has no subset \"v3\" (its subsets: v1 (127.0.0.2:9000), v2 (127.0.0.3:9000)); declare its address in the `services:` document, e.g. `services: {tcp-echo: {subsets: {..., v3: 127.0.0.4:9000}}}`"),
        ("gateway tls", ALL_V1.replace("      protocol: TCP\n", "      protocol: TCP\n    tls: {mode: SIMPLE}\n"), "f.yaml:15:10: Gateway tcp-echo-gateway: spec.servers[0].tls: `tls` is not supported: tcpshift steers plain TCP connections without a proxy; remove it (the listen address of a service goes in the `services:` document)"),
        ("gateway protocol", ALL_V1.replace("protocol: TCP", "protocol: HTTP"), "f.yaml:14:17: Gateway tcp-echo-gateway: spec.servers[0].port.protocol: protocol \"HTTP\" is not supported: tcpshift steers plain TCP connections in the kernel, without a proxy; expected TCP"),
        ("dup gateway", format!("{ALL_V1}\n---\n{}", ALL_V1.split("---").next().unwrap_or("")), "f.yaml:57:9: Gateway tcp-echo-gateway: metadata.name: Gateway tcp-echo-gateway is defined twice in this apply: first in f.yaml (line 6)"),
        ("vs and weights", format!("{V2_20}---\nservices:\n  tcp-echo:\n    subsets: {{v1: 127.0.0.2:9000, v2: 127.0.0.3:9000}}\n    weights: {{v1: 1}}\n"), "f.yaml:32:14: services.tcp-echo.weights: service \"tcp-echo\" gets weights both here and from VirtualService tcp-echo (f.yaml); give them in one place"),
        ("listen mismatch", format!("{V2_20}---\nservices:\n  tcp-echo:\n    listen: 31401\n    subsets: {{v1: 127.0.0.2:9000, v2: 127.0.0.3:9000}}\n"), "f.yaml:31:13: services.tcp-echo.listen: listen port 31401 differs from port 31400 that VirtualService tcp-echo routes (spec.tcp[0].match[0].port in f.yaml); give one port"),
        ("services bad in 2nd doc", format!("{V2_20}---\nservices:\n  tcp-echo:\n    subsets: {{v1: localhost:9000}}\n"), "f.yaml:31:19: services.tcp-echo.subsets.v1: subset address \"localhost:9000\": \"localhost\" is a host name but an IP address is needed (names are not resolved); expected IPv4:PORT (127.0.0.1:9001) or [IPv6]:PORT (\"[::1]:9001\", quoted)"),
        ("services subset limit", "services:\n  x:\n    listen: 5\n    subsets: {a: {address: 127.0.0.1:1, maxConnections: 20}}\n".into(), "f.yaml: services.x.subsets.a: `maxConnections` and `outlierDetection` are not read from a `services:` document given to `tcpshiftctl apply`; set them with a DestinationRule's `trafficPolicy` (`connectionPool.tcp.maxConnections`, `outlierDetection`; per subset under `subsets[].trafficPolicy`) in the same apply, or in tcpshiftd's configuration file"),
        ("services unknown field", format!("{V2_20}---\nservices:\n  tcp-echo:\n    subset: {{v1: 127.0.0.2:9000}}\n"), "f.yaml:31:5: services.tcp-echo: unknown field `subset`, expected one of `listen`, `subsets`, `weights`, `takeOver`, `failClosed`, `affinity`, `balance`, `protocol`"),
        ("new svc no weights", "services:\n  x:\n    listen: 5000\n    subsets: {a: 127.0.0.1:1, b: 127.0.0.1:2}\n".into(), "f.yaml:3:5: services.x: new service \"x\" has several subsets but no weights: add `weights: {a: 100, b: 0}`, or route it with a VirtualService in the same apply"),
        ("new svc no listen", "services:\n  x:\n    subsets: {a: 127.0.0.1:1}\n".into(), "f.yaml:3:5: services.x: service \"x\" has no listen port: give `listen: PORT` in the `services:` document, or route it with a VirtualService whose TCP route matches a port (`match: [{port: 31400}]`)"),
        ("listen conflict kernel", "services:\n  x:\n    listen: 31400\n    subsets: {a: 127.0.0.1:1}\n".into(), "f.yaml:3:13: services.x.listen: service \"x\" would listen on *:31400, which service \"tcp-echo\" already uses; each service needs its own port or address"),
        ("tab", "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\tmetadata: {}\n".into(), "f.yaml:3:1: found a tab character that violates indentation, while scanning a plain scalar at line 2 column 7"),
        ("deep", format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: a}}\nspec: {}", "[".repeat(200)), "f.yaml:4:134: recursion limit exceeded"),
        ("anchor", "a: &x 1\n---\nb: *x\n".into(), "f.yaml:1:1: neither a tcpshift `services:` document nor a Kubernetes object (no `apiVersion` and `kind`); expected networking.istio.io VirtualService, DestinationRule and Gateway objects, gateway.networking.k8s.io Gateway and TCPRoute objects, core v1 Services, and tcpshift `services:` documents"),
        ("weight null", V2_20.replace("weight: 80", "weight:"), "OK [(\"tcp-echo\", [0, 20])]"),
        ("status", format!("{V2_20}status: {{}}\n"), "OK [(\"tcp-echo\", [80, 20])]"),
        ("kubectl meta", V2_20.replace("  name: tcp-echo\nspec", "  name: tcp-echo\n  namespace: default\n  uid: 1234\n  resourceVersion: \"55\"\n  generation: 2\n  creationTimestamp: \"2018-11-12T23:24:57Z\"\n  labels: {app: tcp-echo}\nspec"), "OK [(\"tcp-echo\", [80, 20])]"),
    ];
    for (name, text, expected) in cases {
        let m = Manifest::parse(&text, "f.yaml");
        let got = match m.and_then(|m| {
            if m.is_empty() {
                Err(m.empty_error())
            } else {
                m.resolve(&kernel)
            }
        }) {
            Ok(p) => format!(
                "OK {:?}",
                p.services
                    .iter()
                    .map(|s| (&s.config.name, s.config.weights()))
                    .collect::<Vec<_>>()
            ),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn lines_count_from_the_start_of_the_file() {
    let text = format!(
        "{SERVICES}---\n{}",
        V2_20.replace("weight: 20", "weight: x")
    );
    let e = plan(&[("f.yaml", &text)], &[]).unwrap_err();
    let services_lines = SERVICES.lines().count();
    let weight_line = V2_20
        .lines()
        .position(|l| l.contains("weight: 20"))
        .unwrap()
        + 1;
    assert_eq!(
        e.location(),
        Some((services_lines + 1 + weight_line, Some(15)))
    );
    // A `services:` document after an Istio one.
    let text = format!("{V2_20}---\nservices:\n  tcp-echo:\n    subsets: {{v1: 1}}\n");
    let e = plan(&[("f.yaml", &text)], &[]).unwrap_err();
    let line = V2_20.lines().count() + 4;
    assert_eq!(e.location(), Some((line, Some(19))));
    assert!(
        e.to_string()
            .starts_with(&format!("f.yaml:{line}:19: services.tcp-echo"))
    );
}

#[test]
fn get_shows_what_applies_again_unchanged() {
    let kernel = seed_kernel();
    let p = plan(&[("20.yaml", V2_20)], &kernel).unwrap();
    let kernel = kernel_after(&kernel, &p);
    let shown = virtual_service(&kernel, "tcp-echo").unwrap();
    let yaml = serde_yaml::to_string(&shown).unwrap();
    assert_eq!(
        yaml,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: \
         tcp-echo\nspec:\n  hosts:\n  - '*'\n  gateways:\n  - tcp-echo-gateway\n  tcp:\n  \
         - match:\n    - port: 31400\n    route:\n    - destination:\n        host: \
         tcp-echo\n        port:\n          number: 9000\n        subset: v1\n      \
         weight: 80\n    - destination:\n        host: tcp-echo\n        port:\n          \
         number: 9000\n        subset: v2\n      weight: 20\n"
    );
    let again = plan(&[("get.yaml", &yaml)], &kernel).unwrap();
    assert_eq!(kernel_after(&kernel, &again), kernel);
    // JSON too.
    let json = serde_json::to_string(&shown).unwrap();
    let again = plan(&[("get.json", &json)], &kernel).unwrap();
    assert_eq!(kernel_after(&kernel, &again), kernel);
    // A service nobody routed shows as a VirtualService of its own name.
    let mut plain = kernel.clone();
    plain[0].annotation = None;
    let vs = virtual_service(&plain, "tcp-echo").unwrap();
    assert_eq!(vs.spec.hosts, ["tcp-echo"]);
    assert!(vs.spec.gateways.is_empty());
    assert!(virtual_service(&plain, "nope").is_none());
    let doc = serde_yaml::to_string(&services_document(&kernel)).unwrap();
    assert_eq!(
        doc,
        "services:\n  tcp-echo:\n    listen: 31400\n    subsets:\n      v1: \
         127.0.0.2:9000\n      v2: 127.0.0.3:9000\n    weights:\n      v1: 80\n      v2: \
         20\n"
    );
    // The services document applies again (and is a loader configuration).
    assert!(crate::config::Config::from_yaml_str(&doc, "get.yaml").is_ok());
    let again = plan(&[("get.yaml", &doc)], &kernel).unwrap();
    assert_eq!(weights_of(&again, "tcp-echo"), weights_of(&p, "tcp-echo"));
}

#[test]
fn reapplying_adds_and_removes_subsets() {
    let kernel = seed_kernel();
    let p = plan(&[("20.yaml", V2_20)], &kernel).unwrap();
    let kernel = kernel_after(&kernel, &p);
    // A services document without weights keeps the kernel's, new subsets get 0.
    let three = "services:\n  tcp-echo:\n    subsets: {v1: 127.0.0.2:9000, v2: \
                 127.0.0.3:9000, v3: 127.0.0.4:9000}\n";
    let p = plan(&[("3.yaml", three)], &kernel).unwrap();
    assert_eq!(
        weights_of(&p, "tcp-echo"),
        [("v1".into(), 80), ("v2".into(), 20), ("v3".into(), 0)]
    );
    assert_eq!(p.services[0].config.listen, Listen::Any { port: 31400 });
    assert_eq!(p.services[0].route, None, "the stored route is kept");
    let kernel = kernel_after(&kernel, &p);
    // Dropping v2 keeps v1's weight.
    let p = plan(
        &[(
            "1.yaml",
            "services:\n  tcp-echo:\n    subsets: {v1: 127.0.0.2:9000, v3: 127.0.0.4:9000}\n",
        )],
        &kernel,
    )
    .unwrap();
    assert_eq!(
        weights_of(&p, "tcp-echo"),
        [("v1".into(), 80), ("v3".into(), 0)]
    );
    // Dropping every weighted subset needs weights.
    let e = err(
        &[(
            "v3.yaml",
            "services:\n  tcp-echo:\n    subsets: {v3: 127.0.0.4:9000}\n",
        )],
        &kernel,
    );
    assert!(e.starts_with("v3.yaml:3:5: services.tcp-echo: `weights` is missing, and none"));
    // A single subset needs none when the service is new.
    let p = plan(
        &[(
            "n.yaml",
            "services:\n  n: {listen: 5, subsets: {a: 127.0.0.1:1}}\n",
        )],
        &kernel,
    )
    .unwrap();
    assert_eq!(weights_of(&p, "n"), [("a".into(), 100)]);
}

#[test]
fn listen_port_from_the_route_or_the_gateway() {
    // No match port: the bound gateway's port.
    let no_match = ALL_V1.replace("  - match:\n    - port: 31400\n    route:", "  - route:");
    let p = plan(&[("s.yaml", SERVICES), ("a.yaml", &no_match)], &[]).unwrap();
    assert_eq!(p.services[0].config.listen, Listen::Any { port: 31400 });
    // A gateway with two ports and no match port: ambiguous.
    let two = no_match.replace(
        "  servers:\n",
        "  servers:\n  - port: {number: 31401, name: tcp2, protocol: TCP}\n    hosts: ['*']\n",
    );
    let e = err(&[("s.yaml", SERVICES), ("a.yaml", &two)], &[]);
    assert!(e.contains("several ports (31400, 31401)"), "{e}");
    // The listen address of the kernel is kept, the port follows the route.
    let mut kernel = seed_kernel();
    kernel[0].config.listen = Listen::Addr("[::1]:31400".parse().unwrap());
    let moved = V2_20.replace("port: 31400", "port: 31401");
    let p = plan(&[("m.yaml", &moved)], &kernel).unwrap();
    assert_eq!(
        p.services[0].config.listen,
        Listen::Addr("[::1]:31401".parse().unwrap())
    );
    // No port anywhere for a new service.
    let e = err(
        &[
            ("s.yaml", SERVICES),
            (
                "v.yaml",
                &no_match
                    .split("---")
                    .last()
                    .unwrap()
                    .replace("  gateways:\n  - tcp-echo-gateway\n", ""),
            ),
        ],
        &[],
    );
    assert!(e.contains("has no listen port"), "{e}");
}

#[test]
fn route_without_subset_spreads_over_every_subset() {
    let kernel = seed_kernel();
    let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: \
                all}\nspec:\n  tcp:\n  - match: [{port: 31400}]\n    route:\n    - \
                destination: {host: tcp-echo, port: {number: 9000}}\n";
    let p = plan(&[("all.yaml", text)], &kernel).unwrap();
    assert_eq!(
        weights_of(&p, "tcp-echo"),
        [("v1".into(), 1), ("v2".into(), 1)]
    );
    let e = err(&[("all.yaml", &text.replace("9000", "9001"))], &kernel);
    assert!(e.contains("port 9001 is not the port"), "{e}");
}

#[test]
fn a_virtual_service_reapplied_with_other_routes_forgets_the_old_ones() {
    let kernel = seed_kernel();
    let other = "services:\n  other: {listen: 5000, subsets: {a: 127.0.0.1:1}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: \
                 tcp-echo}\nspec:\n  tcp:\n  - route: [{destination: {host: other}}]\n";
    let p = plan(&[("o.yaml", other)], &kernel).unwrap();
    assert_eq!(p.unrouted, ["tcp-echo"]);
    let kernel = kernel_after(&kernel, &p);
    let shown = virtual_services(&kernel);
    let names: Vec<&str> = shown.iter().map(|v| v.metadata.name.as_str()).collect();
    assert_eq!(names, ["tcp-echo"]);
    // tcp-echo is shown under its own name again, `other` under the VirtualService.
    let hosts: Vec<&str> = shown[0]
        .spec
        .tcp
        .iter()
        .map(|r| r.route[0].destination.host.as_str())
        .collect();
    assert_eq!(hosts, ["other", "tcp-echo"]);
    assert_eq!(
        services_of_virtual_service(&kernel, "tcp-echo"),
        ["other", "tcp-echo"]
    );
}

#[test]
fn services_a_delete_removes() {
    let kernel = seed_kernel();
    let m = manifest(&[("a.yaml", ALL_V1)]).unwrap();
    assert_eq!(m.services_to_delete(&kernel), ["tcp-echo"]);
    let m = manifest(&[("s.yaml", SERVICES)]).unwrap();
    assert_eq!(m.services_to_delete(&kernel), ["tcp-echo"]);
    let gateway_only = ALL_V1.split("---").next().unwrap();
    let m = manifest(&[("g.yaml", gateway_only)]).unwrap();
    assert!(m.services_to_delete(&kernel).is_empty());
    assert_eq!(m.objects(), ["Gateway tcp-echo-gateway"]);
}

fn weights_yaml(weights: &[u32]) -> String {
    let mut yaml = String::from("services:\n  s:\n    listen: 7000\n    subsets:\n");
    for (i, _) in weights.iter().enumerate() {
        yaml.push_str(&format!("      v{i}: 127.0.0.1:{}\n", 9000 + i));
    }
    yaml.push_str(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: \
         s}\nspec:\n  tcp:\n  - route:\n",
    );
    for (i, w) in weights.iter().enumerate() {
        yaml.push_str(&format!(
            "    - destination: {{host: s, subset: v{i}}}\n      weight: {w}\n"
        ));
    }
    yaml
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any weights a VirtualService is accepted with give a bucket table whose shares
    /// match the weights to within one bucket.
    #[test]
    fn accepted_weights_give_shares_within_one_bucket(
        weights in proptest::collection::vec(
            prop_oneof![Just(0u32), 0..=100u32, 0..=MAX_WEIGHT],
            1..=MAX_SUBSETS,
        )
    ) {
        let yaml = weights_yaml(&weights);
        let result = plan(&[("w.yaml", &yaml)], &[]);
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        if total == 0 && weights.len() > 1 {
            prop_assert!(result.is_err());
            return Ok(());
        }
        let p = result.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let applied = p.services[0].config.weights();
        let counts = crate::weights::bucket_counts(&applied)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let n = tcpshift_common::NUM_BUCKETS as f64;
        let applied_total: f64 = applied.iter().map(|&w| f64::from(w)).sum();
        for (i, &w) in applied.iter().enumerate() {
            let got = f64::from(counts[i]);
            let want = f64::from(w) * n / applied_total;
            prop_assert!((got - want).abs() <= 1.0, "subset {i}: {got} positions, exact {want}");
        }
        // The route's weights are the applied ones (a lone destination with weight 0
        // receives everything, as in Istio).
        if weights.len() > 1 {
            prop_assert_eq!(applied, weights);
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        if let Ok(m) = Manifest::parse(&text, "fuzz.yaml") {
            let _ = m.resolve(&seed_kernel());
        }
    }

    #[test]
    fn yaml_like_text_never_panics(
        text in "[a-zA-Z0-9:{}\\[\\], \\n\"'&*!#.|>-]{0,300}"
    ) {
        if let Ok(m) = Manifest::parse(&text, "fuzz.yaml") {
            let _ = m.resolve(&seed_kernel());
        }
    }

    #[test]
    fn mutated_fixtures_never_panic(
        which in 0..4usize,
        at in 0..2000usize,
        len in 0..30usize,
        insert in "[ -~\\n]{0,12}",
    ) {
        let base = [ALL_V1, V2_20, SERVICES, FIFTY][which];
        let at = at % base.len();
        let mut doc = base.to_owned();
        let end = (at + len).min(doc.len());
        doc.replace_range(at..end, &insert);
        let kernel = seed_kernel();
        if let Ok(m) = Manifest::parse(&doc, "fuzz.yaml") {
            let _ = m.resolve(&kernel);
            let _ = m.services_to_delete(&kernel);
        }
    }

    #[test]
    fn truncated_fixtures_never_panic(which in 0..4usize, cut in 0..2000usize) {
        let base = [ALL_V1, V2_20, SERVICES, FIFTY][which];
        let mut cut = cut % (base.len() + 1);
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        if let Ok(m) = Manifest::parse(&base[..cut], "fuzz.yaml") {
            let _ = m.resolve(&seed_kernel());
        }
    }
}
