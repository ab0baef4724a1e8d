//! Parsing an apply: YAML streams split into documents, each document classified (Istio
//! object or `services:` document), typed and checked on its own.

use std::collections::HashSet;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;
use tcpshift_common::MAX_SUBSETS;

use super::gateway_api::{
    self, GATEWAY_API_GROUP, GATEWAY_VERSIONS, GatewayApiGateway, KubeService, TCP_ROUTE_VERSIONS,
    TcpRouteObject,
};
use super::objects::*;
use super::{ApplyError, DEFAULT_API_VERSION, GROUP, MAX_OBJECT_NAME, VERSIONS};
use crate::config::{self, ServiceSpec};
use crate::model;
use crate::yaml::{self, FieldPath, Located, locate, path};

/// One document of an apply.
#[derive(Clone, Debug)]
pub(super) struct Document {
    /// File name for messages.
    pub(super) file: String,
    /// Lines before the document in its file.
    pub(super) line_offset: usize,
    /// The document's text, for locating fields.
    pub(super) text: String,
    pub(super) body: Body,
}

#[derive(Clone, Debug)]
pub(super) enum Body {
    Services(Vec<ServiceSpec>),
    VirtualService(Box<VirtualService>),
    DestinationRule(Box<DestinationRule>),
    Gateway(Box<Gateway>),
    GatewayApiGateway(Box<GatewayApiGateway>),
    TcpRoute(Box<TcpRouteObject>),
    KubeService(Box<KubeService>),
}

impl Document {
    /// `VirtualService NAME` etc., or `None` for a `services:` document.
    pub(super) fn object(&self) -> Option<String> {
        match &self.body {
            Body::Services(_) => None,
            Body::VirtualService(o) => Some(format!("VirtualService {}", o.metadata.name)),
            Body::DestinationRule(o) => Some(format!("DestinationRule {}", o.metadata.name)),
            Body::Gateway(o) => Some(format!("Gateway {}", o.metadata.name)),
            Body::GatewayApiGateway(o) => Some(format!("Gateway {}", o.metadata.name)),
            Body::TcpRoute(o) => Some(format!("TCPRoute {}", o.metadata.name)),
            Body::KubeService(o) => Some(format!("Service {}", o.metadata.name)),
        }
    }

    /// An error about the value at `field`, located in the file.
    pub(super) fn error(&self, field: &FieldPath, message: impl Into<String>) -> ApplyError {
        let loc = locate(&self.text, field);
        Located::new(&self.file, message)
            .at(loc.map(|(l, _)| l + self.line_offset), loc.map(|(_, c)| c))
            .object(self.object())
            .field(field.to_string())
            .into()
    }

    /// 1-based line of the value at `field` in the file, when found.
    pub(super) fn line_of(&self, field: &FieldPath) -> Option<usize> {
        locate(&self.text, field).map(|(l, _)| l + self.line_offset)
    }
}

/// The parsed documents of an apply, each checked on its own. Build one with
/// [`Manifest::parse`] (one per file) and [`Manifest::extend`].
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    pub(super) docs: Vec<Document>,
    files: Vec<String>,
}

/// What a document is, from its top-level keys.
enum Class {
    Empty,
    Services,
    Object(Kind),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    VirtualService,
    DestinationRule,
    Gateway,
    GatewayApiGateway,
    TcpRoute,
    KubeService,
}

const SUPPORTED: &str = "networking.istio.io VirtualService, DestinationRule and Gateway \
                         objects, gateway.networking.k8s.io Gateway and TCPRoute objects, core \
                         v1 Services, and tcpshift `services:` documents";

impl Manifest {
    /// Parses the YAML stream `text` of the file `file` (the name used in messages) and checks
    /// each document on its own. Empty documents are skipped.
    pub fn parse(text: &str, file: &str) -> Result<Manifest, ApplyError> {
        yaml::documents::check_flow_nesting(text, file)?;
        let mut docs = Vec::new();
        for (line_offset, chunk) in yaml::documents::split_documents(text) {
            let value = head(chunk).map_err(|e| {
                let e = yaml::documents::yaml_error_with_location(chunk, e);
                match yaml::documents::second_document_line(chunk) {
                    Some(line) if e.location().is_none() => ApplyError::from(
                        Located::new(
                            file,
                            "a second YAML document starts here; separate documents with a \
                             line holding only `---`",
                        )
                        .at(Some(line + line_offset), None),
                    ),
                    _ => Located::from_yaml(file, line_offset, &e).into(),
                }
            })?;
            let located = |p: &FieldPath, message: String| {
                let loc = locate(chunk, p);
                let mut e = Located::new(file, message)
                    .at(loc.map(|(l, _)| l + line_offset), loc.map(|(_, c)| c));
                e.field = (!p.0.is_empty()).then(|| p.to_string());
                ApplyError::from(e)
            };
            let body = match classify(&value).map_err(|(p, m)| located(&p, m))? {
                Class::Empty => continue,
                Class::Services => {
                    let specs = config::specs_from_yaml_str(chunk, file)
                        .map_err(|e| e.shift_lines(line_offset))?;
                    Body::Services(specs)
                }
                Class::Object(kind) => {
                    let object = object_label(kind, &value);
                    let typed = |e: serde_yaml::Error| -> ApplyError {
                        Located::from_yaml(file, line_offset, &e)
                            .object(object)
                            .into()
                    };
                    match kind {
                        Kind::VirtualService => {
                            Body::VirtualService(serde_yaml::from_str(chunk).map_err(typed)?)
                        }
                        Kind::DestinationRule => {
                            Body::DestinationRule(serde_yaml::from_str(chunk).map_err(typed)?)
                        }
                        Kind::Gateway => Body::Gateway(serde_yaml::from_str(chunk).map_err(typed)?),
                        Kind::GatewayApiGateway => {
                            Body::GatewayApiGateway(serde_yaml::from_str(chunk).map_err(typed)?)
                        }
                        Kind::TcpRoute => {
                            Body::TcpRoute(serde_yaml::from_str(chunk).map_err(typed)?)
                        }
                        Kind::KubeService => {
                            Body::KubeService(serde_yaml::from_str(chunk).map_err(typed)?)
                        }
                    }
                }
            };
            let doc = Document {
                file: file.to_owned(),
                line_offset,
                text: chunk.to_owned(),
                body,
            };
            doc.check()?;
            docs.push(doc);
        }
        Ok(Manifest {
            docs,
            files: vec![file.to_owned()],
        })
    }

    /// Reads and parses a file; `-` is standard input (named `<stdin>` in messages).
    pub fn from_file(file: &str) -> Result<Manifest, ApplyError> {
        let (text, name) = yaml::read_text(file)?;
        Manifest::parse(&text, &name)
    }

    /// Adds the documents of `other` (another file of the same apply).
    pub fn extend(&mut self, other: Manifest) {
        self.docs.extend(other.docs);
        self.files.extend(other.files);
    }

    /// Whether there is no document at all.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// An [`ApplyError::Empty`] naming the files read.
    pub fn empty_error(&self) -> ApplyError {
        ApplyError::Empty {
            file: self.files.join(", "),
            message: "no YAML documents; expected Istio VirtualService, DestinationRule or \
                      Gateway objects and/or a tcpshift `services:` document"
                .to_owned(),
        }
    }

    /// The Istio objects, as `KIND NAME`, in document order.
    pub fn objects(&self) -> Vec<String> {
        self.docs.iter().filter_map(Document::object).collect()
    }
}

fn classify(value: &Value) -> Result<Class, (FieldPath, String)> {
    let map = match value {
        Value::Null => return Ok(Class::Empty),
        Value::Mapping(m) => m,
        other => {
            return Err((
                FieldPath::default(),
                format!("the document is {}; expected {SUPPORTED}", describe(other)),
            ));
        }
    };
    let kind = map.get("kind");
    let api = map.get("apiVersion");
    if kind.is_none() && api.is_none() {
        if map.contains_key("services") {
            return Ok(Class::Services);
        }
        return Err((
            FieldPath::default(),
            format!(
                "neither a tcpshift `services:` document nor a Kubernetes object (no \
                 `apiVersion` and `kind`); expected {SUPPORTED}"
            ),
        ));
    }
    let kind = match kind {
        Some(Value::String(k)) => k.as_str(),
        Some(other) => {
            return Err((
                path(&["kind"]),
                format!("got {}; expected a string", describe(other)),
            ));
        }
        None => {
            return Err((
                FieldPath::default(),
                "missing field `kind`; expected VirtualService, DestinationRule or Gateway".into(),
            ));
        }
    };
    let api_version = match api {
        Some(Value::String(a)) => a.as_str(),
        Some(other) => {
            return Err((
                path(&["apiVersion"]),
                format!("got {}; expected a string", describe(other)),
            ));
        }
        None => {
            return Err((
                FieldPath::default(),
                format!("missing field `apiVersion`; expected {DEFAULT_API_VERSION}"),
            ));
        }
    };
    if let Some(kind) = gateway_api_kind(kind, api_version)? {
        return Ok(Class::Object(kind));
    }
    let versions = VERSIONS
        .iter()
        .map(|v| format!("{GROUP}/{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let known_kind = match kind {
        "VirtualService" => Some(Kind::VirtualService),
        "DestinationRule" => Some(Kind::DestinationRule),
        "Gateway" => Some(Kind::Gateway),
        _ => None,
    };
    match api_version.split_once('/') {
        Some((GROUP, v)) if VERSIONS.contains(&v) => {}
        Some((GROUP, v)) => {
            return Err((
                path(&["apiVersion"]),
                format!("unsupported version {v:?} of {GROUP}; expected one of {versions}"),
            ));
        }
        _ if known_kind.is_some() => {
            return Err((
                path(&["apiVersion"]),
                format!(
                    "{api_version:?} is not Istio's networking API; expected one of {versions}"
                ),
            ));
        }
        _ => {
            return Err((
                path(&["kind"]),
                format!(
                    "{kind} ({api_version}) is not something tcpshift applies; it applies \
                     {SUPPORTED} (where the subsets' servers listen is said by the \
                     `services:` document, not by Kubernetes Services or Deployments)"
                ),
            ));
        }
    }
    match known_kind {
        Some(kind) => Ok(Class::Object(kind)),
        None => Err((
            path(&["kind"]),
            format!(
                "{GROUP} kind {kind:?} is not supported; tcpshift applies VirtualService, \
                 DestinationRule and Gateway"
            ),
        )),
    }
}

/// The Gateway API and core kinds: `Some` for one tcpshift reads, `None` for any other
/// group (Istio's, or unknown), an error for other kinds or versions of these groups.
fn gateway_api_kind(kind: &str, api_version: &str) -> Result<Option<Kind>, (FieldPath, String)> {
    if api_version == "v1" && kind == "Service" {
        return Ok(Some(Kind::KubeService));
    }
    let Some((GATEWAY_API_GROUP, v)) = api_version.split_once('/') else {
        return Ok(None);
    };
    let (known, versions): (Kind, &[&str]) = match kind {
        "Gateway" => (Kind::GatewayApiGateway, &GATEWAY_VERSIONS),
        "TCPRoute" => (Kind::TcpRoute, &TCP_ROUTE_VERSIONS),
        _ => {
            return Err((
                path(&["kind"]),
                format!(
                    "{GATEWAY_API_GROUP} kind {kind:?} is not supported; tcpshift applies \
                     Gateway (v1, v1beta1) and TCPRoute (v1alpha2)"
                ),
            ));
        }
    };
    if versions.contains(&v) {
        Ok(Some(known))
    } else {
        let list: Vec<String> = versions
            .iter()
            .map(|v| format!("{GATEWAY_API_GROUP}/{v}"))
            .collect();
        Err((
            path(&["apiVersion"]),
            format!(
                "unsupported version {v:?} of {GATEWAY_API_GROUP} {kind}; expected {}",
                list.join(" or ")
            ),
        ))
    }
}

/// `VirtualService NAME` from an unchecked document, for messages.
fn object_label(kind: Kind, value: &Value) -> Option<String> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    let kind = match kind {
        Kind::VirtualService => "VirtualService",
        Kind::DestinationRule => "DestinationRule",
        Kind::Gateway | Kind::GatewayApiGateway => "Gateway",
        Kind::TcpRoute => "TCPRoute",
        Kind::KubeService => "Service",
    };
    Some(match name {
        Some(n) => format!("{kind} {n}"),
        None => kind.to_owned(),
    })
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "empty".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Checks a Kubernetes object name: a DNS subdomain.
fn check_object_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_OBJECT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}; expected a Kubernetes object name: 1 to {MAX_OBJECT_NAME} \
             characters from a-z 0-9 - ., starting and ending with a letter or digit"
        ))
    }
}

impl Document {
    /// Checks what can be checked in this document alone.
    fn check(&self) -> Result<(), ApplyError> {
        let meta = |m: &Metadata| -> Result<(), ApplyError> {
            check_object_name(&m.name).map_err(|e| self.error(&path(&["metadata", "name"]), e))
        };
        match &self.body {
            Body::Services(_) => Ok(()),
            Body::VirtualService(vs) => {
                meta(&vs.metadata)?;
                self.check_virtual_service(&vs.spec)
            }
            Body::DestinationRule(dr) => {
                meta(&dr.metadata)?;
                let spec = path(&["spec"]);
                model::validate_service_name(&dr.spec.host)
                    .map_err(|e| self.error(&spec.key("host"), host_message(&e)))?;
                let mut seen = HashSet::new();
                for (i, s) in dr.spec.subsets.iter().enumerate() {
                    let p = spec.key("subsets").index(i).key("name");
                    model::validate_subset_name(&s.name).map_err(|e| self.error(&p, e))?;
                    if !seen.insert(s.name.as_str()) {
                        return Err(self.error(
                            &p,
                            format!("subset {:?} is defined twice; names must be unique", s.name),
                        ));
                    }
                }
                if dr.spec.subsets.len() > MAX_SUBSETS {
                    return Err(self.error(
                        &spec.key("subsets"),
                        format!(
                            "{} subsets; a tcpshift service has at most {MAX_SUBSETS}",
                            dr.spec.subsets.len()
                        ),
                    ));
                }
                Ok(())
            }
            Body::Gateway(gw) => {
                meta(&gw.metadata)?;
                let spec = path(&["spec"]);
                if gw.spec.servers.is_empty() {
                    return Err(self.error(
                        &spec,
                        "no `servers`; expected at least one, e.g. `servers: [{port: {number: \
                         31400, name: tcp, protocol: TCP}, hosts: [\"*\"]}]`",
                    ));
                }
                for (i, s) in gw.spec.servers.iter().enumerate() {
                    let p = spec.key("servers").index(i);
                    if !s.port.protocol.eq_ignore_ascii_case("TCP") {
                        return Err(self.error(
                            &p.key("port").key("protocol"),
                            format!(
                                "protocol {:?} is not supported: tcpshift steers plain TCP \
                                 connections in the kernel, without a proxy; expected TCP",
                                s.port.protocol
                            ),
                        ));
                    }
                    let unsupported = [
                        ("bind", s.bind.is_some()),
                        ("tls", s.tls.is_some()),
                        ("defaultEndpoint", s.default_endpoint.is_some()),
                    ];
                    for (field, present) in unsupported {
                        if present {
                            return Err(self.error(
                                &p.key(field),
                                format!(
                                    "`{field}` is not supported: tcpshift steers plain TCP \
                                     connections without a proxy; remove it (the listen \
                                     address of a service goes in the `services:` document)"
                                ),
                            ));
                        }
                    }
                }
                Ok(())
            }
            Body::GatewayApiGateway(gw) => {
                meta(&gw.metadata)?;
                gateway_api::check_gateway(self, gw)
            }
            Body::TcpRoute(route) => {
                meta(&route.metadata)?;
                gateway_api::check_tcp_route(self, route)
            }
            Body::KubeService(svc) => {
                meta(&svc.metadata)?;
                gateway_api::check_kube_service(self, svc)
            }
        }
    }

    fn check_virtual_service(&self, spec: &VirtualServiceSpec) -> Result<(), ApplyError> {
        let sp = path(&["spec"]);
        for (field, present) in [
            ("http", spec.http.as_ref().is_some_and(|v| !v.is_empty())),
            ("tls", spec.tls.as_ref().is_some_and(|v| !v.is_empty())),
        ] {
            if present {
                return Err(self.error(
                    &sp.key(field),
                    format!(
                        "{} routes are not supported: tcpshift steers TCP connections in the \
                         kernel, without a proxy; use `tcp` routes",
                        field.to_uppercase()
                    ),
                ));
            }
        }
        if spec.tcp.is_empty() {
            return Err(self.error(
                &sp,
                "no `tcp` routes; expected at least one, e.g. `tcp: [{match: [{port: 31400}], \
                 route: [{destination: {host: tcp-echo, subset: v1}}]}]`",
            ));
        }
        for (r, route) in spec.tcp.iter().enumerate() {
            let rp = sp.key("tcp").index(r);
            let mut port: Option<Port> = None;
            for (m, cond) in route.matches.iter().enumerate() {
                let mp = rp.key("match").index(m);
                let unsupported = [
                    ("destinationSubnets", cond.destination_subnets.is_some()),
                    ("sourceLabels", cond.source_labels.is_some()),
                    ("sourceNamespace", cond.source_namespace.is_some()),
                ];
                for (field, present) in unsupported {
                    if present {
                        return Err(self.error(
                            &mp.key(field),
                            format!(
                                "`{field}` is not supported: tcpshift steers every new \
                                 connection to the port; remove it"
                            ),
                        ));
                    }
                }
                if let Some(p) = cond.port {
                    match port {
                        Some(first) if first != p => {
                            return Err(self.error(
                                &mp.key("port"),
                                format!(
                                    "a second port ({}) for one route (the first is {}); a \
                                     tcpshift service listens on one port: give each port \
                                     its own route and service",
                                    p.0, first.0
                                ),
                            ));
                        }
                        _ => port = Some(p),
                    }
                }
            }
            let dests = &route.route;
            if dests.is_empty() {
                return Err(self.error(
                    &rp.key("route"),
                    format!(
                        "no destinations; expected 1 to {MAX_SUBSETS}, e.g. `route: \
                         [{{destination: {{host: tcp-echo, subset: v1}}}}]`"
                    ),
                ));
            }
            if dests.len() > MAX_SUBSETS {
                return Err(self.error(
                    &rp.key("route"),
                    format!(
                        "{} destinations; a tcpshift service has at most {MAX_SUBSETS} subsets",
                        dests.len()
                    ),
                ));
            }
            let mut subsets = HashSet::new();
            let mut total: u64 = 0;
            for (d, dest) in dests.iter().enumerate() {
                let dp = rp.key("route").index(d).key("destination");
                let host = &dest.destination.host;
                model::validate_service_name(host)
                    .map_err(|e| self.error(&dp.key("host"), host_message(&e)))?;
                if let Some(first) = dests.first().map(|f| &f.destination.host)
                    && first != host
                {
                    return Err(self.error(
                        &dp.key("host"),
                        format!(
                            "host {host:?} differs from {first:?} of the route's first \
                             destination; the destinations of one route must be subsets of \
                             one service (a tcpshift service has one listen port and one set \
                             of weights): give each service its own route"
                        ),
                    ));
                }
                match &dest.destination.subset {
                    Some(s) => {
                        model::validate_subset_name(s)
                            .map_err(|e| self.error(&dp.key("subset"), e))?;
                        if !subsets.insert(s.as_str()) {
                            return Err(self.error(
                                &dp.key("subset"),
                                format!(
                                    "subset {s:?} is named twice in this route; name each \
                                     subset once"
                                ),
                            ));
                        }
                    }
                    None if dests.len() > 1 => {
                        return Err(self.error(
                            &dp,
                            "no `subset`; when a route has several destinations each names a \
                             subset",
                        ));
                    }
                    None => {}
                }
                total += u64::from(dest.weight.map_or(0, |w| w.0));
            }
            if dests.len() > 1 && total == 0 {
                return Err(self.error(
                    &rp.key("route"),
                    "all weights are 0 (a missing weight counts as 0 when a route has several \
                     destinations); at least one destination needs a weight above 0, e.g. \
                     `weight: 100`",
                ));
            }
        }
        Ok(())
    }
}

fn host_message(e: &str) -> String {
    format!("{e} (a destination host is the name of a tcpshift service)")
}

/// The top of a document, enough to classify it: `serde_yaml::Value`, or, when a value
/// deep inside is not one (an integer beyond 64 bits, such as a weight of
/// `99999999999999999999`), only the top-level keys that classify it. The typed parse
/// then reports such values with their own message.
fn head(chunk: &str) -> Result<Value, serde_yaml::Error> {
    match serde_yaml::from_str::<Value>(chunk) {
        Ok(value) => Ok(value),
        Err(err) => serde_yaml::from_str::<Head>(chunk)
            .map(|h| h.0)
            .map_err(|_| err),
    }
}

/// See [`head`]: the top-level value with only `kind`, `apiVersion`, `metadata.name` and
/// the presence of `services` kept.
struct Head(Value);

impl<'de> Deserialize<'de> for Head {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Head, D::Error> {
        d.deserialize_any(HeadVisitor).map(Head)
    }
}

struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a YAML document")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_yaml::Mapping::new();
        while let Some(key) = map.next_key::<Value>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "duplicate entry with key {key:?}"
                )));
            }
            let value = match key.as_str() {
                Some("kind" | "apiVersion") => map.next_value::<Value>()?,
                Some("metadata") => map.next_value::<Head>()?.0,
                Some("name") => map.next_value::<Value>().unwrap_or(Value::Null),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    Value::Null
                }
            };
            out.insert(key, value);
        }
        Ok(Value::Mapping(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Sequence(Vec::new()))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Ok(Value::from(v as f64))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        Ok(Value::from(v as f64))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}
