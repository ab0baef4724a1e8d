//! `tcpshiftctl apply`: Istio objects and `services:` documents in, the kernel's routing
//! changed all or nothing (see [`tcpshift::istio`]); then the new subsets' sockets are
//! registered.

use std::collections::HashSet;

use anyhow::Result;
use clap::Args;
use tcpshift::{
    discovery::{self, Registration},
    istio::{Manifest, Plan},
    model::{Change, Desired, ServiceView, rollout::RolloutSpec},
    netns::Netns,
    procfs, report,
    state::State,
    yaml,
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

/// The objects of every file (`-`: standard input) together; an error if there are none.
pub fn read_manifest(files: &[String]) -> Result<Manifest> {
    let (manifest, _) = read_manifest_and_rollouts(files)?;
    if manifest.is_empty() {
        return Err(manifest.empty_error().into());
    }
    Ok(manifest)
}

/// The objects and the `Rollout` documents of every file (`-`: standard input) together; an
/// error if there are none at all.
pub fn read_manifest_and_rollouts(files: &[String]) -> Result<(Manifest, Vec<RolloutSpec>)> {
    let mut manifest = Manifest::default();
    let mut rollouts = Vec::new();
    for file in files {
        let (text, name) = yaml::read_text(file)?;
        rollouts.extend(tcpshift::rollout::parse_rollouts(&text, &name)?);
        manifest.extend(Manifest::parse(
            &tcpshift::rollout::without_rollouts(&text),
            &name,
        )?);
    }
    if manifest.is_empty() && rollouts.is_empty() {
        return Err(manifest.empty_error().into());
    }
    Ok((manifest, rollouts))
}

/// `tcpshiftctl apply -f FILE...`.
pub fn run(netns: &Netns, args: ApplyArgs) -> Result<()> {
    let (manifest, rollouts) = read_manifest_and_rollouts(&args.files)?;
    let mut state = State::open(netns)?;
    if manifest.is_empty() {
        return start_rollouts(&mut state, rollouts, args.dry_run);
    }
    let mut planned: Option<Plan> = None;
    // The dry run is the plan the real apply would commit, computed by the library under the
    // same lock, with nothing written.
    let resolve = |views: &[ServiceView]| -> Result<Desired> {
        let plan = manifest.resolve(views)?;
        let desired = plan.desired();
        planned = Some(plan);
        Ok(desired)
    };
    let changes = if args.dry_run {
        state.plan_with(resolve)?
    } else {
        state.apply_with(resolve)?
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
    if !args.dry_run {
        state.set_traffic_policies(&plan.policies)?;
        register_now(netns, &mut state, &changes)?;
    }
    start_rollouts(&mut state, rollouts, args.dry_run)
}

/// Starts the rollouts of an apply (after its services were applied).
fn start_rollouts(state: &mut State, rollouts: Vec<RolloutSpec>, dry_run: bool) -> Result<()> {
    for spec in rollouts {
        if dry_run {
            println!("rollout/{} would start (dry run)", spec.name);
            continue;
        }
        let name = spec.name.clone();
        let record = tcpshift::rollout::drive::start(state, spec)?;
        println!(
            "rollout/{name} started: {}={} {}={} ({})",
            record.spec.stable,
            100 - record.state.canary_weight,
            record.spec.canary,
            record.state.canary_weight,
            record.state.phase
        );
    }
    Ok(())
}

/// Starts the rollouts of an apply with `--store` in the fleet store (after its services).
pub async fn start_fleet_rollouts(
    store: &tcpshift::store::Store,
    rollouts: Vec<RolloutSpec>,
    dry_run: bool,
) -> Result<()> {
    for spec in rollouts {
        if dry_run {
            println!("rollout/{} would start (dry run)", spec.name);
            continue;
        }
        let name = spec.name.clone();
        let record = tcpshift::rollout::fleet::start(store, spec).await?;
        println!(
            "rollout/{name} started in the fleet store: {}={} {}={} ({})",
            record.spec.stable,
            100 - record.state.canary_weight,
            record.spec.canary,
            record.state.canary_weight,
            record.state.phase
        );
    }
    Ok(())
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
            Registration::Refused {
                missing: m,
                owner,
                uid,
                trusted_uid,
                ..
            } => problems.push(format!(
                "service/{} subset {} ({}): the socket there belongs to uid {uid} ({owner}), \
                 neither root nor the uid {trusted_uid} trusted for this subset, so it was not \
                 registered; if it is legitimate run `tcpshiftctl accept-owner {} {}`",
                m.service, m.subset, m.backend, m.service, m.subset
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
