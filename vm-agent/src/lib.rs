//! `mesh-vm-agent`: brings a VM or bare-metal host into the mesh.
//!
//! What it does: `join` turns a join string into a SPIFFE identity (the
//! cluster's trust bundle checked against the string's pin, then a
//! single-use token), writes the config and keys and starts the systemd
//! unit; `run` keeps the identity (on disk, renewed at half life,
//! re-enrolled with the enrollment key when it expired while the control
//! plane was away), runs the sidecar proxy in process, registers the VM
//! with health from its checks, and serves the SPIFFE Workload API to the
//! VM's apps; `leave` undoes `join`.
//!
//! It also serves DNS for mesh names, captures the app's traffic
//! transparently when asked (iptables for the app's users and ports only),
//! and reaches the cluster through its gateway when that is the VM's only
//! route.
//!
//! What it does not do yet: JWT-SVIDs.

pub mod agent;
pub mod capture;
pub mod cli;
pub mod config;
pub mod dns;
pub mod health;
pub mod join;
pub mod join_string;
pub mod systemd;
pub mod uds;
pub mod via_gateway;
pub mod workload_api;

pub use agent::Agent;
pub use config::AgentConfig;
pub use join_string::JoinString;
