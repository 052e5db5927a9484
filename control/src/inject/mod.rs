//! Sidecar injection on Kubernetes: which pods get the proxy
//! ([`annotations`], [`pod::decide`]), what it adds ([`pod::inject`]), the
//! admission webhook that applies it ([`webhook`]) and the writer's loop that
//! keeps the webhook's `caBundle` and the proxies' trust bundle in step
//! with the issuer ([`sync`]). `mesh inject --manual` renders with the same
//! code, so its output equals the webhook's.

pub mod annotations;
pub mod config;
pub mod pod;
pub mod sync;
pub mod webhook;

pub use config::{InjectConfig, ProxyValues};
