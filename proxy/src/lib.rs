//! `mesh-proxy`: the sidecar data plane.
//!
//! What it does today: gets and renews its SVID, registers its workload,
//! serves the inbound side (mTLS termination, authorization against the
//! control plane's policy, `mesh-client-id`, forwarding to the app), and
//! the outbound side in explicit mode (discovery, p2c/peak-EWMA balancing,
//! mTLS to the endpoint identity discovery gave, HTTP/1 over HTTP/2).
//!
//! Not yet: transparent interception, protocol detection, routes
//! (timeouts, retries, splits), failure accrual, opaque TCP between
//! proxies, hardening limits and the benchmark; see `ARCHITECTURE.md`.

pub mod cli;
pub mod detect;
pub mod env;
pub mod follow;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod outbound;
pub mod proxy;
pub mod register;

pub use env::Config;
pub use proxy::{Proxy, StartError};
