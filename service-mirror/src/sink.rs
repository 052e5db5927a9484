//! Where mirrors go: a file per link in the local control plane's config
//! directory (`local` store), or `MirroredService` objects in the API
//! server (`kube` store).
//!
//! On Kubernetes every mirror carries the labels below; the mirror only
//! ever changes or deletes objects that carry them, so an object of the
//! same name that someone else made is left alone (and the mirror refused,
//! counted with reason `name_taken`). When a Link goes, its mirrors are
//! deleted by label; at start, mirrors of Links that no longer exist are
//! deleted too (a Link deleted while the mirror was down).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use mesh_control::resources::types::{
    self, Condition, LinkStatus, MirroredService, MirroredServiceSpec, Object,
};

use crate::metrics::{Metrics, RefusedLabels};

/// Label of the link a mirror came through.
pub const LINK_LABEL: &str = "multicluster.mesh.rs/link";
/// Label of everything the mirror manages.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "mesh-service-mirror");
const MANAGER: &str = "mesh-service-mirror";
/// The namespace Links live in.
const LINK_NAMESPACE: &str = "mesh-system";

#[derive(Clone)]
pub enum Sink {
    Dir(PathBuf),
    Kube(Client),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(d) => f.debug_tuple("Dir").field(d).finish(),
            Self::Kube(_) => f.write_str("Kube"),
        }
    }
}

fn selector(link: &str) -> String {
    format!("{}={},{LINK_LABEL}={link}", MANAGED_BY.0, MANAGED_BY.1)
}

fn ours(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|l| l.get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1))
}

impl Sink {
    /// Makes the mirrors of `link` exactly `mirrors`.
    pub async fn write(
        &self,
        link: &str,
        mirrors: &[Object<MirroredServiceSpec>],
        metrics: &Metrics,
    ) -> Result<(), String> {
        match self {
            Self::Dir(dir) => {
                let text = crate::validate::render(link, mirrors).map_err(|e| e.to_string())?;
                write_if_changed(&mirrors_file(dir, link), &text).map_err(|e| e.to_string())
            }
            Self::Kube(client) => reconcile(client, link, mirrors, metrics).await,
        }
    }

    /// Deletes every mirror of `link`.
    pub async fn remove(&self, link: &str) -> Result<(), String> {
        match self {
            Self::Dir(dir) => match std::fs::remove_file(mirrors_file(dir, link)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.to_string()),
            },
            Self::Kube(client) => {
                let api: Api<MirroredService> = Api::all(client.clone());
                let list = api
                    .list(&ListParams::default().labels(&selector(link)))
                    .await
                    .map_err(|e| e.to_string())?;
                for m in list.items {
                    delete(client, &m).await?;
                }
                Ok(())
            }
        }
    }

    /// At start: deletes mirrors whose Link is gone.
    pub async fn remove_orphans(&self) -> Result<(), String> {
        let Self::Kube(client) = self else {
            return Ok(());
        };
        let links: Api<types::Link> = Api::namespaced(client.clone(), LINK_NAMESPACE);
        let linked: BTreeSet<String> = links
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .map(|l| l.spec.cluster_name)
            .collect();
        let api: Api<MirroredService> = Api::all(client.clone());
        let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
        for m in api
            .list(&ListParams::default().labels(&managed))
            .await
            .map_err(|e| e.to_string())?
            .items
        {
            let link = m
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LINK_LABEL))
                .cloned()
                .unwrap_or_default();
            if !linked.contains(&link) {
                tracing::info!(link = %link, "the Link is gone; deleting its mirror {:?}", m.metadata.name);
                delete(client, &m).await?;
            }
        }
        Ok(())
    }

    /// Writes the Link's status: `Alive` and how many services it mirrors.
    pub async fn link_status(&self, link: &str, alive: bool, mirrored: usize) {
        let Self::Kube(client) = self else { return };
        let api: Api<types::Link> = Api::namespaced(client.clone(), LINK_NAMESPACE);
        // Links are named after their cluster (`mesh multicluster link`).
        let Ok(Some(object)) = api.get_opt(link).await else {
            return;
        };
        let (status, reason, message) = if alive {
            ("True", "GatewayAnswers", "the gateway answers probes")
        } else {
            (
                "False",
                "GatewayUnreachable",
                "the gateway does not answer probes",
            )
        };
        let current = object.status.as_ref();
        let same = current.is_some_and(|s| {
            s.mirrored_services == Some(mirrored as u32)
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Alive" && c.status == status)
        });
        if same {
            return;
        }
        let status = LinkStatus {
            conditions: vec![Condition {
                type_: "Alive".into(),
                status: status.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: object.metadata.generation,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ),
            }],
            mirrored_services: Some(u32::try_from(mirrored).unwrap_or(u32::MAX)),
        };
        let patch = serde_json::json!({ "status": status });
        if let Err(e) = api
            .patch_status(link, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(error = %e, "cannot write the status of Link {link}");
        }
    }
}

async fn delete(client: &Client, m: &MirroredService) -> Result<(), String> {
    let (Some(ns), Some(name)) = (&m.metadata.namespace, &m.metadata.name) else {
        return Ok(());
    };
    let api: Api<MirroredService> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(format!("cannot delete mirror {ns}/{name}: {e}")),
    }
}

async fn reconcile(
    client: &Client,
    link: &str,
    mirrors: &[Object<MirroredServiceSpec>],
    metrics: &Metrics,
) -> Result<(), String> {
    let all: Api<MirroredService> = Api::all(client.clone());
    let existing = all
        .list(&ListParams::default().labels(&selector(link)))
        .await
        .map_err(|e| e.to_string())?
        .items;
    let wanted: BTreeSet<(String, String)> = mirrors
        .iter()
        .map(|m| (m.metadata.namespace.clone(), m.metadata.name.clone()))
        .collect();
    for m in mirrors {
        let key = (m.metadata.namespace.clone(), m.metadata.name.clone());
        let api: Api<MirroredService> = Api::namespaced(client.clone(), &key.0);
        let current = existing.iter().find(|e| {
            e.metadata.namespace.as_ref() == Some(&key.0)
                && e.metadata.name.as_ref() == Some(&key.1)
        });
        if let Some(current) = current
            && current.spec == m.spec
        {
            continue;
        }
        if current.is_none()
            && let Ok(Some(other)) = api.get_opt(&key.1).await
            && !ours(&other.metadata)
        {
            metrics
                .exports_refused
                .get_or_create(&RefusedLabels {
                    cluster: link.to_owned(),
                    reason: "name_taken",
                })
                .inc();
            tracing::warn!(
                link,
                "not mirrored: {}/{} exists and was not made by the service mirror",
                key.0,
                key.1
            );
            continue;
        }
        let mut object = MirroredService::new(&key.1, m.spec.clone());
        object.metadata.namespace = Some(key.0.clone());
        object.metadata.labels = Some(BTreeMap::from([
            (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
            (LINK_LABEL.to_owned(), link.to_owned()),
        ]));
        api.patch(
            &key.1,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(|e| format!("cannot write mirror {}/{}: {e}", key.0, key.1))?;
    }
    for stale in existing.iter().filter(|e| {
        !wanted.contains(&(
            e.metadata.namespace.clone().unwrap_or_default(),
            e.metadata.name.clone().unwrap_or_default(),
        ))
    }) {
        delete(client, stale).await?;
    }
    Ok(())
}

/// The mirrors file of link `cluster` in a config directory.
pub fn mirrors_file(config_dir: &Path, cluster: &str) -> PathBuf {
    config_dir.join(format!("mirror-{cluster}.yaml"))
}

/// Writes `text` to `path` only when it differs, through a temporary file.
pub fn write_if_changed(path: &Path, text: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
