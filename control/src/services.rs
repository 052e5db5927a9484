//! The API-port services: Discovery, Policy and Registry for this
//! cluster's workloads, and Federation for linked clusters. They read the
//! shared [`Index`]; every watch stream re-renders its answer when the index
//! version moves and sends it only when it changed.
//!
//! The API's TLS accepts any identity a trusted bundle verifies (this
//! cluster's, and each linked cluster's), so every RPC checks the caller's
//! trust domain itself: Discovery, Policy and Registry serve this cluster's
//! trust domain only, Federation linked ones only.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::Instant,
};

use mesh_core::{
    api::v1::{
        DeregisterRequest, DeregisterResponse, DiscoveryUpdate, Exports, GatewayWorkloads,
        HeartbeatRequest, HeartbeatResponse, InboundPolicy, InboundRequest, LinkedTrust,
        OutboundPolicy, OutboundRequest, RegisterRequest, RegisterResponse, WatchExportsRequest,
        WatchGatewayWorkloadsRequest, WatchRequest, WatchTrustRequest, discovery_server::Discovery,
        federation_server::Federation, policy_server::Policy, registry_server::Registry,
    },
    grpc,
    identity::{SpiffeId, TrustDomain},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::{
    index::{Index, Key, Liveness, Registration, RegistryError, WorkloadPort},
    metrics::{ApiLabels, Metrics, ReasonLabels},
    resources::parse::check_name,
    store::Store,
};

/// The index and a version counter that moves on every change.
#[derive(Debug)]
pub struct Shared {
    index: RwLock<Index>,
    version: watch::Sender<u64>,
    /// True once the control plane stops: every watch stream then ends,
    /// so clients reconnect (to its successor) instead of hanging on.
    closed: watch::Sender<bool>,
}

impl Shared {
    pub fn new(index: Index) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::new(index),
            version: watch::Sender::new(0),
            closed: watch::Sender::new(false),
        })
    }

    /// Ends every watch stream.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the index; wakes every watcher when it reports a change.
    pub fn update<R>(&self, f: impl FnOnce(&mut Index) -> (R, bool)) -> R {
        let (result, changed) = f(&mut self.index.write().unwrap_or_else(|p| p.into_inner()));
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
        result
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

/// Streams `render(index)`: first the current answer, then each change.
/// Ends when the client goes away.
fn watch_stream<T>(
    shared: Arc<Shared>,
    metrics: &Metrics,
    api: &str,
    render: impl Fn(&Index, Instant) -> T + Send + 'static,
) -> ReceiverStream<Result<T, Status>>
where
    T: PartialEq + Clone + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let gauge = metrics
        .watch_streams
        .get_or_create(&ApiLabels { api: api.into() })
        .clone();
    tokio::spawn(async move {
        gauge.inc();
        let mut version = shared.subscribe();
        let mut closed = shared.closed.subscribe();
        let mut last: Option<T> = None;
        loop {
            let current = render(&shared.read(), Instant::now());
            if last.as_ref() != Some(&current) {
                if tx.send(Ok(current.clone())).await.is_err() {
                    break;
                }
                last = Some(current);
            }
            tokio::select! {
                changed = version.changed() => if changed.is_err() { break },
                () = tx.closed() => break,
                _ = closed.wait_for(|c| *c) => break,
            }
        }
        gauge.dec();
    });
    ReceiverStream::new(rx)
}

#[derive(Clone, Debug)]
pub struct ApiServices {
    pub shared: Arc<Shared>,
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    pub liveness: Liveness,
    pub trust_domain: TrustDomain,
    /// This cluster's trust bundle as a SPIFFE bundle document, exported.
    pub own_bundle: String,
}

impl ApiServices {
    fn refuse(&self, reason: &str, code: Code, message: impl Into<String>) -> Status {
        self.metrics
            .registry_refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
        let status = Status::new(code, message);
        tracing::warn!(reason, "registry call refused: {}", status.message());
        status
    }

    /// The caller's verified SPIFFE ID, of any trusted trust domain.
    fn verified<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        grpc::peer(req)
            .and_then(|p| p.identity.clone())
            .ok_or_else(|| {
                self.refuse(
                    "no_credentials",
                    Code::Unauthenticated,
                    "mTLS client certificate required",
                )
            })
    }

    /// The caller's SPIFFE ID, which must be of this cluster's trust domain.
    fn local_caller<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        let id = self.verified(req)?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(self.refuse(
                "foreign_trust_domain",
                Code::PermissionDenied,
                format!(
                    "{id} is from another trust domain; linked clusters may only call Federation"
                ),
            ));
        }
        Ok(id)
    }

    /// The caller's SPIFFE ID and the namespace it names.
    fn caller<T>(&self, req: &Request<T>) -> Result<(SpiffeId, String), Status> {
        let id = self.local_caller(req)?;
        let ns = workload_namespace(&id).ok_or_else(|| {
            self.refuse(
                "not_a_workload_identity",
                Code::PermissionDenied,
                format!("{id} is not a workload identity (spiffe://<td>/ns/<ns>/sa/<sa>)"),
            )
        })?;
        Ok((id, ns))
    }

    fn same_namespace(&self, caller_ns: &str, asked: &str) -> Result<(), Status> {
        if caller_ns == asked {
            Ok(())
        } else {
            Err(self.refuse(
                "namespace_mismatch",
                Code::PermissionDenied,
                format!("a workload of namespace {caller_ns} cannot act for namespace {asked}"),
            ))
        }
    }

    /// Whether `key` is a Pod the cluster keeps (then the Registry call is
    /// a no-op for its own identity, and refused for any other).
    fn kept_by_cluster(&self, key: &Key, id: &SpiffeId) -> Result<bool, Status> {
        let index = self.shared.read();
        match index.managed_identity(key) {
            None => Ok(false),
            Some(owner) if owner == id.as_str() => Ok(true),
            Some(owner) => Err(self.registry_error(RegistryError::NotOwner {
                key: key.clone(),
                owner: owner.to_owned(),
            })),
        }
    }

    fn registry_error(&self, e: RegistryError) -> Status {
        match e {
            RegistryError::NotOwner { .. } => {
                self.refuse("not_owner", Code::PermissionDenied, e.to_string())
            }
            RegistryError::NotFound { .. } => {
                self.refuse("not_registered", Code::NotFound, e.to_string())
            }
            RegistryError::AddressTaken { .. } => {
                self.refuse("address_taken", Code::PermissionDenied, e.to_string())
            }
            RegistryError::NamespaceFull { .. } => {
                self.refuse("namespace_full", Code::ResourceExhausted, e.to_string())
            }
        }
    }

    /// A registration may claim only what the token its identity joined
    /// with granted for that workload: the same identity, exactly the
    /// granted labels, and (when the token named any) only granted
    /// addresses. A workload's word about itself is not enough.
    async fn check_granted(&self, reg: &Registration) -> Result<(), Status> {
        let store = self.store.clone();
        let (ns, name) = (reg.namespace.clone(), reg.name.clone());
        let grant = tokio::task::spawn_blocking(move || store.grant(&ns, &name))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let workload = format!("{}/{}", reg.namespace, reg.name);
        let Some(grant) = grant else {
            return Err(self.refuse(
                "not_granted",
                Code::PermissionDenied,
                format!(
                    "no join token was created for workload {workload}; create the workload's token with `mesh control token create --workload {} --labels ...`",
                    reg.name
                ),
            ));
        };
        if grant.spiffe_id != reg.spiffe_id {
            return Err(self.refuse(
                "not_owner",
                Code::PermissionDenied,
                format!(
                    "workload {workload} was granted to {}; only its owner may register it, not {}",
                    grant.spiffe_id, reg.spiffe_id
                ),
            ));
        }
        if grant.claims.labels != reg.labels {
            return Err(self.refuse(
                "labels_not_granted",
                Code::PermissionDenied,
                format!(
                    "workload {workload} may register the labels its token granted ({:?}), not {:?}",
                    grant.claims.labels, reg.labels
                ),
            ));
        }
        let ports = &grant.claims.ports;
        if let Some(p) = reg
            .ports
            .iter()
            .find(|p| !ports.is_empty() && !ports.contains(&p.port))
        {
            return Err(self.refuse(
                "port_not_granted",
                Code::PermissionDenied,
                format!(
                    "workload {workload} may not register port {}: its token granted {ports:?}",
                    p.port
                ),
            ));
        }
        let allowed = &grant.claims.addresses;
        if allowed.is_empty() {
            // Not fixed by the operator: no other workload's address.
            return self
                .shared
                .read()
                .addresses_free(reg)
                .map_err(|e| self.registry_error(e));
        }
        if let Some(a) = reg.addresses.iter().find(|a| !allowed.contains(a)) {
            return Err(self.refuse(
                "address_not_granted",
                Code::PermissionDenied,
                format!("workload {workload} may not register address {a}: its token granted {allowed:?}"),
            ));
        }
        Ok(())
    }

    async fn persist(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<(), crate::store::StoreError> + Send + 'static,
    ) -> Result<(), Status> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Status::internal(e.to_string())),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

/// `ns` of `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub(crate) fn workload_namespace(id: &SpiffeId) -> Option<String> {
    let parts: Vec<&str> = id.path().split('/').collect();
    match parts.as_slice() {
        ["", "ns", ns, "sa", _] => Some((*ns).to_owned()),
        _ => None,
    }
}

#[tonic::async_trait]
impl Discovery for ApiServices {
    type WatchStream = ReceiverStream<Result<DiscoveryUpdate, Status>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.local_caller(&req)?;
        let authority = req.into_inner().authority;
        Ok(Response::new(watch_stream(
            self.shared.clone(),
            &self.metrics,
            "discovery",
            move |index, now| index.discovery(&authority, now),
        )))
    }
}

#[tonic::async_trait]
impl Policy for ApiServices {
    type WatchInboundStream = ReceiverStream<Result<InboundPolicy, Status>>;
    type WatchOutboundStream = ReceiverStream<Result<OutboundPolicy, Status>>;

    async fn watch_inbound(
        &self,
        req: Request<InboundRequest>,
    ) -> Result<Response<Self::WatchInboundStream>, Status> {
        let (_, caller_ns) = self.caller(&req)?;
        let r = req.into_inner();
        self.same_namespace(&caller_ns, &r.namespace)?;
        let port =
            u16::try_from(r.port).map_err(|_| Status::invalid_argument("port must be 1-65535"))?;
        Ok(Response::new(watch_stream(
            self.shared.clone(),
            &self.metrics,
            "inbound_policy",
            move |index, _| index.inbound(&r.namespace, &r.workload, port),
        )))
    }

    async fn watch_outbound(
        &self,
        req: Request<OutboundRequest>,
    ) -> Result<Response<Self::WatchOutboundStream>, Status> {
        self.local_caller(&req)?;
        let authority = req.into_inner().authority;
        Ok(Response::new(watch_stream(
            self.shared.clone(),
            &self.metrics,
            "outbound_policy",
            move |index, _| index.outbound(&authority),
        )))
    }
}

#[tonic::async_trait]
impl Federation for ApiServices {
    type WatchExportsStream = ReceiverStream<Result<Exports, Status>>;

    async fn watch_exports(
        &self,
        req: Request<WatchExportsRequest>,
    ) -> Result<Response<Self::WatchExportsStream>, Status> {
        let id = self.verified(&req)?;
        let linked = self
            .shared
            .read()
            .linked_clusters()
            .iter()
            .any(|l| id.is_member_of(&l.trust_domain));
        // This cluster's gateway checks exports too.
        let own_system = id.is_member_of(&self.trust_domain)
            && workload_namespace(&id).as_deref() == Some(crate::config::CONTROL_NAMESPACE);
        if !linked && !own_system {
            return Err(self.refuse(
                "not_linked",
                Code::PermissionDenied,
                format!(
                    "{id} is not from a linked trust domain; apply a Link for its cluster (mesh multicluster link) first"
                ),
            ));
        }
        let cluster = req.into_inner().cluster;
        tracing::info!(caller = %id, %cluster, "a linked cluster watches exports");
        let (td, bundle) = (self.trust_domain.to_string(), self.own_bundle.clone());
        Ok(Response::new(watch_stream(
            self.shared.clone(),
            &self.metrics,
            "exports",
            move |index, now| index.exports(&td, &bundle, now),
        )))
    }

    type WatchTrustStream = ReceiverStream<Result<LinkedTrust, Status>>;

    async fn watch_trust(
        &self,
        req: Request<WatchTrustRequest>,
    ) -> Result<Response<Self::WatchTrustStream>, Status> {
        self.local_caller(&req)?;
        let td = self.trust_domain.clone();
        Ok(Response::new(watch_stream(
            self.shared.clone(),
            &self.metrics,
            "trust",
            move |index, _| index.linked_trust(&td),
        )))
    }
}

#[tonic::async_trait]
impl Registry for ApiServices {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let (id, caller_ns) = self.caller(&req)?;
        let r = req.into_inner();
        self.same_namespace(&caller_ns, &r.namespace)?;
        check_name("name", &r.name)
            .map_err(|e| self.refuse("bad_name", Code::InvalidArgument, e))?;
        let addresses = r
            .addresses
            .iter()
            .map(|a| a.parse::<IpAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                self.refuse(
                    "bad_address",
                    Code::InvalidArgument,
                    format!("addresses: {e}"),
                )
            })?;
        if addresses.is_empty() {
            return Err(self.refuse(
                "bad_address",
                Code::InvalidArgument,
                "at least one address is required",
            ));
        }
        let to_port = |p: u32| {
            u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
                self.refuse(
                    "bad_port",
                    Code::InvalidArgument,
                    format!("port {p} is not 1-65535"),
                )
            })
        };
        let ports = r
            .ports
            .iter()
            .map(|p| {
                Ok(WorkloadPort {
                    name: p.name.clone(),
                    port: to_port(p.port)?,
                    protocol: p.protocol,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let proxy_port = if r.proxy_port == 0 {
            0
        } else {
            to_port(r.proxy_port)?
        };
        let reg = Registration {
            namespace: r.namespace,
            name: r.name,
            spiffe_id: id.to_string(),
            addresses,
            ports,
            labels: r.labels.into_iter().collect(),
            healthy: r.healthy,
            proxy_port,
            via_gateway: r.via_gateway,
        };
        // Check ownership first, persist, then publish: a registration is
        // only ever visible once it is committed.
        let key = reg.key();
        if self.kept_by_cluster(&key, &id)? {
            // A Pod: the cluster says where it runs and whether it is
            // ready; its proxy's registration changes nothing.
            return Ok(Response::new(RegisterResponse {
                spiffe_id: id.to_string(),
                heartbeat_interval_seconds: self.liveness.heartbeat_interval.as_secs(),
            }));
        }
        self.check_granted(&reg).await?;
        self.shared
            .read()
            .may_register(&reg)
            .map_err(|e| self.registry_error(e))?;
        let stored = reg.clone();
        self.persist(move |s| s.put_registration(&stored)).await?;
        self.shared
            .update(|index| (index.register(reg, Instant::now()), true))
            .map_err(|e| self.registry_error(e))?;
        tracing::info!(workload = %format!("{}/{}", key.0, key.1), %id, "workload registered");
        Ok(Response::new(RegisterResponse {
            spiffe_id: id.to_string(),
            heartbeat_interval_seconds: self.liveness.heartbeat_interval.as_secs(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let (id, caller_ns) = self.caller(&req)?;
        let r = req.into_inner();
        self.same_namespace(&caller_ns, &r.namespace)?;
        let key: Key = (r.namespace, r.name);
        if self.kept_by_cluster(&key, &id)? {
            return Ok(Response::new(HeartbeatResponse {}));
        }
        let (reg, health_changed) = self
            .shared
            .update(|index| {
                let was_ready = index.workload_counts(Instant::now());
                let result = index.heartbeat(&key, id.as_str(), r.healthy, Instant::now());
                let changed = result.as_ref().is_ok_and(|(_, c)| *c)
                    || was_ready != index.workload_counts(Instant::now());
                (result, changed)
            })
            .map_err(|e| self.registry_error(e))?;
        let now = mesh_core::identity::cert::now().unix_timestamp();
        // Where replicas share the store, the heartbeat is recorded for the
        // writer's garbage collection (the store rate-limits the writes).
        let shared_store = !self.store.sweep_deletes();
        if health_changed {
            self.persist(move |s| {
                s.put_registration(&reg)?;
                s.heartbeat(&reg, now)
            })
            .await?;
        } else if shared_store {
            self.persist(move |s| s.heartbeat(&reg, now)).await?;
        }
        Ok(Response::new(HeartbeatResponse {}))
    }

    async fn deregister(
        &self,
        req: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let (id, caller_ns) = self.caller(&req)?;
        let r = req.into_inner();
        self.same_namespace(&caller_ns, &r.namespace)?;
        let key: Key = (r.namespace, r.name);
        if self.kept_by_cluster(&key, &id)? {
            return Ok(Response::new(DeregisterResponse {}));
        }
        self.shared
            .update(|index| {
                let result = index.deregister(&key, id.as_str());
                let changed = result.is_ok();
                (result, changed)
            })
            .map_err(|e| self.registry_error(e))?;
        self.persist(move |s| s.delete_registration(&key.0, &key.1))
            .await?;
        Ok(Response::new(DeregisterResponse {}))
    }

    type WatchGatewayWorkloadsStream = ReceiverStream<Result<GatewayWorkloads, Status>>;

    async fn watch_gateway_workloads(
        &self,
        req: Request<WatchGatewayWorkloadsRequest>,
    ) -> Result<Response<Self::WatchGatewayWorkloadsStream>, Status> {
        let id = self.local_caller(&req)?;
        let gateway = SpiffeId::workload(
            &self.trust_domain,
            crate::config::CONTROL_NAMESPACE,
            "gateway",
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        if id != gateway {
            return Err(self.refuse(
                "not_gateway",
                Code::PermissionDenied,
                format!("only this cluster's gateway ({gateway}) may watch the workloads behind it, not {id}"),
            ));
        }
        Ok(Response::new(watch_stream(
            self.shared.clone(),
            &self.metrics,
            "gateway_workloads",
            |index, now| index.gateway_workloads(now),
        )))
    }
}
