//! `tcpshiftctl delete`: remove services, named or as a file applies them.

use std::collections::HashSet;

use anyhow::{Result, bail};
use clap::Args;
use tcpshift::{
    istio::{self, Manifest},
    model::ServiceView,
    netns::Netns,
    state::State,
};

use crate::apply::read_manifest;

/// Arguments of `tcpshiftctl delete`.
#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Delete the services these files apply: those of `services:` documents, of
    /// VirtualService routes and of DestinationRules (Gateways have nothing to delete).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub files: Vec<String>,
    /// `service NAME...` or `virtualservice NAME...` (the services it routes).
    #[arg(value_name = "KIND NAME", conflicts_with = "files")]
    pub what: Vec<String>,
    /// Do not fail when something to delete does not exist.
    #[arg(long)]
    pub ignore_not_found: bool,
}

/// What `delete` names.
pub enum Target {
    /// The services these files apply.
    Files(Manifest),
    /// Services by name.
    Services(Vec<String>),
    /// The services of these VirtualServices.
    VirtualServices(Vec<String>),
}

/// Reads the arguments (and files) into what to delete.
pub fn target(args: &DeleteArgs) -> Result<Target> {
    let target = if !args.files.is_empty() {
        Target::Files(read_manifest(&args.files)?)
    } else {
        let Some((kind, names)) = args.what.split_first() else {
            bail!(
                "nothing to delete; expected -f FILE, `service NAME...` or `virtualservice \
                 NAME...`"
            );
        };
        if names.is_empty() {
            bail!("`delete {kind}` needs at least one NAME");
        }
        match kind.as_str() {
            "service" | "services" | "svc" => Target::Services(names.to_vec()),
            "virtualservice" | "virtualservices" | "vs" => Target::VirtualServices(names.to_vec()),
            other => bail!(
                "cannot delete {other:?}; expected `service NAME...`, `virtualservice \
                 NAME...` or -f FILE"
            ),
        }
    };
    Ok(target)
}

/// The services to delete among `views`, all or nothing: fails naming what does not exist
/// unless `ignore`, with what was not found pushed to `missing`.
pub fn names(
    target: &Target,
    views: &[ServiceView],
    ignore: bool,
    missing: &mut Vec<String>,
) -> Result<Vec<String>> {
    let exists: HashSet<&str> = views.iter().map(|v| v.config.name.as_str()).collect();
    let names: Vec<String> = match target {
        Target::Files(m) => m.services_to_delete(views),
        Target::Services(names) => names.clone(),
        Target::VirtualServices(vs) => {
            let mut names = Vec::new();
            for name in vs {
                let of = istio::services_of_virtual_service(views, name);
                if of.is_empty() {
                    missing.push(format!("virtualservice/{name}"));
                }
                names.extend(of);
            }
            names
        }
    };
    for n in &names {
        if !exists.contains(n.as_str()) {
            missing.push(format!("service/{n}"));
        }
    }
    if !missing.is_empty() && !ignore {
        bail!(
            "not found: {}; nothing was deleted (use --ignore-not-found to delete the \
             others)",
            missing.join(", ")
        );
    }
    Ok(names)
}

/// `tcpshiftctl delete -f FILE...` / `delete service NAME...` / `delete virtualservice
/// NAME...`: all or nothing.
pub fn run(netns: &Netns, args: DeleteArgs) -> Result<()> {
    let target = target(&args)?;
    let mut state = State::open(netns)?;
    let ignore = args.ignore_not_found;
    let mut missing: Vec<String> = Vec::new();
    let deleted = state.delete_with(|views: &[ServiceView]| -> Result<Vec<String>> {
        names(&target, views, ignore, &mut missing)
    });
    let deleted = deleted?;
    for name in &deleted {
        println!("service/{name} deleted");
    }
    for m in &missing {
        println!("{m} not found (ignored)");
    }
    Ok(())
}
