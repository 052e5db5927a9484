//! `mesh-proxy`: the sidecar data plane.
//!
//! What it does: gets and renews its SVID and registers its workload; the
//! inbound side (mTLS termination, authorization against the control
//! plane's policy, `mesh-client-id`, forwarding to the app, opaque TCP);
//! the outbound side, explicit or transparent (protocol detection,
//! discovery, HTTPRoutes, p2c/peak-EWMA balancing with failure accrual,
//! mTLS to the identity discovery gave; opaque TCP and HTTP/1.1 upgrades
//! such as WebSocket on connections of their own); limits, drain,
//! `/metrics`, `/tap`.

pub mod cli;
pub mod detect;
pub mod dns;
pub mod env;
pub mod follow;
pub mod h2_client;
pub mod head;
pub mod hold;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod outbound;
pub mod probe;
pub mod proxy;
pub mod register;
pub mod trust;
pub mod upgrade;
pub mod wire;

pub use env::{Config, TrustAnchors};
pub use proxy::{Extras, Proxy, StartError};

/// The maps looked up on every request (by destination, by port): keyed
/// with foldhash, seeded per process. Their keys come from the local app
/// or the control plane and are capped in number
/// ([`env::DestinationLimits`]).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set kind of [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
