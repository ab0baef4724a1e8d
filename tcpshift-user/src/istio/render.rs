//! The kernel's routing shown back as Istio VirtualServices (`tcpshiftctl get
//! virtualservice`). The `services:` document is rendered by [`crate::config::render`].

use std::collections::BTreeMap;

use super::DEFAULT_API_VERSION;
use super::objects::*;
use crate::model::ServiceView;

/// The VirtualServices that describe the services in the kernel, sorted by name: a service
/// applied from a VirtualService route is shown in that VirtualService (with its hosts and
/// gateways); any other service as a VirtualService of its own name. Weights are the
/// kernel's; subsets with weight 0 are left out (a route gives them 0), so applying the
/// output again changes nothing.
pub fn virtual_services(views: &[ServiceView]) -> Vec<VirtualService> {
    let mut by_name: BTreeMap<String, Vec<(usize, RouteInfo, &ServiceView)>> = BTreeMap::new();
    for v in views {
        let info = v
            .annotation
            .as_deref()
            .and_then(RouteInfo::from_annotation)
            .unwrap_or_else(|| RouteInfo {
                virtual_service: v.config.name.clone(),
                namespace: None,
                api_version: DEFAULT_API_VERSION.to_owned(),
                hosts: vec![v.config.name.clone()],
                gateways: Vec::new(),
                route: 0,
                tcp_route: None,
            });
        by_name
            .entry(info.virtual_service.clone())
            .or_default()
            .push((info.route, info, v));
    }
    by_name
        .into_iter()
        .map(|(name, mut routes)| {
            routes.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.config.name.cmp(&b.2.config.name)));
            let first = routes.first().map(|(_, i, _)| i.clone());
            let tcp = routes
                .iter()
                .map(|(_, _, v)| TcpRoute {
                    matches: vec![L4Match {
                        port: Some(Port(v.config.listen.port())),
                        ..L4Match::default()
                    }],
                    route: v
                        .config
                        .subsets
                        .iter()
                        .filter(|s| s.weight > 0)
                        .map(|s| RouteDestination {
                            destination: Destination {
                                host: v.config.name.clone(),
                                port: Some(PortSelector {
                                    number: Port(s.addr.port()),
                                }),
                                subset: Some(s.name.clone()),
                            },
                            weight: Some(Weight(s.weight)),
                        })
                        .collect(),
                })
                .collect();
            let info = first.unwrap_or_else(|| RouteInfo {
                virtual_service: name.clone(),
                namespace: None,
                api_version: DEFAULT_API_VERSION.to_owned(),
                hosts: Vec::new(),
                gateways: Vec::new(),
                route: 0,
                tcp_route: None,
            });
            Object {
                api_version: info.api_version,
                kind: "VirtualService".to_owned(),
                metadata: Metadata {
                    name,
                    namespace: info.namespace,
                    ..Metadata::default()
                },
                spec: VirtualServiceSpec {
                    hosts: info.hosts,
                    gateways: info.gateways,
                    tcp,
                    ..VirtualServiceSpec::default()
                },
                status: None,
            }
        })
        .collect()
}

/// The VirtualService called `name` (see [`virtual_services`]).
pub fn virtual_service(views: &[ServiceView], name: &str) -> Option<VirtualService> {
    virtual_services(views)
        .into_iter()
        .find(|vs| vs.metadata.name == name)
}

/// The VirtualServices' names that `tcpshiftctl delete virtualservice NAME` maps to
/// services: the services shown in VirtualService `name` (see [`virtual_services`]).
pub fn services_of_virtual_service(views: &[ServiceView], name: &str) -> Vec<String> {
    views
        .iter()
        .filter(
            |v| match v.annotation.as_deref().and_then(RouteInfo::from_annotation) {
                Some(info) => info.virtual_service == name,
                None => v.config.name == name,
            },
        )
        .map(|v| v.config.name.clone())
        .collect()
}
