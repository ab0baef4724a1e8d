//! `tcpshiftctl apply`: Istio objects and `services:` documents in, the kernel's routing
//! changed all or nothing (see [`tcpshift::istio`]); then the new subsets' sockets are
//! registered.

use std::{
    collections::{HashMap, HashSet},
    fmt,
};

use anyhow::Result;
use clap::Args;
use tcpshift::{
    discovery::{self, Registration},
    istio::{Manifest, Plan},
    model::{Change, Desired, ServiceView},
    netns::Netns,
    procfs, report,
    state::State,
};

/// Arguments of `tcpshiftctl apply`.
#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// YAML file (`-`: standard input): Istio VirtualService, DestinationRule and Gateway
    /// objects and/or a tcpshift `services:` document, several per file separated by `---`.
    /// Repeat -f to apply several files together.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<String>,
    /// Check everything against the kernel's state and say what would change, changing
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Returned by the resolver of a dry run so that nothing is written.
#[derive(Debug)]
struct DryRun;

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dry run")
    }
}

impl std::error::Error for DryRun {}

/// What applying `plan` would do to each service, without writing (for `--dry-run`).
fn predicted(plan: &Plan, views: &[ServiceView]) -> Vec<(String, Change)> {
    let by_name: HashMap<&str, &ServiceView> =
        views.iter().map(|v| (v.config.name.as_str(), v)).collect();
    plan.services
        .iter()
        .map(|s| {
            let change = match by_name.get(s.config.name.as_str()) {
                None => Change::Created,
                Some(v) => {
                    let same_definition = v.config.listen.same_key(&s.config.listen)
                        && v.config.subsets.len() == s.config.subsets.len()
                        && v.config
                            .subsets
                            .iter()
                            .zip(&s.config.subsets)
                            .all(|(a, b)| a.name == b.name && a.addr == b.addr);
                    if !same_definition {
                        Change::Redefined
                    } else if v.config.weights() != s.config.weights() {
                        Change::Reweighted
                    } else {
                        Change::Unchanged
                    }
                }
            };
            (s.config.name.clone(), change)
        })
        .collect()
}

/// The objects of every file (`-`: standard input) together; an error if there are none.
pub fn read_manifest(files: &[String]) -> Result<Manifest> {
    let mut manifest = Manifest::default();
    for file in files {
        manifest.extend(Manifest::from_file(file)?);
    }
    if manifest.is_empty() {
        return Err(manifest.empty_error().into());
    }
    Ok(manifest)
}

/// `tcpshiftctl apply -f FILE...`.
pub fn run(netns: &Netns, args: ApplyArgs) -> Result<()> {
    let manifest = read_manifest(&args.files)?;
    let mut state = State::open(netns)?;
    let mut planned: Option<Plan> = None;
    let mut dry: Vec<(String, Change)> = Vec::new();
    let result = state.apply_with(|views: &[ServiceView]| -> Result<Desired> {
        let plan = manifest.resolve(views)?;
        let desired = plan.desired();
        if args.dry_run {
            dry = predicted(&plan, views);
            planned = Some(plan);
            return Err(DryRun.into());
        }
        planned = Some(plan);
        Ok(desired)
    });
    let changes = match result {
        Ok(changes) => changes,
        Err(e) if e.downcast_ref::<DryRun>().is_some() => dry,
        Err(e) => return Err(e),
    };
    let plan = planned.unwrap_or_default();
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    for line in &plan.objects {
        println!("{line}");
    }
    let services: Vec<_> = plan.services.iter().map(|s| &s.config).collect();
    print!("{}", report::applied(&changes, &services, args.dry_run));
    if args.dry_run {
        return Ok(());
    }
    register_now(netns, &mut state, &changes)
}

/// Registers the sockets of the subsets just applied (so that they are served at once) and
/// warns about those that have none.
fn register_now(netns: &Netns, state: &mut State, changes: &[(String, Change)]) -> Result<()> {
    let touched: HashSet<String> = changes.iter().map(|(n, _)| n.clone()).collect();
    let outcomes = discovery::register_missing(state, Some(&touched))?;
    let loader = loader_running(netns.inode());
    let mut problems = Vec::new();
    for o in &outcomes {
        match o {
            Registration::Registered { .. } => {}
            Registration::NotListening(m) => problems.push(format!(
                "service/{} subset {} ({}): nothing listens there, so it has no registered \
                 socket{}",
                m.service,
                m.subset,
                m.backend,
                if loader {
                    "; tcpshiftd registers it as soon as its server listens (until then its \
                     connections go to the other subsets)"
                } else {
                    " and tcpshiftd is not running: start its server and tcpshiftd, or it \
                     will receive no connections"
                }
            )),
            Registration::Failed { missing: m, error } => problems.push(format!(
                "service/{} subset {} ({}): cannot take its server's socket: {error}{}",
                m.service,
                m.subset,
                m.backend,
                if loader {
                    "; tcpshiftd keeps trying"
                } else {
                    " (and tcpshiftd is not running)"
                }
            )),
        }
    }
    const SHOWN: usize = 20;
    for p in problems.iter().take(SHOWN) {
        eprintln!("warning: {p}");
    }
    if problems.len() > SHOWN {
        eprintln!(
            "warning: ... and {} more subsets without a registered socket",
            problems.len() - SHOWN
        );
    }
    if !loader {
        eprintln!(
            "note: tcpshiftd is not running in this network namespace: steering continues, but \
             a backend that restarts is only registered again once tcpshiftd runs"
        );
    }
    Ok(())
}

/// Whether a process named `tcpshiftd` runs in the network namespace with this inode.
fn loader_running(netns_inode: u64) -> bool {
    procfs::processes().is_ok_and(|all| {
        all.iter()
            .any(|p| p.comm() == "tcpshiftd" && p.netns().is_ok_and(|n| n.inode() == netns_inode))
    })
}
