//! The Kubernetes Gateway API flavour of an apply: `gateway.networking.k8s.io` `Gateway`
//! (v1, v1beta1) with TCP listeners, `TCPRoute` (v1alpha2) with weighted `backendRefs`, and
//! core `v1` `Service` objects naming the backends, as in Istio's Gateway API flavour of the
//! tcp-echo sample.
//!
//! # Mapping
//!
//! - A TCPRoute has one rule; it is one tcpshift service. The service is named by the `app`
//!   label of its first backend's Service selector (a Service of the same apply), else by
//!   the service the kernel has that route stored with, else by the TCPRoute's own name.
//! - A `backendRef` names a Service; the subset it stands for is that Service's selector
//!   label `version` (the label Istio's DestinationRule subsets select on), else the
//!   Service's name. A Service applied before (with an earlier TCPRoute) is remembered with
//!   the route in the kernel, so a later apply of the TCPRoute alone finds its subsets. The subset's address comes from a `services:` document of the same
//!   apply or from the kernel, as with DestinationRule subsets.
//! - `backendRef.port` must be a port of the Service (when it is in the apply); its
//!   `targetPort` (or `port`) must be the port of the subset's address.
//! - The listen port is the port of the Gateway listener the route's `parentRefs` select
//!   (by `sectionName` or `port`, else the Gateway's only TCP listener), when the Gateway is
//!   in the same apply; otherwise the service keeps the port its `services:` document or the
//!   kernel gives.
//! - Weights follow the Gateway API: a missing weight is 1; a single backend receives
//!   everything (weight 100).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use tcpshift_common::MAX_SUBSETS;

use super::ApplyError;
use super::objects::*;
use super::parse::{Body, Document};
use crate::config::DEFAULT_SINGLE_WEIGHT;
use crate::model::{self, ServiceView};
use crate::yaml::{FieldPath, path};

fn is_none<T>(v: &Option<T>) -> bool {
    v.is_none()
}

/// The Gateway API group.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// The versions of [`GATEWAY_API_GROUP`] whose `Gateway` tcpshift reads.
pub const GATEWAY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// The versions of [`GATEWAY_API_GROUP`] whose `TCPRoute` tcpshift reads.
pub const TCP_ROUTE_VERSIONS: [&str; 1] = ["v1alpha2"];
/// The `apiVersion` of the TCPRoutes `tcpshiftctl get tcproute` prints.
pub const TCP_ROUTE_API_VERSION: &str = "gateway.networking.k8s.io/v1alpha2";
/// The `apiVersion` of the Gateway API Gateways `tcpshiftctl get gateway` prints.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// `spec` of a Gateway API `Gateway`: its listeners.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayApiSpec {
    /// The class: no local meaning (kept and shown back).
    #[serde(default)]
    pub gateway_class_name: String,
    /// The listeners; each must be plain TCP.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Addresses: no local meaning.
    #[serde(default, skip_serializing)]
    pub addresses: Option<Value>,
    /// Infrastructure: no local meaning.
    #[serde(default, skip_serializing)]
    pub infrastructure: Option<Value>,
}

/// A Gateway API listener.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Listener {
    /// The listener's name (`sectionName` of a route's `parentRefs`).
    pub name: String,
    /// The port: the listen port of the routes attached to this listener.
    pub port: Port,
    /// Must be `TCP`.
    pub protocol: String,
    /// Hostname: no local meaning.
    #[serde(default, skip_serializing)]
    pub hostname: Option<String>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub tls: Option<Mapping>,
    /// Which routes may attach: no local meaning.
    #[serde(default, skip_serializing)]
    pub allowed_routes: Option<Value>,
}

/// `spec` of a `TCPRoute`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRouteSpec {
    /// The Gateways (listeners) the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// The rules; tcpshift takes exactly one (one service, one set of weights).
    #[serde(default)]
    pub rules: Vec<TcpRouteRule>,
}

/// A reference to a Gateway (listener).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    /// API group of the parent; `gateway.networking.k8s.io` when given.
    #[serde(default, skip_serializing_if = "is_none")]
    pub group: Option<String>,
    /// Kind of the parent; `Gateway` when given.
    #[serde(default, skip_serializing_if = "is_none")]
    pub kind: Option<String>,
    /// Namespace: no local meaning (kept and shown back).
    #[serde(default, skip_serializing_if = "is_none")]
    pub namespace: Option<String>,
    /// Name of the Gateway.
    pub name: String,
    /// The listener's name.
    #[serde(default, skip_serializing_if = "is_none")]
    pub section_name: Option<String>,
    /// The listener's port.
    #[serde(default, skip_serializing_if = "is_none")]
    pub port: Option<Port>,
}

/// A TCPRoute rule: weighted backends.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRouteRule {
    /// Rule name: no local meaning.
    #[serde(default, skip_serializing_if = "is_none")]
    pub name: Option<String>,
    /// The backends: Services standing for subsets of one tcpshift service.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// A weighted backend: a Service.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    /// API group; the core group (`""`) when given.
    #[serde(default, skip_serializing_if = "is_none")]
    pub group: Option<String>,
    /// Kind; `Service` when given.
    #[serde(default, skip_serializing_if = "is_none")]
    pub kind: Option<String>,
    /// Name of the Service.
    pub name: String,
    /// Namespace: no local meaning.
    #[serde(default, skip_serializing_if = "is_none")]
    pub namespace: Option<String>,
    /// A port of the Service.
    #[serde(default, skip_serializing_if = "is_none")]
    pub port: Option<Port>,
    /// Relative weight (Gateway API default: 1).
    #[serde(default, skip_serializing_if = "is_none")]
    pub weight: Option<Weight>,
}

/// `spec` of a core `v1` `Service`: its ports and selector (the rest has no local meaning).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeServiceSpec {
    /// The ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// The selector: `app` names the tcpshift service, `version` the subset.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// No local meaning.
    #[serde(default, rename = "type", skip_serializing)]
    pub service_type: Option<String>,
    /// No local meaning.
    #[serde(default, rename = "clusterIP", skip_serializing)]
    pub cluster_ip: Option<String>,
    /// No local meaning.
    #[serde(default, rename = "clusterIPs", skip_serializing)]
    pub cluster_ips: Option<Vec<String>>,
    /// No local meaning.
    #[serde(default, skip_serializing)]
    pub ip_families: Option<Vec<String>>,
    /// No local meaning.
    #[serde(default, skip_serializing)]
    pub ip_family_policy: Option<String>,
    /// No local meaning.
    #[serde(default, skip_serializing)]
    pub internal_traffic_policy: Option<String>,
    /// No local meaning.
    #[serde(default, skip_serializing)]
    pub session_affinity: Option<String>,
}

/// A port of a core Service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// Name: no local meaning.
    #[serde(default, skip_serializing_if = "is_none")]
    pub name: Option<String>,
    /// The Service's port (what a `backendRef.port` names).
    pub port: Port,
    /// The pods' port (a number, or a port name: then `port` is used); must be the port of
    /// the subset's address.
    #[serde(default, skip_serializing_if = "is_none")]
    pub target_port: Option<Value>,
    /// Must be `TCP` when given.
    #[serde(default, skip_serializing_if = "is_none")]
    pub protocol: Option<String>,
    /// No local meaning.
    #[serde(default, skip_serializing)]
    pub app_protocol: Option<String>,
}

/// A Gateway API Gateway.
pub type GatewayApiGateway = Object<GatewayApiSpec>;
/// A TCPRoute.
pub type TcpRouteObject = Object<TcpRouteSpec>;
/// A core Service.
pub type KubeService = Object<KubeServiceSpec>;

/// What is stored with a service applied from a TCPRoute (inside its [`RouteInfo`]) so that
/// `tcpshiftctl get tcproute` shows the route back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRouteInfo {
    /// The route's `parentRefs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentRef>,
    /// Its backends, in order: (subset, Service name, backend port).
    pub backends: Vec<StoredBackend>,
    /// The ports of the listeners it attached to (for `get gateway`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<(String, u16)>,
    /// The Services of the apply that select this service (`app` label), as (Service name,
    /// subset): a later apply of the TCPRoute alone may name them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<(String, String)>,
}

/// A backend of a stored TCPRoute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredBackend {
    /// The subset the backend stands for.
    pub subset: String,
    /// The Service's name.
    pub name: String,
    /// `backendRef.port`.
    #[serde(default, skip_serializing_if = "is_none")]
    pub port: Option<u16>,
}

/// Checks of a Gateway API Gateway document alone.
pub(super) fn check_gateway(doc: &Document, gw: &GatewayApiGateway) -> Result<(), ApplyError> {
    let spec = path(&["spec"]);
    if gw.spec.listeners.is_empty() {
        return Err(doc.error(
            &spec,
            "no `listeners`; expected at least one, e.g. `listeners: [{name: tcp-31400, \
             protocol: TCP, port: 31400}]`",
        ));
    }
    let mut names = Vec::new();
    for (i, l) in gw.spec.listeners.iter().enumerate() {
        let p = spec.key("listeners").index(i);
        if !l.protocol.eq_ignore_ascii_case("TCP") {
            return Err(doc.error(
                &p.key("protocol"),
                format!(
                    "protocol {:?} is not supported: tcpshift steers plain TCP connections in \
                     the kernel, without a proxy; expected TCP",
                    l.protocol
                ),
            ));
        }
        if l.tls.is_some() {
            return Err(doc.error(
                &p.key("tls"),
                "`tls` is not supported: tcpshift steers plain TCP connections without a \
                 proxy; remove it",
            ));
        }
        if names.contains(&l.name.as_str()) {
            return Err(doc.error(
                &p.key("name"),
                format!(
                    "listener {:?} is defined twice; names must be unique",
                    l.name
                ),
            ));
        }
        names.push(&l.name);
    }
    Ok(())
}

/// Checks of a TCPRoute document alone.
pub(super) fn check_tcp_route(doc: &Document, route: &TcpRouteObject) -> Result<(), ApplyError> {
    let spec = path(&["spec"]);
    for (i, p) in route.spec.parent_refs.iter().enumerate() {
        let pp = spec.key("parentRefs").index(i);
        if let Some(k) = &p.kind
            && k != "Gateway"
        {
            return Err(doc.error(
                &pp.key("kind"),
                format!("parent kind {k:?} is not supported; expected Gateway"),
            ));
        }
    }
    let rule = match route.spec.rules.as_slice() {
        [one] => one,
        [] => {
            return Err(doc.error(
                &spec,
                "no `rules`; expected one, e.g. `rules: [{backendRefs: [{name: tcp-echo-v1, \
                 port: 9000}]}]`",
            ));
        }
        _ => {
            return Err(doc.error(
                &spec.key("rules").index(1),
                format!(
                    "{} rules; a TCPRoute is one tcpshift service with one set of weights: \
                     give each rule its own TCPRoute",
                    route.spec.rules.len()
                ),
            ));
        }
    };
    let rp = spec.key("rules").index(0).key("backendRefs");
    if rule.backend_refs.is_empty() || rule.backend_refs.len() > MAX_SUBSETS {
        return Err(doc.error(
            &rp,
            format!(
                "{} backends; expected 1 to {MAX_SUBSETS}, e.g. `backendRefs: [{{name: \
                 tcp-echo-v1, port: 9000}}]`",
                rule.backend_refs.len()
            ),
        ));
    }
    let mut total = 0u64;
    for (i, b) in rule.backend_refs.iter().enumerate() {
        let bp = rp.index(i);
        if let Some(k) = &b.kind
            && k != "Service"
        {
            return Err(doc.error(
                &bp.key("kind"),
                format!("backend kind {k:?} is not supported; expected Service"),
            ));
        }
        if let Some(g) = &b.group
            && !g.is_empty()
        {
            return Err(doc.error(
                &bp.key("group"),
                format!("backend group {g:?} is not supported; expected the core group \"\""),
            ));
        }
        if rule.backend_refs[..i].iter().any(|o| o.name == b.name) {
            return Err(doc.error(
                &bp.key("name"),
                format!(
                    "Service {:?} is named twice in this rule; name each backend once",
                    b.name
                ),
            ));
        }
        total += u64::from(b.weight.map_or(1, |w| w.0));
    }
    if total == 0 {
        return Err(doc.error(
            &rp,
            "all weights are 0; at least one backend needs a weight above 0, e.g. `weight: 100`",
        ));
    }
    Ok(())
}

/// Checks of a core Service document alone.
pub(super) fn check_kube_service(doc: &Document, svc: &KubeService) -> Result<(), ApplyError> {
    let spec = path(&["spec"]);
    if svc.spec.ports.is_empty() {
        return Err(doc.error(
            &spec,
            "no `ports`; expected at least one, e.g. `ports: [{port: 9000, name: tcp}]`",
        ));
    }
    for (i, p) in svc.spec.ports.iter().enumerate() {
        if let Some(proto) = &p.protocol
            && !proto.eq_ignore_ascii_case("TCP")
        {
            return Err(doc.error(
                &spec.key("ports").index(i).key("protocol"),
                format!("protocol {proto:?} is not supported; expected TCP"),
            ));
        }
    }
    Ok(())
}

/// The Services of an apply by name.
fn kube_services(docs: &[Document]) -> HashMap<&str, &KubeService> {
    docs.iter()
        .filter_map(|d| match &d.body {
            Body::KubeService(s) => Some((s.metadata.name.as_str(), &**s)),
            _ => None,
        })
        .collect()
}

/// The TCPRoutes stored with the services in the kernel: (service, what is stored with it
/// but the route, the route). The one reader of stored routes: applies and `get` use it.
fn stored_routes(
    current: &[ServiceView],
) -> impl Iterator<Item = (&ServiceView, RouteInfo, TcpRouteInfo)> {
    current.iter().filter_map(|v| {
        let mut info = v
            .annotation
            .as_deref()
            .and_then(RouteInfo::from_annotation)?;
        let route = info.tcp_route.take()?;
        Some((v, info, route))
    })
}

/// The tcpshift service a TCPRoute routes (see the module documentation): the `app` label
/// of its first backend's Service of this apply, else the service the kernel has this
/// route (or a backend of that name) stored with, else the route's name.
pub(super) fn route_service(
    docs: &[Document],
    current: &[ServiceView],
    route: &TcpRouteObject,
) -> String {
    let services = kube_services(docs);
    let first = route
        .spec
        .rules
        .first()
        .and_then(|r| r.backend_refs.first());
    if let Some(app) = first
        .and_then(|b| services.get(b.name.as_str()))
        .and_then(|s| s.spec.selector.get("app"))
        .filter(|app| model::validate_service_name(app).is_ok())
    {
        return app.clone();
    }
    let stored: Vec<_> = stored_routes(current).collect();
    if let Some((v, _, _)) = stored
        .iter()
        .find(|(_, info, _)| info.virtual_service == route.metadata.name)
    {
        return v.config.name.clone();
    }
    if let Some(b) = first
        && let Some((v, _, _)) = stored.iter().find(|(_, _, tr)| {
            tr.backends.iter().any(|s| s.name == b.name)
                || tr.services.iter().any(|(name, _)| name == &b.name)
        })
    {
        return v.config.name.clone();
    }
    route.metadata.name.clone()
}

/// A TCPRoute resolved: the service, its listen port (with the field that gave it), its
/// backends as (subset, weight, backend path), and what is stored with the service.
pub(super) struct ResolvedRoute {
    pub(super) service: String,
    pub(super) port: Option<(Port, FieldPath)>,
    pub(super) destinations: Vec<(String, u32, FieldPath)>,
    pub(super) info: RouteInfo,
}

/// Resolves the TCPRoute of `doc`: `subsets_of` gives the subsets of a service after the
/// apply (`None`: no such service).
pub(super) fn resolve_route(
    docs: &[Document],
    current: &[ServiceView],
    doc: &Document,
    route: &TcpRouteObject,
    subsets_of: impl Fn(&str) -> Option<Vec<model::SubsetConfig>>,
    no_service: impl Fn(&FieldPath, &str) -> ApplyError,
) -> Result<ResolvedRoute, ApplyError> {
    let services = kube_services(docs);
    let gateways: HashMap<&str, &GatewayApiGateway> = docs
        .iter()
        .filter_map(|d| match &d.body {
            Body::GatewayApiGateway(g) => Some((g.metadata.name.as_str(), &**g)),
            _ => None,
        })
        .collect();
    let service = route_service(docs, current, route);
    let mut stored_listeners: Vec<(String, u16)> = Vec::new();
    let mut stored: Vec<(String, String)> = Vec::new();
    for (_, _, tr) in stored_routes(current).filter(|(v, _, _)| v.config.name == service) {
        stored_listeners.extend(tr.listeners);
        stored.extend(tr.backends.into_iter().map(|b| (b.name, b.subset)));
        stored.extend(tr.services);
    }
    let mut known: Vec<(String, String)> = services
        .values()
        .filter(|s| s.spec.selector.get("app") == Some(&service))
        .map(|s| {
            let subset = s.spec.selector.get("version").unwrap_or(&s.metadata.name);
            (s.metadata.name.clone(), subset.clone())
        })
        .collect();
    known.sort();
    let rp = path(&["spec", "rules"]).index(0).key("backendRefs");
    let Some(subsets) = subsets_of(&service) else {
        return Err(no_service(&rp.index(0).key("name"), &service));
    };

    // The listen port from the parent Gateways of this apply.
    let mut ports: Vec<(Port, FieldPath)> = Vec::new();
    let mut listeners: Vec<(String, u16)> = Vec::new();
    for (i, parent) in route.spec.parent_refs.iter().enumerate() {
        let pp = path(&["spec", "parentRefs"]).index(i);
        let Some(gw) = gateways.get(parent.name.as_str()) else {
            // A Gateway of an earlier apply: the listeners stored with the route.
            listeners.extend(stored_listeners.iter().cloned());
            continue;
        };
        let chosen: Vec<&Listener> = gw
            .spec
            .listeners
            .iter()
            .filter(|l| parent.section_name.as_ref().is_none_or(|s| s == &l.name))
            .filter(|l| parent.port.is_none_or(|p| p == l.port))
            .collect();
        if chosen.is_empty() {
            let have: Vec<String> = gw
                .spec
                .listeners
                .iter()
                .map(|l| format!("{} (port {})", l.name, l.port.0))
                .collect();
            let field = if parent.section_name.is_some() {
                "sectionName"
            } else {
                "port"
            };
            return Err(doc.error(
                &pp.key(field),
                format!(
                    "Gateway {} has no such listener (its listeners: {})",
                    parent.name,
                    have.join(", ")
                ),
            ));
        }
        for l in chosen {
            listeners.push((l.name.clone(), l.port.0));
            if !ports.iter().any(|(p, _)| *p == l.port) {
                ports.push((l.port, pp.clone()));
            }
        }
    }
    let port = match ports.len() {
        0 | 1 => ports.pop(),
        _ => {
            let list: Vec<String> = ports.iter().map(|(p, _)| p.0.to_string()).collect();
            return Err(doc.error(
                &path(&["spec", "parentRefs"]),
                format!(
                    "the route attaches to listeners on several ports ({}); a tcpshift \
                     service listens on one port: say which listener with `sectionName`",
                    list.join(", ")
                ),
            ));
        }
    };

    let rule = route.spec.rules.first().cloned().unwrap_or_default();
    let single = rule.backend_refs.len() == 1;
    let mut destinations = Vec::new();
    let mut backends = Vec::new();
    for (i, b) in rule.backend_refs.iter().enumerate() {
        let bp = rp.index(i);
        let svc = services.get(b.name.as_str());
        let subset = match svc {
            Some(s) => s
                .spec
                .selector
                .get("version")
                .cloned()
                .unwrap_or_else(|| b.name.clone()),
            None => stored
                .iter()
                .find(|(name, _)| name == &b.name)
                .map_or_else(|| b.name.clone(), |(_, subset)| subset.clone()),
        };
        let Some(local) = subsets.iter().find(|s| s.name == subset) else {
            let have: Vec<String> = subsets
                .iter()
                .map(|s| format!("{} ({})", s.name, s.addr))
                .collect();
            return Err(doc.error(
                &bp.key("name"),
                format!(
                    "backend {:?} stands for subset {subset:?} of service {service:?} (the \
                     Service's selector label `version`, else its name), which has no such \
                     subset (its subsets: {}); declare it in the `services:` document",
                    b.name,
                    have.join(", ")
                ),
            ));
        };
        if let (Some(svc), Some(port)) = (svc, b.port) {
            let Some(sp) = svc.spec.ports.iter().find(|p| p.port == port) else {
                let have: Vec<String> = svc
                    .spec
                    .ports
                    .iter()
                    .map(|p| p.port.0.to_string())
                    .collect();
                return Err(doc.error(
                    &bp.key("port"),
                    format!(
                        "Service {} has no port {} (its ports: {})",
                        b.name,
                        port.0,
                        have.join(", ")
                    ),
                ));
            };
            let target = sp
                .target_port
                .as_ref()
                .and_then(Value::as_u64)
                .and_then(|t| u16::try_from(t).ok())
                .unwrap_or(sp.port.0);
            if target != local.addr.port() {
                return Err(doc.error(
                    &bp.key("port"),
                    format!(
                        "port {} of Service {} leads to port {target}, but subset {subset:?} \
                         listens on {}; make the Service's targetPort (or port) that of the \
                         subset's address",
                        port.0, b.name, local.addr
                    ),
                ));
            }
        }
        let w = match b.weight {
            Some(Weight(w)) if w > 0 && !single => w,
            Some(Weight(0)) => 0,
            _ if single => DEFAULT_SINGLE_WEIGHT,
            _ => 1,
        };
        destinations.push((subset.clone(), w, bp));
        backends.push(StoredBackend {
            subset,
            name: b.name.clone(),
            port: b.port.map(|p| p.0),
        });
    }
    let info = RouteInfo {
        virtual_service: route.metadata.name.clone(),
        namespace: route.metadata.namespace.clone(),
        api_version: route.api_version.clone(),
        hosts: Vec::new(),
        gateways: route
            .spec
            .parent_refs
            .iter()
            .map(|p| p.name.clone())
            .collect(),
        route: 0,
        tcp_route: Some(TcpRouteInfo {
            parent_refs: route.spec.parent_refs.clone(),
            backends,
            listeners,
            services: known,
        }),
    };
    Ok(ResolvedRoute {
        service,
        port,
        destinations,
        info,
    })
}

/// The TCPRoutes that describe the services applied from one, sorted by name; weights are
/// the kernel's.
pub fn tcp_routes(views: &[ServiceView]) -> Vec<TcpRouteObject> {
    let mut out: Vec<TcpRouteObject> = stored_routes(views)
        .map(|(v, info, tr)| {
            let backend_refs = tr
                .backends
                .iter()
                .map(|b| BackendRef {
                    name: b.name.clone(),
                    port: b.port.map(Port),
                    weight: Some(Weight(
                        v.config
                            .subsets
                            .iter()
                            .find(|s| s.name == b.subset)
                            .map_or(0, |s| s.weight),
                    )),
                    ..BackendRef::default()
                })
                .collect();
            Object {
                api_version: info.api_version,
                kind: "TCPRoute".to_owned(),
                metadata: Metadata {
                    name: info.virtual_service,
                    namespace: info.namespace,
                    ..Metadata::default()
                },
                spec: TcpRouteSpec {
                    parent_refs: tr.parent_refs,
                    rules: vec![TcpRouteRule {
                        name: None,
                        backend_refs,
                    }],
                },
                status: None,
            }
        })
        .collect();
    out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out
}

/// The Gateway API Gateways the stored TCPRoutes attached to, with the listeners they used.
pub fn gateway_api_gateways(views: &[ServiceView]) -> Vec<GatewayApiGateway> {
    let mut by_name: BTreeMap<String, Vec<Listener>> = BTreeMap::new();
    for (_, _, tr) in stored_routes(views) {
        for parent in &tr.parent_refs {
            let entry = by_name.entry(parent.name.clone()).or_default();
            for (name, port) in &tr.listeners {
                if parent.section_name.as_ref().is_none_or(|s| s == name)
                    && !entry.iter().any(|l| &l.name == name)
                {
                    entry.push(Listener {
                        name: name.clone(),
                        port: Port(*port),
                        protocol: "TCP".to_owned(),
                        hostname: None,
                        tls: None,
                        allowed_routes: None,
                    });
                }
            }
        }
    }
    by_name
        .into_iter()
        .map(|(name, listeners)| Object {
            api_version: GATEWAY_API_VERSION.to_owned(),
            kind: "Gateway".to_owned(),
            metadata: Metadata {
                name,
                ..Metadata::default()
            },
            spec: GatewayApiSpec {
                gateway_class_name: "tcpshift".to_owned(),
                listeners,
                ..GatewayApiSpec::default()
            },
            status: None,
        })
        .collect()
}

/// The Istio Gateways the stored VirtualServices are bound to, each with one TCP server per
/// listen port of the services routed through it.
pub fn istio_gateways(views: &[ServiceView]) -> Vec<Gateway> {
    let mut by_name: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for v in views {
        let Some(info) = v.annotation.as_deref().and_then(RouteInfo::from_annotation) else {
            continue;
        };
        if info.tcp_route.is_some() {
            continue;
        }
        for g in info.gateways {
            let ports = by_name.entry(g).or_default();
            if !ports.contains(&v.config.listen.port()) {
                ports.push(v.config.listen.port());
            }
        }
    }
    by_name
        .into_iter()
        .map(|(name, mut ports)| {
            ports.sort_unstable();
            Object {
                api_version: super::DEFAULT_API_VERSION.to_owned(),
                kind: "Gateway".to_owned(),
                metadata: Metadata {
                    name,
                    ..Metadata::default()
                },
                spec: GatewaySpec {
                    selector: None,
                    servers: ports
                        .into_iter()
                        .map(|p| Server {
                            port: ServerPort {
                                number: Port(p),
                                protocol: "TCP".to_owned(),
                                name: Some(format!("tcp-{p}")),
                                target_port: None,
                            },
                            hosts: Some(vec!["*".to_owned()]),
                            name: None,
                            bind: None,
                            tls: None,
                            default_endpoint: None,
                        })
                        .collect(),
                },
                status: None,
            }
        })
        .collect()
}

/// One DestinationRule per service in the kernel: its subsets.
pub fn destination_rules(views: &[ServiceView]) -> Vec<DestinationRule> {
    views
        .iter()
        .map(|v| Object {
            api_version: super::DEFAULT_API_VERSION.to_owned(),
            kind: "DestinationRule".to_owned(),
            metadata: Metadata {
                name: v.config.name.clone(),
                ..Metadata::default()
            },
            spec: DestinationRuleSpec {
                host: v.config.name.clone(),
                subsets: v
                    .config
                    .subsets
                    .iter()
                    .map(|s| DestinationRuleSubset {
                        name: s.name.clone(),
                        labels: None,
                        traffic_policy: None,
                    })
                    .collect(),
                ..DestinationRuleSpec::default()
            },
            status: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::Manifest;

    fn parse_error(text: &str) -> String {
        match Manifest::parse(text, "f.yaml") {
            Ok(_) => "no error".to_owned(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn gateway_api_documents_checked_with_file_line_field() {
        let cases = [
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\n\
                 spec:\n  listeners:\n  - {name: u, port: 53, protocol: UDP}\n",
                "f.yaml:6:35: Gateway g: spec.listeners[0].protocol: protocol \"UDP\" is not \
                 supported",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: \
                 {name: r}\nspec:\n  rules:\n  - backendRefs: [{name: a, port: 1}]\n  - \
                 backendRefs: [{name: b, port: 1}]\n",
                "f.yaml:7:5: TCPRoute r: spec.rules[1]: 2 rules; a TCPRoute is one tcpshift \
                 service",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {name: \
                 r}\nspec: {}\n",
                "f.yaml:1:13: apiVersion: unsupported version \"v1\" of \
                 gateway.networking.k8s.io TCPRoute; expected gateway.networking.k8s.io/v1alpha2",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: \
                 r}\nspec: {}\n",
                "f.yaml:2:7: kind: gateway.networking.k8s.io kind \"HTTPRoute\" is not \
                 supported",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: \
                 {name: r}\nspec:\n  rules:\n  - backendRefs: [{name: a, port: 1, weight: \
                 0}]\n",
                "f.yaml:6:18: TCPRoute r: spec.rules[0].backendRefs: all weights are 0",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: \
                 9000, protocol: UDP}]\n",
                "f.yaml:5:34: Service s: spec.ports[0].protocol: protocol \"UDP\" is not \
                 supported; expected TCP",
            ),
        ];
        for (text, want) in cases {
            let got = parse_error(text);
            assert!(got.starts_with(want), "got {got:?}\nwant {want:?}");
        }
    }
}
