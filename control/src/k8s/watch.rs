//! The `kube` store's read side: kube-rs reflectors over Services,
//! EndpointSlices, Pods and our CRDs, turned into the same resources and
//! registrations the local store gives the pure [`Index`].
//!
//! A watch that breaks is retried with backoff and re-lists; the reflector
//! swaps in the new list only once it is complete, so the last good state
//! keeps serving meanwhile. Objects the control plane would refuse are left
//! out, logged and counted (`config_errors_total{reason}`), and the rest
//! keeps serving.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    hash::Hash,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource as KubeResource, ResourceExt,
    runtime::{WatchStreamExt, reflector, watcher},
};
use mesh_core::identity::{SpiffeId, TrustDomain};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_stream::StreamExt;

use crate::{
    index::{Index, Registration, WorkloadPort},
    metrics::Metrics,
    resources::{
        Resource,
        parse::validate,
        types::{self, Metadata, Object},
    },
    services::Shared,
};

/// The sidecar container injection adds (as a native sidecar or a plain
/// container); a Pod with it is meshed.
pub const PROXY_CONTAINER: &str = "mesh-proxy";
/// The name of the proxy container's inbound port.
pub const PROXY_INBOUND_PORT: &str = "mesh-inbound";
/// The proxy's inbound port when the container does not name one.
const DEFAULT_PROXY_INBOUND: u16 = 4143;
/// Changes closer together than this are applied together.
const BATCH: Duration = Duration::from_millis(50);

/// Readers of everything the control plane watches.
#[derive(Clone)]
pub struct Cluster {
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
    pods: reflector::Store<Pod>,
    servers: reflector::Store<types::Server>,
    authorizations: reflector::Store<types::AuthorizationPolicy>,
    authentications: reflector::Store<types::MeshTlsAuthentication>,
    routes: reflector::Store<types::HttpRoute>,
    links: reflector::Store<types::Link>,
    mirrors: reflector::Store<types::MirroredService>,
    failovers: reflector::Store<types::FailoverPolicy>,
    changed: Arc<Notify>,
    /// Objects refused on the last pass (`kind ns/name@version`): each is
    /// logged and counted once, not on every pass.
    refused: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

/// Starts one reflector; its task runs until the runtime stops.
fn reflect<K>(
    api: Api<K>,
    what: &'static str,
    changed: Arc<Notify>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> reflector::Store<K>
where
    K: KubeResource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    reflect_with(api, watcher::Config::default(), what, changed, tasks)
}

/// [`reflect`] with a watch configuration (e.g. a field selector).
pub(crate) fn reflect_with<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    changed: Arc<Notify>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> reflector::Store<K>
where
    K: KubeResource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config).default_backoff());
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if failing {
                        tracing::info!("watch of {what} works again");
                        failing = false;
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    // Retried with backoff; the last good list keeps serving.
                    if !failing {
                        tracing::warn!(error = %e, "watch of {what} failed; retrying (the last list keeps serving)");
                    }
                    failing = true;
                }
            }
        }
    });
    reader
}

impl Cluster {
    /// Starts every watch, and waits until each has its first full list
    /// (or `timeout` passes: then the error names the kinds still missing,
    /// usually for want of RBAC or CRDs).
    pub async fn start(
        client: Client,
        timeout: Duration,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Result<Self, String> {
        let changed = Arc::new(Notify::new());
        let c = Self {
            services: reflect(Api::all(client.clone()), "services", changed.clone(), tasks),
            slices: reflect(
                Api::all(client.clone()),
                "endpointslices",
                changed.clone(),
                tasks,
            ),
            pods: reflect(Api::all(client.clone()), "pods", changed.clone(), tasks),
            servers: reflect(Api::all(client.clone()), "servers", changed.clone(), tasks),
            authorizations: reflect(
                Api::all(client.clone()),
                "authorizationpolicies",
                changed.clone(),
                tasks,
            ),
            authentications: reflect(
                Api::all(client.clone()),
                "meshtlsauthentications",
                changed.clone(),
                tasks,
            ),
            routes: reflect(
                Api::all(client.clone()),
                "httproutes",
                changed.clone(),
                tasks,
            ),
            links: reflect(Api::all(client.clone()), "links", changed.clone(), tasks),
            mirrors: reflect(
                Api::all(client.clone()),
                "mirroredservices",
                changed.clone(),
                tasks,
            ),
            failovers: reflect(Api::all(client), "failoverpolicies", changed.clone(), tasks),
            changed,
            refused: Arc::default(),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let waits: [(&str, bool); 10] = [
            ("services", wait(&c.services, deadline).await),
            ("endpointslices", wait(&c.slices, deadline).await),
            ("pods", wait(&c.pods, deadline).await),
            ("servers.policy.mesh.rs", wait(&c.servers, deadline).await),
            (
                "authorizationpolicies.policy.mesh.rs",
                wait(&c.authorizations, deadline).await,
            ),
            (
                "meshtlsauthentications.policy.mesh.rs",
                wait(&c.authentications, deadline).await,
            ),
            ("httproutes.policy.mesh.rs", wait(&c.routes, deadline).await),
            ("links.multicluster.mesh.rs", wait(&c.links, deadline).await),
            (
                "mirroredservices.multicluster.mesh.rs",
                wait(&c.mirrors, deadline).await,
            ),
            (
                "failoverpolicies.multicluster.mesh.rs",
                wait(&c.failovers, deadline).await,
            ),
        ];
        let missing: Vec<&str> = waits
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(k, _)| *k)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "could not list {} from the API server in {timeout:?}; are the CRDs installed (`mesh install --crds | kubectl apply -f -`) and may this identity list them (the ClusterRole `mesh install` prints)? See the warnings above",
                missing.join(", ")
            ));
        }
        Ok(c)
    }

    /// The configuration resources, each validated like a file of the
    /// local store; refused objects are logged and counted.
    pub fn resources(&self, metrics: &Metrics) -> Vec<Resource> {
        let mut out = Vec::new();
        let mut refused = std::collections::HashSet::new();
        let mut before = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        for svc in self.services.state() {
            if let Some(r) = service(&svc) {
                out.push(Resource::Service(r));
            }
        }
        let mut add = |r: Option<(Resource, String)>| {
            let Some((r, version)) = r else { return };
            match validate(&r) {
                Ok(()) => out.push(r),
                Err(reason) => {
                    let m = r.metadata();
                    let key = format!("{} {}/{}@{version}", r.kind(), m.namespace, m.name);
                    if !before.contains(&key) {
                        tracing::warn!(
                            "{} {}/{} is refused and not served: {reason}",
                            r.kind(),
                            m.namespace,
                            m.name
                        );
                        metrics
                            .config_errors
                            .get_or_create(&crate::metrics::ReasonLabels {
                                reason: "invalid".into(),
                            })
                            .inc();
                    }
                    refused.insert(key);
                }
            }
        };
        for o in self.servers.state() {
            add(object(&*o, types::POLICY_V1ALPHA1, "Server")
                .map(|(o, v)| (Resource::Server(o), v)));
        }
        for o in self.authorizations.state() {
            add(object(&*o, types::POLICY_V1ALPHA1, "AuthorizationPolicy")
                .map(|(o, v)| (Resource::AuthorizationPolicy(o), v)));
        }
        for o in self.authentications.state() {
            add(object(&*o, types::POLICY_V1ALPHA1, "MeshTLSAuthentication")
                .map(|(o, v)| (Resource::MeshTlsAuthentication(o), v)));
        }
        for o in self.routes.state() {
            add(object(&*o, types::POLICY_V1ALPHA1, "HTTPRoute")
                .map(|(o, v)| (Resource::HttpRoute(o), v)));
        }
        for o in self.links.state() {
            add(object(&*o, types::MULTICLUSTER_V1ALPHA1, "Link")
                .map(|(o, v)| (Resource::Link(o), v)));
        }
        for o in self.mirrors.state() {
            add(object(&*o, types::MULTICLUSTER_V1ALPHA1, "MirroredService")
                .map(|(o, v)| (Resource::MirroredService(o), v)));
        }
        for o in self.failovers.state() {
            add(object(&*o, types::MULTICLUSTER_V1ALPHA1, "FailoverPolicy")
                .map(|(o, v)| (Resource::FailoverPolicy(o), v)));
        }
        *before = refused;
        out
    }

    /// Every running Pod as a cluster-managed registration.
    pub fn workloads(&self, td: &TrustDomain) -> Vec<Registration> {
        let mut ready_by_pod: HashMap<(String, String), bool> = HashMap::new();
        for slice in self.slices.state() {
            let ns = slice.namespace().unwrap_or_default();
            for ep in &slice.endpoints {
                let Some(target) = ep.target_ref.as_ref() else {
                    continue;
                };
                if target.kind.as_deref() != Some("Pod") {
                    continue;
                }
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                let key = (
                    target.namespace.clone().unwrap_or_else(|| ns.clone()),
                    target.name.clone().unwrap_or_default(),
                );
                // Ready in any slice is ready.
                *ready_by_pod.entry(key).or_insert(false) |= ready;
            }
        }
        self.pods
            .state()
            .iter()
            .filter_map(|pod| workload(pod, td, &ready_by_pod))
            .collect()
    }

    /// Applies changes to `shared` as they come (after the first
    /// [`Cluster::apply`]), until the task is aborted.
    pub async fn follow(
        self,
        shared: Arc<Shared>,
        td: TrustDomain,
        metrics: Metrics,
        on_resources: impl Fn(&mut Index) + Send + 'static,
    ) {
        // Start applied the first lists; from here, each change.
        loop {
            self.changed.notified().await;
            tokio::time::sleep(BATCH).await;
            self.apply(&shared, &td, &metrics, &on_resources);
        }
    }

    /// One pass: the current lists into the index.
    pub fn apply(
        &self,
        shared: &Shared,
        td: &TrustDomain,
        metrics: &Metrics,
        on_resources: &impl Fn(&mut Index),
    ) {
        let resources = self.resources(metrics);
        let workloads = self.workloads(td);
        let now = Instant::now();
        let changed = shared.update(|index| {
            let config = index.set_resources(resources);
            if config {
                on_resources(index);
            }
            let pods = index.set_managed(workloads, now);
            (config, config || pods)
        });
        if changed {
            metrics.config_reloads.inc();
            tracing::debug!("cluster state changed and applied");
        }
    }
}

async fn wait<K>(store: &reflector::Store<K>, deadline: tokio::time::Instant) -> bool
where
    K: KubeResource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    tokio::time::timeout_at(deadline, store.wait_until_ready())
        .await
        .is_ok_and(|r| r.is_ok())
}

fn metadata(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Metadata {
    Metadata {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: BTreeMap::new(),
    }
}

/// A custom resource as the local store's object.
fn object<K>(o: &K, api_version: &str, kind: &str) -> Option<(Object<K::Spec>, String)>
where
    K: KubeResource + HasSpec,
{
    let object = Object {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        metadata: metadata(o.meta()),
        spec: o.spec().clone(),
    };
    Some((
        object,
        o.meta().resource_version.clone().unwrap_or_default(),
    ))
}

/// The spec of one of our custom resources.
pub trait HasSpec {
    type Spec: Clone;
    fn spec(&self) -> &Self::Spec;
}

macro_rules! has_spec {
    ($($kind:ty => $spec:ty),* $(,)?) => {$(
        impl HasSpec for $kind {
            type Spec = $spec;
            fn spec(&self) -> &$spec {
                &self.spec
            }
        }
    )*};
}

has_spec! {
    types::Server => types::ServerSpec,
    types::AuthorizationPolicy => types::AuthorizationPolicySpec,
    types::MeshTlsAuthentication => types::MeshTlsAuthenticationSpec,
    types::HttpRoute => types::HttpRouteSpec,
    types::Link => types::LinkSpec,
    types::MirroredService => types::MirroredServiceSpec,
    types::FailoverPolicy => types::FailoverPolicySpec,
}

/// A Service with a selector and TCP ports, as the index reads it. Named
/// target ports are resolved per Pod by Kubernetes, not here: such a port
/// is served on its service port number (ports may be listed by number
/// where it differs).
pub fn service(svc: &Service) -> Option<Object<types::ServiceSpec>> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let ports: Vec<types::ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target_port = match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    u16::try_from(*n).ok()
                }
                _ => None,
            };
            Some(types::ServicePort {
                name: p.name.clone(),
                port,
                target_port,
                app_protocol: p.app_protocol.clone(),
                protocol: None,
            })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    Some(Object {
        api_version: types::CORE_V1.to_owned(),
        kind: "Service".to_owned(),
        metadata: metadata(&svc.metadata),
        spec: types::ServiceSpec {
            selector: spec.selector.clone().unwrap_or_default(),
            ports,
        },
    })
}

/// A running Pod with an IP as a registration: meshed (its service
/// account's SPIFFE ID, its proxy's inbound port) when it has the proxy
/// container; ready as its EndpointSlices say, or (in no slice) as its
/// Ready condition says.
pub fn workload(
    pod: &Pod,
    td: &TrustDomain,
    ready_by_pod: &HashMap<(String, String), bool>,
) -> Option<Registration> {
    let namespace = pod.namespace()?;
    let name = pod.name_any();
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let addresses: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .chain(status.pod_ip.iter().filter_map(|ip| ip.parse().ok()))
        .fold(Vec::new(), |mut v, ip| {
            if !v.contains(&ip) {
                v.push(ip);
            }
            v
        });
    if addresses.is_empty() {
        return None;
    }
    let sidecars = spec.init_containers.iter().flatten();
    let proxy = spec
        .containers
        .iter()
        .chain(sidecars)
        .find(|c| c.name == PROXY_CONTAINER);
    let proxy_port = proxy.map(|c| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(PROXY_INBOUND_PORT))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(DEFAULT_PROXY_INBOUND)
    });
    let sa = spec.service_account_name.as_deref().unwrap_or("default");
    let spiffe_id = match proxy_port {
        Some(_) => SpiffeId::workload(td, &namespace, sa).ok()?.to_string(),
        None => String::new(),
    };
    let ports = spec
        .containers
        .iter()
        .filter(|c| c.name != PROXY_CONTAINER)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| {
            Some(WorkloadPort {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.container_port).ok()?,
                protocol: 0,
            })
        })
        .collect();
    let pod_ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let healthy = !terminating
        && ready_by_pod
            .get(&(namespace.clone(), name.clone()))
            .copied()
            .unwrap_or(pod_ready);
    Some(Registration {
        namespace,
        name,
        spiffe_id,
        addresses,
        ports,
        labels: pod.labels().clone(),
        healthy,
        proxy_port: proxy_port.unwrap_or(0),
        via_gateway: false,
    })
}

impl Cluster {
    /// The `Accepted` condition of every Server, written where it differs
    /// from what the Server shows for its current generation. Run by the
    /// Lease holder only.
    pub async fn write_server_status(&self, client: &Client) {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use kube::api::{Patch, PatchParams};
        for server in self.servers.state() {
            let Some((object, _)) = object(&*server, types::POLICY_V1ALPHA1, "Server") else {
                continue;
            };
            let verdict = validate(&Resource::Server(object));
            let (status, reason, message) = match &verdict {
                Ok(()) => ("True", "Accepted", "served to proxies".to_owned()),
                Err(why) => ("False", "Invalid", why.clone()),
            };
            let generation = server.metadata.generation;
            let current = server
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"));
            if current.is_some_and(|c| {
                c.status == status && c.reason == reason && c.observed_generation == generation
            }) {
                continue;
            }
            let condition = types::Condition {
                type_: "Accepted".into(),
                status: status.into(),
                reason: reason.into(),
                message,
                observed_generation: generation,
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            };
            let patch = serde_json::json!({ "status": { "conditions": [condition] } });
            let (Some(ns), name) = (server.namespace(), server.name_any()) else {
                continue;
            };
            let api: Api<types::Server> = Api::namespaced(client.clone(), &ns);
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(error = %e, "cannot write the status of Server {ns}/{name}");
            }
        }
    }

    /// Writes statuses while `leader` says this replica holds the Lease.
    pub async fn write_statuses(
        self,
        client: Client,
        mut leader: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            if *leader.borrow_and_update() {
                self.write_server_status(&client).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = leader.changed() => {}
                }
            } else if leader.changed().await.is_err() {
                return;
            }
        }
    }
}
