//! `mesh-gateway`: the cross-cluster entry. Linked clusters' proxies open a
//! tunnel (mTLS, TCP; one HTTP/2 `CONNECT` per stream) and the gateway
//! splices each stream to a ready endpoint of an exported service, without
//! decrypting it. The same tunnel runs over QUIC on the same port (UDP;
//! `quic.rs`). Built from `mesh-proxy`'s identity and watch code. It also
//! carries this cluster's VMs that have no other route to it (`behind.rs`).

pub mod behind;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod metrics;
pub mod quic;
pub mod tunnel;

pub use config::GatewayArgs;
pub use gateway::{Gateway, StartError};
