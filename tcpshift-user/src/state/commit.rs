//! Changing services: apply, set-weight and delete, through one commit path.
//!
//! Each change is planned first ([`super::plan`], pure: nothing is written unless the whole
//! change is valid), then written by [`State::commit`] in three phases: prepare every service
//! (definitions, counters, sockets given up, annotations), commit them (one `TS_SERVICES` update
//! per service, carrying its weights and the ranges derived from them: the moment its new
//! connections follow the change), then release what the old definitions held
//! (listen keys no longer used, slots gone) and delete. Every map update goes through
//! [`write`], which retries while the kernel answers ENOMEM; if an update fails for good, what
//! was written is put back ([`Plan::undo`]) and the error is returned.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData, MapError};
use tcpshift_common::{Counters, MAX_SUBSETS, ServiceEntry, slot};
use tracing::{info, warn};

use crate::{
    model::{Annotation, Change, Desired, DesiredService, ServiceConfig, ServiceView, Weights},
    weights,
};

use super::{
    State,
    encode::*,
    error::*,
    plan::{AnnotationWrite, Plan, Progress, Undo, plan, plan_delete},
};

/// The definition and entry of each service a change touches, as they were before it, by id.
type Before = StdHashMap<u32, (Definition, Option<ServiceEntry>)>;

impl State {
    /// Makes the kernel state match `services` (e.g. a loader configuration's): creates new
    /// services, redefines changed ones and, with [`Weights::FromConfig`], sets the weights of
    /// the others. Services absent from `services` are left alone. Everything is validated
    /// before the first map is written.
    pub fn apply(
        &mut self,
        services: &[ServiceConfig],
        policy: Weights,
    ) -> Result<Vec<(String, Change)>> {
        let desired = Desired {
            services: services
                .iter()
                .map(|svc| DesiredService {
                    config: svc.clone(),
                    annotation: Annotation::Keep,
                })
                .collect(),
            clear_annotations: Vec::new(),
        };
        self.change_with(policy, |_: &[ServiceView]| Ok::<_, StateError>(desired))
    }

    /// Changes services in one step, holding the namespace's lock throughout: `resolve` is
    /// given every service as the kernel holds it ([`State::services`]) and returns what the
    /// services it names must become; services it does not name are left alone.
    ///
    /// Nothing is written unless everything is valid: names unique and well-formed, 1 to 16
    /// subsets, valid weights, no two services on one listen address (also counting the
    /// services left alone), room for the new ones. The changes are then written service by
    /// service, each committed by one `TS_SERVICES` update as in
    /// [`State::set_weights`]; if the kernel refuses a write half-way (out of memory), the
    /// services already changed are put back as they were (their old entries, weights and
    /// ranges included, are kept for that) and the error is returned. Sockets of subsets whose address changed are
    /// unregistered; the loader registers the new ones.
    ///
    /// A listen address written in another form with the same kernel key
    /// (`[::ffff:127.0.0.1]:31400` for `127.0.0.1:31400`) is no change: the service is
    /// [`Change::Unchanged`] (or reweighted) and keeps the address as first written.
    ///
    /// Returns what happened to each service named by `resolve`, in its order.
    pub fn apply_with<E, F>(&mut self, resolve: F) -> std::result::Result<Vec<(String, Change)>, E>
    where
        E: From<StateError>,
        F: FnOnce(&[ServiceView]) -> std::result::Result<Desired, E>,
    {
        self.change_with(Weights::FromConfig, resolve)
    }

    /// The dry run of [`State::apply_with`]: what applying `resolve`'s change would do to each
    /// service, computed by the same plan under the same lock, with nothing written. Errors
    /// that the real apply would return before writing (an invalid service, a listen address
    /// taken, too many services) are returned here too.
    pub fn plan_with<E, F>(&self, resolve: F) -> std::result::Result<Vec<(String, Change)>, E>
    where
        E: From<StateError>,
        F: FnOnce(&[ServiceView]) -> std::result::Result<Desired, E>,
    {
        let _lock = self.lock()?;
        let views = self.services()?;
        let desired = resolve(&views)?;
        let plan = plan(&views, &desired, Weights::FromConfig)?;
        self.guard(&plan)?;
        Ok(plan.changes())
    }

    /// [`State::apply_with`] with a weights policy.
    fn change_with<E, F>(
        &mut self,
        policy: Weights,
        resolve: F,
    ) -> std::result::Result<Vec<(String, Change)>, E>
    where
        E: From<StateError>,
        F: FnOnce(&[ServiceView]) -> std::result::Result<Desired, E>,
    {
        let _lock = self.lock()?;
        let views = self.services()?;
        let desired = resolve(&views)?;
        let plan = plan(&views, &desired, policy)?;
        self.guard(&plan)?;
        self.commit(&plan)?;
        let rules: Vec<_> = desired
            .services
            .iter()
            .map(|d| {
                let subsets = d.config.subsets.iter();
                let rules = subsets.map(|s| (s.name.clone(), s.owner.clone()));
                (d.config.name.clone(), rules.collect())
            })
            .collect();
        self.write_owner_rules(&rules)?;
        for s in plan.steps.iter().filter(|s| s.change != Change::Unchanged) {
            info!(service = %s.config.name, listen = %s.config.listen, change = ?s.change, "applied");
        }
        Ok(plan.changes())
    }

    /// Writes `plan` (see the module documentation); on failure puts back what was written and
    /// returns the error. The caller holds the lock.
    fn commit(&mut self, plan: &Plan) -> Result<()> {
        let mut routes = match self.open_routes()? {
            Some(r) => Some(r),
            None if plan.writes_annotations() => Some(self.create_routes()?),
            None => None,
        };
        // The records before the change, for the roll-back (of the services written: an
        // unchanged one needs none, and with many services reading them all would cost more
        // than the change).
        let mut before = Before::new();
        for s in &plan.steps {
            if s.old.is_some()
                && s.writes()
                && let Ok(Some(meta)) = self.definition(s.id)
            {
                let entry = self.entry(&meta)?;
                before.insert(s.id, (meta, entry));
            }
        }
        let mut progress = Progress::Prepare(0);
        let written = self.write_plan(plan, routes.as_mut(), &mut progress);
        if let Err(e) = written {
            warn!(error = %e, "a change failed half-way; putting the services back as they were");
            self.undo(&plan.undo(progress), &before, routes.as_mut());
            return Err(e);
        }
        Ok(())
    }

    fn write_plan(
        &mut self,
        plan: &Plan,
        mut routes: Option<&mut RoutesMap>,
        progress: &mut Progress,
    ) -> Result<()> {
        // 1. Everything the data path reaches only through the new entries. Sockets of subsets
        //    whose backend changed go first, so that no connection reaches an old backend
        //    under a new subset (it falls back to the other subsets until the new socket is
        //    registered).
        for (k, step) in plan.steps.iter().enumerate() {
            *progress = Progress::Prepare(k);
            let id = step.id;
            if step.change == Change::Created {
                // Leftovers of a service that had this id before.
                self.clear_slots(id, 0, MAX_SUBSETS as u32)?;
            }
            if let Some(routes) = routes.as_deref_mut() {
                match &step.annotation {
                    AnnotationWrite::Keep => {}
                    AnnotationWrite::Write(text) => write_annotation(routes, id, text)?,
                    AnnotationWrite::Remove => remove_annotation(routes, id)?,
                }
            }
            if !step.writes() {
                continue;
            }
            if step.change == Change::Reweighted {
                continue;
            }
            self.write_definition(id, &service_meta(&step.config))?;
            let m = &mut self.maps;
            for i in 0..step.n_subsets() {
                ensure_counters(&mut m.counters, slot(id, i))?;
                if step.config.protocol.udp() {
                    super::udp::ensure_udp_counters(&mut m.udp_counters, slot(id, i))?;
                }
            }
            let protocol_changed = step
                .old
                .as_ref()
                .is_some_and(|o| o.config.protocol != step.config.protocol);
            for &i in &step.unregister {
                ignore_missing(m.sockets.remove(&slot(id, i)), "cannot unregister a socket")?;
                ignore_missing(
                    m.udp_sockets.remove(&slot(id, i)),
                    "cannot unregister a socket",
                )?;
            }
            if protocol_changed {
                // Sockets of a protocol the service no longer steers.
                for i in 0..step.n_subsets() {
                    if !step.config.protocol.tcp() {
                        ignore_missing(
                            m.sockets.remove(&slot(id, i)),
                            "cannot unregister a socket",
                        )?;
                    }
                    if !step.config.protocol.udp() {
                        ignore_missing(
                            m.udp_sockets.remove(&slot(id, i)),
                            "cannot unregister a socket",
                        )?;
                    }
                }
            }
        }
        *progress = Progress::Prepare(plan.steps.len());
        if let Some(routes) = routes {
            for (id, _) in &plan.clear_annotations {
                remove_annotation(routes, *id)?;
            }
        }
        // 2. The commit points: one TS_SERVICES update per service.
        for (k, step) in plan.steps.iter().enumerate() {
            *progress = Progress::Commit(k);
            if !step.writes() {
                continue;
            }
            let entry = new_entry(step.id, &step.config.weights(), &step.config)?;
            let key = service_key_for(&step.config.listen, step.config.protocol);
            let services = &mut self.maps.services;
            write("entry", "cannot write a service entry", || {
                services.insert(key, entry, 0)
            })?;
        }
        // 3. Listen addresses given up, subsets gone, services deleted.
        for (k, step) in plan.steps.iter().enumerate() {
            *progress = Progress::Release(k);
            if let Some(old) = &step.release {
                let protocol = step
                    .old
                    .as_ref()
                    .map_or_else(Default::default, |o| o.config.protocol);
                let key = service_key_for(old, protocol);
                // Only this service's entry: another service may hold the key now.
                if self
                    .maps
                    .services
                    .get(&key, 0)
                    .is_ok_and(|e| e.id == step.id)
                {
                    ignore_missing(
                        self.maps.services.remove(&key),
                        "cannot remove a service entry",
                    )?;
                }
            }
            if step.change == Change::Redefined {
                self.clear_slots(step.id, step.n_subsets(), step.old_n_subsets())?;
            }
        }
        let mut routes = self.open_routes()?;
        for d in &plan.deletions {
            let key = service_key_for(&d.listen, d.protocol);
            // Only this service's entry: another service may have taken the address since.
            if let Ok(e) = self.maps.services.get(&key, 0)
                && e.id == d.id
            {
                ignore_missing(
                    self.maps.services.remove(&key),
                    "cannot remove a service entry",
                )?;
            }
            self.remove_id(d.id, d.n_subsets, routes.as_mut())?;
            info!(service = %d.name, "deleted");
        }
        Ok(())
    }

    /// Best effort: carries out `undo` (errors are logged; the first error is what the caller
    /// reports). `before` holds the records the change started from.
    fn undo(&mut self, undo: &[Undo], before: &Before, mut routes: Option<&mut RoutesMap>) {
        let report = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                warn!(error = %e, "rolling back: {what}");
            }
        };
        for u in undo {
            match u {
                Undo::RestoreEntry { id } => {
                    if let Some((meta, Some(entry))) = before.get(id) {
                        let services = &mut self.maps.services;
                        report(
                            "cannot restore a service entry",
                            write("restore", "entry", || services.insert(meta.key, entry, 0)),
                        );
                    }
                }
                Undo::RemoveEntry(listen) => report(
                    "cannot remove a new listen address",
                    ignore_missing(self.maps.services.remove(&service_key(listen)), "entry"),
                ),
                Undo::RemoveUdpEntry(listen) => report(
                    "cannot remove a new listen address",
                    ignore_missing(
                        self.maps
                            .services
                            .remove(&service_key_for(listen, crate::model::Protocol::Udp)),
                        "entry",
                    ),
                ),
                Undo::RestoreDefinition { id } => {
                    if let Some((meta, _)) = before.get(id) {
                        report(
                            "cannot restore a service definition",
                            self.restore_definition(*id, meta),
                        );
                    }
                }
                Undo::RemoveService { id, n_subsets } => {
                    let r = self.remove_id(*id, *n_subsets, routes.as_deref_mut());
                    report("cannot remove a new service", r);
                }
                Undo::RestoreAnnotation { id, text } => {
                    if let Some(routes) = routes.as_deref_mut() {
                        let r = match text {
                            Some(text) => write_annotation(routes, *id, text),
                            None => remove_annotation(routes, *id),
                        };
                        report("cannot restore an annotation", r);
                    }
                }
            }
        }
    }

    /// Removes the sockets, counters, subset definitions, owner rules, limits and loads of slots
    /// `from..to` of service `id`.
    fn clear_slots(&mut self, id: u32, from: u32, to: u32) -> Result<()> {
        for i in from..to.min(MAX_SUBSETS as u32) {
            let s = slot(id, i);
            ignore_missing(self.maps.sockets.remove(&s), "cannot unregister a socket")?;
            ignore_missing(self.maps.counters.remove(&s), "cannot remove counters")?;
            ignore_missing(
                self.maps.udp_sockets.remove(&s),
                "cannot unregister a socket",
            )?;
            ignore_missing(self.maps.udp_counters.remove(&s), "cannot remove counters")?;
            ignore_missing(
                self.maps.subset_meta.remove(&s),
                "cannot remove a subset definition",
            )?;
        }
        self.remove_owner_rules(id, from, to)?;
        self.clear_limit_slots(id, from, to)
    }

    /// Writes the definition of service `id`: its subsets' `TS_SUBSET_META` records first,
    /// then its `TS_META` record (how the id is found), so that a definition found is
    /// complete. Records of subsets the service no longer has are removed when it is
    /// released ([`State::clear_slots`]).
    fn write_definition(&mut self, id: u32, def: &Definition) -> Result<()> {
        let m = &mut self.maps;
        for (i, sub) in def.subsets.iter().enumerate() {
            let s = slot(id, i as u32);
            write("definition", "cannot write a subset definition", || {
                m.subset_meta.insert(s, sub, 0)
            })?;
        }
        write("definition", "cannot write a service definition", || {
            m.meta.insert(id, def.service, 0)
        })
    }

    /// Puts back the definition `def` of service `id` as it was before a change (roll-back):
    /// its records, and no record for a subset it did not have.
    fn restore_definition(&mut self, id: u32, def: &Definition) -> Result<()> {
        let m = &mut self.maps;
        for (i, sub) in def.subsets.iter().enumerate() {
            let s = slot(id, i as u32);
            write("restore", "cannot restore a subset definition", || {
                m.subset_meta.insert(s, sub, 0)
            })?;
        }
        write("restore", "cannot restore a service definition", || {
            m.meta.insert(id, def.service, 0)
        })?;
        for i in def.subsets.len() as u32..MAX_SUBSETS as u32 {
            ignore_missing(
                m.subset_meta.remove(&slot(id, i)),
                "cannot remove a subset definition",
            )?;
        }
        Ok(())
    }

    /// Removes everything of service `id` but its `TS_SERVICES` entry: sockets, counters,
    /// subset definitions, owner rules, limits, annotation and definition (last: it is how the
    /// id is found).
    /// Slots from `n_subsets` on are empty already (a redefinition clears them).
    fn remove_id(&mut self, id: u32, n_subsets: u32, routes: Option<&mut RoutesMap>) -> Result<()> {
        self.clear_slots(id, 0, n_subsets)?;
        if let Some(routes) = routes {
            remove_annotation(routes, id)?;
        }
        ignore_missing(
            self.maps.meta.remove(&id),
            "cannot remove a service definition",
        )
    }

    /// Deletes services in one step, holding the namespace's lock throughout: `select` is
    /// given every service ([`State::services`]) and returns the names to delete (names that
    /// do not exist are skipped). Each service stops being steered at once (its
    /// `TS_SERVICES` entry goes first: new connections to its listen address see the normal
    /// socket lookup); then its tables, sockets, counters, annotation and definition are
    /// removed. Returns the names deleted.
    pub fn delete_with<E, F>(&mut self, select: F) -> std::result::Result<Vec<String>, E>
    where
        E: From<StateError>,
        F: FnOnce(&[ServiceView]) -> std::result::Result<Vec<String>, E>,
    {
        let _lock = self.lock()?;
        let views = self.services()?;
        let names = select(&views)?;
        let plan = plan_delete(&views, &names);
        self.commit(&plan)?;
        Ok(plan.deletions.into_iter().map(|d| d.name).collect())
    }

    /// Deletes the service called `name`. Returns whether it existed.
    pub fn delete_service(&mut self, name: &str) -> Result<bool> {
        let deleted = self.delete_with(|_| Ok::<_, StateError>(vec![name.to_owned()]))?;
        Ok(!deleted.is_empty())
    }

    /// Sets weights with `tcpshiftctl set-weight` semantics (see
    /// [`weights::apply_set_weight`]). `service` may be `None` when there is one service.
    /// Returns the service's name and its new weights.
    pub fn set_weights(
        &mut self,
        service: Option<&str>,
        requested: &[(String, u32)],
    ) -> Result<(String, Vec<(String, u32)>)> {
        let _lock = self.lock()?;
        let views = self.services()?;
        let known = || {
            views
                .iter()
                .map(|v| v.config.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let view = match service {
            Some(name) => views
                .iter()
                .find(|v| v.config.name == name)
                .ok_or_else(|| StateError::UnknownService {
                    name: name.to_string(),
                    known: known(),
                })?,
            None => match views.as_slice() {
                [] => return Err(StateError::NoServices),
                [one] => one,
                _ => {
                    return Err(StateError::AmbiguousService {
                        count: views.len(),
                        known: known(),
                    });
                }
            },
        };
        let current: Vec<(String, u32)> = view
            .config
            .subsets
            .iter()
            .map(|s| (s.name.clone(), s.weight))
            .collect();
        let new = weights::apply_set_weight(&current, requested)?;
        let mut config = view.config.clone();
        for (s, w) in config.subsets.iter_mut().zip(&new) {
            s.weight = *w;
        }
        let desired = Desired {
            services: vec![DesiredService {
                config,
                annotation: Annotation::Keep,
            }],
            clear_annotations: Vec::new(),
        };
        let plan = plan(&views, &desired, Weights::FromConfig)?;
        self.commit(&plan)?;
        let service_name = view.config.name.clone();
        info!(service = %service_name, weights = ?new, "weights set");
        let names = current.into_iter().map(|(name, _)| name);
        Ok((service_name, names.zip(new).collect()))
    }
}

/// One map update of the commit path: runs `update` through the test failpoint `point` (with
/// the `failpoints` feature) and again while the kernel answers ENOMEM ([`retry_enomem`]).
pub(super) fn write(
    point: &'static str,
    what: &str,
    mut update: impl FnMut() -> std::result::Result<(), MapError>,
) -> Result<()> {
    retry_enomem(|| {
        super::failpoints::check(point)?;
        update()
    })
    .map_err(map_err(what))
}

/// `BPF_NOEXIST`: a map update that only creates (EEXIST if the key is there).
const BPF_NOEXIST: u64 = 1;

/// Creates zeroed counters for `slot` unless they exist: a create-only insert, so counts the
/// programs are adding to the one shared value are never overwritten.
pub(super) fn ensure_counters(
    counters: &mut HashMap<MapData, u32, Counters>,
    slot: u32,
) -> Result<()> {
    write("counters", "cannot create counters", || {
        match counters.insert(slot, Counters::default(), BPF_NOEXIST) {
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            other => other,
        }
    })
}

/// Runs a map update again while the kernel answers ENOMEM, for up to about a second.
///
/// Maps without preallocation take their elements from the BPF memory allocator's per-CPU
/// caches, which are refilled asynchronously (and per-CPU values from the percpu allocator,
/// which grows asynchronously too): thousands of updates in a row from userspace — an apply
/// of 10 000 services — can find them empty for a moment although memory is plentiful.
fn retry_enomem<T>(
    mut update: impl FnMut() -> std::result::Result<T, MapError>,
) -> std::result::Result<T, MapError> {
    let mut delay = std::time::Duration::from_micros(100);
    let mut waited = std::time::Duration::ZERO;
    loop {
        match update() {
            Err(MapError::SyscallError(s))
                if s.io_error.raw_os_error() == Some(libc::ENOMEM)
                    && waited < std::time::Duration::from_secs(1) =>
            {
                std::thread::sleep(delay);
                waited += delay;
                delay = (delay * 2).min(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Writes `text` as the annotation of service `id`.
fn write_annotation(routes: &mut RoutesMap, id: u32, text: &str) -> Result<()> {
    let value = encode_annotation(text);
    write("annotation", "cannot write an annotation", || {
        routes.insert(id, value, 0)
    })
}

/// Removes the annotation of service `id`, if any.
fn remove_annotation(routes: &mut RoutesMap, id: u32) -> Result<()> {
    ignore_missing(routes.remove(&id), "cannot remove an annotation")
}
