//! What injection adds to a pod (or a pod template: both are
//! `{metadata, spec}`): the proxy, as a native sidecar by default, the
//! projected token it bootstraps with, and `mesh-init` unless the CNI plugin
//! sets up interception. Works on JSON, not on typed structs, so fields this
//! version does not know survive untouched.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{
    annotations::{self, EXCLUDED_NAMESPACES, Overrides, PROXY_VERSION, Switch},
    config::InjectConfig,
};

/// The proxy's container name (what discovery looks for).
pub const PROXY: &str = crate::k8s::watch::PROXY_CONTAINER;
/// The init container applying the iptables rules.
pub const INIT: &str = "mesh-init";
/// The proxy's ports inside the pod.
pub const INBOUND_PORT: u16 = 4143;
pub const OUTBOUND_PORT: u16 = 4140;
pub const ADMIN_PORT: u16 = 4191;
/// The proxy's metrics-only listener, on the pod's address, for Prometheus.
pub const METRICS_PORT: u16 = 4192;
/// Its container port's name, which `mesh viz install`'s scrape
/// configuration keeps.
pub const METRICS_PORT_NAME: &str = "mesh-metrics";
/// The audience of the token the proxy proves its service account with.
pub const TOKEN_AUDIENCE: &str = crate::k8s::review::AUDIENCE;
/// Where the projected token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/mesh.rs/identity";
/// The projected token's volume.
pub const TOKEN_VOLUME: &str = "mesh-identity-token";
/// The `mesh` binary inside the image (its entrypoint).
pub const MESH_BIN: &str = "/usr/bin/mesh";

/// Whether a pod gets the proxy, and why not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Inject,
    Skip(Skip),
}

/// Why a pod is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    ExcludedNamespace,
    AlreadyInjected,
    NotEnabled,
    HostNetwork,
}

impl Skip {
    /// The metric's `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ExcludedNamespace => "excluded_namespace",
            Self::AlreadyInjected => "already_injected",
            Self::NotEnabled => "not_enabled",
            Self::HostNetwork => "host_network",
        }
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ExcludedNamespace => "namespace is excluded from injection",
            Self::AlreadyInjected => "already injected",
            Self::NotEnabled => "injection is not enabled",
            Self::HostNetwork => "hostNetwork pods share the node's network and cannot be meshed",
        })
    }
}

/// The namespace as the webhook sees it.
#[derive(Clone, Debug, Default)]
pub struct NamespaceMeta {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Decides for `pod` (or a template) in `ns`: the pod's switch wins over
/// the namespace's; excluded namespaces, host-network pods and pods that
/// already carry a proxy are left alone.
pub fn decide(ns: &NamespaceMeta, pod: &Value) -> Result<Decision, String> {
    if EXCLUDED_NAMESPACES.contains(&ns.name.as_str()) {
        return Ok(Decision::Skip(Skip::ExcludedNamespace));
    }
    if is_injected(pod) {
        return Ok(Decision::Skip(Skip::AlreadyInjected));
    }
    let meta = &pod["metadata"];
    let pod_switch = annotations::switch(
        string_map(&meta["labels"]).as_ref(),
        string_map(&meta["annotations"]).as_ref(),
        "pod",
    )?;
    let ns_switch = annotations::switch(
        Some(&ns.labels),
        Some(&ns.annotations),
        &format!("namespace {}", ns.name),
    )?;
    let wanted = pod_switch.or(ns_switch) == Some(Switch::Enabled);
    if !wanted {
        return Ok(Decision::Skip(Skip::NotEnabled));
    }
    if pod["spec"]["hostNetwork"] == json!(true) {
        return Ok(Decision::Skip(Skip::HostNetwork));
    }
    Ok(Decision::Inject)
}

/// Whether the pod already has the proxy (as a sidecar or a container).
pub fn is_injected(pod: &Value) -> bool {
    ["containers", "initContainers"].iter().any(|list| {
        pod["spec"][list]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == PROXY))
    })
}

/// A `map[string]string` of the object, if it is one.
pub fn string_map(v: &Value) -> Option<BTreeMap<String, String>> {
    v.as_object().map(|m| {
        m.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect()
    })
}

/// Adds the proxy to `pod` (a pod or a pod template). Refuses, naming each
/// problem, bad `config.mesh.rs/` annotations and app ports that collide
/// with the proxy's. Idempotent: an injected pod is returned unchanged.
pub fn inject(pod: &mut Value, cfg: &InjectConfig, bundle: &str) -> Result<(), Vec<String>> {
    if is_injected(pod) {
        return Ok(());
    }
    let o = annotations::overrides(
        &cfg.proxy,
        string_map(&pod["metadata"]["annotations"]).as_ref(),
    )?;
    let app_ports = app_ports(&pod["spec"])?;
    let labels = string_map(&pod["metadata"]["labels"]).unwrap_or_default();

    let spec = pod["spec"]
        .as_object_mut()
        .ok_or_else(|| vec!["the pod has no spec".to_owned()])?;
    let proxy = proxy_container(cfg, &o, bundle, &app_ports, &labels);
    let mut inits: Vec<Value> = Vec::new();
    if !cfg.cni_enabled {
        inits.push(init_container(cfg, &o));
    }
    let existing_inits = take_list(spec, "initContainers");
    let mut containers = take_list(spec, "containers");
    if o.proxy.native_sidecar {
        inits.push(proxy);
    } else {
        // First, so that its postStart hook holds the app until it is ready.
        containers.insert(0, proxy);
    }
    inits.extend(existing_inits);
    spec.insert("initContainers".into(), Value::Array(inits));
    spec.insert("containers".into(), Value::Array(containers));
    let mut volumes = take_list(spec, "volumes");
    volumes.push(json!({
        "name": TOKEN_VOLUME,
        "projected": { "sources": [{ "serviceAccountToken": {
            "audience": TOKEN_AUDIENCE, "expirationSeconds": 86400, "path": "token",
        } }] },
    }));
    spec.insert("volumes".into(), Value::Array(volumes));

    let meta = pod
        .as_object_mut()
        .expect("a pod with a spec is an object")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let annotations = meta
        .as_object_mut()
        .ok_or_else(|| vec!["the pod's metadata is not an object".to_owned()])?
        .entry("annotations")
        .or_insert_with(|| json!({}));
    if let Some(a) = annotations.as_object_mut() {
        a.insert(PROXY_VERSION.into(), json!(cfg.version));
    }
    Ok(())
}

fn take_list(spec: &mut serde_json::Map<String, Value>, key: &str) -> Vec<Value> {
    match spec.remove(key) {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

/// The app's declared TCP ports as `name=port` (or `port`), refusing the
/// proxy's own.
fn app_ports(spec: &Value) -> Result<Vec<String>, Vec<String>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for c in spec["containers"].as_array().into_iter().flatten() {
        for p in c["ports"].as_array().into_iter().flatten() {
            if p["protocol"].as_str().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let Some(port) = p["containerPort"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
            else {
                continue;
            };
            if [INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT, METRICS_PORT].contains(&port) {
                errors.push(format!(
                    "container {} port {port} is one of the proxy's ports ({INBOUND_PORT}, {OUTBOUND_PORT}, {ADMIN_PORT}, {METRICS_PORT}); move the app to another port",
                    c["name"].as_str().unwrap_or("?")
                ));
                continue;
            }
            out.push(match p["name"].as_str() {
                Some(name) if !name.is_empty() => format!("{name}={port}"),
                _ => port.to_string(),
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn join(ports: impl IntoIterator<Item = u16>) -> String {
    ports
        .into_iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn resources(o: &Overrides) -> Value {
    let q = |cpu: &str, memory: &str| {
        let mut m = serde_json::Map::new();
        if !cpu.is_empty() {
            m.insert("cpu".into(), json!(cpu));
        }
        if !memory.is_empty() {
            m.insert("memory".into(), json!(memory));
        }
        Value::Object(m)
    };
    let p = &o.proxy;
    json!({
        "requests": q(&p.cpu_request, &p.memory_request),
        "limits": q(&p.cpu_limit, &p.memory_limit),
    })
}

fn image(cfg: &InjectConfig, o: &Overrides) -> String {
    if o.proxy.image.is_empty() {
        cfg.proxy_image().to_owned()
    } else {
        o.proxy.image.clone()
    }
}

fn proxy_container(
    cfg: &InjectConfig,
    o: &Overrides,
    bundle: &str,
    app_ports: &[String],
    labels: &BTreeMap<String, String>,
) -> Value {
    let field = |name: &str, path: &str| json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } });
    let value = |name: &str, value: &str| json!({ "name": name, "value": value });
    let labels = labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut env = vec![
        value("RUST_LOG", &o.proxy.log_level),
        value("MESH_PROXY_CLUSTER", &cfg.cluster),
        value("MESH_PROXY_TRUST_DOMAIN", &cfg.trust_domain),
        field("MESH_PROXY_NAMESPACE", "metadata.namespace"),
        field("MESH_PROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field("MESH_PROXY_WORKLOAD", "metadata.name"),
        value(
            "MESH_PROXY_CONTROL_IDENTITY_ADDR",
            &cfg.control_identity_addr,
        ),
        value("MESH_PROXY_CONTROL_API_ADDR", &cfg.control_api_addr),
        value("MESH_PROXY_TRUST_ANCHORS_BUNDLE", bundle),
        value("MESH_PROXY_JOIN_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
        value(
            "MESH_PROXY_INBOUND_ADDR",
            &format!("0.0.0.0:{INBOUND_PORT}"),
        ),
        value(
            "MESH_PROXY_OUTBOUND_ADDR",
            &format!("127.0.0.1:{OUTBOUND_PORT}"),
        ),
        value("MESH_PROXY_ADMIN_ADDR", &format!("127.0.0.1:{ADMIN_PORT}")),
        value(
            "MESH_PROXY_METRICS_ADDR",
            &format!("0.0.0.0:{METRICS_PORT}"),
        ),
        field("MESH_PROXY_APP_IP", "status.podIP"),
        field("MESH_PROXY_WORKLOAD_ADDRESSES", "status.podIPs"),
        value("MESH_PROXY_APP_PORTS", &app_ports.join(",")),
        value("MESH_PROXY_LABELS", &labels),
        value("MESH_PROXY_SHUTDOWN_GRACE", &o.proxy.shutdown_grace),
    ];
    if !o.opaque_ports.is_empty() {
        env.push(value(
            "MESH_PROXY_OPAQUE_PORTS",
            &join(o.opaque_ports.iter().copied()),
        ));
    }
    let probe = |what: &str| json!({ "exec": { "command": [MESH_BIN, "proxy", "probe", what] } });
    let mut c = json!({
        "name": PROXY,
        "image": image(cfg, o),
        "imagePullPolicy": cfg.image_pull_policy,
        "args": ["proxy"],
        "env": env,
        "ports": [
            { "name": crate::k8s::watch::PROXY_INBOUND_PORT, "containerPort": INBOUND_PORT, "protocol": "TCP" },
            { "name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP" },
        ],
        "readinessProbe": { "periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 2 },
        "livenessProbe": { "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 2 },
        "resources": resources(o),
        "securityContext": {
            "runAsUser": o.proxy.uid, "runAsGroup": o.proxy.uid, "runAsNonRoot": true,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [{ "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true }],
    });
    merge(&mut c["readinessProbe"], probe("ready"));
    merge(&mut c["livenessProbe"], probe("live"));
    if o.proxy.native_sidecar {
        c["restartPolicy"] = json!("Always");
        if o.proxy.await_ready {
            // The kubelet starts the next container once this passes.
            let mut startup =
                json!({ "periodSeconds": 1, "failureThreshold": 120, "timeoutSeconds": 2 });
            merge(&mut startup, probe("ready"));
            c["startupProbe"] = startup;
        }
    } else if o.proxy.await_ready {
        c["lifecycle"] = json!({ "postStart": { "exec": { "command": [
            MESH_BIN, "proxy", "probe", "ready", "--wait", "120s",
        ] } } });
    }
    c
}

fn merge(into: &mut Value, more: Value) {
    if let (Some(into), Value::Object(more)) = (into.as_object_mut(), more) {
        into.extend(more);
    }
}

fn init_container(cfg: &InjectConfig, o: &Overrides) -> Value {
    let skip_in = [ADMIN_PORT, METRICS_PORT]
        .into_iter()
        .chain(o.skip_inbound_ports.iter().copied());
    let mut args = vec![
        "proxy".to_owned(),
        "init".to_owned(),
        "--apply".to_owned(),
        "--proxy-uid".to_owned(),
        o.proxy.uid.to_string(),
        "--inbound-port".to_owned(),
        INBOUND_PORT.to_string(),
        "--outbound-port".to_owned(),
        OUTBOUND_PORT.to_string(),
        "--skip-inbound-ports".to_owned(),
        join(skip_in),
    ];
    if !o.skip_outbound_ports.is_empty() {
        args.push("--skip-outbound-ports".to_owned());
        args.push(join(o.skip_outbound_ports.iter().copied()));
    }
    json!({
        "name": INIT,
        "image": image(cfg, o),
        "imagePullPolicy": cfg.image_pull_policy,
        "args": args,
        "resources": {
            "requests": { "cpu": "10m", "memory": "10Mi" },
            "limits": { "memory": "50Mi" },
        },
        "securityContext": {
            "runAsUser": 0, "runAsNonRoot": false,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::config::ProxyValues;

    pub(crate) fn config() -> InjectConfig {
        InjectConfig {
            version: "0.1.0".into(),
            cluster: "west".into(),
            trust_domain: "west.mesh.local".into(),
            image: "ghcr.io/mesh-rs/mesh:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            control_identity_addr: "mesh-control.mesh-system.svc.cluster.local:8080".into(),
            control_api_addr: "mesh-control.mesh-system.svc.cluster.local:8086".into(),
            cni_enabled: false,
            proxy: ProxyValues::default(),
        }
    }

    fn pod() -> Value {
        json!({
            "metadata": { "name": "web-1", "labels": { "app": "web" }, "annotations": { "mesh.rs/inject": "enabled" } },
            "spec": {
                "containers": [{ "name": "web", "image": "nginx", "ports": [{ "name": "http", "containerPort": 8080 }, { "containerPort": 53, "protocol": "UDP" }] }],
                "initContainers": [{ "name": "migrate", "image": "tool" }],
                "futureField": { "kept": true },
            },
        })
    }

    #[test]
    fn the_proxy_is_a_native_sidecar_after_mesh_init() {
        let mut p = pod();
        inject(&mut p, &config(), "{}").unwrap();
        let inits = p["spec"]["initContainers"].as_array().unwrap();
        let names: Vec<&str> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, [INIT, PROXY, "migrate"]);
        let proxy = &inits[1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert!(
            proxy["startupProbe"]["exec"].is_object(),
            "await by default"
        );
        let env: BTreeMap<&str, &Value> = proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e))
            .collect();
        assert_eq!(
            env["MESH_PROXY_APP_PORTS"]["value"], "http=8080",
            "UDP is not proxied"
        );
        assert_eq!(env["MESH_PROXY_LABELS"]["value"], "app=web");
        assert_eq!(
            env["MESH_PROXY_WORKLOAD"]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert_eq!(
            p["spec"]["futureField"]["kept"], true,
            "unknown fields survive"
        );
        assert_eq!(p["metadata"]["annotations"][PROXY_VERSION], "0.1.0");
        let init = &inits[0];
        assert_eq!(
            init["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );

        let once = p.clone();
        inject(&mut p, &config(), "{}").unwrap();
        assert_eq!(p, once, "idempotent");
    }

    #[test]
    fn classic_sidecar_cni_and_annotations() {
        let mut p = pod();
        p["metadata"]["annotations"]["config.mesh.rs/native-sidecar"] = json!("disabled");
        p["metadata"]["annotations"]["config.mesh.rs/skip-outbound-ports"] = json!("5432");
        let mut cfg = config();
        inject(&mut p, &cfg, "{}").unwrap();
        assert_eq!(p["spec"]["containers"][0]["name"], PROXY);
        assert!(p["spec"]["containers"][0]["lifecycle"]["postStart"].is_object());
        let args = p["spec"]["initContainers"][0]["args"].to_string();
        assert!(
            args.contains("\"--skip-outbound-ports\",\"5432\""),
            "{args}"
        );

        cfg.cni_enabled = true;
        let mut p = pod();
        inject(&mut p, &cfg, "{}").unwrap();
        let names: Vec<&str> = p["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [PROXY, "migrate"],
            "no mesh-init with the CNI plugin"
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut p = pod();
        p["metadata"]["annotations"]["config.mesh.rs/proxy-memory-limit"] = json!("a lot");
        p["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(4143);
        let errors = inject(&mut p, &config(), "{}").unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("config.mesh.rs/proxy-memory-limit")),
            "{errors:?}"
        );

        let mut p = pod();
        p["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(4143);
        let errors = inject(&mut p, &config(), "{}").unwrap_err();
        assert!(errors[0].contains("4143"), "{errors:?}");
    }

    #[test]
    fn decisions() {
        let ns = |name: &str, on: bool| NamespaceMeta {
            name: name.into(),
            labels: if on {
                BTreeMap::from([(annotations::INJECT.to_owned(), "enabled".to_owned())])
            } else {
                BTreeMap::new()
            },
            annotations: BTreeMap::new(),
        };
        let plain = json!({ "metadata": {}, "spec": { "containers": [] } });
        assert_eq!(decide(&ns("shop", true), &plain), Ok(Decision::Inject));
        assert!(matches!(
            decide(&ns("shop", false), &plain),
            Ok(Decision::Skip(_))
        ));
        assert!(matches!(
            decide(&ns("kube-system", true), &pod()),
            Ok(Decision::Skip(_))
        ));
        assert_eq!(
            decide(&ns("shop", false), &pod()),
            Ok(Decision::Inject),
            "pod opts in"
        );
        let mut off = pod();
        off["metadata"]["annotations"]["mesh.rs/inject"] = json!("disabled");
        assert!(
            matches!(decide(&ns("shop", true), &off), Ok(Decision::Skip(_))),
            "pod opts out"
        );
        let mut host = pod();
        host["spec"]["hostNetwork"] = json!(true);
        assert!(matches!(
            decide(&ns("shop", true), &host),
            Ok(Decision::Skip(_))
        ));
        let mut done = pod();
        inject(&mut done, &config(), "{}").unwrap();
        assert!(matches!(
            decide(&ns("shop", true), &done),
            Ok(Decision::Skip(_))
        ));
    }
}
