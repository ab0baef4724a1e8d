//! The domain: services, subsets, listen addresses and the plan types of a change.
//!
//! This is the bottom of the library. It knows nothing of YAML, Istio or BPF; every input
//! (the loader configuration, Istio objects, the fleet store) translates into these types,
//! and the state owner ([`crate::state`]) writes them into the kernel.
//!
//! - [`service`]: [`ServiceConfig`], [`SubsetConfig`], [`Listen`], the listen key and the
//!   rule that no two services share one;
//! - [`plan`]: what the kernel holds ([`ServiceView`]) and what a change wants
//!   ([`Desired`]), and what a change does to a service ([`Change::classify`]);
//! - [`rollout`]: progressive rollouts, their spec, state and pure decision logic;
//! - [`traffic_policy`]: connection limits and outlier detection per service and subset.

pub mod balance;
pub mod plan;
pub mod rollout;
pub mod service;
pub mod traffic_policy;

pub use balance::Balance;
pub use plan::{
    Annotation, Change, Desired, DesiredService, ServiceView, Weights, same_definition,
};
pub use service::{
    Listen, ListenClaims, ListenKey, ListenTaken, MAX_SERVICE_NAME, MAX_SUBSET_NAME, OwnerRule,
    PROTOCOL_FORMS, Protocol, ServiceConfig, SubsetConfig, parse_subset_addr,
    validate_service_name, validate_subset_name,
};
