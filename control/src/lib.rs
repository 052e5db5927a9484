//! `mesh-control`: the per-cluster control plane.
//!
//! What it does: issues SVIDs (Identity), tells proxies where services are
//! (Discovery) and what is allowed and how to route (Policy), and keeps the
//! registrations of workloads that announce themselves (Registry). It reads
//! configuration resources from a watched directory and keeps durable state
//! in an embedded database (the `local` store).
//!
//! What it does not do: sit in the request path, or talk to Kubernetes (the
//! `kube` store comes later behind the same [`store::Store`] interface).
//!
//! Shape: watch (config dir, registrations) -> [`index::Index`] (pure,
//! tested without a network) -> serve (gRPC watch streams re-render from the
//! index when it changes).

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
