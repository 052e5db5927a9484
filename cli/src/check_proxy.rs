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
        annotations::{EXCLUDED_NAMESPACES, INJECT, PROXY_VERSION},
        pod::{self, Decision, NamespaceMeta},
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
    // The SVID audit events, read once per namespace.
    let mut issued: BTreeMap<String, Result<BTreeMap<String, u64>, String>> = BTreeMap::new();
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
        if !issued.contains_key(&ns) {
            issued.insert(ns.clone(), latest_svids(client, &ns).await);
        }
        if let Err(why) = valid_svid(&issued[&ns], &ns, &sa) {
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
    // The webhook's own decision: would it inject this pod?
    if pod::decide(ns, pod) != Ok(Decision::Inject) {
        return None;
    }
    let labelled = |labels: Option<BTreeMap<String, String>>| {
        labels
            .and_then(|m| m.get(INJECT).cloned())
            .is_some_and(|v| v == "enabled")
    };
    if !labelled(pod::string_map(&pod["metadata"]["labels"])) && !labelled(Some(ns.labels.clone()))
    {
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

/// The latest `notAfter` of the SVIDs the control plane issued to each
/// ServiceAccount of `ns` (its audit Events: `reason: Issued`).
async fn latest_svids(client: &Client, ns: &str) -> Result<BTreeMap<String, u64>, String> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("cannot read the SVID audit events: {e}"))?;
    let mut latest = BTreeMap::new();
    for e in events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Issued"))
    {
        let sa = e.regarding.as_ref().and_then(|r| r.name.clone());
        let not_after = e
            .note
            .as_deref()
            .and_then(|n| n.rsplit("notAfter unix ").next())
            .and_then(|t| t.trim().parse::<u64>().ok());
        if let (Some(sa), Some(not_after)) = (sa, not_after) {
            let at: &mut u64 = latest.entry(sa).or_default();
            *at = (*at).max(not_after);
        }
    }
    Ok(latest)
}

/// Whether `ns/sa` holds an SVID that has not expired.
fn valid_svid(
    issued: &Result<BTreeMap<String, u64>, String>,
    ns: &str,
    sa: &str,
) -> Result<(), String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match issued.as_ref().map_err(Clone::clone)?.get(sa) {
        Some(not_after) if *not_after > now => Ok(()),
        Some(_) => Err(format!("every SVID issued to {ns}/{sa} has expired")),
        None => Err(format!("no SVID was ever issued to {ns}/{sa}")),
    }
}
