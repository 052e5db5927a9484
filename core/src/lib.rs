//! `mesh-core`: the ground every Mesh component stands on.
//!
//! What it does: SPIFFE IDs and trust domains; the per-trust-domain
//! certificate authority (root, issuer, CSR signing); trust bundles in the
//! SPIFFE bundle format and PEM; verification of peer X.509-SVID chains; and
//! TLS 1.3 rustls configs that authenticate both sides by SPIFFE ID with
//! credentials that rotate in place. It fixes the one crypto provider
//! (aws-lc-rs) for the workspace. It also decides when a component gives
//! free memory back to the kernel after a burst of connections (`memory`)
//! and drops its resident pages of code that ran only to start
//! (`code_pages`), through the workspace's only `unsafe` calls (`sys`).
//!
//! What it does not do: open sockets, serve APIs, or read the environment.
//! Those belong to the binaries and the component crates.

pub mod admin;
pub mod api;
pub mod code_pages;
pub mod crypto;
pub mod grpc;
pub mod identity;
pub mod memory;
pub mod metrics_text;
pub mod names;
pub mod shutdown;
pub mod sys;
pub mod targets;
pub mod telemetry;
pub mod unix_socket;
