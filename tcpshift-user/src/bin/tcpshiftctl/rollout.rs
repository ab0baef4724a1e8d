//! `tcpshiftctl rollout`: start a progressive rollout (short form), show it, and promote,
//! pause, resume or abort it by hand. tcpshiftd drives it between these commands.

use std::{fmt::Write, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tcpshift::{
    model::rollout::{RolloutSpec, format_duration, parse_duration},
    netns::Netns,
    rollout::{
        drive::{self, Command},
        fleet,
    },
    state::{RolloutRecord, State},
    store::Store,
};

/// Arguments of `tcpshiftctl rollout`.
#[derive(Args, Debug)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
}

#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// Start a rollout of SERVICE's canary subset: each weight of --steps held for one
    /// --interval and judged (failure rate at most 1 %), then the next; rolled back at once
    /// when a check fails.
    Start {
        /// The service.
        service: String,
        /// The subset being rolled out.
        #[arg(long)]
        canary: String,
        /// The subset that has the traffic now; default: the service's first other subset.
        #[arg(long)]
        stable: Option<String>,
        /// Canary weights in percent, in order, e.g. 5,20,50,100.
        #[arg(long, value_delimiter = ',', default_value = "5,20,50,100")]
        steps: Vec<u32>,
        /// How long each weight is held and judged (e.g. 30s, 1m).
        #[arg(long, default_value = "30s")]
        interval: String,
        /// Fewer canary connections than this in an interval make the check inconclusive.
        #[arg(long, default_value = "1")]
        min_connections: u64,
        /// Failed checks tolerated before the rollback.
        #[arg(long, default_value = "0")]
        failure_limit: u32,
    },
    /// Show the rollouts (or one): phase, step, weights, the last values of each metric and
    /// why the last decision was taken.
    Status {
        /// The rollout; default: all.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// End the current pause and go on (--full: skip every remaining step).
    Promote {
        /// The rollout; may be omitted when there is one.
        name: Option<String>,
        /// Skip every remaining step: the canary gets its final weight now.
        #[arg(long)]
        full: bool,
    },
    /// Hold the current weights until `resume`.
    Pause {
        /// The rollout; may be omitted when there is one.
        name: Option<String>,
    },
    /// Go on after a pause (the weights of the rollout are written again).
    Resume {
        /// The rollout; may be omitted when there is one.
        name: Option<String>,
    },
    /// Roll back: the canary's weight to 0 at once, phase Aborted (--forget: then remove
    /// the rollout's record, e.g. one that can no longer be read).
    Abort {
        /// The rollout; may be omitted when there is one.
        name: Option<String>,
        /// Remove the rollout's record after the abort (it leaves `status` and `history`).
        #[arg(long)]
        forget: bool,
    },
    /// The events of a rollout, oldest first.
    History {
        /// The rollout; may be omitted when there is one.
        name: Option<String>,
    },
}

/// The rollout `name`, or the only one of `all` (`place` names where they are kept).
fn pick_of(all: &[RolloutRecord], name: Option<String>, place: &str) -> Result<String> {
    if let Some(n) = name {
        return Ok(n);
    }
    match all {
        [one] => Ok(one.spec.name.clone()),
        [] => bail!("no rollout in {place}; start one with `tcpshiftctl rollout start`"),
        _ => bail!(
            "{} rollouts ({}); name one",
            all.len(),
            all.iter()
                .map(|r| r.spec.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The rollout `name`, or the only one.
fn pick(state: &State, name: Option<String>) -> Result<String> {
    pick_of(&state.rollouts()?, name, "this network namespace")
}

/// Whether the command changes a rollout (refused on a host following a fleet store).
fn changes(args: &RolloutArgs) -> bool {
    !matches!(
        args.command,
        RolloutCommand::Status { .. } | RolloutCommand::History { .. }
    )
}

/// The `stable` subset given, or the first of `subsets` that is not `canary`.
fn stable_of(
    stable: Option<String>,
    service: &str,
    canary: &str,
    subsets: Option<Vec<String>>,
) -> Result<String> {
    if let Some(s) = stable {
        return Ok(s);
    }
    subsets
        .with_context(|| format!("no service named {service:?}; apply it first"))?
        .into_iter()
        .find(|s| s != canary)
        .with_context(|| format!("service {service:?} has no subset besides {canary:?}"))
}

/// The short form's spec.
fn short_spec(
    service: &str,
    stable: &str,
    canary: &str,
    steps: &[u32],
    interval: &str,
    min_connections: u64,
    failure_limit: u32,
) -> Result<RolloutSpec> {
    let interval = parse_duration(interval)
        .map_err(anyhow::Error::msg)
        .context("--interval")?;
    let mut spec = RolloutSpec::short(service, stable, canary, steps, interval);
    spec.analysis.min_connections = min_connections;
    spec.analysis.failure_limit = failure_limit;
    Ok(spec)
}

/// `tcpshiftctl --store URL rollout ...`: the same commands on the fleet's rollouts, kept in
/// the store and driven by one node's tcpshiftd.
pub async fn run_store(store: &Store, args: RolloutArgs) -> Result<()> {
    let records = || async {
        Ok::<_, anyhow::Error>(
            store
                .rollouts()
                .await?
                .into_iter()
                .map(|r| r.record)
                .collect::<Vec<_>>(),
        )
    };
    let place = "the fleet store";
    let record = match args.command {
        RolloutCommand::Start {
            service,
            canary,
            stable,
            steps,
            interval,
            min_connections,
            failure_limit,
        } => {
            let subsets = store
                .load()
                .await?
                .state
                .get(&service)
                .map(|s| s.config.subsets.iter().map(|x| x.name.clone()).collect());
            let stable = stable_of(stable, &service, &canary, subsets)?;
            let spec = short_spec(
                &service,
                &stable,
                &canary,
                &steps,
                &interval,
                min_connections,
                failure_limit,
            )?;
            fleet::start(store, spec).await?
        }
        RolloutCommand::Status { name, json } => {
            let all: Vec<RolloutRecord> = records()
                .await?
                .into_iter()
                .filter(|r| name.as_ref().is_none_or(|n| &r.spec.name == n))
                .collect();
            return show(&all, name.as_deref(), json);
        }
        RolloutCommand::History { name } => {
            let all = records().await?;
            let name = pick_of(&all, name, place)?;
            let r = all
                .iter()
                .find(|r| r.spec.name == name)
                .with_context(|| format!("no rollout named {name:?}"))?;
            print!("{}", history(r));
            return Ok(());
        }
        RolloutCommand::Abort { name, forget: true } => {
            let name = pick_of(&records().await?, name, place)?;
            if !fleet::forget(store, &name).await? {
                bail!("no rollout named {name:?} in the fleet store");
            }
            println!("rollout/{name} aborted and forgotten");
            return Ok(());
        }
        RolloutCommand::Promote { name, full } => {
            let name = pick_of(&records().await?, name, place)?;
            fleet::command(store, &name, Command::Promote { full }).await?
        }
        RolloutCommand::Pause { name } => {
            let name = pick_of(&records().await?, name, place)?;
            fleet::command(store, &name, Command::Pause).await?
        }
        RolloutCommand::Resume { name } => {
            let name = pick_of(&records().await?, name, place)?;
            fleet::command(store, &name, Command::Resume).await?
        }
        RolloutCommand::Abort { name, .. } => {
            let name = pick_of(&records().await?, name, place)?;
            fleet::command(store, &name, Command::Abort).await?
        }
    };
    print!("{}", describe(&record));
    Ok(())
}

/// `rollout status` output of `all` (`name`: the one asked for).
fn show(all: &[RolloutRecord], name: Option<&str>, json: bool) -> Result<()> {
    if let Some(n) = name
        && all.is_empty()
    {
        bail!("no rollout named {n:?}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(all)?);
    } else if all.is_empty() {
        println!("(no rollouts)");
    } else {
        for r in all {
            print!("{}", describe(r));
        }
    }
    Ok(())
}

/// `rollout history` output.
fn history(r: &RolloutRecord) -> String {
    let mut out = String::new();
    for h in &r.history {
        let _ = writeln!(out, "{}  {:<13} {}", h.at, h.event.reason, h.event.message);
    }
    out
}

/// `tcpshiftctl rollout ...`.
pub fn run(netns: &Netns, args: RolloutArgs, local: bool) -> Result<()> {
    if changes(&args) {
        crate::fleet::guard(netns, local)?;
    }
    let mut state = State::open(netns)?;
    match args.command {
        RolloutCommand::Start {
            service,
            canary,
            stable,
            steps,
            interval,
            min_connections,
            failure_limit,
        } => {
            let subsets = state
                .services()?
                .into_iter()
                .find(|v| v.config.name == service)
                .map(|v| v.config.subsets.into_iter().map(|s| s.name).collect());
            let stable = stable_of(stable, &service, &canary, subsets)?;
            let spec = short_spec(
                &service,
                &stable,
                &canary,
                &steps,
                &interval,
                min_connections,
                failure_limit,
            )?;
            let record = drive::start(&mut state, spec)?;
            print!("{}", describe(&record));
        }
        RolloutCommand::Status { name, json } => {
            let all: Vec<RolloutRecord> = state
                .rollouts()?
                .into_iter()
                .filter(|r| name.as_ref().is_none_or(|n| &r.spec.name == n))
                .collect();
            show(&all, name.as_deref(), json)?;
        }
        RolloutCommand::Promote { name, full } => {
            let name = pick(&state, name)?;
            print!(
                "{}",
                describe(&drive::command(
                    &mut state,
                    &name,
                    Command::Promote { full }
                )?)
            );
        }
        RolloutCommand::Pause { name } => {
            let name = pick(&state, name)?;
            print!(
                "{}",
                describe(&drive::command(&mut state, &name, Command::Pause)?)
            );
        }
        RolloutCommand::Resume { name } => {
            let name = pick(&state, name)?;
            print!(
                "{}",
                describe(&drive::command(&mut state, &name, Command::Resume)?)
            );
        }
        RolloutCommand::Abort { name, forget: true } => {
            let name = pick(&state, name)?;
            if !drive::forget(&mut state, &name)? {
                bail!("no rollout named {name:?}");
            }
            println!("rollout/{name} aborted and forgotten");
        }
        RolloutCommand::Abort { name, .. } => {
            let name = pick(&state, name)?;
            print!(
                "{}",
                describe(&drive::command(&mut state, &name, Command::Abort)?)
            );
        }
        RolloutCommand::History { name } => {
            let name = pick(&state, name)?;
            let r = state
                .rollout(&name)?
                .with_context(|| format!("no rollout named {name:?}"))?;
            print!("{}", history(&r));
        }
    }
    Ok(())
}

/// The text of `rollout status` for one rollout.
fn describe(r: &RolloutRecord) -> String {
    let s = &r.spec;
    let st = &r.state;
    let mut out = String::new();
    let _ = writeln!(out, "rollout {}  service {}", s.name, s.service);
    let _ = writeln!(out, "  phase    {}", st.phase);
    let _ = writeln!(
        out,
        "  step     {}/{}{}",
        st.step.min(s.steps.len()),
        s.steps.len(),
        if st.pause_elapsed > Duration::ZERO {
            format!(" (paused {} so far)", format_duration(st.pause_elapsed))
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "  weights  {}={} {}={}",
        s.stable,
        100 - st.canary_weight.min(100),
        s.canary,
        st.canary_weight
    );
    let _ = writeln!(
        out,
        "  checks   every {}, failed {} (limit {}), inconclusive in a row {} (limit {})",
        format_duration(s.analysis.interval),
        st.failures,
        s.analysis.failure_limit,
        st.inconclusives,
        s.analysis.inconclusive_limit
    );
    for m in &st.last {
        let v = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
        let _ = writeln!(
            out,
            "  metric   {:<14} canary {:>8}  stable {:>8}  {}",
            m.metric.name(),
            v(m.canary),
            v(m.stable),
            if m.passed { "ok" } else { "FAILED" }
        );
    }
    let _ = writeln!(out, "  why      {}", st.message);
    if let Some(node) = &r.driver {
        let _ = writeln!(
            out,
            "  driver   {node} (the fleet node that wrote this last)"
        );
    }
    out
}
