//! What a cluster's viz needs in a run: its resources (an exported Service
//! that only linked clusters' viz may call) and its Prometheus'
//! configuration (every admin endpoint of the cluster, labelled with what
//! viz groups by). Both are documents built with a serializer.

use serde_json::{Value, json};

use super::ClusterInfo;

/// The viz resources, one document per file name: `callers` are the trust
/// domains of the clusters that link to this one, whose viz may ask it.
pub(super) fn resources(callers: &[&str]) -> Vec<(&'static str, Value)> {
    let port = mesh_viz::federate::VIZ_PORT;
    let meta = |name: &str| json!({ "name": name, "namespace": "mesh-system" });
    let mut docs = vec![
        (
            "viz-service.yaml",
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "viz",
                    "namespace": "mesh-system",
                    "labels": { "multicluster.mesh.rs/exported": "true" },
                },
                "spec": {
                    "selector": { "app": "viz" },
                    "ports": [{ "name": "http", "port": port, "appProtocol": "http" }],
                },
            }),
        ),
        // A Server with no policy admits nobody: only what follows may call.
        (
            "viz-server.yaml",
            json!({
                "apiVersion": "policy.mesh.rs/v1alpha1",
                "kind": "Server",
                "metadata": meta("viz-api"),
                "spec": { "podSelector": { "matchLabels": { "app": "viz" } }, "port": port },
            }),
        ),
    ];
    if !callers.is_empty() {
        let ids: Vec<String> = callers
            .iter()
            .map(|td| format!("spiffe://{td}/ns/mesh-system/sa/viz"))
            .collect();
        docs.push((
            "viz-callers.yaml",
            json!({
                "apiVersion": "policy.mesh.rs/v1alpha1",
                "kind": "MeshTLSAuthentication",
                "metadata": meta("viz-of-linked-clusters"),
                "spec": { "identities": ids },
            }),
        ));
        docs.push((
            "viz-policy.yaml",
            json!({
                "apiVersion": "policy.mesh.rs/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": meta("viz-from-linked-clusters"),
                "spec": {
                    "targetRef": { "kind": "Server", "name": "viz-api" },
                    "requiredAuthenticationRefs": [
                        { "kind": "MeshTLSAuthentication", "name": "viz-of-linked-clusters" }
                    ],
                },
            }),
        ));
    }
    docs
}

/// Prometheus' configuration for cluster `c`: its control plane, gateway,
/// mirror and every proxy (VM agents included), scraped every 2 s.
pub(super) fn prometheus_config(c: &ClusterInfo) -> Value {
    let target =
        |addr: std::net::SocketAddr, component: &str, ns: &str, deploy: &str, pod: &str| {
            json!({
                "targets": [addr.to_string()],
                "labels": {
                    "mesh_cluster": c.name,
                    "mesh_component": component,
                    "mesh_namespace": ns,
                    "mesh_deployment": deploy,
                    "mesh_pod": pod,
                },
            })
        };
    let mut targets = vec![target(
        c.control_admin,
        "control",
        "mesh-system",
        "control",
        "control",
    )];
    if let Some(a) = c.gateway_admin {
        targets.push(target(a, "gateway", "mesh-system", "gateway", "gateway"));
    }
    if let Some(a) = c.mirror_admin {
        targets.push(target(
            a,
            "service-mirror",
            "mesh-system",
            "service-mirror",
            "service-mirror",
        ));
    }
    for r in &c.replicas {
        targets.push(target(
            r.proxy_admin,
            "proxy",
            &r.namespace,
            &r.workload,
            &r.name,
        ));
    }
    json!({
        "global": { "scrape_interval": "2s", "scrape_timeout": "1s" },
        "scrape_configs": [{ "job_name": "mesh", "static_configs": targets }],
    })
}
