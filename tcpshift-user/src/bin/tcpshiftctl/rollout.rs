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

/// The arguments of `rollout start` (the short form).
struct StartArgs {
    service: String,
    canary: String,
    stable: Option<String>,
    steps: Vec<u32>,
    interval: String,
    min_connections: u64,
    failure_limit: u32,
}

impl StartArgs {
    /// The short form's spec, `subsets` being the service's subsets (`None`: no such
    /// service).
    fn spec(self, subsets: Option<Vec<String>>) -> Result<RolloutSpec> {
        let stable = stable_of(self.stable, &self.service, &self.canary, subsets)?;
        let interval = parse_duration(&self.interval)
            .map_err(anyhow::Error::msg)
            .context("--interval")?;
        let mut spec =
            RolloutSpec::short(&self.service, &stable, &self.canary, &self.steps, interval);
        spec.analysis.min_connections = self.min_connections;
        spec.analysis.failure_limit = self.failure_limit;
        Ok(spec)
    }
}

/// What a `rollout` command asks for, the same on this namespace's rollouts and on the fleet
/// store's: [`run`] and [`run_store`] each carry it out on their own.
enum Action {
    /// Start a rollout.
    Start(StartArgs),
    /// Show the rollouts (or one).
    Status { name: Option<String>, json: bool },
    /// Print a rollout's events.
    History { name: Option<String> },
    /// Abort a rollout and remove its record.
    Forget { name: Option<String> },
    /// A manual command on a rollout.
    Command {
        name: Option<String>,
        command: Command,
    },
}

impl From<RolloutCommand> for Action {
    fn from(c: RolloutCommand) -> Self {
        let command = |name, command| Action::Command { name, command };
        match c {
            RolloutCommand::Start {
                service,
                canary,
                stable,
                steps,
                interval,
                min_connections,
                failure_limit,
            } => Action::Start(StartArgs {
                service,
                canary,
                stable,
                steps,
                interval,
                min_connections,
                failure_limit,
            }),
            RolloutCommand::Status { name, json } => Action::Status { name, json },
            RolloutCommand::History { name } => Action::History { name },
            RolloutCommand::Abort { name, forget: true } => Action::Forget { name },
            RolloutCommand::Promote { name, full } => command(name, Command::Promote { full }),
            RolloutCommand::Pause { name } => command(name, Command::Pause),
            RolloutCommand::Resume { name } => command(name, Command::Resume),
            RolloutCommand::Abort { name, .. } => command(name, Command::Abort),
        }
    }
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
    let record = match Action::from(args.command) {
        Action::Start(start) => {
            let subsets = store
                .load()
                .await?
                .state
                .get(&start.service)
                .map(|s| s.config.subsets.iter().map(|x| x.name.clone()).collect());
            fleet::start(store, start.spec(subsets)?).await?
        }
        Action::Status { name, json } => {
            let all: Vec<RolloutRecord> = records()
                .await?
                .into_iter()
                .filter(|r| name.as_ref().is_none_or(|n| &r.spec.name == n))
                .collect();
            return show(&all, name.as_deref(), json);
        }
        Action::History { name } => {
            let all = records().await?;
            let name = pick_of(&all, name, place)?;
            let r = all
                .iter()
                .find(|r| r.spec.name == name)
                .with_context(|| format!("no rollout named {name:?}"))?;
            print!("{}", history(r));
            return Ok(());
        }
        Action::Forget { name } => {
            let name = pick_of(&records().await?, name, place)?;
            if !fleet::forget(store, &name).await? {
                bail!("no rollout named {name:?} in the fleet store");
            }
            println!("rollout/{name} aborted and forgotten");
            return Ok(());
        }
        Action::Command { name, command } => {
            let name = pick_of(&records().await?, name, place)?;
            fleet::command(store, &name, command).await?
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
    let record = match Action::from(args.command) {
        Action::Start(start) => {
            let subsets = state
                .services()?
                .into_iter()
                .find(|v| v.config.name == start.service)
                .map(|v| v.config.subsets.into_iter().map(|s| s.name).collect());
            drive::start(&mut state, start.spec(subsets)?)?
        }
        Action::Status { name, json } => {
            let all: Vec<RolloutRecord> = state
                .rollouts()?
                .into_iter()
                .filter(|r| name.as_ref().is_none_or(|n| &r.spec.name == n))
                .collect();
            return show(&all, name.as_deref(), json);
        }
        Action::History { name } => {
            let name = pick(&state, name)?;
            let r = state
                .rollout(&name)?
                .with_context(|| format!("no rollout named {name:?}"))?;
            print!("{}", history(&r));
            return Ok(());
        }
        Action::Forget { name } => {
            let name = pick(&state, name)?;
            if !drive::forget(&mut state, &name)? {
                bail!("no rollout named {name:?}");
            }
            println!("rollout/{name} aborted and forgotten");
            return Ok(());
        }
        Action::Command { name, command } => {
            let name = pick(&state, name)?;
            drive::command(&mut state, &name, command)?
        }
    };
    print!("{}", describe(&record));
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
