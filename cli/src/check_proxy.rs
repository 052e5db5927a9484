//! `mesh check --proxy [-n NS]`: every pod that should be meshed has an
//! injected proxy of the control plane's version, ready, whose service
//! account holds a valid SVID; pods that escaped injection (created while
//! the webhook was down, or before their namespace was labelled) are named
//! with the command that fixes them.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Pod},
    events::v1::Event,
};
use kube::{Api, Client, api::ListParams};
use mesh_control::{
    inject::{
        annotations::{self, EXCLUDED_NAMESPACES, INJECT, PROXY_VERSION, Switch},
        pod::{self, NamespaceMeta},
    },
    k8s::install::{CONFIG, NAMESPACE},
};
use serde_json::Value;

use crate::check::{Outcome, fail, pass};

/// The checks of the data plane in `namespace` (or every namespace).
pub(crate) async fn checks(client: &Client, namespace: Option<&str>) -> Vec<Outcome> {
    let mut out = Vec::new();
    let version = match Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE)
        .get_opt(CONFIG)
        .await
    {
        Ok(Some(cm)) => cm
            .data
            .and_then(|d| d.get("version").cloned())
            .unwrap_or_default(),
        Ok(None) => {
            out.push(fail(
                "control plane version",
                format!("ConfigMap {NAMESPACE}/{CONFIG} is missing"),
                "mesh install | kubectl apply -f -",
            ));
            return out;
        }
        Err(e) => {
            out.push(fail(
                "control plane version",
                e.to_string(),
                "check your access to configmaps in mesh-system",
            ));
            return out;
        }
    };
    let pods = match namespace {
        Some(ns) => {
            Api::<Pod>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await
        }
        None => {
            Api::<Pod>::all(client.clone())
                .list(&ListParams::default())
                .await
        }
    };
    let pods = match pods {
        Ok(list) => list.items,
        Err(e) => {
            out.push(fail(
                "can list pods",
                e.to_string(),
                "check your access to pods",
            ));
            return out;
        }
    };
    let namespaces: BTreeMap<String, NamespaceMeta> = match Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list
            .items
            .into_iter()
            .map(|ns| {
                let name = ns.metadata.name.clone().unwrap_or_default();
                let meta = NamespaceMeta {
                    name: name.clone(),
                    labels: ns.metadata.labels.unwrap_or_default(),
                    annotations: ns.metadata.annotations.unwrap_or_default(),
                };
                (name, meta)
            })
            .collect(),
        Err(e) => {
            out.push(fail(
                "can list namespaces",
                e.to_string(),
                "check your access to namespaces",
            ));
            return out;
        }
    };
    let mut healthy = 0;
    let mut identities: BTreeMap<(String, String), Result<(), String>> = BTreeMap::new();
    for p in &pods {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        if EXCLUDED_NAMESPACES.contains(&ns.as_str()) {
            continue;
        }
        let Ok(json) = serde_json::to_value(p) else {
            continue;
        };
        let what = format!("pod {ns}/{name}");
        let ns_meta = namespaces.get(&ns).cloned().unwrap_or_default();
        if !pod::is_injected(&json) {
            if let Some(why) = escaped(&ns_meta, &json) {
                out.push(fail(&what, why, fix(&json, &ns, &name)));
            }
            continue;
        }
        let running = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PROXY_VERSION));
        if running.map(String::as_str) != Some(version.as_str()) {
            out.push(fail(
                &what,
                format!(
                    "its proxy is version {}, the control plane {version}",
                    running.map_or("unknown", String::as_str)
                ),
                fix(&json, &ns, &name),
            ));
            continue;
        }
        if !proxy_ready(p) {
            out.push(fail(
                &what,
                "its proxy is not ready",
                format!("kubectl logs -n {ns} {name} -c {}", pod::PROXY),
            ));
            continue;
        }
        let sa = p
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let key = (ns.clone(), sa.clone());
        if !identities.contains_key(&key) {
            identities.insert(key.clone(), valid_svid(client, &ns, &sa).await);
        }
        if let Err(why) = &identities[&key] {
            out.push(fail(
                &what,
                why.clone(),
                format!("kubectl logs -n {ns} {name} -c {}", pod::PROXY),
            ));
            continue;
        }
        healthy += 1;
    }
    out.insert(
        0,
        pass(
            "meshed pods have a ready proxy of the control plane's version with a valid identity",
            format!("{healthy} pods, version {version}"),
        ),
    );
    out
}

/// Why a pod without a proxy should have one, if it should.
fn escaped(ns: &NamespaceMeta, pod: &Value) -> Option<String> {
    let meta = &pod["metadata"];
    let labels = pod::string_map(&meta["labels"]);
    let notes = pod::string_map(&meta["annotations"]);
    let pod_switch = annotations::switch(labels.as_ref(), notes.as_ref(), "pod").ok()?;
    let ns_switch =
        annotations::switch(Some(&ns.labels), Some(&ns.annotations), "namespace").ok()?;
    if pod_switch.or(ns_switch) != Some(Switch::Enabled) || pod["spec"]["hostNetwork"] == true {
        return None;
    }
    let labelled = |m: &Option<BTreeMap<String, String>>| {
        m.as_ref()
            .and_then(|m| m.get(INJECT))
            .is_some_and(|v| v == "enabled")
    };
    let ns_labelled = ns.labels.get(INJECT).is_some_and(|v| v == "enabled");
    if !labelled(&labels) && !ns_labelled {
        return Some(format!(
            "{INJECT}: enabled is an annotation only, and the webhook is called for labelled namespaces and pods; label namespace {} (kubectl label namespace {} {INJECT}=enabled) and recreate the pod",
            ns.name, ns.name
        ));
    }
    Some("should be meshed but has no proxy: it was created while the injection webhook was down or before injection was enabled".into())
}

/// The command that recreates the pod through the webhook.
fn fix(pod: &Value, ns: &str, name: &str) -> String {
    let owner = pod["metadata"]["ownerReferences"]
        .as_array()
        .and_then(|o| o.iter().find(|r| r["controller"] == true));
    match owner.map(|o| {
        (
            o["kind"].as_str().unwrap_or(""),
            o["name"].as_str().unwrap_or(""),
        )
    }) {
        Some(("ReplicaSet", rs)) => {
            // A Deployment's ReplicaSet is named <deployment>-<hash>.
            let deployment = rs.rsplit_once('-').map_or(rs, |(d, _)| d);
            format!("kubectl rollout restart deployment/{deployment} -n {ns}")
        }
        Some((kind @ ("StatefulSet" | "DaemonSet"), owner)) => {
            format!(
                "kubectl rollout restart {}/{owner} -n {ns}",
                kind.to_lowercase()
            )
        }
        Some(_) => format!("kubectl delete pod {name} -n {ns} (its controller recreates it)"),
        None => format!(
            "recreate it: kubectl get pod {name} -n {ns} -o yaml > pod.yaml; kubectl replace --force -f pod.yaml"
        ),
    }
}

fn proxy_ready(p: &Pod) -> bool {
    let status = p.status.as_ref();
    status
        .and_then(|s| s.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .chain(
            status
                .and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten(),
        )
        .any(|c| c.name == pod::PROXY && c.ready)
}

/// Whether the control plane issued an SVID to `ns/sa` that has not
/// expired (its audit Events: `reason: Issued`).
async fn valid_svid(client: &Client, ns: &str, sa: &str) -> Result<(), String> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("cannot read the SVID audit events: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let latest = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Issued"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(sa))
        .filter_map(|e| {
            e.note
                .as_deref()?
                .rsplit("notAfter unix ")
                .next()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .max();
    match latest {
        Some(not_after) if not_after > now => Ok(()),
        Some(_) => Err(format!("every SVID issued to {ns}/{sa} has expired")),
        None => Err(format!("no SVID was ever issued to {ns}/{sa}")),
    }
}
