//! Mesh on Kubernetes: the CRDs and the manifests `mesh install` prints.

pub mod cni;
pub mod crds;
pub mod install;
pub mod issuer;
pub mod lease;
pub mod manifest;
pub mod review;
pub mod store;
pub mod watch;

use std::path::Path;

/// A client for the API server: from `kubeconfig` when given, otherwise
/// `KUBECONFIG`, `~/.kube/config` or the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!("no API server configured (--kubeconfig, KUBECONFIG, ~/.kube/config or in-cluster): {e}")
        })?,
    };
    kube::Client::try_from(config).map_err(|e| format!("cannot build the API client: {e}"))
}
