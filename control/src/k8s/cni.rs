//! `mesh install-cni`: the DaemonSet that puts `mesh-cni` on every node
//! (`mesh-cni install`: binary, kubeconfig, chained configuration) and the
//! read-only access to pods the plugin needs.

use serde_json::{Value, json};

use super::install::NAMESPACE;

/// The ServiceAccount, roles and DaemonSet name.
pub const NAME: &str = "mesh-cni";

/// Where the node keeps CNI binaries and configuration.
#[derive(Clone, Debug)]
pub struct CniValues {
    pub image: String,
    pub image_pull_policy: String,
    pub bin_dir: String,
    pub conf_dir: String,
}

/// The objects, in apply order.
pub fn objects(v: &CniValues) -> Vec<Value> {
    let labels = json!({ "app.kubernetes.io/part-of": "mesh", "app.kubernetes.io/name": NAME });
    let meta = |namespaced: bool| {
        let mut m = json!({ "name": NAME, "labels": labels });
        if namespaced {
            m["namespace"] = json!(NAMESPACE);
        }
        m
    };
    vec![
        json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(true) }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta(false),
            "rules": [{ "apiGroups": [""], "resources": ["pods"], "verbs": ["get"] }],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": meta(false),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME },
            "subjects": [{ "kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE }],
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta(true),
            "spec": {
                "selector": { "matchLabels": { "app.kubernetes.io/name": NAME } },
                "updateStrategy": { "rollingUpdate": { "maxUnavailable": 1 } },
                "template": {
                    "metadata": { "labels": labels },
                    "spec": {
                        "serviceAccountName": NAME,
                        "priorityClassName": "system-node-critical",
                        // Every node, whatever its taints: pods there need it.
                        "tolerations": [{ "operator": "Exists" }],
                        "terminationGracePeriodSeconds": 10,
                        "containers": [{
                            "name": "install-cni",
                            "image": v.image,
                            "imagePullPolicy": v.image_pull_policy,
                            "command": ["/usr/bin/mesh-cni", "install",
                                "--bin-dir", "/host/opt/cni/bin",
                                "--conf-dir", "/host/etc/cni/net.d",
                                "--host-conf-dir", v.conf_dir],
                            "resources": {
                                "requests": { "cpu": "10m", "memory": "16Mi" },
                                "limits": { "memory": "64Mi" },
                            },
                            // Writes the node's CNI directories; nothing else.
                            "securityContext": {
                                "runAsUser": 0, "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": { "drop": ["ALL"], "add": ["DAC_OVERRIDE", "CHOWN", "FOWNER"] },
                            },
                            "volumeMounts": [
                                { "name": "cni-bin", "mountPath": "/host/opt/cni/bin" },
                                { "name": "cni-conf", "mountPath": "/host/etc/cni/net.d" },
                            ],
                        }],
                        "volumes": [
                            { "name": "cni-bin", "hostPath": { "path": v.bin_dir, "type": "DirectoryOrCreate" } },
                            { "name": "cni-conf", "hostPath": { "path": v.conf_dir, "type": "DirectoryOrCreate" } },
                        ],
                    },
                },
            },
        }),
    ]
}
