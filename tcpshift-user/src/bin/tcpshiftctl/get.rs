//! `tcpshiftctl get`: the services, or the routing as Istio VirtualServices, read from the
//! kernel, as a table, YAML or JSON.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use tcpshift::{istio, model::ServiceView, netns::Netns, report, state::State};

/// What `tcpshiftctl get` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GetKind {
    /// The services: listen address, subsets, weights, live sockets.
    #[value(name = "services", alias = "service", alias = "svc")]
    Services,
    /// The routing as Istio VirtualServices.
    #[value(name = "virtualservice", alias = "virtualservices", alias = "vs")]
    VirtualService,
    /// The nodes of a fleet store (with --store): reachable or not, applied revision, in
    /// sync or behind.
    #[value(name = "nodes", alias = "node")]
    Nodes,
    /// The routing applied from Gateway API TCPRoutes, as TCPRoutes.
    #[value(name = "tcproute", alias = "tcproutes")]
    TcpRoute,
    /// The gateways routes are bound to: Istio Gateways and Gateway API Gateways.
    #[value(name = "gateway", alias = "gateways", alias = "gw")]
    Gateway,
    /// Each service's subsets as an Istio DestinationRule.
    #[value(name = "destinationrule", alias = "destinationrules", alias = "dr")]
    DestinationRule,
}

/// Output formats of `tcpshiftctl get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table.
    Table,
    /// YAML: Istio VirtualServices, or a `services:` document (both can be applied again).
    Yaml,
    /// JSON.
    Json,
}

/// Arguments of `tcpshiftctl get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// `services` (`svc`), `virtualservice` (`vs`), `tcproute`, `gateway` (`gw`) or
    /// `destinationrule` (`dr`).
    #[arg(value_enum)]
    pub kind: GetKind,
    /// Show only this one.
    pub name: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Format,
}

/// `tcpshiftctl get services|virtualservice [NAME] [-o FORMAT]`.
pub fn run(netns: &Netns, args: GetArgs) -> Result<()> {
    if args.kind == GetKind::Nodes {
        bail!("`get nodes` lists the nodes of a fleet store: add --store URL");
    }
    let state = State::open_read_only(netns)?;
    show(state.services()?, &args)
}

/// Shows `views` (the kernel's services, or the fleet's desired state) as `args` asks.
pub fn show(views: Vec<ServiceView>, args: &GetArgs) -> Result<()> {
    match args.kind {
        GetKind::Nodes => bail!("`get nodes` lists the nodes of a fleet store: add --store URL"),
        GetKind::Services => {
            let views: Vec<ServiceView> = match &args.name {
                Some(name) => match views.iter().find(|v| &v.config.name == name) {
                    Some(v) => vec![v.clone()],
                    None => bail!("no service named {name:?} ({})", names(&views)),
                },
                None => views,
            };
            match args.output {
                Format::Table => print!(
                    "{}{}",
                    report::services_table(&views),
                    report::fail_closed_view_notes(&views)
                ),
                Format::Yaml => print!(
                    "{}",
                    serde_yaml::to_string(&istio::services_document(&views))?
                ),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&istio::services_document(&views))?
                ),
            }
        }
        GetKind::TcpRoute => {
            let all = istio::tcp_routes(&views);
            let rows = all.iter().map(|r| {
                let backends: Vec<String> = r
                    .spec
                    .rules
                    .iter()
                    .flat_map(|rule| &rule.backend_refs)
                    .map(|b| format!("{}={}", b.name, b.weight.map_or(0, |w| w.0)))
                    .collect();
                (r.metadata.name.clone(), backends.join(" "))
            });
            let rows: Vec<(String, String)> = rows.collect();
            show_objects(&all, rows, "TCPRoute", "BACKENDS", args, |r| {
                &r.metadata.name
            })?;
        }
        GetKind::Gateway => {
            let mut docs: Vec<serde_json::Value> = Vec::new();
            let mut rows = Vec::new();
            for g in istio::istio_gateways(&views) {
                let ports: Vec<String> = g
                    .spec
                    .servers
                    .iter()
                    .map(|s| format!("{}/TCP", s.port.number.0))
                    .collect();
                rows.push((
                    g.metadata.name.clone(),
                    format!("istio {}", ports.join(",")),
                ));
                docs.push(serde_json::to_value(&g)?);
            }
            for g in istio::gateway_api_gateways(&views) {
                let ports: Vec<String> = g
                    .spec
                    .listeners
                    .iter()
                    .map(|l| format!("{}/TCP", l.port.0))
                    .collect();
                rows.push((
                    g.metadata.name.clone(),
                    format!("gateway-api {}", ports.join(",")),
                ));
                docs.push(serde_json::to_value(&g)?);
            }
            show_objects(&docs, rows, "Gateway", "FLAVOUR PORTS", args, |d| {
                d["metadata"]["name"].as_str().unwrap_or_default()
            })?;
        }
        GetKind::DestinationRule => {
            let all = istio::destination_rules(&views);
            let rows: Vec<(String, String)> = all
                .iter()
                .map(|d| {
                    let subsets: Vec<&str> =
                        d.spec.subsets.iter().map(|s| s.name.as_str()).collect();
                    (d.metadata.name.clone(), subsets.join(","))
                })
                .collect();
            show_objects(&all, rows, "DestinationRule", "SUBSETS", args, |d| {
                &d.metadata.name
            })?;
        }
        GetKind::VirtualService => {
            let all = istio::virtual_services(&views);
            let shown: Vec<istio::VirtualService> = match &args.name {
                Some(name) => match all.iter().find(|vs| &vs.metadata.name == name) {
                    Some(vs) => vec![vs.clone()],
                    None => {
                        let known: Vec<&str> =
                            all.iter().map(|vs| vs.metadata.name.as_str()).collect();
                        bail!(
                            "no VirtualService named {name:?} (VirtualServices: {})",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        )
                    }
                },
                None => all,
            };
            match args.output {
                Format::Table => print!("{}", report::virtual_services_table(&shown)),
                Format::Yaml => {
                    let docs = shown
                        .iter()
                        .map(serde_yaml::to_string)
                        .collect::<Result<Vec<_>, _>>()?;
                    print!("{}", docs.join("---\n"));
                }
                Format::Json => {
                    if args.name.is_some() && shown.len() == 1 {
                        println!("{}", serde_json::to_string_pretty(&shown[0])?);
                    } else {
                        println!("{}", serde_json::to_string_pretty(&shown)?);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Prints `all` (or the one called `args.name`) as a NAME/`column` table, YAML documents or
/// JSON.
fn show_objects<T: serde::Serialize>(
    all: &[T],
    rows: Vec<(String, String)>,
    kind: &str,
    column: &str,
    args: &GetArgs,
    name_of: impl Fn(&T) -> &str,
) -> Result<()> {
    let keep = |n: &str| args.name.as_deref().is_none_or(|want| want == n);
    let shown: Vec<&T> = all.iter().filter(|o| keep(name_of(o))).collect();
    if let Some(name) = &args.name
        && shown.is_empty()
    {
        let known: Vec<&str> = all.iter().map(&name_of).collect();
        bail!(
            "no {kind} named {name:?} ({kind}s: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    }
    match args.output {
        Format::Table => {
            println!("NAME\t{column}");
            for (n, rest) in rows.iter().filter(|(n, _)| keep(n)) {
                println!("{n}\t{rest}");
            }
        }
        Format::Yaml => {
            let docs = shown
                .iter()
                .map(serde_yaml::to_string)
                .collect::<Result<Vec<_>, _>>()?;
            print!("{}", docs.join("---\n"));
        }
        Format::Json => match shown.as_slice() {
            [one] if args.name.is_some() => println!("{}", serde_json::to_string_pretty(one)?),
            _ => println!("{}", serde_json::to_string_pretty(&shown)?),
        },
    }
    Ok(())
}

/// The services there are, for an error message.
fn names(views: &[ServiceView]) -> String {
    if views.is_empty() {
        return "there are none".to_owned();
    }
    let names: Vec<&str> = views.iter().map(|v| v.config.name.as_str()).collect();
    if names.len() > 20 {
        format!(
            "services: {}, … ({} in all)",
            names[..20].join(", "),
            names.len()
        )
    } else {
        format!("services: {}", names.join(", "))
    }
}
