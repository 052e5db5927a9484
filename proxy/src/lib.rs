//! `mesh-proxy`: the sidecar data plane.
//!
//! What it does today: gets and renews its SVID, registers its workload,
//! and serves the inbound side (mTLS termination, authorization against
//! the control plane's policy, `mesh-client-id`, forwarding to the app).
//!
//! Not yet: the outbound side (discovery, balancing, retries), protocol
//! detection, transparent interception and the benchmark; see
//! `ARCHITECTURE.md`.

pub mod cli;
pub mod env;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod proxy;
pub mod register;

pub use env::Config;
pub use proxy::{Proxy, StartError};
