//! The writer keeps two copies of the trust roots in step with the issuer
//! the control plane loaded: the webhook configuration's `caBundle` (the
//! root that signs the webhook's serving certificate) and `mesh-config`'s
//! `bundle.json` (what injected proxies start with). It checks at start,
//! whenever it becomes the writer, and every 30 s; it patches only what
//! differs.

use std::{path::PathBuf, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::ConfigMap},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::watch;

use super::config::BUNDLE_KEY;
use crate::k8s::install::{CONFIG, NAMESPACE, WEBHOOK};

const EVERY: Duration = Duration::from_secs(30);

/// Runs while the process does; acts only while `leader` is true.
pub async fn keep_in_step(client: Client, ca_dir: PathBuf, mut leader: watch::Receiver<bool>) {
    loop {
        if *leader.borrow_and_update()
            && let Err(e) = once(&client, &ca_dir).await
        {
            tracing::warn!(error = %e, "cannot bring the webhook caBundle and mesh-config up to date; retrying in 30 s");
        }
        tokio::select! {
            _ = leader.changed() => {}
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

async fn once(client: &Client, ca_dir: &std::path::Path) -> Result<(), String> {
    let files = mesh_core::identity::files::ROOT_CERT;
    let root = std::fs::read(ca_dir.join(files)).map_err(|e| format!("{files}: {e}"))?;
    let bundle = std::fs::read_to_string(ca_dir.join(mesh_core::identity::files::BUNDLE))
        .map_err(|e| format!("bundle: {e}"))?;
    let params = PatchParams::default();

    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    if let Some(config) = hooks.get_opt(WEBHOOK).await.map_err(|e| e.to_string())? {
        let webhooks = config.webhooks.unwrap_or_default();
        let stale: Vec<usize> = webhooks
            .iter()
            .enumerate()
            .filter(|(_, w)| w.client_config.ca_bundle.as_ref().map(|b| &b.0) != Some(&root))
            .map(|(i, _)| i)
            .collect();
        if !stale.is_empty() {
            let ops: Vec<serde_json::Value> = stale
                .iter()
                .map(|i| json!({ "op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": ByteString(root.clone()) }))
                .collect();
            let patch: json_patch::Patch =
                serde_json::from_value(json!(ops)).map_err(|e| e.to_string())?;
            hooks
                .patch(WEBHOOK, &params, &Patch::Json::<()>(patch))
                .await
                .map_err(|e| format!("patch {WEBHOOK}: {e}"))?;
            tracing::info!(
                webhooks = stale.len(),
                "webhook caBundle updated to the current root"
            );
        }
    }
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    if let Some(cm) = maps.get_opt(CONFIG).await.map_err(|e| e.to_string())? {
        let current = cm.data.as_ref().and_then(|d| d.get(BUNDLE_KEY));
        if current != Some(&bundle) {
            let patch = json!({ "data": { BUNDLE_KEY: bundle } });
            maps.patch(CONFIG, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| format!("patch ConfigMap {CONFIG}: {e}"))?;
            tracing::info!("mesh-config trust bundle updated");
        }
    }
    Ok(())
}
