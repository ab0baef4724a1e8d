//! The guard against taking a port another server already serves: every change that creates
//! a service or moves its listen address goes through [`State::guard`] (called by
//! [`State::apply_with`], [`State::apply`] and the dry run [`State::plan_with`]), so
//! `tcpshiftctl apply`, `tcpshiftd --config` and its reloads refuse the same things, before
//! anything is written.
//!
//! A service shadows a listener when a socket that is not one of its subsets listens on its
//! listen address (see [`crate::discovery::shadowed_by`]): once steered, that server's new
//! connections all go to the subsets. Taking a port over is allowed on purpose with
//! `takeOver: true` ([`crate::model::ServiceConfig::take_over`]). An existing service whose
//! listen address does not change is never refused. What a service shadows is read from
//! `/proc` of the current thread's network namespace (the state's: both binaries enter it
//! before opening the state) whenever asked, never stored.

use std::collections::HashMap;

use crate::{
    discovery::{self, ListenersByPort, ShadowedListener},
    model::ServiceConfig,
};

use super::{State, error::*, plan::Plan, plan::Step};

/// Whether `step` must be checked: a new service, or one whose listen address changes,
/// without `takeOver`.
fn checked(step: &Step) -> bool {
    !step.config.take_over
        && step
            .old
            .as_ref()
            .is_none_or(|old| !old.config.listen.same_key(&step.config.listen))
}

impl State {
    /// Refuses `plan` if a service it creates or moves (without `takeOver`) would shadow a
    /// listener: [`StateError::ListenerShadowed`] names the first such service and every
    /// listener it would shadow. Reads `/proc` only when some service must be checked.
    pub(super) fn guard(&self, plan: &Plan) -> Result<()> {
        let steps: Vec<&Step> = plan.steps.iter().filter(|s| checked(s)).collect();
        if steps.is_empty() {
            return Ok(());
        }
        let all = ListenersByPort::new(&discovery::listeners()?);
        let udp = udp_listeners(steps.iter().any(|s| s.config.protocol.udp()))?;
        for step in steps {
            let shadowed = discovery::shadowed_by_protocol(&step.config, &all, &udp);
            if !shadowed.is_empty() {
                return Err(StateError::ListenerShadowed {
                    name: step.config.name.clone(),
                    listen: step.config.listen.to_string(),
                    listeners: discovery::describe(&shadowed)?,
                });
            }
        }
        Ok(())
    }

    /// The listeners each service shadows now, by service name (services shadowing nothing
    /// are left out), from one read of the namespace's listening sockets and one walk over
    /// `/proc`.
    pub fn shadowed(&self) -> Result<HashMap<String, Vec<ShadowedListener>>> {
        let configs: Vec<ServiceConfig> = self.services()?.into_iter().map(|v| v.config).collect();
        shadowed_among(&configs)
    }
}

/// [`State::shadowed`] for the services `configs` (as the maps hold them).
pub(super) fn shadowed_among(
    configs: &[ServiceConfig],
) -> Result<HashMap<String, Vec<ShadowedListener>>> {
    let all = ListenersByPort::new(&discovery::listeners()?);
    let udp = udp_listeners(configs.iter().any(|c| c.protocol.udp()))?;
    let per_service: Vec<(String, Vec<discovery::Listener>)> = configs
        .iter()
        .map(|v| {
            (
                v.name.clone(),
                discovery::shadowed_by_protocol(v, &all, &udp),
            )
        })
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let flat: Vec<discovery::Listener> = per_service
        .iter()
        .flat_map(|(_, l)| l.iter().copied())
        .collect();
    let described: HashMap<u64, ShadowedListener> = discovery::describe(&flat)?
        .into_iter()
        .map(|d| (d.inode, d))
        .collect();
    Ok(per_service
        .into_iter()
        .map(|(name, listeners)| {
            let found = listeners
                .iter()
                .filter_map(|l| described.get(&l.inode).cloned())
                .collect();
            (name, found)
        })
        .collect())
}

/// The namespace's bound unconnected UDP sockets by port when `wanted` (a service steering
/// UDP is checked), else none: reading `/proc/net/udp*` is skipped for TCP-only changes.
fn udp_listeners(wanted: bool) -> Result<ListenersByPort> {
    Ok(if wanted {
        ListenersByPort::new(&discovery::udp_sockets()?)
    } else {
        ListenersByPort::default()
    })
}
