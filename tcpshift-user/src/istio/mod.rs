//! `tcpshiftctl apply`: Istio networking objects and tcpshift `services:` documents.
//!
//! An apply reads one or more multi-document YAML files holding any mix of:
//!
//! - tcpshift's own `services:` document (the loader's format, see [`crate::config`]), which
//!   says where each subset's server listens; `listen` and `weights` may be left out there
//!   (see [`ServiceSpec`]);
//! - Istio `networking.istio.io` objects (API versions `v1`, `v1beta1`, `v1alpha3`), written
//!   exactly as for Istio: [`VirtualServiceSpec`] (TCP routes), [`DestinationRuleSpec`] and
//!   [`GatewaySpec`].
//!
//! # Mapping
//!
//! - A VirtualService destination's `host` is the tcpshift service of that name; its `subset`
//!   is a subset of that service, whose address comes from a `services:` document of the
//!   same apply or from the service already in the kernel.
//! - The port a TCP route matches (`match[].port`), or else the TCP port of the Gateway the
//!   VirtualService is bound to, is the service's listen port (on any local address, or on
//!   the address the `services:` document or the kernel gives).
//! - `destination.port.number`, when present, must equal the port of that subset's address
//!   (the local analogue of a Kubernetes service port).
//! - Weights are relative integers (0 to 1 000 000); a route with a single destination and
//!   no weight sends it everything (weight 100); subsets a route does not name get 0.
//! - Fields without local meaning (`hosts`, `gateways`, `exportTo`, `selector`, labels,
//!   annotations, server-set metadata such as `uid`) are accepted and, except the names,
//!   hosts and gateways kept for `tcpshiftctl get virtualservice`, ignored. Fields whose
//!   meaning tcpshift cannot honour (HTTP and TLS routes, source matches, TLS servers) are
//!   errors, as are unknown fields and values of the wrong type.
//!
//! # All or nothing
//!
//! [`Manifest::parse`] checks each document on its own (syntax, types, names, weights);
//! [`Manifest::resolve`] checks the objects against each other and against the services in
//! the kernel and returns the complete new definition of every service concerned
//! ([`Plan`]). Only then does [`crate::state::State::apply_with`] write anything, under the
//! namespace's lock. Every error names the file, the line and column of the offending value
//! (also for errors found after parsing), the object, the field and what is expected.
//!
//! YAML streams are split into documents at `---` / `...` lines (the YAML markers, which
//! cannot occur inside a document), and each document is parsed on its own: one bad document
//! never confuses the parsing of the others.

//!
//! The work is split by job:
//! - [`objects`]: the Istio object types and the route stored with a service;
//! - [`parse`]: documents read, classified, typed and checked on their own ([`Manifest`]);
//! - [`resolve`]: the objects checked together and against the kernel ([`Plan`]);
//! - [`render`]: the kernel's routing shown back as VirtualServices.
//!
//! Reading, documents, field locations, weights, ports and the error type are the YAML
//! toolkit's ([`crate::yaml`]); `services:` documents are the loader's format
//! ([`crate::config::spec`]).

pub mod gateway_api;
mod load_balancer;
pub mod objects;
pub mod parse;
pub mod render;
pub mod resolve;
#[cfg(test)]
mod tests;
mod traffic_policy;

pub use crate::config::{ServiceSpec, services_document};
pub use crate::yaml::Located;
pub use gateway_api::{
    GATEWAY_API_GROUP, GatewayApiGateway, KubeService, TcpRouteObject, destination_rules,
    gateway_api_gateways, istio_gateways, tcp_routes,
};
pub use objects::*;
pub use parse::Manifest;
pub use render::{services_of_virtual_service, virtual_service, virtual_services};
pub use resolve::{Plan, PlannedService};

/// Why an apply (or a delete by file) was refused; nothing was changed. The YAML toolkit's
/// one error type (see [`crate::yaml::Error`]).
pub type ApplyError = crate::yaml::Error;

/// The Istio API group tcpshift understands.
pub const GROUP: &str = "networking.istio.io";
/// The versions of [`GROUP`] tcpshift understands (their networking objects are the same).
pub const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// The `apiVersion` of the objects `tcpshiftctl get` prints.
pub const DEFAULT_API_VERSION: &str = "networking.istio.io/v1";
/// Longest Kubernetes object name (a DNS subdomain).
pub const MAX_OBJECT_NAME: usize = 253;
