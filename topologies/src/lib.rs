//! `mesh-topologies`: whole federated meshes on one machine.
//!
//! What it does: reads topology files ([`schema`]), runs them as real local
//! processes with per-cluster loopback ranges ([`runner`]), shows what the
//! mesh sees while they run ([`view`]), and provides the demo workloads
//! they run ([`demo`]). `mesh up`, `mesh down` and `mesh status` are in
//! [`cli`]; the end-to-end tests drive [`runner::Run`] directly.
//!
//! What it does not do: carry traffic itself. Every component is the `mesh`
//! binary run as a separate process, exactly as a user would run it.

pub mod cli;
pub mod demo;
pub mod netns;
pub mod runner;
pub mod schema;
pub mod view;

pub use runner::{Options, Run, RunRecord};
pub use schema::Topology;
