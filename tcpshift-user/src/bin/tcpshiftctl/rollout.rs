//! `tcpshiftctl rollout`: start a progressive rollout (short form), show it, and promote,
//! pause, resume or abort it by hand. tcpshiftd drives it between these commands.

use std::{fmt::Write, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tcpshift::{
    model::rollout::{RolloutSpec, format_duration, parse_duration},
    netns::Netns,
    rollout::drive::{self, Command},
    state::{RolloutRecord, State},
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
    /// Roll back: the canary's weight to 0 at once, phase Aborted.
    Abort {
        /// The rollout; may be omitted when there is one.
        name: Option<String>,
    },
    /// The events of a rollout, oldest first.
    History {
        /// The rollout; may be omitted when there is one.
        name: Option<String>,
    },
}

/// The rollout `name`, or the only one.
fn pick(state: &State, name: Option<String>) -> Result<String> {
    if let Some(n) = name {
        return Ok(n);
    }
    let all = state.rollouts()?;
    match all.as_slice() {
        [one] => Ok(one.spec.name.clone()),
        [] => bail!(
            "no rollout in this network namespace; start one with `tcpshiftctl rollout start`"
        ),
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

/// `tcpshiftctl rollout ...`.
pub fn run(netns: &Netns, args: RolloutArgs) -> Result<()> {
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
            let interval = parse_duration(&interval)
                .map_err(anyhow::Error::msg)
                .context("--interval")?;
            let stable = match stable {
                Some(s) => s,
                None => {
                    let views = state.services()?;
                    let view = views
                        .iter()
                        .find(|v| v.config.name == service)
                        .with_context(|| format!("no service named {service:?}; apply it first"))?;
                    view.config
                        .subsets
                        .iter()
                        .map(|s| s.name.clone())
                        .find(|s| *s != canary)
                        .with_context(|| {
                            format!("service {service:?} has no subset besides {canary:?}")
                        })?
                }
            };
            let mut spec = RolloutSpec::short(&service, &stable, &canary, &steps, interval);
            spec.analysis.min_connections = min_connections;
            spec.analysis.failure_limit = failure_limit;
            let record = drive::start(&mut state, spec)?;
            print!("{}", describe(&record));
        }
        RolloutCommand::Status { name, json } => {
            let all: Vec<RolloutRecord> = state
                .rollouts()?
                .into_iter()
                .filter(|r| name.as_ref().is_none_or(|n| &r.spec.name == n))
                .collect();
            if let Some(n) = &name
                && all.is_empty()
            {
                bail!("no rollout named {n:?}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("(no rollouts)");
            } else {
                for r in &all {
                    print!("{}", describe(r));
                }
            }
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
        RolloutCommand::Abort { name } => {
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
            for h in &r.history {
                println!("{}  {:<13} {}", h.at, h.event.reason, h.event.message);
            }
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
    out
}
