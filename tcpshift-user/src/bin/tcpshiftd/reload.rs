//! SIGHUP: reading the `--config` file again and applying it, all or nothing.
//!
//! Which weights win: a service whose weights *in the file* changed since the file was last
//! loaded (or that is new in the file) gets the file's weights; any other service keeps the
//! weights the kernel holds, so a shift made with `tcpshiftctl set-weight` survives a reload
//! that did not touch that service's weights. A service whose listen address or subsets
//! changed is redefined with the file's weights. Services no longer in the file are left
//! alone (as at start; `tcpshiftctl delete` removes them).

use std::path::PathBuf;

use anyhow::{Context, Result};
use tcpshift::{
    config::Config,
    model::{Annotation, Desired, DesiredService, ServiceConfig, ServiceView, same_definition},
    state::State,
};
use tracing::{error, info};

/// Reloads one configuration file.
pub struct Reloader {
    path: PathBuf,
    /// The file as last loaded successfully (the file's own past, not the kernel's state).
    last: Config,
}

impl Reloader {
    /// `last` is the configuration read from `path` at start.
    pub fn new(path: PathBuf, last: Config) -> Self {
        Self { path, last }
    }

    /// Reads the file and applies it; a file that cannot be read, parsed, validated or
    /// applied is refused with the error logged, and nothing changes.
    pub fn reload(&mut self, state: &mut State) {
        info!(config = %self.path.display(), "SIGHUP: reading the configuration again");
        match self.try_reload(state) {
            Ok(changes) => {
                let changed: Vec<String> = changes
                    .iter()
                    .filter(|(_, c)| *c != tcpshift::model::Change::Unchanged)
                    .map(|(name, c)| format!("{name} {c:?}").to_lowercase())
                    .collect();
                info!(
                    config = %self.path.display(),
                    "reloaded the configuration: {}",
                    if changed.is_empty() { "nothing changed".to_string() } else { changed.join(", ") }
                );
            }
            Err(e) => error!(
                config = %self.path.display(),
                "reload refused, nothing changed: {e:#}"
            ),
        }
    }

    fn try_reload(&mut self, state: &mut State) -> Result<Vec<(String, tcpshift::model::Change)>> {
        let config = Config::from_file(&self.path)?;
        let last = &self.last;
        let changes = state
            .apply_with(|current: &[ServiceView]| -> Result<Desired> {
                let services = config
                    .services
                    .iter()
                    .map(|svc| DesiredService {
                        config: desired(svc, last, current),
                        annotation: Annotation::Keep,
                    })
                    .collect();
                Ok(Desired {
                    services,
                    clear_annotations: Vec::new(),
                })
            })
            .context("cannot apply the configuration")?;
        state
            .set_traffic_policies(&config.policies)
            .context("cannot apply the connection limits and outlier detection")?;
        self.last = config;
        Ok(changes)
    }
}

/// `svc` from the file, with the kernel's weights when its weights in the file are as last
/// loaded and the kernel holds the same definition.
fn desired(svc: &ServiceConfig, last: &Config, current: &[ServiceView]) -> ServiceConfig {
    let weights_unchanged = last
        .services
        .iter()
        .find(|l| l.name == svc.name)
        .is_some_and(|l| weights(l) == weights(svc));
    let kernel = current.iter().find(|v| v.config.name == svc.name);
    match kernel {
        Some(view) if weights_unchanged && same_definition(&view.config, svc) => ServiceConfig {
            // The file decides whether the service fails closed.
            fail_closed: svc.fail_closed,
            ..view.config.clone()
        },
        _ => svc.clone(),
    }
}

/// (subset name, weight) in order.
fn weights(svc: &ServiceConfig) -> Vec<(&str, u32)> {
    svc.subsets
        .iter()
        .map(|s| (s.name.as_str(), s.weight))
        .collect()
}
