//! `tcpshiftctl --store URL ...`: the same commands on the fleet's desired state in etcd
//! (one transaction each, compare-and-swap on the revision, retried when another writer
//! committed first), with the same parsing, validation and messages as on the local
//! kernel. `status` and `get nodes` show every node's report.
//!
//! Without `--store`, on a host whose tcpshiftd follows a store, a local change is refused
//! ([`guard`]) unless `--local` is given: it would silently diverge from the fleet until the
//! store's next change overwrote it.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use tcpshift::{
    model::Change,
    netns::Netns,
    report,
    store::{DesiredState, Following, NodeView, Store, StoreError, StoreOptions},
    weights,
};

use crate::{
    Command,
    apply::{ApplyArgs, read_manifest_and_rollouts},
    delete::{self, DeleteArgs},
    get::{self, GetArgs, GetKind},
};

/// Runs `command` against the store.
pub fn run(options: StoreOptions, command: Command) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let store = Store::connect(&options).await?;
        match command {
            Command::Apply(a) => apply(&store, a).await,
            Command::SetWeight { service, weights } => {
                set_weight(&store, service.as_deref(), &weights).await
            }
            Command::Delete(a) => delete(&store, a).await,
            Command::Get(a) => get(&store, a).await,
            Command::Status { json } => status(&store, json).await,
            Command::Rollout(a) => crate::rollout::run_store(&store, a).await,
            Command::Top { .. }
            | Command::Metrics
            | Command::Uninstall
            | Command::AcceptOwner { .. } => bail!(
                "this command acts on one host's kernel, not on the fleet store: run it \
                 without --store on that host"
            ),
        }
    })
}

/// What happened to each service of `next` compared with `base` (as a local apply says it).
fn changes(base: &DesiredState, next: &DesiredState, names: &[String]) -> Vec<(String, Change)> {
    names
        .iter()
        .filter_map(|name| {
            let new = &next.get(name)?.config;
            let old = base.get(name).map(|s| &s.config);
            Some((name.clone(), Change::classify(old, new)))
        })
        .collect()
}

async fn apply(store: &Store, args: ApplyArgs) -> Result<()> {
    let (manifest, rollouts) = read_manifest_and_rollouts(&args.files)?;
    if manifest.is_empty() {
        return crate::apply::start_fleet_rollouts(store, rollouts, args.dry_run).await;
    }
    if args.dry_run {
        let base = store.load().await?;
        let plan = manifest.resolve(&base.state.views())?;
        let next = base.state.applied(&plan.desired())?;
        next.validate()?;
        let names: Vec<String> = plan
            .services
            .iter()
            .map(|s| s.config.name.clone())
            .collect();
        for w in &plan.warnings {
            eprintln!("warning: {w}");
        }
        for line in &plan.objects {
            println!("{line}");
        }
        let services: Vec<_> = plan.services.iter().map(|s| &s.config).collect();
        print!(
            "{}",
            report::applied(&changes(&base.state, &next, &names), &services, true)
        );
        return crate::apply::start_fleet_rollouts(store, rollouts, true).await;
    }
    let (committed, (plan, changed)) = store
        .update(|state| -> Result<_> {
            let plan = manifest.resolve(&state.views())?;
            let next = state.applied(&plan.desired())?;
            let names: Vec<String> = plan
                .services
                .iter()
                .map(|s| s.config.name.clone())
                .collect();
            let changed = changes(state, &next, &names);
            Ok((next, (plan, changed)))
        })
        .await?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    for line in &plan.objects {
        println!("{line}");
    }
    let services: Vec<_> = plan.services.iter().map(|s| &s.config).collect();
    print!("{}", report::applied(&changed, &services, false));
    println!("store revision {}", committed.revision);
    crate::apply::start_fleet_rollouts(store, rollouts, false).await
}

async fn set_weight(store: &Store, service: Option<&str>, assignments: &[String]) -> Result<()> {
    let requested = assignments
        .iter()
        .map(|w| weights::parse_assignment(w))
        .collect::<Result<Vec<_>, _>>()?;
    let (committed, (name, new)) = store
        .update(|state| -> Result<_, StoreError> {
            let r = state.with_weights(service, &requested)?;
            Ok((r.state, (r.service, r.weights)))
        })
        .await?;
    let shown: Vec<String> = new.iter().map(|(s, w)| format!("{s}={w}")).collect();
    println!(
        "{name}: {} (store revision {})",
        shown.join(" "),
        committed.revision
    );
    Ok(())
}

async fn delete(store: &Store, args: DeleteArgs) -> Result<()> {
    let target = delete::target(&args)?;
    let ignore = args.ignore_not_found;
    let (_, (deleted, missing)) = store
        .update(|state| -> Result<_> {
            let mut missing = Vec::new();
            let names = delete::names(&target, &state.views(), ignore, &mut missing)?;
            let (next, removed) = state.without(&names);
            Ok((next, (removed, missing)))
        })
        .await?;
    for name in &deleted {
        println!("service/{name} deleted");
    }
    for m in &missing {
        println!("{m} not found (ignored)");
    }
    Ok(())
}

async fn get(store: &Store, args: GetArgs) -> Result<()> {
    if args.kind == GetKind::Nodes {
        let nodes = store.node_reports().await?;
        match args.output {
            get::Format::Json | get::Format::Yaml => {
                println!("{}", serde_json::to_string_pretty(&nodes)?)
            }
            get::Format::Table => print!("{}", nodes_table(&nodes)),
        }
        return Ok(());
    }
    let snapshot = store.load().await?;
    get::show(snapshot.state.views(), &args)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `NODE  STORE  APPLIED  SYNC  LAST CONTACT`.
fn nodes_table(nodes: &[NodeView]) -> String {
    let mut out = format!(
        "{:<24} {:<12} {:>9} {:<14} {}\n",
        "NODE", "STORE", "APPLIED", "SYNC", "LAST CONTACT"
    );
    let now = now_ms();
    for n in nodes {
        let r = &n.report;
        let sync = if n.in_sync {
            "in sync".to_string()
        } else {
            format!("behind {}", n.behind)
        };
        let contact = r.last_contact_ms.map_or_else(
            || "never".to_string(),
            |ms| format!("{:.1}s ago", now.saturating_sub(ms) as f64 / 1000.0),
        );
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>9} {:<14} {}{}",
            r.node,
            if r.connected {
                "connected"
            } else {
                "unreachable"
            },
            r.applied_revision,
            sync,
            contact,
            r.apply_error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
    if nodes.is_empty() {
        out.push_str(
            "(no node reports: no tcpshiftd follows this store, or their leases expired)\n",
        );
    }
    out
}

async fn status(store: &Store, json: bool) -> Result<()> {
    let snapshot = store.load().await?;
    let nodes = store.node_reports().await?;
    if json {
        let doc = serde_json::json!({
            "store": store.endpoints(),
            "revision": snapshot.revision,
            "generation": snapshot.generation,
            "seed": snapshot.seed,
            "services": snapshot.state.views().iter().map(|v| serde_json::json!({
                "name": v.config.name,
                "weights": v.config.subsets.iter().map(|s| (s.name.clone(), s.weight)).collect::<std::collections::BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
            "nodes": nodes,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "store {}: desired revision {} (generation {}), {} services",
        store.endpoints(),
        snapshot.revision,
        snapshot.generation,
        snapshot.state.len()
    );
    for s in snapshot.state.services() {
        let w: Vec<String> = s
            .config
            .subsets
            .iter()
            .map(|x| format!("{}={}", x.name, x.weight))
            .collect();
        println!("  {}: {}", s.config.name, w.join(" "));
    }
    println!();
    print!("{}", nodes_table(&nodes));
    for n in &nodes {
        println!("\nnode {}:", n.report.node);
        for svc in &n.report.services {
            let parts: Vec<String> = svc
                .subsets
                .iter()
                .map(|x| {
                    format!(
                        "{}={}{}{}",
                        x.name,
                        x.weight,
                        if x.live { "" } else { " (no live socket)" },
                        x.observed_share
                            .map(|o| format!(" observed {:.0}%", o * 100.0))
                            .unwrap_or_default()
                    )
                })
                .collect();
            println!("  {} ({}): {}", svc.name, svc.listen, parts.join(", "));
        }
    }
    Ok(())
}

/// Refuses a local change on a host whose tcpshiftd follows a store (see the module
/// documentation), unless `local`.
pub fn guard(netns: &Netns, local: bool) -> Result<()> {
    if local {
        return Ok(());
    }
    if let Some(f) = Following::read(netns.inode()) {
        bail!(
            "this host's tcpshiftd (pid {}, node {}) follows the fleet store {}: a local change \
             would silently diverge from the fleet (and be overwritten by its next change). \
             Change the fleet with `tcpshiftctl --store {} ...`, or give --local to change \
             only this host anyway",
            f.pid,
            f.node,
            f.store,
            f.store
        );
    }
    Ok(())
}

/// Shows the local follower's state (for `status` without --store).
pub fn local_note(netns: &Netns) -> Option<String> {
    let f = Following::read(netns.inode())?;
    let s = &f.status;
    let connected = s["connected"].as_bool().unwrap_or(false);
    let applied = s["applied_revision"].as_i64().unwrap_or(0);
    let newest = s["store_revision"].as_i64().unwrap_or(0);
    let contact = s["last_contact"]["secs_since_epoch"].as_u64().map(|secs| {
        let now = now_ms() / 1000;
        Duration::from_secs(now.saturating_sub(secs))
    });
    let error = s["last_error"].as_str();
    let link = match (connected, error) {
        (true, _) => "connected".to_string(),
        // Not yet answered, no failure either: the first attempt is under way.
        (false, None) => "connecting".to_string(),
        (false, Some(e)) => format!("UNREACHABLE: keeping the last applied state; {e}"),
    };
    Some(format!(
        "fleet: node {} follows {} ({link}), applied revision {applied}{}{}",
        f.node,
        f.store,
        if applied == newest {
            String::new()
        } else {
            format!(" of {newest}")
        },
        contact
            .map(|d| format!(", last contact {}s ago", d.as_secs()))
            .unwrap_or_default()
    ))
}
