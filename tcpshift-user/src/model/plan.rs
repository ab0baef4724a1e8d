//! What the kernel holds and what a change wants: the plan types shared by every way in
//! (loader configuration, `tcpshiftctl apply`, set-weight, the fleet store).

use serde::Serialize;

use super::service::ServiceConfig;

/// How `State::apply` treats the weights of a service that already exists unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Write the configuration's weights.
    FromConfig,
    /// Keep the weights in the kernel (a restarted loader must not reset a shift in progress).
    KeepExisting,
}

/// What `State::apply` did to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// The service was added.
    Created,
    /// Its listen address or subsets changed.
    Redefined,
    /// Same definition, new weights.
    Reweighted,
    /// Nothing changed.
    Unchanged,
}

/// A service as the kernel maps hold it (see `State::services`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    /// Internal id (slot base in the maps).
    pub id: u32,
    /// Name, listen address, subsets and their current weights.
    pub config: ServiceConfig,
    /// Per subset, in order: whether a live listening socket is registered.
    pub live: Vec<bool>,
    /// Text stored with the service by `State::apply_with` (`tcpshiftctl apply` keeps
    /// the Istio VirtualService the service was routed by there); never read by the data path.
    pub annotation: Option<String>,
}

/// What `State::apply_with` does with a service's annotation (at most `MAX_ANNOTATION`
/// bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Annotation {
    /// Leave it as it is (a new service gets none).
    Keep,
    /// Replace it.
    Set(String),
    /// Remove it.
    Clear,
}

/// One service as a change wants it (see `State::apply_with`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// The complete definition, weights included.
    pub config: ServiceConfig,
    /// What to do with its annotation.
    pub annotation: Annotation,
}

/// What a change wants (see `State::apply_with`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Services to create or change; services not named are left alone.
    pub services: Vec<DesiredService>,
    /// Other services whose annotation is removed.
    pub clear_annotations: Vec<String>,
}
