//! `tcpshiftctl apply`, `get` and `delete`: Istio objects and `services:` documents in, the
//! kernel's routing out (see [`tcpshift::istio`]).

use std::{
    collections::{HashMap, HashSet},
    fmt,
    os::unix::fs::MetadataExt,
};

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use tcpshift::{
    discovery::{self, Registration},
    istio::{self, Manifest, Plan, RouteInfo},
    model::{Change, Desired, ServiceView},
    netns::Netns,
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

/// What `tcpshiftctl get` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GetKind {
    /// The services: listen address, subsets, weights, live sockets.
    #[value(name = "services", alias = "service", alias = "svc")]
    Services,
    /// The routing as Istio VirtualServices.
    #[value(name = "virtualservice", alias = "virtualservices", alias = "vs")]
    VirtualService,
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

/// Returned by the resolver of a dry run so that nothing is written.
#[derive(Debug)]
struct DryRun;

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dry run")
    }
}

impl std::error::Error for DryRun {}

fn change_word(c: &Change) -> &'static str {
    match c {
        Change::Created => "created",
        Change::Redefined => "configured",
        Change::Reweighted => "reweighted",
        Change::Unchanged => "unchanged",
    }
}

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

/// `tcpshiftctl apply -f FILE...`.
pub fn apply(netns: &Netns, args: ApplyArgs) -> Result<()> {
    let mut manifest = Manifest::default();
    for file in &args.files {
        manifest.extend(Manifest::from_file(file)?);
    }
    if manifest.is_empty() {
        return Err(manifest.empty_error().into());
    }
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
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    let by_name: HashMap<&str, &istio::PlannedService> = plan
        .services
        .iter()
        .map(|s| (s.config.name.as_str(), s))
        .collect();
    for (name, change) in &changes {
        let detail = by_name
            .get(name.as_str())
            .map(|s| {
                let subsets: Vec<String> = s
                    .config
                    .subsets
                    .iter()
                    .map(|x| format!("{}={} ({})", x.name, x.weight, x.addr))
                    .collect();
                format!(": listen {}, {}", s.config.listen, subsets.join(", "))
            })
            .unwrap_or_default();
        println!("service/{name} {}{suffix}{detail}", change_word(change));
    }
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
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let pid = e.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        comm.trim_end() == "tcpshiftd"
            && std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == netns_inode)
    })
}

/// `tcpshiftctl get services|virtualservice [NAME] [-o FORMAT]`.
pub fn get(netns: &Netns, args: GetArgs) -> Result<()> {
    let state = State::open(netns)?;
    let views = state.services()?;
    match args.kind {
        GetKind::Services => {
            let views: Vec<ServiceView> = match &args.name {
                Some(name) => match views.iter().find(|v| &v.config.name == name) {
                    Some(v) => vec![v.clone()],
                    None => bail!("no service named {name:?} ({})", names(&views)),
                },
                None => views,
            };
            match args.output {
                Format::Table => print!("{}", services_table(&views)),
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
                Format::Table => print!("{}", virtual_services_table(&shown)),
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

fn services_table(views: &[ServiceView]) -> String {
    let mut rows = vec![
        [
            "SERVICE",
            "LISTEN",
            "SUBSETS",
            "WEIGHTS",
            "LIVE",
            "VIRTUALSERVICE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in views {
        let subsets: Vec<String> = v
            .config
            .subsets
            .iter()
            .map(|s| format!("{}={}", s.name, s.addr))
            .collect();
        let weights: Vec<String> = v
            .config
            .subsets
            .iter()
            .map(|s| format!("{}={}", s.name, s.weight))
            .collect();
        let live = v.live.iter().filter(|l| **l).count();
        let vs = v
            .annotation
            .as_deref()
            .and_then(RouteInfo::from_annotation)
            .map_or_else(|| "-".to_owned(), |r| r.virtual_service);
        rows.push(vec![
            v.config.name.clone(),
            v.config.listen.to_string(),
            subsets.join(","),
            weights.join(","),
            format!("{live}/{}", v.live.len()),
            vs,
        ]);
    }
    let mut out = tcpshift::report::columns(&rows);
    if views.is_empty() {
        out.push_str("(no services)\n");
    }
    out
}

fn virtual_services_table(all: &[istio::VirtualService]) -> String {
    let mut rows = vec![
        ["NAME", "GATEWAYS", "HOSTS", "SERVICES"]
            .map(String::from)
            .to_vec(),
    ];
    for vs in all {
        let quoted = |l: &[String]| {
            let l: Vec<String> = l.iter().map(|h| format!("{h:?}")).collect();
            format!("[{}]", l.join(","))
        };
        let services: Vec<String> = vs
            .spec
            .tcp
            .iter()
            .filter_map(|r| r.route.first().map(|d| d.destination.host.clone()))
            .collect();
        rows.push(vec![
            vs.metadata.name.clone(),
            quoted(&vs.spec.gateways),
            quoted(&vs.spec.hosts),
            services.join(","),
        ]);
    }
    let mut out = tcpshift::report::columns(&rows);
    if all.is_empty() {
        out.push_str("(no VirtualServices)\n");
    }
    out
}

/// `tcpshiftctl delete -f FILE...` / `delete service NAME...` / `delete virtualservice
/// NAME...`: all or nothing.
pub fn delete(netns: &Netns, args: DeleteArgs) -> Result<()> {
    enum Target {
        Files(Manifest),
        Services(Vec<String>),
        VirtualServices(Vec<String>),
    }
    let target = if !args.files.is_empty() {
        let mut manifest = Manifest::default();
        for file in &args.files {
            manifest.extend(Manifest::from_file(file)?);
        }
        if manifest.is_empty() {
            return Err(manifest.empty_error().into());
        }
        Target::Files(manifest)
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
    let mut state = State::open(netns)?;
    let ignore = args.ignore_not_found;
    let mut missing: Vec<String> = Vec::new();
    let deleted = state.delete_with(|views: &[ServiceView]| -> Result<Vec<String>> {
        let exists: HashSet<&str> = views.iter().map(|v| v.config.name.as_str()).collect();
        let names: Vec<String> = match &target {
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
