//! The injection webhook: the API server sends every pod CREATE in a
//! namespace (or of a pod) labelled `mesh.rs/inject=enabled` to
//! `POST /inject` over HTTPS; the answer adds the proxy as a JSON patch, or
//! refuses the pod naming the bad setting. Served by every control-plane
//! replica (the Service balances), with a serving certificate the replica
//! issues itself from the trust domain's issuer and renews at half life, so
//! the `caBundle` (the root) stays valid across renewals without restarts.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{Api, Client, runtime::reflector, runtime::watcher};
use rustls::{
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify};

use super::{
    config::{BUNDLE_KEY, CONFIG_KEY, InjectConfig},
    pod::{self, Decision, NamespaceMeta},
};
use crate::{
    certify::{CaSlot, current_ca},
    k8s::install::{CONFIG, CONTROL, NAMESPACE},
    metrics::{InjectionLabels, Metrics},
};

/// The path the API server posts AdmissionReviews to.
pub const PATH: &str = "/inject";
/// An AdmissionReview larger than this is refused (pods are far smaller;
/// the API server itself stops at about 3 MiB).
const MAX_BODY: usize = 4 << 20;
/// A request's uid is echoed back: bounded.
const MAX_UID: usize = 128;
/// How long reading a request may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The DNS names the API server checks: `<service>.<namespace>.svc`.
pub fn dns_names() -> Vec<String> {
    vec![
        format!("{CONTROL}.{NAMESPACE}.svc"),
        format!("{CONTROL}.{NAMESPACE}.svc.cluster.local"),
    ]
}

/// The serving certificate, swapped in place when renewed.
#[derive(Debug)]
struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// Issues a serving certificate; returns it and how long until it should
/// be renewed (half its life).
fn issue(ca: &CaSlot, ttl: Duration) -> Result<(Arc<CertifiedKey>, Duration), String> {
    let cert = current_ca(ca)
        .issue_dns_server(&dns_names(), ttl)
        .map_err(|e| format!("cannot issue the webhook certificate: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der));
    let certified = CertifiedKey::from_der(cert.chain, key, &mesh_core::crypto::provider())
        .map_err(|e| format!("cannot use the webhook certificate: {e}"))?;
    let left = (cert.not_after - mesh_core::identity::cert::now()).unsigned_abs();
    Ok((Arc::new(certified), left / 2))
}

/// What the webhook reads from the cluster: namespaces and `mesh-config`.
#[derive(Clone)]
struct Cluster {
    client: Client,
    namespaces: reflector::Store<Namespace>,
    config: reflector::Store<ConfigMap>,
}

impl Cluster {
    async fn namespace(&self, name: &str) -> Result<NamespaceMeta, String> {
        let from = |ns: &Namespace| NamespaceMeta {
            name: name.to_owned(),
            labels: ns.metadata.labels.clone().unwrap_or_default(),
            annotations: ns.metadata.annotations.clone().unwrap_or_default(),
        };
        if let Some(ns) = self.namespaces.get(&reflector::ObjectRef::new(name)) {
            return Ok(from(&ns));
        }
        // Just created: not in the cache yet.
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.get(name)
            .await
            .map(|ns| from(&ns))
            .map_err(|e| format!("cannot read namespace {name}: {e}"))
    }

    async fn inject_config(&self) -> Result<(InjectConfig, String), String> {
        if let Some(cm) = self
            .config
            .get(&reflector::ObjectRef::new(CONFIG).within(NAMESPACE))
        {
            return config_from(cm.data.as_ref());
        }
        // Not in the cache (yet): ask once.
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), NAMESPACE);
        match api.get_opt(CONFIG).await {
            Ok(Some(cm)) => config_from(cm.data.as_ref()),
            Ok(None) => Err(format!(
                "ConfigMap {NAMESPACE}/{CONFIG} is missing; re-apply `mesh install`"
            )),
            Err(e) => Err(format!("cannot read ConfigMap {NAMESPACE}/{CONFIG}: {e}")),
        }
    }
}

/// The injection settings and the trust bundle from `mesh-config`'s data.
pub fn config_from(
    data: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<(InjectConfig, String), String> {
    let get = |key: &str| {
        data.and_then(|d| d.get(key)).cloned().ok_or_else(|| {
            format!("ConfigMap {NAMESPACE}/{CONFIG} has no {key}; re-apply `mesh install`")
        })
    };
    let config = InjectConfig::from_json(&get(CONFIG_KEY)?)?;
    Ok((config, get(BUNDLE_KEY)?))
}

/// Serves the webhook on `listener` (TLS 1.3, certificate renewed at half
/// life) until the returned tasks are dropped.
pub fn serve(
    listener: TcpListener,
    client: Client,
    ca: CaSlot,
    cert_ttl: Duration,
    metrics: Metrics,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), String> {
    let (first, mut renew_in) = issue(&ca, cert_ttl)?;
    let resolver = Arc::new(ServingCert {
        current: RwLock::new(first),
    });
    let renewing = resolver.clone();
    tasks.spawn(async move {
        loop {
            tokio::time::sleep(renew_in.max(Duration::from_secs(1))).await;
            match issue(&ca, cert_ttl) {
                Ok((cert, next)) => {
                    *renewing.current.write().unwrap_or_else(|p| p.into_inner()) = cert;
                    renew_in = next;
                    tracing::info!(next_renewal = ?next, "webhook certificate renewed");
                }
                Err(e) => {
                    tracing::error!(error = %e, "webhook certificate renewal failed; retrying in 10 s");
                    renew_in = Duration::from_secs(10);
                }
            }
        }
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(mesh_core::crypto::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let changed = Arc::new(Notify::new());
    let cluster = Cluster {
        namespaces: crate::k8s::watch::reflect_with(
            Api::all(client.clone()),
            watcher::Config::default(),
            "namespaces",
            changed.clone(),
            tasks,
        ),
        config: crate::k8s::watch::reflect_with(
            Api::namespaced(client.clone(), NAMESPACE),
            watcher::Config::default().fields(&format!("metadata.name={CONFIG}")),
            "mesh-config",
            changed,
            tasks,
        ),
        client,
    };
    tasks.spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let (acceptor, cluster, metrics) = (acceptor.clone(), cluster.clone(), metrics.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let svc = service_fn(move |req| {
                    let (cluster, metrics) = (cluster.clone(), metrics.clone());
                    async move { Ok::<_, Infallible>(handle(req, &cluster, &metrics, peer).await) }
                });
                let _ = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Ok(())
}

fn reply(status: StatusCode, body: Vec<u8>, json: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let kind = if json {
        "application/json"
    } else {
        "text/plain"
    };
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(kind),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    cluster: &Cluster,
    metrics: &Metrics,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let count = |result: &str, reason: &str| {
        metrics
            .injections
            .get_or_create(&InjectionLabels {
                result: result.into(),
                reason: reason.into(),
            })
            .inc();
    };
    if req.uri().path() != PATH || req.method() != Method::POST {
        return reply(
            StatusCode::NOT_FOUND,
            format!("POST {PATH} only\n").into(),
            false,
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            count("refused", "body_too_large");
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{e}\n").into(),
                false,
            );
        }
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            count("refused", "not_json");
            return reply(
                StatusCode::BAD_REQUEST,
                format!("not an AdmissionReview: {e}\n").into(),
                false,
            );
        }
    };
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str().filter(|u| u.len() <= MAX_UID) else {
        count("refused", "no_uid");
        return reply(
            StatusCode::BAD_REQUEST,
            b"the AdmissionReview has no request.uid\n".to_vec(),
            false,
        );
    };
    let namespace = request["namespace"].as_str().unwrap_or_default();
    let admission = match cluster.namespace(namespace).await {
        Ok(ns) => admit(request, &ns, cluster.inject_config().await),
        Err(e) => Admission::Deny {
            reason: "namespace_unknown",
            message: e,
        },
    };
    let name = request["object"]["metadata"]["name"]
        .as_str()
        .or(request["object"]["metadata"]["generateName"].as_str())
        .unwrap_or("?");
    match &admission {
        Admission::Allow { patch: Some(_), .. } => {
            count("injected", "");
            tracing::info!(%namespace, pod = name, "proxy injected");
        }
        Admission::Allow { reason, .. } => count("skipped", reason),
        Admission::Deny { reason, message } => {
            count("refused", reason);
            tracing::warn!(%namespace, pod = name, %peer, %message, "pod refused");
        }
    }
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": admission.response(uid),
    });
    reply(StatusCode::OK, body.to_string().into_bytes(), true)
}

/// The webhook's answer for one pod.
#[derive(Debug)]
pub enum Admission {
    Allow {
        /// The JSON patch, when the pod gets the proxy.
        patch: Option<Vec<u8>>,
        reason: &'static str,
        warnings: Vec<String>,
    },
    Deny {
        reason: &'static str,
        message: String,
    },
}

impl Admission {
    fn response(&self, uid: &str) -> Value {
        match self {
            Self::Allow {
                patch, warnings, ..
            } => {
                let mut r = json!({ "uid": uid, "allowed": true });
                if let Some(patch) = patch {
                    r["patchType"] = json!("JSONPatch");
                    r["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
                }
                if !warnings.is_empty() {
                    r["warnings"] = json!(warnings);
                }
                r
            }
            Self::Deny { message, .. } => json!({
                "uid": uid, "allowed": false,
                "status": { "code": 400, "reason": "BadRequest", "message": message },
            }),
        }
    }
}

/// Decides one admission request (pure: tested without a server).
pub fn admit(
    request: &Value,
    ns: &NamespaceMeta,
    config: Result<(InjectConfig, String), String>,
) -> Admission {
    let allow = |reason, warnings| Admission::Allow {
        patch: None,
        reason,
        warnings,
    };
    if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
        return allow("not_a_pod_create", Vec::new());
    }
    let original = &request["object"];
    match pod::decide(ns, original) {
        Ok(Decision::Inject) => {}
        Ok(Decision::Skip(why)) => {
            let warnings = match why {
                pod::Skip::HostNetwork => vec![format!("mesh: not injected: {why}")],
                _ => Vec::new(),
            };
            return allow(why.label(), warnings);
        }
        Err(message) => {
            return Admission::Deny {
                reason: "bad_switch",
                message: format!("mesh: {message}"),
            };
        }
    }
    let (config, bundle) = match config {
        Ok(c) => c,
        Err(message) => {
            return Admission::Deny {
                reason: "no_config",
                message: format!("mesh: cannot inject: {message}"),
            };
        }
    };
    let mut injected = original.clone();
    if let Err(errors) = pod::inject(&mut injected, &config, &bundle) {
        return Admission::Deny {
            reason: "bad_annotation",
            message: format!("mesh: cannot inject this pod: {}", errors.join("; ")),
        };
    }
    let patch = json_patch::diff(original, &injected);
    match serde_json::to_vec(&patch) {
        Ok(bytes) => Admission::Allow {
            patch: Some(bytes),
            reason: "",
            warnings: Vec::new(),
        },
        Err(e) => Admission::Deny {
            reason: "internal",
            message: format!("mesh: cannot encode the patch: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::config::ProxyValues;

    fn config() -> Result<(InjectConfig, String), String> {
        Ok((
            InjectConfig {
                version: "0.1.0".into(),
                cluster: "west".into(),
                trust_domain: "west.mesh.local".into(),
                image: "mesh:0.1.0".into(),
                image_pull_policy: "IfNotPresent".into(),
                control_identity_addr: "c:8080".into(),
                control_api_addr: "c:8086".into(),
                cni_enabled: false,
                proxy: ProxyValues::default(),
            },
            "{\"keys\":[]}".into(),
        ))
    }

    fn request(annotations: Value) -> Value {
        json!({
            "uid": "u1", "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "operation": "CREATE", "namespace": "shop",
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "generateName": "web-", "annotations": annotations },
                "spec": { "containers": [{ "name": "web", "image": "nginx" }] },
            },
        })
    }

    fn shop(enabled: bool) -> NamespaceMeta {
        let mut ns = NamespaceMeta {
            name: "shop".into(),
            ..NamespaceMeta::default()
        };
        if enabled {
            ns.labels.insert("mesh.rs/inject".into(), "enabled".into());
        }
        ns
    }

    #[test]
    fn the_patch_applies_to_the_pod_the_api_server_sent() {
        let req = request(json!({}));
        let Admission::Allow {
            patch: Some(patch), ..
        } = admit(&req, &shop(true), config())
        else {
            panic!("injected")
        };
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut pod = req["object"].clone();
        json_patch::patch(&mut pod, &patch).unwrap();
        let mut expected = req["object"].clone();
        let (c, b) = config().unwrap();
        pod::inject(&mut expected, &c, &b).unwrap();
        assert_eq!(pod, expected);
    }

    #[test]
    fn refusals_and_skips() {
        let bad = request(json!({ "config.mesh.rs/proxy-log-level": "loud" }));
        let Admission::Deny { message, .. } = admit(&bad, &shop(true), config()) else {
            panic!("refused")
        };
        assert!(
            message.contains("config.mesh.rs/proxy-log-level"),
            "{message}"
        );
        assert!(matches!(
            admit(&request(json!({})), &shop(false), config()),
            Admission::Allow { patch: None, .. }
        ));
        let no_config = admit(&request(json!({})), &shop(true), Err("missing".into()));
        assert!(matches!(no_config, Admission::Deny { .. }), "fails closed");
        let r = admit(&bad, &shop(true), config()).response("u1");
        assert_eq!(r["allowed"], false);
        assert_eq!(r["uid"], "u1");
    }
}
