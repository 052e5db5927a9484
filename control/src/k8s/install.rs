//! `mesh install`: the control plane as Kubernetes objects, from settings
//! an operator may change (`--set`, `--values`) over documented defaults.
//! Same settings and CA, same bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    crds::PART_OF,
    manifest::{self, ManifestError},
};
use crate::inject::{InjectConfig, ProxyValues, annotations};

/// The namespace everything of the control plane lives in.
pub const NAMESPACE: &str = "mesh-system";
/// Its ServiceAccount, Deployment, Service and RBAC roles.
pub const CONTROL: &str = "mesh-control";
/// The Secret holding the issuer (`issuer.crt`, `issuer.key`, `bundle.json`).
pub const ISSUER_SECRET: &str = "mesh-issuer";
/// The gateway's and the service mirror's ServiceAccounts (their SPIFFE
/// IDs: `ns/mesh-system/sa/gateway`, `ns/mesh-system/sa/service-mirror`).
pub const GATEWAY: &str = "gateway";
pub const SERVICE_MIRROR: &str = "service-mirror";
/// The ConfigMap recording what was installed.
pub const CONFIG: &str = "mesh-config";
/// The Lease the writer among the replicas holds.
pub const LEASE: &str = "mesh-control";
/// The MutatingWebhookConfiguration of sidecar injection.
pub const WEBHOOK: &str = "mesh-proxy-injector";
/// The webhook's port in the control plane's pods.
pub const WEBHOOK_PORT: u16 = 8443;

/// Settings an operator changes. Every field has a default; unknown keys are
/// refused naming the key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Values {
    /// This cluster's name (mirrors elsewhere are named `<svc>-<cluster>`).
    pub cluster: String,
    /// The trust domain; when a CA is given it must be the CA's.
    pub trust_domain: String,
    pub image: String,
    pub image_pull_policy: String,
    pub replicas: u32,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: String,
    pub resources: Resources,
    /// What injection gives each meshed pod (`--set proxy.logLevel=debug`).
    pub proxy: ProxyValues,
    /// The CNI plugin (`mesh install-cni`) sets up interception, so
    /// injection adds no privileged `mesh-init` container.
    pub cni_enabled: bool,
    /// `Fail` (a pod that should be meshed never starts without its
    /// proxy) or `Ignore`.
    pub webhook_failure_policy: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    pub requests: Quantities,
    pub limits: Quantities,
}

/// Kubernetes quantities; empty means unset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quantities {
    #[serde(default)]
    pub cpu: String,
    #[serde(default)]
    pub memory: String,
}

impl Default for Values {
    fn default() -> Self {
        Self {
            cluster: "cluster".into(),
            trust_domain: "cluster.local".into(),
            image: format!("ghcr.io/mesh-rs/mesh:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            replicas: 1,
            log_level: "info".into(),
            resources: Resources {
                requests: Quantities {
                    cpu: "100m".into(),
                    memory: "64Mi".into(),
                },
                limits: Quantities {
                    cpu: String::new(),
                    memory: "512Mi".into(),
                },
            },
            proxy: ProxyValues::default(),
            cni_enabled: false,
            webhook_failure_policy: "Fail".into(),
        }
    }
}

/// Why the settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum ValuesError {
    #[error("--set {0:?}: write KEY=VALUE, e.g. --set replicas=3")]
    NotKeyValue(String),
    #[error("--values {file}: {reason}")]
    File { file: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl Values {
    /// The defaults, then each values file, then each `--set` in order;
    /// `ha` sets 3 replicas unless `replicas` is set.
    pub fn build(
        files: &[(String, String)],
        sets: &[String],
        ha: bool,
    ) -> Result<Self, ValuesError> {
        let mut tree = serde_json::to_value(Self::default())
            .map_err(|e| ValuesError::Invalid(e.to_string()))?;
        if ha {
            tree["replicas"] = json!(3);
        }
        for (file, text) in files {
            let overlay: Value = serde_saphyr::from_str(text).map_err(|e| ValuesError::File {
                file: file.clone(),
                reason: e.to_string(),
            })?;
            merge(&mut tree, overlay);
        }
        for set in sets {
            let (key, value) = set
                .split_once('=')
                .ok_or_else(|| ValuesError::NotKeyValue(set.clone()))?;
            let mut at = &mut tree;
            for part in key.split('.') {
                let Some(object) = at.as_object_mut() else {
                    return Err(ValuesError::Invalid(format!(
                        "--set {key}: {part:?} is inside a value that is not a map"
                    )));
                };
                at = object.entry(part.to_owned()).or_insert(Value::Null);
            }
            // Numbers and booleans keep their type (replicas=3,
            // cniEnabled=true); everything else is a string.
            *at = match value {
                "true" => Value::from(true),
                "false" => Value::from(false),
                _ => value
                    .parse::<u64>()
                    .map(Value::from)
                    .unwrap_or_else(|_| Value::from(value)),
            };
        }
        let values: Self = serde_json::from_value(tree).map_err(|e| {
            ValuesError::Invalid(format!(
                "{e}; known settings: cluster, trustDomain, image, imagePullPolicy, replicas, logLevel, resources.requests.cpu, resources.requests.memory, resources.limits.cpu, resources.limits.memory, cniEnabled, webhookFailurePolicy, proxy.image, proxy.logLevel, proxy.cpuRequest, proxy.cpuLimit, proxy.memoryRequest, proxy.memoryLimit, proxy.uid, proxy.await, proxy.nativeSidecar, proxy.shutdownGrace"
            ))
        })?;
        values.check()?;
        Ok(values)
    }

    fn check(&self) -> Result<(), ValuesError> {
        crate::resources::parse::check_name("cluster", &self.cluster)
            .map_err(ValuesError::Invalid)?;
        mesh_core::identity::TrustDomain::parse(&self.trust_domain)
            .map_err(|e| ValuesError::Invalid(format!("trustDomain: {e}")))?;
        if self.replicas == 0 || self.replicas > 7 {
            return Err(ValuesError::Invalid(format!(
                "replicas {} is not 1-7",
                self.replicas
            )));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log_level.as_str()) {
            return Err(ValuesError::Invalid(format!(
                "logLevel {:?}: use error, warn, info, debug or trace",
                self.log_level
            )));
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            return Err(ValuesError::Invalid(format!(
                "imagePullPolicy {:?}: use Always, IfNotPresent or Never",
                self.image_pull_policy
            )));
        }
        if !["Fail", "Ignore"].contains(&self.webhook_failure_policy.as_str()) {
            return Err(ValuesError::Invalid(format!(
                "webhookFailurePolicy {:?}: use Fail or Ignore",
                self.webhook_failure_policy
            )));
        }
        // The proxy settings are checked as their annotations are.
        let p = &self.proxy;
        let mut annotations = BTreeMap::new();
        for (key, value) in [
            ("proxy-log-level", &p.log_level),
            ("shutdown-grace", &p.shutdown_grace),
        ]
        .into_iter()
        .chain(
            [
                ("proxy-cpu-request", &p.cpu_request),
                ("proxy-cpu-limit", &p.cpu_limit),
                ("proxy-memory-request", &p.memory_request),
                ("proxy-memory-limit", &p.memory_limit),
                ("proxy-image", &p.image),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty()),
        ) {
            annotations.insert(
                format!("{}{key}", annotations::CONFIG_PREFIX),
                value.clone(),
            );
        }
        if let Err(errors) = annotations::overrides(p, Some(&annotations)) {
            return Err(ValuesError::Invalid(
                errors
                    .join("; ")
                    .replace("annotation config.mesh.rs/", "proxy setting "),
            ));
        }
        if self.image.is_empty() || self.image.chars().any(char::is_whitespace) {
            return Err(ValuesError::Invalid(format!(
                "image {:?} is not an image reference",
                self.image
            )));
        }
        Ok(())
    }
}

fn merge(into: &mut Value, overlay: Value) {
    match (into, overlay) {
        (Value::Object(into), Value::Object(overlay)) => {
            for (k, v) in overlay {
                merge(into.entry(k).or_insert(Value::Null), v);
            }
        }
        (into, overlay) => *into = overlay,
    }
}

/// The issuer's files, read from a CA directory, for the Secret.
#[derive(Clone, Debug)]
pub struct IssuerFiles {
    pub root_crt: String,
    pub issuer_crt: String,
    pub issuer_key: String,
    pub bundle_json: String,
}

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (PART_OF.0.to_owned(), PART_OF.1.to_owned()),
        ("app.kubernetes.io/name".to_owned(), component.to_owned()),
    ])
}

fn metadata(name: &str, component: &str, namespaced: bool) -> Value {
    let mut m = json!({ "name": name, "labels": labels(component) });
    if namespaced {
        m["namespace"] = json!(NAMESPACE);
    }
    m
}

fn quantities(q: &Quantities) -> Value {
    let mut out = serde_json::Map::new();
    if !q.cpu.is_empty() {
        out.insert("cpu".into(), json!(q.cpu));
    }
    if !q.memory.is_empty() {
        out.insert("memory".into(), json!(q.memory));
    }
    Value::Object(out)
}

/// The RBAC rules of the control plane across the cluster: read what
/// discovery and policy need, write only its own kinds.
fn cluster_rules() -> Value {
    let read = json!(["get", "list", "watch"]);
    let write = json!([
        "get", "list", "watch", "create", "update", "patch", "delete"
    ]);
    let status = json!(["get", "update", "patch"]);
    json!([
        { "apiGroups": [""], "resources": ["services", "pods", "namespaces", "serviceaccounts"], "verbs": read },
        { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read },
        { "apiGroups": ["policy.mesh.rs"], "resources": ["servers", "authorizationpolicies", "meshtlsauthentications", "httproutes"], "verbs": read },
        { "apiGroups": ["policy.mesh.rs"], "resources": ["servers/status"], "verbs": status },
        { "apiGroups": ["multicluster.mesh.rs"], "resources": ["links", "failoverpolicies"], "verbs": read },
        { "apiGroups": ["multicluster.mesh.rs"], "resources": ["links/status"], "verbs": status },
        { "apiGroups": ["multicluster.mesh.rs"], "resources": ["mirroredservices"], "verbs": write },
        { "apiGroups": ["workload.mesh.rs"], "resources": ["externalworkloads"], "verbs": write },
        { "apiGroups": ["workload.mesh.rs"], "resources": ["externalworkloads/status"], "verbs": status },
        { "apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"] },
        // Keeps the injection webhook's caBundle at the current root.
        { "apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"], "resourceNames": [WEBHOOK], "verbs": ["get", "patch"] },
        // The audit trail of issued SVIDs.
        { "apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"] },
    ])
}

/// In its own namespace only: the issuer and join-token Secrets, and the
/// Lease.
fn namespace_rules() -> Value {
    json!([
        { "apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"] },
        { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "watch", "create", "update", "patch"] },
        // mesh-config: what injection renders, and the trust bundle.
        { "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "patch"] },
    ])
}

/// The control plane's objects, in apply order.
pub fn objects(values: &Values, issuer: Option<&IssuerFiles>) -> Vec<Value> {
    let mut docs = vec![
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": NAMESPACE, "labels": labels("mesh") },
        }),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": metadata(CONTROL, CONTROL, true),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": metadata(CONTROL, CONTROL, false),
            "rules": cluster_rules(),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": metadata(CONTROL, CONTROL, false),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROL },
            "subjects": [{ "kind": "ServiceAccount", "name": CONTROL, "namespace": NAMESPACE }],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": metadata(CONTROL, CONTROL, true),
            "rules": namespace_rules(),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": metadata(CONTROL, CONTROL, true),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROL },
            "subjects": [{ "kind": "ServiceAccount", "name": CONTROL, "namespace": NAMESPACE }],
        }),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": metadata(GATEWAY, GATEWAY, true),
        }),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": metadata(SERVICE_MIRROR, SERVICE_MIRROR, true),
        }),
        // The service mirror writes mirrors and Link status, nothing else.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": metadata(SERVICE_MIRROR, SERVICE_MIRROR, false),
            "rules": [
                { "apiGroups": ["multicluster.mesh.rs"], "resources": ["mirroredservices"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"] },
                { "apiGroups": ["multicluster.mesh.rs"], "resources": ["links"], "verbs": ["get", "list", "watch"] },
                { "apiGroups": ["multicluster.mesh.rs"], "resources": ["links/status"], "verbs": ["get", "update", "patch"] },
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": metadata(SERVICE_MIRROR, SERVICE_MIRROR, false),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SERVICE_MIRROR },
            "subjects": [{ "kind": "ServiceAccount", "name": SERVICE_MIRROR, "namespace": NAMESPACE }],
        }),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(CONFIG, CONTROL, true),
            "data": config_data(values, issuer),
        }),
    ];
    if let Some(issuer) = issuer {
        docs.push(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": metadata(ISSUER_SECRET, CONTROL, true),
            "type": "Opaque",
            "stringData": {
                "root.crt": issuer.root_crt,
                "issuer.crt": issuer.issuer_crt,
                "issuer.key": issuer.issuer_key,
                "bundle.json": issuer.bundle_json,
            },
        }));
    }
    let selector = json!({ "app.kubernetes.io/name": CONTROL });
    let mut pod_spec = json!({
        "serviceAccountName": CONTROL,
        "securityContext": {
            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "containers": [{
            "name": "control",
            "image": values.image,
            "imagePullPolicy": values.image_pull_policy,
            "args": [
                "control", "--store", "kube",
                "--cluster", values.cluster,
                "--ca-secret", format!("{NAMESPACE}/{ISSUER_SECRET}"),
                "--data-dir", "/var/run/mesh",
                "--identity-addr", "0.0.0.0:8080",
                "--api-addr", "0.0.0.0:8086",
                "--webhook-addr", format!("0.0.0.0:{WEBHOOK_PORT}"),
                "--metrics-addr", format!("0.0.0.0:{}", crate::inject::pod::METRICS_PORT),
            ],
            "env": [
                { "name": "RUST_LOG", "value": values.log_level },
                { "name": "MESH_CONTROL_POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
            ],
            "ports": [
                { "name": "identity", "containerPort": 8080, "protocol": "TCP" },
                { "name": "api", "containerPort": 8086, "protocol": "TCP" },
                { "name": "webhook", "containerPort": WEBHOOK_PORT, "protocol": "TCP" },
                { "name": crate::inject::pod::METRICS_PORT_NAME, "containerPort": crate::inject::pod::METRICS_PORT, "protocol": "TCP" },
            ],
            "readinessProbe": { "tcpSocket": { "port": "api" }, "periodSeconds": 2, "failureThreshold": 2 },
            "livenessProbe": { "tcpSocket": { "port": "identity" }, "periodSeconds": 10, "failureThreshold": 3 },
            "resources": {
                "requests": quantities(&values.resources.requests),
                "limits": quantities(&values.resources.limits),
            },
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": { "drop": ["ALL"] },
            },
            "volumeMounts": [{ "name": "data", "mountPath": "/var/run/mesh" }],
        }],
        // The issuer files written from the Secret and the admin socket.
        "volumes": [{ "name": "data", "emptyDir": { "medium": "Memory", "sizeLimit": "16Mi" } }],
    });
    if values.replicas > 1 {
        pod_spec["affinity"] = json!({
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [{
                    "labelSelector": { "matchLabels": selector },
                    "topologyKey": "kubernetes.io/hostname",
                }],
            },
        });
    }
    docs.push(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(CONTROL, CONTROL, true),
        "spec": {
            "replicas": values.replicas,
            "selector": { "matchLabels": selector },
            "strategy": { "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 } },
            "template": {
                "metadata": { "labels": labels(CONTROL) },
                "spec": pod_spec,
            },
        },
    }));
    docs.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(CONTROL, CONTROL, true),
        "spec": {
            "selector": selector,
            "ports": [
                { "name": "identity", "port": 8080, "targetPort": "identity", "protocol": "TCP" },
                { "name": "api", "port": 8086, "targetPort": "api", "protocol": "TCP" },
                { "name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP" },
            ],
        },
    }));
    if values.replicas > 1 {
        docs.push(json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": metadata(CONTROL, CONTROL, true),
            "spec": { "maxUnavailable": 1, "selector": { "matchLabels": selector } },
        }));
    }
    // Last: it sends pods to the Service above.
    docs.push(webhook_configuration(values, issuer));
    docs
}

/// What injection renders from, as `mesh-config` holds it.
pub fn inject_config(values: &Values) -> InjectConfig {
    let control = format!("{CONTROL}.{NAMESPACE}.svc");
    InjectConfig {
        version: env!("CARGO_PKG_VERSION").into(),
        cluster: values.cluster.clone(),
        trust_domain: values.trust_domain.clone(),
        image: values.image.clone(),
        image_pull_policy: values.image_pull_policy.clone(),
        control_identity_addr: format!("{control}:8080"),
        control_api_addr: format!("{control}:8086"),
        cni_enabled: values.cni_enabled,
        proxy: values.proxy.clone(),
    }
}

fn config_data(values: &Values, issuer: Option<&IssuerFiles>) -> Value {
    let mut data = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "cluster": values.cluster,
        "trustDomain": values.trust_domain,
        crate::inject::config::CONFIG_KEY: serde_json::to_string(&inject_config(values))
            .expect("plain data serializes"),
    });
    if let Some(issuer) = issuer {
        data[crate::inject::config::BUNDLE_KEY] = json!(issuer.bundle_json);
    }
    data
}

/// Two webhooks, both failing closed where injection is wanted and nowhere
/// else: pods in namespaces labelled `mesh.rs/inject=enabled`, and pods
/// labelled so in other namespaces. `kube-system`, `mesh-system` and
/// namespaces labelled `config.mesh.rs/admission-webhooks=disabled` are
/// never sent, so a control plane that is down never blocks them.
fn webhook_configuration(values: &Values, issuer: Option<&IssuerFiles>) -> Value {
    use base64::Engine;
    let mut client_config = json!({
        "service": { "name": CONTROL, "namespace": NAMESPACE, "path": crate::inject::webhook::PATH, "port": 443 },
    });
    if let Some(issuer) = issuer {
        client_config["caBundle"] =
            json!(base64::engine::general_purpose::STANDARD.encode(&issuer.root_crt));
    }
    let excluded = [
        json!({ "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": annotations::EXCLUDED_NAMESPACES }),
        json!({ "key": annotations::WEBHOOK_OPT_OUT, "operator": "NotIn", "values": ["disabled"] }),
    ];
    let hook = |name: &str, namespace: Value, object: Option<Value>| {
        let mut expressions = vec![namespace];
        expressions.extend(excluded.iter().cloned());
        let mut h = json!({
            "name": name,
            "clientConfig": client_config,
            "rules": [{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced" }],
            "namespaceSelector": { "matchExpressions": expressions },
            "failurePolicy": values.webhook_failure_policy,
            "timeoutSeconds": 10,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "reinvocationPolicy": "IfNeeded",
        });
        if let Some(object) = object {
            h["objectSelector"] = object;
        }
        h
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": metadata(WEBHOOK, CONTROL, false),
        "webhooks": [
            hook(
                "namespaces.inject.mesh.rs",
                json!({ "key": annotations::INJECT, "operator": "In", "values": ["enabled"] }),
                None,
            ),
            hook(
                "pods.inject.mesh.rs",
                json!({ "key": annotations::INJECT, "operator": "NotIn", "values": ["enabled"] }),
                Some(json!({ "matchLabels": { annotations::INJECT: "enabled" } })),
            ),
        ],
    })
}

/// `mesh install` output.
pub fn install_yaml(
    values: &Values,
    issuer: Option<&IssuerFiles>,
) -> Result<String, ManifestError> {
    manifest::yaml(&objects(values, issuer))
}

/// What `mesh uninstall` prints: every object `mesh install` and
/// `mesh install --crds` create, for `kubectl delete -f -`. Deleting the
/// CRDs deletes every Mesh resource in the cluster.
pub fn uninstall_yaml() -> Result<String, ManifestError> {
    let values = Values {
        replicas: 2,
        ..Values::default()
    };
    let mut docs: Vec<Value> = objects(&values, None)
        .into_iter()
        .chain(std::iter::once(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": metadata(ISSUER_SECRET, CONTROL, true),
        })))
        .map(|doc| {
            json!({ "apiVersion": doc["apiVersion"], "kind": doc["kind"], "metadata": doc["metadata"] })
        })
        .collect();
    for crd in super::crds::crds() {
        docs.push(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": { "name": crd.metadata.name },
        }));
    }
    // The webhook first, so pod creation never waits on a control plane
    // being deleted; the namespace last: deleting it removes what is left.
    if let Some(at) = docs
        .iter()
        .position(|d| d["kind"] == "MutatingWebhookConfiguration")
    {
        let hook = docs.remove(at);
        docs.insert(0, hook);
    }
    let at = docs
        .iter()
        .position(|d| d["kind"] == "Namespace")
        .expect("the namespace is installed");
    let namespace = docs.remove(at);
    docs.push(namespace);
    manifest::yaml(&docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_layer_defaults_files_and_set() {
        let v = Values::build(&[], &[], false).unwrap();
        assert_eq!(v, Values::default());
        let v = Values::build(
            &[(
                "v.yaml".into(),
                "logLevel: debug\nresources:\n  limits:\n    memory: 1Gi\n".into(),
            )],
            &["replicas=2".into(), "image=registry.local/mesh:dev".into()],
            true,
        )
        .unwrap();
        assert_eq!(v.replicas, 2, "--set wins over --ha");
        assert_eq!(v.log_level, "debug");
        assert_eq!(v.resources.limits.memory, "1Gi");
        assert_eq!(v.resources.requests.cpu, "100m", "untouched defaults stay");
        assert_eq!(v.image, "registry.local/mesh:dev");
        assert_eq!(Values::build(&[], &[], true).unwrap().replicas, 3);

        let e = Values::build(&[], &["replica=3".into()], false).unwrap_err();
        assert!(e.to_string().contains("replica"), "{e}");
        let e = Values::build(&[], &["logLevel=loud".into()], false).unwrap_err();
        assert!(e.to_string().contains("logLevel"), "{e}");
        let e = Values::build(&[], &["replicas".into()], false).unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
        let e = Values::build(&[], &["image=a b".into()], false).unwrap_err();
        assert!(e.to_string().contains("image"), "{e}");
    }

    /// A value an operator types stays a value: it cannot add a field or a
    /// document to the output.
    #[test]
    fn values_are_serialized_not_pasted() {
        let v = Values::build(&[], &["image=x\n---\nkind: Secret".into()], false);
        assert!(v.is_err(), "whitespace in an image is refused");
        let v = Values::build(&[], &["logLevel=info\"\nkind: x".into()], false);
        assert!(v.is_err());
        let values = Values {
            cluster: "east".into(),
            ..Values::default()
        };
        let yaml = install_yaml(&values, None).unwrap();
        assert_eq!(yaml, install_yaml(&values, None).unwrap(), "stable bytes");
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
        assert_eq!(docs.len(), objects(&values, None).len());
    }

    #[test]
    fn ha_adds_replicas_a_budget_and_anti_affinity() {
        let ha = Values::build(&[], &[], true).unwrap();
        let yaml = install_yaml(&ha, None).unwrap();
        assert!(yaml.contains("PodDisruptionBudget"));
        assert!(yaml.contains("podAntiAffinity"));
        let single = install_yaml(&Values::default(), None).unwrap();
        assert!(!single.contains("PodDisruptionBudget"));
    }
}
