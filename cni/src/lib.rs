//! `mesh-cni`: a CNI 1.0 plugin, chained after the cluster's own network
//! plugin, that applies the proxy's interception rules (`mesh proxy init`)
//! inside each meshed pod's network namespace, so app pods need no
//! `NET_ADMIN` init container (`mesh install --cni-enabled`).
//!
//! What it does: ADD applies the rules when the pod carries the injected
//! proxy (read from the API server) and passes `prevResult` on; DEL removes
//! them; CHECK reports drift; VERSION lists the versions. `mesh-cni
//! install` (the DaemonSet `mesh install-cni` prints) puts the binary and
//! its entry in the node's CNI configuration.
//!
//! What it does not do: set up interfaces or addresses (the primary plugin
//! does), or touch pods without the proxy.

pub mod installer;
pub mod plugin;
pub mod protocol;
