//! The Istio networking objects tcpshift reads and prints, as typed Rust values, and the
//! route information stored with each service.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

pub use crate::yaml::{Port, Weight};

fn is_none<T>(v: &Option<T>) -> bool {
    v.is_none()
}

/// A Kubernetes object of [`GROUP`]: `apiVersion`, `kind`, `metadata`, `spec` (and an
/// ignored `status`, as `kubectl get -o yaml` prints it).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S> {
    /// `networking.istio.io/v1`, `.../v1beta1` or `.../v1alpha3`.
    pub api_version: String,
    /// `VirtualService`, `DestinationRule` or `Gateway`.
    pub kind: String,
    /// Name and the like.
    pub metadata: Metadata,
    /// The object's specification.
    pub spec: S,
    /// `status`, as a Kubernetes API server reports it: ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<Value>,
}

/// `metadata` of an object. Besides `name`, only `namespace` is kept (for display).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// The object's name (a DNS subdomain: `a-z 0-9 - .`, at most 253 characters).
    pub name: String,
    /// The Kubernetes namespace, shown back by `tcpshiftctl get`; no local meaning.
    #[serde(default, skip_serializing_if = "is_none")]
    pub namespace: Option<String>,
    /// Labels: no local meaning.
    #[serde(default, skip_serializing)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations: no local meaning.
    #[serde(default, skip_serializing)]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub uid: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub resource_version: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub generation: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub creation_timestamp: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub deletion_timestamp: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub deletion_grace_period_seconds: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub generate_name: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub finalizers: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub owner_references: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub managed_fields: Option<Value>,
    /// Set by a Kubernetes API server: ignored.
    #[serde(default, skip_serializing)]
    pub self_link: Option<Value>,
}

/// `spec` of a VirtualService. Only `tcp` routes are supported.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts the VirtualService applies to; kept and shown back, no local meaning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Gateways it is bound to; a Gateway of the same apply gives routes without a
    /// `match.port` their port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// HTTP routes: not supported (an error when not empty).
    #[serde(default, skip_serializing)]
    pub http: Option<Vec<Value>>,
    /// TLS routes: not supported (an error when not empty).
    #[serde(default, skip_serializing)]
    pub tls: Option<Vec<Value>>,
    /// The TCP routes: each one is a tcpshift service.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// `exportTo`: no local meaning.
    #[serde(default, skip_serializing)]
    pub export_to: Option<Vec<String>>,
}

/// A TCP route: match conditions and weighted destinations.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRoute {
    /// Match conditions; only `port` (and `gateways`, ignored) are supported.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<L4Match>,
    /// The destinations: subsets of one service.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// A TCP match condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct L4Match {
    /// The port the route matches: the service's listen port.
    #[serde(default, skip_serializing_if = "is_none")]
    pub port: Option<Port>,
    /// Gateways the condition is limited to: no local meaning.
    #[serde(default, skip_serializing)]
    pub gateways: Option<Vec<String>>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub destination_subnets: Option<Vec<String>>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub source_labels: Option<BTreeMap<String, String>>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub source_namespace: Option<String>,
}

/// A weighted destination.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteDestination {
    /// Where connections go.
    pub destination: Destination,
    /// Relative weight; see the module documentation for the defaults.
    #[serde(default, skip_serializing_if = "is_none")]
    pub weight: Option<Weight>,
}

/// A destination: a subset of a service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    /// The tcpshift service.
    pub host: String,
    /// The port of the subset's address, when given.
    #[serde(default, skip_serializing_if = "is_none")]
    pub port: Option<PortSelector>,
    /// The subset.
    #[serde(default, skip_serializing_if = "is_none")]
    pub subset: Option<String>,
}

/// `destination.port`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    /// The port number.
    pub number: Port,
}

/// `spec` of a DestinationRule: the subsets of a host.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The tcpshift service.
    pub host: String,
    /// Its subsets; each must be a subset of the service.
    #[serde(default)]
    pub subsets: Vec<DestinationRuleSubset>,
    /// Traffic policy: its `loadBalancer` sets the service's mode (`load_balancer.rs`); the rest
    /// is ignored, with a warning.
    #[serde(default, skip_serializing)]
    pub traffic_policy: Option<Mapping>,
    /// `exportTo`: no local meaning.
    #[serde(default, skip_serializing)]
    pub export_to: Option<Vec<String>>,
    /// Workload selector: no local meaning.
    #[serde(default, skip_serializing)]
    pub workload_selector: Option<Mapping>,
}

/// A DestinationRule subset.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSubset {
    /// Subset name.
    pub name: String,
    /// Labels: no local meaning.
    #[serde(default, skip_serializing)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Traffic policy: its `loadBalancer` sets the service's mode (`load_balancer.rs`); the rest
    /// is ignored, with a warning.
    #[serde(default, skip_serializing)]
    pub traffic_policy: Option<Mapping>,
}

/// `spec` of a Gateway: its servers' ports.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Selector of the gateway workload: no local meaning.
    #[serde(default, skip_serializing)]
    pub selector: Option<BTreeMap<String, String>>,
    /// The servers; each must be plain TCP.
    #[serde(default)]
    pub servers: Vec<Server>,
}

/// A Gateway server.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Server {
    /// The port.
    pub port: ServerPort,
    /// Hosts: no local meaning.
    #[serde(default, skip_serializing)]
    pub hosts: Option<Vec<String>>,
    /// Name: no local meaning.
    #[serde(default, skip_serializing)]
    pub name: Option<String>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub bind: Option<String>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub tls: Option<Mapping>,
    /// Not supported (an error when present).
    #[serde(default, skip_serializing)]
    pub default_endpoint: Option<String>,
}

/// A Gateway server's port.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerPort {
    /// The port number: the listen port of the services routed through this server.
    pub number: Port,
    /// Must be `TCP`.
    pub protocol: String,
    /// Name: no local meaning.
    #[serde(default, skip_serializing)]
    pub name: Option<String>,
    /// Target port: no local meaning.
    #[serde(default, skip_serializing)]
    pub target_port: Option<Port>,
}

/// A VirtualService.
pub type VirtualService = Object<VirtualServiceSpec>;
/// A DestinationRule.
pub type DestinationRule = Object<DestinationRuleSpec>;
/// A Gateway.
pub type Gateway = Object<GatewaySpec>;

/// Where a service's route comes from, stored with the service (as its
/// [`crate::state::ServiceView::annotation`], JSON) so that `tcpshiftctl get
/// virtualservice` can show the VirtualService back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteInfo {
    /// Name of the VirtualService.
    pub virtual_service: String,
    /// Its namespace, if it had one.
    #[serde(default, skip_serializing_if = "is_none")]
    pub namespace: Option<String>,
    /// Its `apiVersion`.
    pub api_version: String,
    /// Its `hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Its `gateways`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Index of the route in `spec.tcp`.
    pub route: usize,
    /// Set when the route is a Gateway API TCPRoute (then `virtual_service` is its name).
    #[serde(default, skip_serializing_if = "is_none")]
    pub tcp_route: Option<super::gateway_api::TcpRouteInfo>,
}

impl RouteInfo {
    /// Parses a stored annotation; `None` if it is not a [`RouteInfo`].
    pub fn from_annotation(text: &str) -> Option<RouteInfo> {
        serde_json::from_str(text).ok()
    }
}
