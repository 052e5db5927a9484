//! `mesh-control`: the per-cluster control plane.
//!
//! What it does: issues SVIDs (Identity), tells proxies where services are
//! (Discovery) and what is allowed and how to route (Policy), and keeps the
//! registrations of workloads that announce themselves (Registry). Its
//! state lives in a watched directory plus an embedded database (the
//! `local` store) or in a Kubernetes API server (the `kube` store, [`k8s`]),
//! where it also serves the sidecar injection webhook ([`inject`]).
//!
//! What it does not do: sit in the request path.
//!
//! Shape: watch (config dir or API server, registrations) ->
//! [`index::Index`] (pure, tested without a network) -> serve (gRPC watch
//! streams re-render from the index when it changes).

pub mod admin_socket;
pub mod certify;
pub mod cli;
pub mod config;
pub mod index;
pub mod inject;
pub mod k8s;
pub mod metrics;
pub mod plane;
pub mod ratelimit;
pub mod resources;
pub mod services;
pub mod store;
#[cfg(feature = "test-util")]
pub mod test_util;
pub mod tokens;

pub use config::Config;
pub use plane::{ControlPlane, StartError};
