//! Planning a change, without the kernel: [`plan`] checks what a change wants against what
//! the maps hold and lists the steps that [`super::commit`] writes; [`Plan::undo`] lists what
//! must be put back when the writing stops part-way.
//!
//! Everything here is pure (services in, steps out), so the rules are unit-tested without
//! root: validation, which ids new services get, what each service's [`Change`] is, which
//! sockets and slots a redefinition gives up, and the roll-back after a failure at any step.
//!
//! Two listen addresses with the same kernel key (`127.0.0.1:31400` and
//! `[::ffff:127.0.0.1]:31400`) are the same definition: such a service is
//! [`Change::Unchanged`] (or [`Change::Reweighted`]) and keeps the listen address as it was
//! first written, so that the dry run, the real apply and `status` agree.

use std::collections::{HashMap, HashSet};

use tcpshift_common::{MAX_SERVICES, MAX_SUBSETS};

use crate::{
    model::{
        Annotation, Change, Desired, Listen, ListenClaims, Protocol, ServiceConfig, ServiceView,
        Weights, same_definition, validate_service_name, validate_subset_name,
    },
    weights::{self, WeightError},
};

use super::{MAX_ANNOTATION, StateError};

/// What a change writes, service by service, in the order of [`Desired::services`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// One step per service named by the change.
    pub steps: Vec<Step>,
    /// Services left alone whose annotation is removed: (id, the annotation before).
    pub clear_annotations: Vec<(u32, String)>,
    /// Services deleted (after every step is committed; a deletion is not rolled back).
    pub deletions: Vec<Deletion>,
}

/// A service to delete (see [`plan_delete`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Deletion {
    /// Its id.
    pub id: u32,
    /// Its name.
    pub name: String,
    /// Its listen address (its `TS_SERVICES` entry goes first, if it still holds it).
    pub listen: Listen,
    /// Its protocol (which key its entry is stored under).
    pub protocol: Protocol,
    /// Its number of subsets.
    pub n_subsets: u32,
}

/// Plans deleting the services called `names` (names that do not exist, and repeats, are
/// skipped).
pub(crate) fn plan_delete(existing: &[ServiceView], names: &[String]) -> Plan {
    let mut seen = HashSet::new();
    let deletions = names
        .iter()
        .filter_map(|name| existing.iter().find(|v| &v.config.name == name))
        .filter(|v| seen.insert(v.id))
        .map(|v| Deletion {
            id: v.id,
            name: v.config.name.clone(),
            listen: v.config.listen,
            protocol: v.config.protocol,
            n_subsets: v.config.subsets.len() as u32,
        })
        .collect();
    Plan {
        steps: Vec::new(),
        clear_annotations: Vec::new(),
        deletions,
    }
}

/// What happens to one service's annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AnnotationWrite {
    /// Nothing to write.
    Keep,
    /// Store this text.
    Write(String),
    /// Remove it.
    Remove,
}

/// One service's part of a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// The service's id: its own, or the lowest free one for a new service.
    pub id: u32,
    /// What the service becomes (its listen address as stored when only its form changed).
    pub config: ServiceConfig,
    /// The service before the change, `None` for a new one.
    pub old: Option<ServiceView>,
    /// What happens to its annotation.
    pub annotation: AnnotationWrite,
    /// What the change does to it.
    pub change: Change,
    /// Subsets (by index in the old definition) whose socket is unregistered: their backend
    /// changed or they are gone.
    pub unregister: Vec<u32>,
    /// The old listen address, when no service holds its key once the change is done (its
    /// `TS_SERVICES` entry goes after the commit).
    pub release: Option<Listen>,
}

impl Step {
    /// Number of subsets after the change.
    pub fn n_subsets(&self) -> u32 {
        self.config.subsets.len() as u32
    }

    /// Number of subsets before the change (0 for a new service).
    pub fn old_n_subsets(&self) -> u32 {
        self.old
            .as_ref()
            .map_or(0, |o| o.config.subsets.len() as u32)
    }

    /// Whether the kernel is written for this service at all (annotations aside).
    pub fn writes(&self) -> bool {
        self.change != Change::Unchanged
    }

    /// Whether the `TS_SERVICES` entry moves to another listen key.
    fn moves_key(&self) -> bool {
        self.old.as_ref().is_some_and(|o| {
            !o.config.listen.same_key(&self.config.listen)
                || o.config.protocol.tcp() != self.config.protocol.tcp()
        })
    }
}

/// How far the writing of a plan got (see [`super::commit`]); the step named failed, possibly
/// after some of its writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Preparing step `n` (definition, counters, sockets, annotation): nothing
    /// is steered differently yet. `n == steps.len()` means removing the cleared annotations.
    Prepare(usize),
    /// Committing step `n` (its `TS_SERVICES` entry): the steps before it are committed.
    Commit(usize),
    /// Releasing step `n`'s old listen key and slots: every step is committed.
    Release(usize),
}

/// What to put back after a failure (see [`Plan::undo`]), in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Undo {
    /// Write the service's `TS_SERVICES` entry as it was (old key, weights and ranges).
    RestoreEntry { id: u32 },
    /// Remove the entry written under a listen key that no service had before.
    RemoveEntry(Listen),
    /// Remove the UDP-keyed entry (of a `udp` service) written under a listen key that no
    /// service had before.
    RemoveUdpEntry(Listen),
    /// Write the service's definition as it was.
    RestoreDefinition { id: u32 },
    /// Remove a service created by the change: slots, annotation, definition.
    RemoveService { id: u32, n_subsets: u32 },
    /// Put an annotation back (`None`: remove it).
    RestoreAnnotation { id: u32, text: Option<String> },
}

/// Checks `desired` against the services the kernel holds (`existing`, as
/// [`super::State::services`] reads them) and plans the change. With
/// [`Weights::KeepExisting`], a service whose definition is the same keeps its weights.
///
/// Nothing is accepted unless everything is valid: names unique and well-formed, 1 to
/// [`MAX_SUBSETS`] subsets, valid weights, annotations that fit, no two services on one listen
/// address (the services left alone included), room for the new services.
pub(crate) fn plan(
    existing: &[ServiceView],
    desired: &Desired,
    policy: Weights,
) -> Result<Plan, StateError> {
    let by_name: HashMap<&str, &ServiceView> = existing
        .iter()
        .map(|v| (v.config.name.as_str(), v))
        .collect();
    let invalid = |name: &str, reason: String| StateError::InvalidService {
        name: name.to_owned(),
        reason,
    };
    let mut names = HashSet::new();
    let mut claims = ListenClaims::new();
    for d in &desired.services {
        let svc = &d.config;
        if !names.insert(svc.name.as_str()) {
            return Err(invalid(&svc.name, "named twice in one change".into()));
        }
        let annotation = match &d.annotation {
            Annotation::Set(a) => Some(a.as_str()),
            Annotation::Keep | Annotation::Clear => None,
        };
        check_service(svc, annotation)?;
        claims
            .claim_protocol(&svc.listen, svc.protocol, &svc.name)
            .map_err(|taken| StateError::ListenConflict {
                name: svc.name.clone(),
                listen: svc.listen.to_string(),
                other: taken.owner,
            })?;
    }
    let untouched: Vec<&ServiceView> = existing
        .iter()
        .filter(|v| !names.contains(v.config.name.as_str()))
        .collect();
    for v in &untouched {
        if let Some(owner) = claims.owner_protocol(&v.config.listen, v.config.protocol) {
            return Err(StateError::ListenConflict {
                name: owner.to_owned(),
                listen: v.config.listen.to_string(),
                other: v.config.name.clone(),
            });
        }
    }
    let new_count = desired
        .services
        .iter()
        .filter(|d| !by_name.contains_key(d.config.name.as_str()))
        .count();
    let wanted = existing.len() + new_count;
    if wanted > MAX_SERVICES as usize {
        return Err(StateError::TooManyServices { wanted });
    }

    // Every listen key in use once the change is done: the services left alone and the new
    // definitions.
    let mut final_claims = ListenClaims::new();
    for v in &untouched {
        let _ = final_claims.claim_protocol(&v.config.listen, v.config.protocol, &v.config.name);
    }
    for d in &desired.services {
        let _ = final_claims.claim_protocol(&d.config.listen, d.config.protocol, &d.config.name);
    }

    let used: HashSet<u32> = existing.iter().map(|v| v.id).collect();
    let mut free = (0..MAX_SERVICES).filter(|id| !used.contains(id));
    let mut steps = Vec::with_capacity(desired.services.len());
    for d in &desired.services {
        let mut config = d.config.clone();
        let step = match by_name.get(config.name.as_str()) {
            None => Step {
                id: free.next().ok_or(StateError::TooManyServices { wanted })?,
                annotation: match &d.annotation {
                    Annotation::Set(text) => AnnotationWrite::Write(text.clone()),
                    // A new service starts without one (an earlier service with its id may
                    // have left one).
                    Annotation::Keep | Annotation::Clear => AnnotationWrite::Remove,
                },
                config,
                old: None,
                change: Change::Created,
                unregister: Vec::new(),
                release: None,
            },
            Some(old) => {
                let same = same_definition(&old.config, &config);
                if same {
                    // The kernel key is the same: keep the address as it was written.
                    config.listen = old.config.listen;
                    if policy == Weights::KeepExisting {
                        config.subsets = old.config.subsets.clone();
                    }
                }
                let change = Change::classify(Some(&old.config), &config);
                let unregister = if change == Change::Redefined {
                    (0..old.config.subsets.len())
                        .filter(|&i| {
                            config.subsets.get(i).map(|s| s.addr)
                                != Some(old.config.subsets[i].addr)
                        })
                        .map(|i| i as u32)
                        .collect()
                } else {
                    Vec::new()
                };
                let release = (change == Change::Redefined
                    && final_claims
                        .key_holder(&old.config.listen, old.config.protocol)
                        .is_none())
                .then_some(old.config.listen);
                Step {
                    id: old.id,
                    annotation: match &d.annotation {
                        Annotation::Set(text) if old.annotation.as_ref() == Some(text) => {
                            AnnotationWrite::Keep
                        }
                        Annotation::Set(text) => AnnotationWrite::Write(text.clone()),
                        Annotation::Clear => AnnotationWrite::Remove,
                        Annotation::Keep => AnnotationWrite::Keep,
                    },
                    config,
                    old: Some((*old).clone()),
                    change,
                    unregister,
                    release,
                }
            }
        };
        steps.push(step);
    }
    let clear_annotations = desired
        .clear_annotations
        .iter()
        .filter(|name| !names.contains(name.as_str()))
        .filter_map(|name| by_name.get(name.as_str()))
        .filter_map(|v| v.annotation.clone().map(|a| (v.id, a)))
        .collect();
    Ok(Plan {
        steps,
        clear_annotations,
        deletions: Vec::new(),
    })
}

/// The rules one service must keep, whichever way it comes in (a local change, the fleet
/// store's desired state): a well-formed name, 1 to [`MAX_SUBSETS`] uniquely and well named
/// subsets, valid weights, an annotation that fits.
pub(crate) fn check_service(
    svc: &ServiceConfig,
    annotation: Option<&str>,
) -> Result<(), StateError> {
    let invalid = |reason: String| StateError::InvalidService {
        name: svc.name.clone(),
        reason,
    };
    validate_service_name(&svc.name).map_err(invalid)?;
    if svc.subsets.is_empty() || svc.subsets.len() > MAX_SUBSETS {
        return Err(invalid(format!(
            "{} subsets; a service has 1 to {MAX_SUBSETS}",
            svc.subsets.len()
        )));
    }
    let mut subset_names = HashSet::new();
    for s in &svc.subsets {
        validate_subset_name(&s.name).map_err(invalid)?;
        if !subset_names.insert(s.name.as_str()) {
            return Err(invalid(format!("subset {:?} twice", s.name)));
        }
        if s.weight > weights::MAX_WEIGHT {
            return Err(WeightError::TooLarge {
                subset: s.name.clone(),
                weight: u64::from(s.weight),
            }
            .into());
        }
    }
    weights::bucket_counts(&svc.weights())?;
    if let Some(a) = annotation
        && a.len() > MAX_ANNOTATION
    {
        return Err(invalid(format!(
            "annotation of {} bytes; at most {MAX_ANNOTATION} are stored",
            a.len()
        )));
    }
    Ok(())
}

impl Plan {
    /// What the change does to each service it names, in order.
    pub fn changes(&self) -> Vec<(String, Change)> {
        self.steps
            .iter()
            .map(|s| (s.config.name.clone(), s.change.clone()))
            .collect()
    }

    /// Whether the change stores an annotation (`TS_ROUTES` must exist then).
    pub fn writes_annotations(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.annotation, AnnotationWrite::Write(_)))
    }

    /// What must be put back when writing stopped with an error at `failed`, so that every
    /// service is as it was before the change: the entries committed are restored first
    /// (steering goes back to the old tables, which the change never overwrote), then the
    /// definitions, the services created are removed, and the annotations written are put
    /// back. Steps not reached yet need nothing. Unregistered sockets are not restored: the
    /// loader registers them again.
    pub fn undo(&self, failed: Progress) -> Vec<Undo> {
        let n = self.steps.len();
        // Steps whose preparation began, and steps whose entry may have been written.
        let (prepared, committed) = match failed {
            Progress::Prepare(k) => ((k + 1).min(n), 0),
            Progress::Commit(k) => (n, (k + 1).min(n)),
            Progress::Release(_) => (n, n),
        };
        let clears_done = !matches!(failed, Progress::Prepare(k) if k < n);
        let old_keys: Vec<(Listen, bool)> = self
            .steps
            .iter()
            .filter_map(|s| {
                s.old
                    .as_ref()
                    .map(|o| (o.config.listen, o.config.protocol.tcp()))
            })
            .collect();
        let was_a_key =
            |l: &Listen, tcp: bool| old_keys.iter().any(|(o, t)| o.same_key(l) && *t == tcp);
        let mut out = Vec::new();
        for s in self.steps[..committed].iter().filter(|s| s.writes()) {
            if s.old.is_some() {
                out.push(Undo::RestoreEntry { id: s.id });
            }
            let tcp = s.config.protocol.tcp();
            if (s.old.is_none() || s.moves_key()) && !was_a_key(&s.config.listen, tcp) {
                out.push(if tcp {
                    Undo::RemoveEntry(s.config.listen)
                } else {
                    Undo::RemoveUdpEntry(s.config.listen)
                });
            }
        }
        for s in self.steps[..prepared].iter() {
            match (&s.old, &s.change) {
                (_, Change::Unchanged | Change::Reweighted) => {}
                (Some(_), _) => out.push(Undo::RestoreDefinition { id: s.id }),
                (None, _) => out.push(Undo::RemoveService {
                    id: s.id,
                    n_subsets: s.n_subsets(),
                }),
            }
        }
        for s in self.steps[..prepared].iter() {
            if s.annotation != AnnotationWrite::Keep && s.old.is_some() {
                out.push(Undo::RestoreAnnotation {
                    id: s.id,
                    text: s.old.as_ref().and_then(|o| o.annotation.clone()),
                });
            }
        }
        if clears_done {
            for (id, text) in &self.clear_annotations {
                out.push(Undo::RestoreAnnotation {
                    id: *id,
                    text: Some(text.clone()),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DesiredService, SubsetConfig};

    fn svc(name: &str, listen: &str, subsets: &[(&str, u16, u32)]) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            listen: Listen::parse(listen).unwrap(),
            subsets: subsets
                .iter()
                .map(|&(n, port, weight)| SubsetConfig {
                    name: n.into(),
                    addr: ([127, 0, 0, 1], port).into(),
                    weight,
                    owner: Default::default(),
                })
                .collect(),
            take_over: false,
            fail_closed: false,
            balance: Default::default(),
            protocol: Protocol::Tcp,
        }
    }

    fn view(id: u32, config: ServiceConfig, annotation: Option<&str>) -> ServiceView {
        ServiceView {
            id,
            live: vec![true; config.subsets.len()],
            config,
            annotation: annotation.map(String::from),
        }
    }

    fn want(services: Vec<ServiceConfig>) -> Desired {
        Desired {
            services: services
                .into_iter()
                .map(|config| DesiredService {
                    config,
                    annotation: Annotation::Keep,
                })
                .collect(),
            clear_annotations: Vec::new(),
        }
    }

    const V1V2: &[(&str, u16, u32)] = &[("v1", 9001, 80), ("v2", 9002, 20)];

    #[test]
    fn changes_are_classified() {
        let existing = vec![
            view(0, svc("a", "127.0.0.1:31400", V1V2), None),
            view(1, svc("b", "31401", V1V2), None),
            view(2, svc("c", "31402", V1V2), None),
        ];
        let desired = want(vec![
            svc("a", "127.0.0.1:31400", V1V2),
            svc("b", "31401", &[("v1", 9001, 50), ("v2", 9002, 50)]),
            svc("c", "31402", &[("v1", 9001, 50), ("v2", 9003, 50)]),
            svc("d", "31403", V1V2),
        ]);
        let p = plan(&existing, &desired, Weights::FromConfig).unwrap();
        assert_eq!(
            p.changes(),
            vec![
                ("a".into(), Change::Unchanged),
                ("b".into(), Change::Reweighted),
                ("c".into(), Change::Redefined),
                ("d".into(), Change::Created),
            ]
        );
        // The new service takes the lowest free id; c gives up v2's socket (new backend).
        assert_eq!(p.steps[3].id, 3);
        assert_eq!(p.steps[2].unregister, vec![1]);
        assert_eq!(p.steps[2].release, None);
        // KeepExisting: b keeps its weights, so nothing changes.
        let p = plan(&existing, &desired, Weights::KeepExisting).unwrap();
        assert_eq!(p.steps[1].change, Change::Unchanged);
        assert_eq!(p.steps[1].config.weights(), vec![80, 20]);
        assert_eq!(p.steps[2].change, Change::Redefined);
    }

    #[test]
    fn a_v4_mapped_listen_is_the_same_definition() {
        let existing = vec![view(0, svc("a", "127.0.0.1:31400", V1V2), None)];
        let desired = want(vec![svc("a", "[::ffff:127.0.0.1]:31400", V1V2)]);
        let p = plan(&existing, &desired, Weights::FromConfig).unwrap();
        assert_eq!(p.changes(), vec![("a".into(), Change::Unchanged)]);
        // The address keeps the form it was written in first.
        assert_eq!(p.steps[0].config.listen.to_string(), "127.0.0.1:31400");
        let desired = want(vec![svc(
            "a",
            "[::ffff:127.0.0.1]:31400",
            &[("v1", 9001, 1), ("v2", 9002, 1)],
        )]);
        let p = plan(&existing, &desired, Weights::FromConfig).unwrap();
        assert_eq!(p.steps[0].change, Change::Reweighted);
        assert_eq!(p.steps[0].release, None);
    }

    #[test]
    fn invalid_changes_are_refused() {
        let existing = vec![view(0, svc("a", "31400", V1V2), None)];
        let conflict = want(vec![svc("b", "31400", V1V2)]);
        let err = plan(&existing, &conflict, Weights::FromConfig).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service \"b\" wants to listen on *:31400, which service \"a\" already uses"
        );
        let twice = want(vec![svc("b", "31401", V1V2), svc("c", "31401", V1V2)]);
        let err = plan(&existing, &twice, Weights::FromConfig).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service \"c\" wants to listen on *:31401, which service \"b\" already uses"
        );
        // a moves away and b takes its address in the same change: allowed.
        let swap = want(vec![svc("a", "31402", V1V2), svc("b", "31400", V1V2)]);
        let p = plan(&existing, &swap, Weights::FromConfig).unwrap();
        assert_eq!(p.steps[0].release, None, "b holds a's old key afterwards");
        let zero = want(vec![svc("z", "31409", &[("v1", 9001, 0)])]);
        assert!(plan(&existing, &zero, Weights::FromConfig).is_err());
        let dup = want(vec![svc("d", "31409", &[("v1", 9001, 1), ("v1", 9002, 1)])]);
        assert_eq!(
            plan(&existing, &dup, Weights::FromConfig)
                .unwrap_err()
                .to_string(),
            "service \"d\": subset \"v1\" twice"
        );
    }

    #[test]
    fn a_moved_service_releases_its_old_key_and_slots() {
        let existing = vec![view(4, svc("a", "31400", V1V2), None)];
        let desired = want(vec![svc("a", "31401", &[("v1", 9001, 1)])]);
        let p = plan(&existing, &desired, Weights::FromConfig).unwrap();
        let s = &p.steps[0];
        assert_eq!(s.change, Change::Redefined);
        assert_eq!(s.release, Some(Listen::Any { port: 31400 }));
        assert_eq!(s.unregister, vec![1]);
        assert_eq!((s.n_subsets(), s.old_n_subsets()), (1, 2));
    }

    /// a: reweighted, b: redefined onto a new address, c: created; with annotations.
    fn three_step_plan() -> Plan {
        let existing = vec![
            view(0, svc("a", "31400", V1V2), Some("A")),
            view(1, svc("b", "31401", V1V2), None),
            view(2, svc("x", "31409", V1V2), Some("X")),
        ];
        let mut desired = want(vec![
            svc("a", "31400", &[("v1", 9001, 1), ("v2", 9002, 1)]),
            svc("b", "31405", V1V2),
            svc("c", "31406", V1V2),
        ]);
        desired.services[0].annotation = Annotation::Set("A2".into());
        desired.clear_annotations = vec!["x".into()];
        plan(&existing, &desired, Weights::FromConfig).unwrap()
    }

    #[test]
    fn roll_back_during_preparation_touches_only_the_steps_reached() {
        let p = three_step_plan();
        assert_eq!(p.clear_annotations, vec![(2, "X".to_string())]);
        // Step 0 failed: only a's annotation can have been written.
        assert_eq!(
            p.undo(Progress::Prepare(0)),
            vec![Undo::RestoreAnnotation {
                id: 0,
                text: Some("A".into())
            }]
        );
        // Step 2 (the new service) failed: b's definition back, c removed; nothing committed.
        assert_eq!(
            p.undo(Progress::Prepare(2)),
            vec![
                Undo::RestoreDefinition { id: 1 },
                Undo::RemoveService {
                    id: 3,
                    n_subsets: 2
                },
                Undo::RestoreAnnotation {
                    id: 0,
                    text: Some("A".into())
                },
            ]
        );
        // Removing the cleared annotations failed: x's annotation comes back too.
        assert_eq!(
            p.undo(Progress::Prepare(3)).last(),
            Some(&Undo::RestoreAnnotation {
                id: 2,
                text: Some("X".into())
            })
        );
    }

    #[test]
    fn roll_back_during_commit_restores_the_entries_written() {
        let p = three_step_plan();
        // b's entry failed: a's and b's old entries back, b's new address removed, and
        // everything prepared undone.
        let undo = p.undo(Progress::Commit(1));
        assert_eq!(
            undo[..3],
            [
                Undo::RestoreEntry { id: 0 },
                Undo::RestoreEntry { id: 1 },
                Undo::RemoveEntry(Listen::Any { port: 31405 }),
            ]
        );
        assert!(!undo.contains(&Undo::RemoveEntry(Listen::Any { port: 31406 })));
        assert!(undo.contains(&Undo::RemoveService {
            id: 3,
            n_subsets: 2
        }));
        // c's entry failed: its new key goes too.
        let undo = p.undo(Progress::Commit(2));
        assert!(undo.contains(&Undo::RemoveEntry(Listen::Any { port: 31406 })));
        // A failure while releasing undoes everything.
        assert_eq!(p.undo(Progress::Release(0)), p.undo(Progress::Commit(2)));
    }

    #[test]
    fn roll_back_never_removes_a_key_a_service_had_before() {
        // a and b swap addresses: rolling back must restore both entries and remove neither.
        let existing = vec![
            view(0, svc("a", "31400", V1V2), None),
            view(1, svc("b", "31401", V1V2), None),
        ];
        let desired = want(vec![svc("a", "31401", V1V2), svc("b", "31400", V1V2)]);
        let p = plan(&existing, &desired, Weights::FromConfig).unwrap();
        assert_eq!(
            p.undo(Progress::Commit(1))[..2],
            [Undo::RestoreEntry { id: 0 }, Undo::RestoreEntry { id: 1 }]
        );
        assert!(
            !p.undo(Progress::Commit(1))
                .iter()
                .any(|u| matches!(u, Undo::RemoveEntry(_)))
        );
    }

    #[test]
    fn deleting_skips_unknown_and_repeated_names() {
        let existing = vec![view(7, svc("a", "31400", V1V2), None)];
        let p = plan_delete(&existing, &["a".into(), "nope".into(), "a".into()]);
        assert_eq!(p.deletions.len(), 1);
        assert_eq!(p.deletions[0].id, 7);
        assert_eq!(p.deletions[0].n_subsets, 2);
    }
}
