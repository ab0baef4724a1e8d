//! Resolving an apply: the objects checked against each other and against the services in
//! the kernel, giving the complete new definition of every service concerned ([`Plan`]).

use std::collections::{HashMap, HashSet};

use super::ApplyError;
use super::GROUP;
use super::gateway_api::{self, GATEWAY_API_GROUP};
use super::load_balancer;
use super::objects::*;
use super::parse::{Body, Document, Manifest};
use crate::config::{DEFAULT_SINGLE_WEIGHT, ServiceSpec};
use crate::model::{
    Annotation, Balance, Desired, DesiredService, Listen, ListenClaims, ServiceConfig, ServiceView,
    SubsetConfig,
};
use crate::state::MAX_ANNOTATION;
use crate::yaml::{FieldPath, Located, Seg, path};

/// One service as an apply wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedService {
    /// The complete definition, weights included.
    pub config: ServiceConfig,
    /// The VirtualService route it comes from, if any.
    pub route: Option<RouteInfo>,
}

/// What an apply does: the new definition of every service concerned, and lines describing
/// the Istio objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Services to create or change, sorted by name.
    pub services: Vec<PlannedService>,
    /// Services whose stored VirtualService this apply replaces without routing them any
    /// more (a VirtualService re-applied with other routes): their route is forgotten, their
    /// weights stay.
    pub unrouted: Vec<String>,
    /// One line per Istio object: what it was taken to mean.
    pub objects: Vec<String>,
    /// Things the user should know (ignored fields).
    pub warnings: Vec<String>,
    /// The traffic policies of the DestinationRules' hosts (connection limits, outlier
    /// detection), for [`crate::state::State::set_traffic_policies`] after the apply.
    pub policies: Vec<crate::model::traffic_policy::ServicePolicy>,
}

impl Plan {
    /// The change for [`crate::state::State::apply_with`].
    pub fn desired(&self) -> Desired {
        Desired {
            services: self
                .services
                .iter()
                .map(|s| DesiredService {
                    config: s.config.clone(),
                    annotation: match &s.route {
                        Some(r) => Annotation::Set(serde_json::to_string(r).unwrap_or_default()),
                        None => Annotation::Keep,
                    },
                })
                .collect(),
            clear_annotations: self.unrouted.clone(),
        }
    }
}

/// A VirtualService route resolved to one service.
struct Routed<'a> {
    doc: &'a Document,
    route_path: FieldPath,
    service: String,
    port: Option<(Port, FieldPath)>,
    /// (subset or `None` for "every subset", weight, destination path)
    destinations: Vec<(Option<String>, u32, Option<Port>, FieldPath)>,
    info: RouteInfo,
}

/// The objects of an apply by name, each name once per kind, and the services in the
/// kernel: what every step of [`Manifest::resolve`] looks things up in.
struct Objects<'a> {
    /// The services in the kernel, by name.
    kernel: HashMap<&'a str, &'a ServiceView>,
    /// The services of `services:` documents, in document order.
    specs: Vec<(&'a Document, &'a ServiceSpec)>,
    /// The same, by name.
    spec_by_name: HashMap<&'a str, (&'a Document, &'a ServiceSpec)>,
    /// Gateways by name.
    gateways: HashMap<&'a str, (&'a Document, &'a Gateway)>,
    /// DestinationRules by host.
    rules: HashMap<&'a str, (&'a Document, &'a DestinationRule)>,
}

impl<'a> Objects<'a> {
    /// Indexes the documents, refusing a name defined twice (per kind) and two
    /// DestinationRules for one host.
    fn collect(docs: &'a [Document], current: &'a [ServiceView]) -> Result<Self, ApplyError> {
        let mut objects = Objects {
            kernel: current
                .iter()
                .map(|v| (v.config.name.as_str(), v))
                .collect(),
            specs: Vec::new(),
            spec_by_name: HashMap::new(),
            gateways: HashMap::new(),
            rules: HashMap::new(),
        };
        let mut rule_names: HashMap<&str, &Document> = HashMap::new();
        let mut vs_names: HashMap<&str, &Document> = HashMap::new();
        for doc in docs {
            let name_path = path(&["metadata", "name"]);
            let twice = |first: &Document, what: &str| {
                let line = first
                    .line_of(&name_path)
                    .map(|l| format!(" (line {l})"))
                    .unwrap_or_default();
                doc.error(
                    &name_path,
                    format!(
                        "{what} is defined twice in this apply: first in {}{line}",
                        first.file
                    ),
                )
            };
            match &doc.body {
                Body::Services(list) => {
                    for spec in list {
                        if let Some((first, _)) = objects.spec_by_name.get(spec.name.as_str()) {
                            let p = spec_path(spec);
                            let line = first
                                .line_of(&p)
                                .map(|l| format!(" (line {l})"))
                                .unwrap_or_default();
                            return Err(doc.error(
                                &p,
                                format!(
                                    "service {:?} is defined twice in this apply: first in \
                                     {}{line}",
                                    spec.name, first.file
                                ),
                            ));
                        }
                        objects.spec_by_name.insert(&spec.name, (doc, spec));
                        objects.specs.push((doc, spec));
                    }
                }
                Body::Gateway(gw) => {
                    if let Some((first, _)) = objects.gateways.get(gw.metadata.name.as_str()) {
                        return Err(twice(first, &format!("Gateway {}", gw.metadata.name)));
                    }
                    objects.gateways.insert(&gw.metadata.name, (doc, gw));
                }
                Body::DestinationRule(dr) => {
                    if let Some(first) = rule_names.get(dr.metadata.name.as_str()) {
                        return Err(twice(
                            first,
                            &format!("DestinationRule {}", dr.metadata.name),
                        ));
                    }
                    rule_names.insert(&dr.metadata.name, doc);
                    if let Some((first, other)) = objects.rules.get(dr.spec.host.as_str()) {
                        return Err(doc.error(
                            &path(&["spec", "host"]),
                            format!(
                                "host {:?} already has DestinationRule {} in this apply ({}); \
                                 give each host one DestinationRule",
                                dr.spec.host, other.metadata.name, first.file
                            ),
                        ));
                    }
                    objects.rules.insert(&dr.spec.host, (doc, dr));
                }
                Body::VirtualService(vs) => {
                    if let Some(first) = vs_names.get(vs.metadata.name.as_str()) {
                        return Err(twice(
                            first,
                            &format!("VirtualService {}", vs.metadata.name),
                        ));
                    }
                    vs_names.insert(&vs.metadata.name, doc);
                }
                Body::GatewayApiGateway(_) | Body::TcpRoute(_) | Body::KubeService(_) => {}
            }
        }
        Ok(objects)
    }

    /// The subsets a service has after this apply: from its `services:` document, else from
    /// the kernel.
    fn subsets_of(&self, name: &str) -> Option<Vec<SubsetConfig>> {
        self.spec_by_name
            .get(name)
            .map(|(_, s)| s.subsets.clone())
            .or_else(|| self.kernel.get(name).map(|v| v.config.subsets.clone()))
    }

    /// The services known to this apply, for messages.
    fn known_services(&self) -> String {
        let mut names: Vec<&str> = self.spec_by_name.keys().copied().collect();
        names.extend(
            self.kernel
                .keys()
                .copied()
                .filter(|n| !self.spec_by_name.contains_key(n)),
        );
        names.sort_unstable();
        match names.len() {
            0 => "there are none yet".to_owned(),
            n if n > 10 => format!("services: {}, … ({n} in all)", names[..10].join(", ")),
            _ => format!("services: {}", names.join(", ")),
        }
    }

    /// The error for `host` at `p` of `doc` naming no known service.
    fn no_service(&self, doc: &Document, p: &FieldPath, host: &str) -> ApplyError {
        doc.error(
            p,
            format!(
                "no tcpshift service named {host:?} ({}): declare it with its subsets' \
                 addresses in a `services:` document of this apply (e.g. `services: \
                 {{{host}: {{subsets: {{v1: 127.0.0.2:9000}}}}}}`) or in the loader's \
                 configuration",
                self.known_services()
            ),
        )
    }

    /// DestinationRules: their subsets must exist. One line per rule, and warnings, in
    /// `plan`.
    fn check_destination_rules(
        &self,
        docs: &[Document],
        plan: &mut Plan,
    ) -> Result<(), ApplyError> {
        for doc in docs {
            let Body::DestinationRule(dr) = &doc.body else {
                continue;
            };
            let host = dr.spec.host.as_str();
            let Some(subsets) = self.subsets_of(host) else {
                return Err(self.no_service(doc, &path(&["spec", "host"]), host));
            };
            let mut shown = Vec::new();
            for (i, s) in dr.spec.subsets.iter().enumerate() {
                let Some(local) = subsets.iter().find(|l| l.name == s.name) else {
                    return Err(doc.error(
                        &path(&["spec", "subsets"]).index(i).key("name"),
                        unknown_subset(host, &s.name, &subsets),
                    ));
                };
                shown.push(format!("{} ({})", s.name, local.addr));
            }
            let (_, warnings) = load_balancer::rule_balance(doc, dr)?;
            plan.warnings.extend(warnings);
            let (policy, warning) = super::traffic_policy::policy_of(doc, dr)?;
            plan.warnings.extend(warning);
            plan.policies.push(policy);
            plan.objects.push(format!(
                "destinationrule.{GROUP}/{} accepted: host {host}, subsets {}",
                dr.metadata.name,
                if shown.is_empty() {
                    "(none)".to_owned()
                } else {
                    shown.join(", ")
                }
            ));
        }
        Ok(())
    }

    /// VirtualServices: each TCP route is one service. One line per VirtualService, and the
    /// services whose stored VirtualService no longer routes them, in `plan`.
    fn route_virtual_services(
        &self,
        docs: &'a [Document],
        current: &[ServiceView],
        plan: &mut Plan,
    ) -> Result<Vec<Routed<'a>>, ApplyError> {
        // VirtualService name → the services it routes, as stored with them.
        let mut stored: HashMap<String, Vec<&str>> = HashMap::new();
        for v in current {
            if let Some(info) = v.annotation.as_deref().and_then(RouteInfo::from_annotation) {
                stored
                    .entry(info.virtual_service)
                    .or_default()
                    .push(&v.config.name);
            }
        }
        let mut routed: Vec<Routed> = Vec::new();
        let mut routed_by: HashMap<String, String> = HashMap::new();
        for doc in docs {
            let Body::VirtualService(vs) = &doc.body else {
                continue;
            };
            let mut summary = Vec::new();
            for (r, route) in vs.spec.tcp.iter().enumerate() {
                let rp = path(&["spec", "tcp"]).index(r);
                let host = route
                    .route
                    .first()
                    .map(|d| d.destination.host.clone())
                    .unwrap_or_default();
                let host_path = rp.key("route").index(0).key("destination").key("host");
                if self.subsets_of(&host).is_none() {
                    return Err(self.no_service(doc, &host_path, &host));
                }
                if let Some(other) = routed_by.get(&host) {
                    return Err(doc.error(
                        &host_path,
                        format!(
                            "service {host:?} is already routed by {other}; a service takes \
                             its weights from one route"
                        ),
                    ));
                }
                routed_by.insert(
                    host.clone(),
                    format!("VirtualService {} spec.tcp[{r}]", vs.metadata.name),
                );
                let port = self.route_port(doc, vs, route, &rp)?;
                let info = RouteInfo {
                    virtual_service: vs.metadata.name.clone(),
                    namespace: vs.metadata.namespace.clone(),
                    api_version: vs.api_version.clone(),
                    hosts: vs.spec.hosts.clone(),
                    gateways: vs.spec.gateways.clone(),
                    route: r,
                    tcp_route: None,
                };
                let size = serde_json::to_string(&info).map_or(usize::MAX, |s| s.len());
                if size > MAX_ANNOTATION {
                    return Err(doc.error(
                        &path(&["spec", "hosts"]),
                        format!(
                            "the VirtualService's name, namespace, hosts and gateways take \
                             {size} bytes; tcpshift keeps at most {MAX_ANNOTATION} per \
                             service: shorten the lists"
                        ),
                    ));
                }
                routed.push(Routed {
                    doc,
                    destinations: destinations(route, &rp),
                    route_path: rp,
                    service: host.clone(),
                    port,
                    info,
                });
                summary.push(host);
            }
            plan.objects.push(format!(
                "virtualservice.{GROUP}/{} accepted: routes service {}",
                vs.metadata.name,
                summary.join(", ")
            ));
            let routed_now: HashSet<&str> = vs
                .spec
                .tcp
                .iter()
                .filter_map(|r| r.route.first().map(|d| d.destination.host.as_str()))
                .collect();
            for name in stored.get(&vs.metadata.name).into_iter().flatten() {
                if !routed_now.contains(name) {
                    plan.unrouted.push((*name).to_owned());
                }
            }
        }
        Ok(routed)
    }

    /// Gateway API TCPRoutes (see [`gateway_api`]): each is one service, added to `routed`.
    /// One line per TCPRoute and per Gateway API Gateway in `plan`.
    fn route_tcp_routes(
        &self,
        docs: &'a [Document],
        current: &[ServiceView],
        routed: &mut Vec<Routed<'a>>,
        plan: &mut Plan,
    ) -> Result<(), ApplyError> {
        for doc in docs {
            if let Body::GatewayApiGateway(gw) = &doc.body {
                let ports: Vec<String> = gw
                    .spec
                    .listeners
                    .iter()
                    .map(|l| format!("{} {}/TCP", l.name, l.port.0))
                    .collect();
                plan.objects.push(format!(
                    "gateway.{GATEWAY_API_GROUP}/{} accepted: listeners {} (tcpshift keeps no \
                     gateway state: this is the listen port of the routes attached to it)",
                    gw.metadata.name,
                    ports.join(", ")
                ));
            }
            let Body::TcpRoute(route) = &doc.body else {
                continue;
            };
            let r = gateway_api::resolve_route(
                docs,
                current,
                doc,
                route,
                |n| self.subsets_of(n),
                |p, h| self.no_service(doc, p, h),
            )?;
            let rule = path(&["spec", "rules"]).index(0);
            let first = rule.key("backendRefs").index(0).key("name");
            if let Some(other) = routed.iter().find(|o| o.service == r.service) {
                return Err(doc.error(
                    &first,
                    format!(
                        "service {:?} is already routed by {}; a service takes its weights \
                         from one route",
                        r.service,
                        other.doc.object().unwrap_or_default()
                    ),
                ));
            }
            let size = serde_json::to_string(&r.info).map_or(usize::MAX, |s| s.len());
            if size > MAX_ANNOTATION {
                return Err(doc.error(
                    &path(&["spec", "parentRefs"]),
                    format!(
                        "the TCPRoute's name, namespace, parents and backends take {size} \
                         bytes; tcpshift keeps at most {MAX_ANNOTATION} per service: shorten \
                         the names"
                    ),
                ));
            }
            plan.objects.push(format!(
                "tcproute.{GATEWAY_API_GROUP}/{} accepted: routes service {}",
                route.metadata.name, r.service
            ));
            routed.push(Routed {
                doc,
                route_path: rule,
                service: r.service,
                port: r.port,
                destinations: r
                    .destinations
                    .into_iter()
                    .map(|(subset, w, p)| (Some(subset), w, None, p))
                    .collect(),
                info: r.info,
            });
        }
        Ok(())
    }

    /// A route may only name subsets its host's DestinationRule (of this apply) defines.
    fn check_route_subsets(&self, routed: &[Routed]) -> Result<(), ApplyError> {
        for r in routed {
            let Some((_, dr)) = self.rules.get(r.service.as_str()) else {
                continue;
            };
            for (subset, _, _, dp) in &r.destinations {
                if let Some(sub) = subset
                    && !dr.spec.subsets.iter().any(|s| &s.name == sub)
                {
                    let defined: Vec<&str> =
                        dr.spec.subsets.iter().map(|s| s.name.as_str()).collect();
                    return Err(r.doc.error(
                        &dp.key("subset"),
                        format!(
                            "subset {sub:?} is not defined by DestinationRule {} of host {:?} \
                             (its subsets: {}); add it there",
                            dr.metadata.name,
                            r.service,
                            if defined.is_empty() {
                                "none".to_owned()
                            } else {
                                defined.join(", ")
                            }
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Listen addresses: unique among the planned services and the others in the kernel
    /// (the one rule, [`ListenClaims`]); the error points at the field that gave the address.
    fn check_listen_claims(
        &self,
        current: &[ServiceView],
        services: &[PlannedService],
        routed: &HashMap<&str, &Routed>,
    ) -> Result<(), ApplyError> {
        let mut taken = ListenClaims::new();
        let planned: HashSet<&str> = services.iter().map(|s| s.config.name.as_str()).collect();
        for v in current {
            if !planned.contains(v.config.name.as_str()) {
                // The kernel never holds two services on one key.
                let _ = taken.claim(&v.config.listen, &v.config.name);
            }
        }
        for s in services {
            if let Err(e) = taken.claim(&s.config.listen, &s.config.name) {
                let (doc, p) = match (
                    self.spec_by_name.get(s.config.name.as_str()),
                    routed.get(s.config.name.as_str()),
                ) {
                    (_, Some(r)) => (
                        r.doc,
                        r.port
                            .as_ref()
                            .map_or_else(|| r.route_path.clone(), |(_, p)| p.clone()),
                    ),
                    (Some((doc, spec)), None) => (*doc, spec_path(spec).key("listen")),
                    (None, None) => continue,
                };
                return Err(doc.error(&p, e.to_string()));
            }
        }
        Ok(())
    }
}

/// A route's destinations with their weights: those given, a single destination
/// [`DEFAULT_SINGLE_WEIGHT`], others 0.
fn destinations(
    route: &TcpRoute,
    rp: &FieldPath,
) -> Vec<(Option<String>, u32, Option<Port>, FieldPath)> {
    let single = route.route.len() == 1;
    route
        .route
        .iter()
        .enumerate()
        .map(|(d, dest)| {
            let w = match dest.weight {
                Some(Weight(w)) if w > 0 => w,
                // A single destination receives everything.
                _ if single => DEFAULT_SINGLE_WEIGHT,
                _ => 0,
            };
            (
                dest.destination.subset.clone(),
                w,
                dest.destination.port.map(|p| p.number),
                rp.key("route").index(d).key("destination"),
            )
        })
        .collect()
}

impl Manifest {
    /// Checks the objects against each other and against `current` (the services in the
    /// kernel) and returns the new definition of every service the apply concerns. See the
    /// module documentation for the rules.
    pub fn resolve(&self, current: &[ServiceView]) -> Result<Plan, ApplyError> {
        let objects = Objects::collect(&self.docs, current)?;
        let mut plan = Plan::default();
        objects.check_destination_rules(&self.docs, &mut plan)?;
        for doc in &self.docs {
            if let Body::Gateway(gw) = &doc.body {
                plan.objects.push(gateway_line(gw));
            }
        }
        let mut routed = objects.route_virtual_services(&self.docs, current, &mut plan)?;
        objects.route_tcp_routes(&self.docs, current, &mut routed, &mut plan)?;
        objects.check_route_subsets(&routed)?;

        // Every service concerned: declared in a `services:` document, or routed.
        let mut names: Vec<String> = objects.specs.iter().map(|(_, s)| s.name.clone()).collect();
        for r in &routed {
            if !objects.spec_by_name.contains_key(r.service.as_str()) {
                names.push(r.service.clone());
            }
        }
        names.sort();
        let routed_index: HashMap<&str, &Routed> =
            routed.iter().map(|r| (r.service.as_str(), r)).collect();
        for name in names {
            let spec = objects.spec_by_name.get(name.as_str()).copied();
            let route = routed_index.get(name.as_str()).copied();
            let old = objects.kernel.get(name.as_str()).copied();
            let rule = match objects.rules.get(name.as_str()) {
                Some((doc, dr)) => load_balancer::rule_balance(doc, dr)?
                    .0
                    .map(|b| (b, dr.metadata.name.as_str())),
                None => None,
            };
            plan.services
                .push(plan_service(&name, spec, route, old, rule)?);
        }
        objects.check_listen_claims(current, &plan.services, &routed_index)?;
        Ok(plan)
    }
}

/// What a Gateway of an apply is taken to mean, for [`Plan::objects`].
fn gateway_line(gw: &Gateway) -> String {
    let ports: Vec<String> = gw
        .spec
        .servers
        .iter()
        .map(|s| format!("{}/TCP", s.port.number.0))
        .collect();
    format!(
        "gateway.{GROUP}/{} accepted: port {} (tcpshift keeps no gateway state: this is the \
         listen port of the routes bound to it)",
        gw.metadata.name,
        ports.join(", ")
    )
}

impl<'a> Objects<'a> {
    /// The listen port a route gives: its `match.port`, else the TCP port of the Gateway (of
    /// this apply) it is bound to. A `match.port` must be a port of that Gateway.
    fn route_port(
        &self,
        doc: &Document,
        vs: &VirtualService,
        route: &TcpRoute,
        rp: &FieldPath,
    ) -> Result<Option<(Port, FieldPath)>, ApplyError> {
        let matched = route
            .matches
            .iter()
            .enumerate()
            .find_map(|(m, c)| c.port.map(|p| (p, rp.key("match").index(m).key("port"))));
        let bound: Vec<(&str, Vec<Port>)> = vs
            .spec
            .gateways
            .iter()
            .filter_map(|g| {
                self.gateways.get(g.as_str()).map(|(_, gw)| {
                    let mut ports: Vec<Port> =
                        gw.spec.servers.iter().map(|s| s.port.number).collect();
                    ports.sort_unstable();
                    ports.dedup();
                    (g.as_str(), ports)
                })
            })
            .collect();
        match matched {
            Some((p, mp)) => {
                if !bound.is_empty() && !bound.iter().any(|(_, ports)| ports.contains(&p)) {
                    let have: Vec<String> = bound
                        .iter()
                        .map(|(g, ports)| {
                            let ports: Vec<String> =
                                ports.iter().map(|p| p.0.to_string()).collect();
                            format!("{g}: {}", ports.join(", "))
                        })
                        .collect();
                    return Err(doc.error(
                        &mp,
                        format!(
                            "port {} is not a port of the gateways this VirtualService is \
                             bound to ({}); expected one of their server ports",
                            p.0,
                            have.join("; ")
                        ),
                    ));
                }
                Ok(Some((p, mp)))
            }
            None => {
                let mut ports: Vec<Port> = bound.iter().flat_map(|(_, p)| p.clone()).collect();
                ports.sort_unstable();
                ports.dedup();
                match ports.as_slice() {
                    [] => Ok(None),
                    [one] => Ok(Some((*one, path(&["spec", "gateways"])))),
                    many => Err(doc.error(
                        rp,
                        format!(
                            "the route has no `match: [{{port: ...}}]` and its gateways have \
                             several ports ({}); say which one with `match: [{{port: {}}}]`",
                            many.iter()
                                .map(|p| p.0.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                            many.first().map_or(0, |p| p.0)
                        ),
                    )),
                }
            }
        }
    }
}

impl Manifest {
    /// The services a `tcpshiftctl delete -f` of these files removes: those of `services:`
    /// documents, the hosts of VirtualService routes and of DestinationRules, and the
    /// services whose stored route comes from one of the VirtualServices. Gateways remove
    /// nothing. Sorted, without duplicates.
    pub fn services_to_delete(&self, current: &[ServiceView]) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let mut vs_names: HashSet<&str> = HashSet::new();
        for doc in &self.docs {
            match &doc.body {
                Body::Services(specs) => names.extend(specs.iter().map(|s| s.name.clone())),
                Body::VirtualService(vs) => {
                    vs_names.insert(&vs.metadata.name);
                    for r in &vs.spec.tcp {
                        names.extend(r.route.iter().map(|d| d.destination.host.clone()));
                    }
                }
                Body::DestinationRule(dr) => names.push(dr.spec.host.clone()),
                Body::TcpRoute(route) => {
                    names.push(gateway_api::route_service(&self.docs, current, route));
                }
                Body::Gateway(_) | Body::GatewayApiGateway(_) | Body::KubeService(_) => {}
            }
        }
        for v in current {
            if let Some(info) = v.annotation.as_deref().and_then(RouteInfo::from_annotation)
                && vs_names.contains(info.virtual_service.as_str())
            {
                names.push(v.config.name.clone());
            }
        }
        names.sort();
        names.dedup();
        names
    }
}

/// The path of a service in its `services:` document.
fn spec_path(spec: &ServiceSpec) -> FieldPath {
    FieldPath(vec![
        Seg::Key("services".into()),
        Seg::Key(spec.name.clone()),
    ])
}

fn unknown_subset(host: &str, subset: &str, subsets: &[SubsetConfig]) -> String {
    let have: Vec<String> = subsets
        .iter()
        .map(|s| format!("{} ({})", s.name, s.addr))
        .collect();
    // An example address next to the others: same port, next loopback address.
    let port = subsets.first().map_or(9000, |s| s.addr.port());
    let example = format!("127.0.0.{}:{port}", (subsets.len() + 2).min(254));
    format!(
        "service {host:?} has no subset {subset:?} (its subsets: {}); declare its address in \
         the `services:` document, e.g. `services: {{{host}: {{subsets: {{..., {subset}: \
         {example}}}}}}}`",
        have.join(", ")
    )
}

/// The new definition of one service.
fn plan_service(
    name: &str,
    spec: Option<(&Document, &ServiceSpec)>,
    route: Option<&Routed>,
    old: Option<&ServiceView>,
    rule: Option<(Balance, &str)>,
) -> Result<PlannedService, ApplyError> {
    let balance = balance_of(name, spec, old, rule)?;
    let mut subsets: Vec<SubsetConfig> = match (spec, old) {
        (Some((_, s)), _) => s.subsets.clone(),
        (None, Some(v)) => v.config.subsets.clone(),
        // `resolve` only plans services that are declared or in the kernel.
        (None, None) => Vec::new(),
    };

    // Listen address.
    let spec_listen = spec.and_then(|(_, s)| s.listen);
    let listen = match (route.and_then(|r| r.port.as_ref()), spec_listen) {
        (Some((port, port_path)), Some(l)) => {
            if let (Some((doc, s)), Some(r)) = (spec, route)
                && l.port() != port.0
            {
                return Err(doc.error(
                    &spec_path(s).key("listen"),
                    format!(
                        "listen port {} differs from port {} that VirtualService {} routes ({} \
                         in {}); give one port",
                        l.port(),
                        port.0,
                        r.info.virtual_service,
                        port_path,
                        r.doc.file
                    ),
                ));
            }
            l
        }
        (Some((port, _)), None) => match old.map(|v| v.config.listen) {
            Some(Listen::Addr(a)) => Listen::Addr(std::net::SocketAddr::new(a.ip(), port.0)),
            _ => Listen::Any { port: port.0 },
        },
        (None, Some(l)) => l,
        (None, None) => match old {
            Some(v) => v.config.listen,
            None => {
                let (doc, p) = match (spec, route) {
                    (Some((d, s)), _) => (d, spec_path(s)),
                    (None, Some(r)) => (r.doc, r.route_path.clone()),
                    (None, None) => {
                        return Err(ApplyError::from(Located {
                            file: String::new(),
                            line: None,
                            column: None,
                            object: None,
                            field: None,
                            message: format!("service {name:?}: no listen port"),
                        }));
                    }
                };
                return Err(doc.error(
                    &p,
                    format!(
                        "service {name:?} has no listen port: give `listen: PORT` in the \
                         `services:` document, or route it with a VirtualService whose TCP \
                         route matches a port (`match: [{{port: 31400}}]`)"
                    ),
                ));
            }
        },
    };

    // Weights.
    if let Some(r) = route {
        if let Some((doc, s)) = spec
            && s.weights_given
        {
            return Err(doc.error(
                &spec_path(s).key("weights"),
                format!(
                    "service {name:?} gets weights both here and from VirtualService {} ({}); \
                     give them in one place",
                    r.info.virtual_service, r.doc.file
                ),
            ));
        }
        for s in subsets.iter_mut() {
            s.weight = 0;
        }
        for (subset, weight, port, dp) in &r.destinations {
            match subset {
                Some(sub) => {
                    let Some(local) = subsets.iter_mut().find(|s| &s.name == sub) else {
                        return Err(r.doc.error(
                            &dp.key("subset"),
                            unknown_subset(name, sub, &spec_or_old(spec, old)),
                        ));
                    };
                    if let Some(p) = port
                        && p.0 != local.addr.port()
                    {
                        return Err(r.doc.error(
                            &dp.key("port").key("number"),
                            port_mismatch(p.0, &[(&local.name, local.addr)]),
                        ));
                    }
                    local.weight = *weight;
                }
                None => {
                    if let Some(p) = port {
                        let wrong: Vec<(&str, std::net::SocketAddr)> = subsets
                            .iter()
                            .filter(|s| s.addr.port() != p.0)
                            .map(|s| (s.name.as_str(), s.addr))
                            .collect();
                        if !wrong.is_empty() {
                            return Err(r
                                .doc
                                .error(&dp.key("port").key("number"), port_mismatch(p.0, &wrong)));
                        }
                    }
                    // Like a Kubernetes Service over all its pods: every subset equally.
                    for s in subsets.iter_mut() {
                        s.weight = 1;
                    }
                }
            }
        }
        // A DestinationRule in the kernel is not known; one in the apply was checked above.
    } else {
        let given = spec.is_some_and(|(_, s)| s.weights_given);
        if !given {
            match old {
                Some(v) => {
                    for s in subsets.iter_mut() {
                        s.weight = v
                            .config
                            .subsets
                            .iter()
                            .find(|o| o.name == s.name)
                            .map_or(0, |o| o.weight);
                    }
                    if subsets.iter().all(|s| s.weight == 0)
                        && let Some((doc, s)) = spec
                    {
                        return Err(doc.error(
                            &spec_path(s),
                            format!(
                                "`weights` is missing, and none of the subsets kept from the \
                                 service in the kernel has a weight above 0; add e.g. \
                                 `weights: {{{}: 100}}` or route the service with a \
                                 VirtualService",
                                subsets.first().map_or("v1", |s| s.name.as_str())
                            ),
                        ));
                    }
                }
                None if subsets.len() == 1 => {
                    if let Some(s) = subsets.first_mut() {
                        s.weight = DEFAULT_SINGLE_WEIGHT;
                    }
                }
                None => {
                    if let Some((doc, s)) = spec {
                        let example = subsets
                            .iter()
                            .enumerate()
                            .map(|(i, s)| format!("{}: {}", s.name, if i == 0 { 100 } else { 0 }))
                            .collect::<Vec<_>>()
                            .join(", ");
                        return Err(doc.error(
                            &spec_path(s),
                            format!(
                                "new service {name:?} has several subsets but no weights: add \
                                 `weights: {{{example}}}`, or route it with a VirtualService \
                                 in the same apply"
                            ),
                        ));
                    }
                }
            }
        }
    }

    Ok(PlannedService {
        config: ServiceConfig {
            name: name.to_owned(),
            listen,
            subsets,
            take_over: spec.is_some_and(|(_, s)| s.take_over),
            fail_closed: spec
                .and_then(|(_, s)| s.fail_closed)
                .or(old.map(|o| o.config.fail_closed))
                .unwrap_or(false),
            balance,
            protocol: spec
                .and_then(|(_, s)| s.protocol)
                .or(old.map(|v| v.config.protocol))
                .unwrap_or_default(),
        },
        route: route.map(|r| r.info.clone()),
    })
}

/// How service `name` places connections: as its DestinationRule of this apply says (`rule`:
/// the mode and the rule's name), else as its `services:` document says, else as the kernel
/// holds it now, else by hash. A rule and a document that disagree are refused.
fn balance_of(
    name: &str,
    spec: Option<(&Document, &ServiceSpec)>,
    old: Option<&ServiceView>,
    rule: Option<(Balance, &str)>,
) -> Result<Balance, ApplyError> {
    let given = spec.and_then(|(doc, s)| s.balance.map(|b| (doc, s, b)));
    Ok(match (rule, given) {
        (Some((r, rule_name)), Some((doc, s, b))) if r != b => {
            return Err(doc.error(
                &spec_path(s),
                format!(
                    "service {name:?} is placed by {b} here and by {r} by DestinationRule \
                     {rule_name} (its trafficPolicy.loadBalancer); give the mode in one place"
                ),
            ));
        }
        (Some((r, _)), _) => r,
        (None, Some((_, _, b))) => b,
        (None, None) => old.map_or(Balance::Hash, |v| v.config.balance),
    })
}

fn spec_or_old(
    spec: Option<(&Document, &ServiceSpec)>,
    old: Option<&ServiceView>,
) -> Vec<SubsetConfig> {
    match (spec, old) {
        (Some((_, s)), _) => s.subsets.clone(),
        (None, Some(v)) => v.config.subsets.clone(),
        _ => Vec::new(),
    }
}

fn port_mismatch(port: u16, subsets: &[(&str, std::net::SocketAddr)]) -> String {
    let shown: Vec<String> = subsets
        .iter()
        .map(|(n, a)| format!("subset {n} listens on {a}"))
        .collect();
    let expected = subsets.first().map_or(0, |(_, a)| a.port());
    format!(
        "port {port} is not the port of the subset's address ({}): a destination port is \
         the port the subset's server listens on, like a Kubernetes service port; expected \
         {expected}, or leave `port` out",
        shown.join(", ")
    )
}
