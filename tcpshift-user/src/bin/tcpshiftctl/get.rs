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
    /// `services` (`svc`) or `virtualservice` (`vs`).
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
    let state = State::open(netns)?;
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
                Format::Table => print!("{}", report::services_table(&views)),
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
