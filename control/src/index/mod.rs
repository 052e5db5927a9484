//! The control plane's view of the cluster: configuration resources plus
//! live workload registrations, held in memory. Pure and synchronous; the
//! gRPC services render their answers from it (`discovery.rs`,
//! `policy.rs`, `federation.rs`), and the store persists what must survive
//! a restart.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::resources::{
    Resource,
    types::{
        AuthorizationPolicySpec, FailoverPolicySpec, HttpRouteSpec, LinkSpec,
        MeshTlsAuthenticationSpec, MirroredServiceSpec, Object, ServerSpec, ServiceSpec,
    },
};

mod discovery;
mod federation;
mod policy;

pub use discovery::Authority;

/// `(namespace, name)` of a workload or resource.
pub type Key = (String, String);

/// A workload as it registered itself (persisted in the store).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub namespace: String,
    pub name: String,
    /// The SPIFFE ID of the mTLS peer that registered it: its owner.
    pub spiffe_id: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<WorkloadPort>,
    pub labels: BTreeMap<String, String>,
    pub healthy: bool,
    /// The workload proxy's inbound port; 0 when it has none.
    pub proxy_port: u16,
    /// Reached through this cluster's gateway (a VM with no route from
    /// the cluster's workloads).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub via_gateway: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadPort {
    pub name: String,
    pub port: u16,
    /// A `mesh.v1.ProtocolHint` value.
    pub protocol: i32,
}

impl Registration {
    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

/// When a silent workload stops being ready, and when it is forgotten.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    pub heartbeat_interval: Duration,
    /// Missed heartbeats before a workload is not ready.
    pub misses: u32,
    /// Time without heartbeats before a registration is removed.
    pub grace: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            misses: 3,
            grace: Duration::from_secs(300),
        }
    }
}

/// Why a registry call was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("workload {}/{} is registered by {owner}; only its owner may change it", key.0, key.1)]
    NotOwner { key: Key, owner: String },
    #[error("workload {}/{} is not registered (it may have been removed after missing heartbeats); register again", key.0, key.1)]
    NotFound { key: Key },
    #[error("address {address} is registered by workload {}/{}; a workload may not claim another's address", holder.0, holder.1)]
    AddressTaken { address: IpAddr, holder: Key },
    #[error(
        "namespace {namespace} already has {max} registered workloads (--max-workloads-per-namespace)"
    )]
    NamespaceFull { namespace: String, max: usize },
}

/// Registered workloads one namespace may hold by default.
pub const MAX_WORKLOADS_PER_NAMESPACE: usize = 1_000;

#[derive(Clone, Debug)]
struct Workload {
    reg: Registration,
    last_heartbeat: Instant,
    /// Kept by the cluster (a Pod on the `kube` store): its readiness is
    /// `reg.healthy` as the cluster reports it, with no heartbeats, and it
    /// is never swept.
    managed: bool,
}

/// How often the liveness sweep runs (`plane::sweep`).
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A gap between sweeps longer than this means the control plane itself
/// was stalled (SIGSTOP, a frozen VM, a long pause): nobody could be heard
/// meanwhile, so silence in that time is not held against the workloads.
const STALLED: Duration = Duration::from_secs(2);

/// Everything the views are computed from.
#[derive(Debug)]
pub struct Index {
    cluster: String,
    /// When the sweep last ran (`None` until it first does): readiness is
    /// never judged further ahead than `STALLED` past it, so answers
    /// computed right after a stall (before the sweep catches up) do not
    /// see every workload as silent.
    awake: Option<Instant>,
    cluster_domain: String,
    liveness: Liveness,
    /// Registrations one namespace may hold.
    max_per_namespace: usize,
    services: BTreeMap<Key, Object<ServiceSpec>>,
    servers: BTreeMap<Key, Object<ServerSpec>>,
    authorizations: BTreeMap<Key, Object<AuthorizationPolicySpec>>,
    authentications: BTreeMap<Key, Object<MeshTlsAuthenticationSpec>>,
    routes: BTreeMap<Key, Object<HttpRouteSpec>>,
    links: BTreeMap<Key, Object<LinkSpec>>,
    mirrors: BTreeMap<Key, Object<MirroredServiceSpec>>,
    failovers: BTreeMap<Key, Object<FailoverPolicySpec>>,
    workloads: BTreeMap<Key, Workload>,
    /// This cluster's gateway, for workloads reached through it.
    gateway: Option<LocalGateway>,
}

/// This cluster's own gateway: where its workloads reach VMs that have no
/// route from them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalGateway {
    pub addresses: Vec<String>,
    pub identity: String,
}

impl Index {
    pub fn new(cluster: &str, cluster_domain: &str, liveness: Liveness) -> Self {
        Self {
            cluster: cluster.to_owned(),
            awake: None,
            cluster_domain: cluster_domain.to_owned(),
            liveness,
            max_per_namespace: MAX_WORKLOADS_PER_NAMESPACE,
            services: BTreeMap::new(),
            servers: BTreeMap::new(),
            authorizations: BTreeMap::new(),
            authentications: BTreeMap::new(),
            routes: BTreeMap::new(),
            links: BTreeMap::new(),
            mirrors: BTreeMap::new(),
            failovers: BTreeMap::new(),
            workloads: BTreeMap::new(),
            gateway: None,
        }
    }

    /// This cluster's gateway (`--gateway-addr`).
    pub fn set_gateway(&mut self, gateway: Option<LocalGateway>) {
        self.gateway = gateway;
    }

    /// The workloads reached through this cluster's gateway, for it.
    pub fn gateway_workloads(&self, now: Instant) -> mesh_core::api::v1::GatewayWorkloads {
        mesh_core::api::v1::GatewayWorkloads {
            workloads: self
                .workloads
                .values()
                .filter(|w| w.reg.via_gateway)
                .map(|w| mesh_core::api::v1::GatewayWorkload {
                    namespace: w.reg.namespace.clone(),
                    name: w.reg.name.clone(),
                    spiffe_id: w.reg.spiffe_id.clone(),
                    ready: self.is_ready(w, now),
                })
                .collect(),
        }
    }

    /// Sets how many registrations one namespace may hold.
    pub fn set_max_per_namespace(&mut self, max: usize) {
        self.max_per_namespace = max;
    }

    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    /// Replaces all configuration resources. Returns whether anything changed.
    pub fn set_resources(&mut self, resources: Vec<Resource>) -> bool {
        let mut services = BTreeMap::new();
        let mut servers = BTreeMap::new();
        let mut authorizations = BTreeMap::new();
        let mut authentications = BTreeMap::new();
        let mut routes = BTreeMap::new();
        let mut links = BTreeMap::new();
        let mut mirrors = BTreeMap::new();
        let mut failovers = BTreeMap::new();
        for res in resources {
            let key = (
                res.metadata().namespace.clone(),
                res.metadata().name.clone(),
            );
            match res {
                Resource::Service(o) => services.insert(key, o).map(|_| ()),
                Resource::Server(o) => servers.insert(key, o).map(|_| ()),
                Resource::AuthorizationPolicy(o) => authorizations.insert(key, o).map(|_| ()),
                Resource::MeshTlsAuthentication(o) => authentications.insert(key, o).map(|_| ()),
                Resource::HttpRoute(o) => routes.insert(key, o).map(|_| ()),
                Resource::Link(o) => links.insert(key, o).map(|_| ()),
                Resource::MirroredService(o) => mirrors.insert(key, o).map(|_| ()),
                Resource::FailoverPolicy(o) => failovers.insert(key, o).map(|_| ()),
            };
        }
        let changed = services != self.services
            || servers != self.servers
            || authorizations != self.authorizations
            || authentications != self.authentications
            || routes != self.routes
            || links != self.links
            || mirrors != self.mirrors
            || failovers != self.failovers;
        self.failovers = failovers;
        self.links = links;
        self.mirrors = mirrors;
        self.services = services;
        self.servers = servers;
        self.authorizations = authorizations;
        self.authentications = authentications;
        self.routes = routes;
        changed
    }

    /// Whether `reg` may be stored: new (below its namespace's cap), or
    /// replacing its owner's own.
    pub fn may_register(&self, reg: &Registration) -> Result<(), RegistryError> {
        let key = reg.key();
        match self.workloads.get(&key) {
            Some(existing) if existing.reg.spiffe_id != reg.spiffe_id => {
                return Err(RegistryError::NotOwner {
                    key,
                    owner: existing.reg.spiffe_id.clone(),
                });
            }
            Some(_) => {}
            None => {
                let in_namespace = self
                    .workloads
                    .keys()
                    .filter(|(ns, _)| *ns == reg.namespace)
                    .count();
                if in_namespace >= self.max_per_namespace {
                    return Err(RegistryError::NamespaceFull {
                        namespace: reg.namespace.clone(),
                        max: self.max_per_namespace,
                    });
                }
            }
        }
        Ok(())
    }

    /// `Err` when another workload than `reg`'s holds one of its
    /// addresses (for registrations whose token fixed no addresses).
    pub fn addresses_free(&self, reg: &Registration) -> Result<(), RegistryError> {
        let key = reg.key();
        for (other, w) in &self.workloads {
            if *other == key {
                continue;
            }
            if let Some(address) = reg.addresses.iter().find(|a| w.reg.addresses.contains(a)) {
                return Err(RegistryError::AddressTaken {
                    address: *address,
                    holder: other.clone(),
                });
            }
        }
        Ok(())
    }

    /// Adds or replaces a registration; only its owner may replace it.
    pub fn register(&mut self, reg: Registration, now: Instant) -> Result<(), RegistryError> {
        self.may_register(&reg)?;
        let key = reg.key();
        self.workloads.insert(
            key,
            Workload {
                reg,
                last_heartbeat: now,
                managed: false,
            },
        );
        Ok(())
    }

    /// Restores registrations read from the store after a restart. Each gets
    /// a fresh heartbeat window.
    pub fn restore(&mut self, regs: Vec<Registration>, now: Instant) {
        for reg in regs {
            self.workloads.insert(
                reg.key(),
                Workload {
                    reg,
                    last_heartbeat: now,
                    managed: false,
                },
            );
        }
    }

    /// The SPIFFE ID of the cluster-managed workload `key` (a Pod), if it
    /// is one: the Registry leaves it to the cluster.
    pub fn managed_identity(&self, key: &Key) -> Option<&str> {
        self.workloads
            .get(key)
            .filter(|w| w.managed)
            .map(|w| w.reg.spiffe_id.as_str())
    }

    /// Replaces every cluster-managed workload (Pods on the `kube` store)
    /// with `regs`. Registrations made through the Registry stay, unless a
    /// Pod of the same name replaces one. Returns whether anything changed.
    pub fn set_managed(&mut self, regs: Vec<Registration>, now: Instant) -> bool {
        let before: BTreeMap<Key, Registration> = self
            .workloads
            .iter()
            .filter(|(_, w)| w.managed)
            .map(|(k, w)| (k.clone(), w.reg.clone()))
            .collect();
        let after: BTreeMap<Key, Registration> = regs.into_iter().map(|r| (r.key(), r)).collect();
        if before == after {
            return false;
        }
        self.workloads.retain(|_, w| !w.managed);
        for (key, reg) in after {
            self.workloads.insert(
                key,
                Workload {
                    reg,
                    last_heartbeat: now,
                    managed: true,
                },
            );
        }
        true
    }

    /// Records a heartbeat. Returns the updated registration and whether
    /// its health changed.
    pub fn heartbeat(
        &mut self,
        key: &Key,
        caller: &str,
        healthy: bool,
        now: Instant,
    ) -> Result<(Registration, bool), RegistryError> {
        let w = self.owned(key, caller)?;
        let changed = w.reg.healthy != healthy;
        w.reg.healthy = healthy;
        w.last_heartbeat = now;
        Ok((w.reg.clone(), changed))
    }

    pub fn deregister(&mut self, key: &Key, caller: &str) -> Result<(), RegistryError> {
        self.owned(key, caller)?;
        self.workloads.remove(key);
        Ok(())
    }

    fn owned(&mut self, key: &Key, caller: &str) -> Result<&mut Workload, RegistryError> {
        match self.workloads.get_mut(key) {
            None => Err(RegistryError::NotFound { key: key.clone() }),
            Some(w) if w.reg.spiffe_id != caller => Err(RegistryError::NotOwner {
                key: key.clone(),
                owner: w.reg.spiffe_id.clone(),
            }),
            Some(w) => Ok(w),
        }
    }

    /// Whether a workload counts as ready at `now`: healthy and heard from
    /// within `misses` heartbeat intervals.
    fn is_ready(&self, w: &Workload, now: Instant) -> bool {
        let deadline = self.liveness.heartbeat_interval * self.liveness.misses;
        let judged = self.awake.map_or(now, |awake| now.min(awake + STALLED));
        w.reg.healthy
            && (w.managed || judged.saturating_duration_since(w.last_heartbeat) <= deadline)
    }

    /// Removes registrations silent for longer than the grace period and
    /// returns their keys. Also returns whether any workload's readiness
    /// flipped since `before` (the previous sweep's time).
    ///
    /// When the sweep itself ran late (more than `STALLED` after `before`:
    /// the control plane was stalled), the time it lost is added to every
    /// workload's heartbeat window first: the judge's own pause is not
    /// evidence against the workloads.
    pub fn sweep(&mut self, before: Instant, now: Instant) -> (Vec<Key>, bool) {
        let gap = now.saturating_duration_since(before);
        if gap > STALLED {
            let lost = gap - SWEEP_EVERY;
            tracing::warn!(
                "the control plane was stalled for {lost:?}; heartbeat windows are extended by as much"
            );
            for w in self.workloads.values_mut() {
                w.last_heartbeat = (w.last_heartbeat + lost).min(now);
            }
        }
        self.awake = Some(now);
        let flipped = self
            .workloads
            .values()
            .any(|w| self.is_ready(w, before) != self.is_ready(w, now));
        let grace = self.liveness.grace;
        let removed: Vec<Key> = self
            .workloads
            .iter()
            .filter(|(_, w)| !w.managed && now.saturating_duration_since(w.last_heartbeat) > grace)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &removed {
            self.workloads.remove(key);
        }
        (removed.clone(), flipped || !removed.is_empty())
    }

    /// `(ready, not_ready)` workload counts at `now`.
    pub fn workload_counts(&self, now: Instant) -> (usize, usize) {
        let ready = self
            .workloads
            .values()
            .filter(|w| self.is_ready(w, now))
            .count();
        (ready, self.workloads.len() - ready)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn reg(
        ns: &str,
        name: &str,
        sa: &str,
        labels: &[(&str, &str)],
        ip: &str,
    ) -> Registration {
        Registration {
            namespace: ns.into(),
            name: name.into(),
            spiffe_id: format!("spiffe://west.mesh.local/ns/{ns}/sa/{sa}"),
            addresses: vec![ip.parse().unwrap()],
            ports: vec![WorkloadPort {
                name: "http".into(),
                port: 8080,
                protocol: 1,
            }],
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            healthy: true,
            proxy_port: 4143,
            via_gateway: false,
        }
    }

    #[test]
    fn liveness_marks_not_ready_then_removes() {
        let t0 = Instant::now();
        let mut index = Index::new("west", "cluster.local", Liveness::default());
        index
            .register(reg("shop", "api-0", "api", &[], "10.0.0.1"), t0)
            .unwrap();
        assert_eq!(index.workload_counts(t0), (1, 0));

        let t31 = t0 + Duration::from_secs(31);
        let (removed, changed) = index.sweep(t0 + Duration::from_secs(29), t31);
        assert!(
            removed.is_empty() && changed,
            "three missed heartbeats: not ready"
        );
        assert_eq!(index.workload_counts(t31), (0, 1));

        let key = ("shop".to_owned(), "api-0".to_owned());
        let owner = "spiffe://west.mesh.local/ns/shop/sa/api";
        index.heartbeat(&key, owner, true, t31).unwrap();
        assert_eq!(
            index.workload_counts(t31),
            (1, 0),
            "a heartbeat makes it ready again"
        );

        let late = t31 + Duration::from_secs(301);
        let (removed, _) = index.sweep(late - Duration::from_secs(1), late);
        assert_eq!(removed, vec![key.clone()]);
        assert!(matches!(
            index.heartbeat(&key, owner, true, late),
            Err(RegistryError::NotFound { .. })
        ));
    }

    /// The control plane itself stalls for 40 s (SIGSTOP, a frozen VM):
    /// when it resumes, no workload is judged silent for the time it could
    /// not listen, neither by an answer computed before the sweep catches
    /// up nor by the sweep; real silence afterwards still counts.
    #[test]
    fn the_judges_own_pause_is_not_held_against_workloads() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut index = Index::new("west", "cluster.local", Liveness::default());
        index
            .register(reg("shop", "api-0", "api", &[], "10.0.0.1"), t0)
            .unwrap();
        index.sweep(t0, t0 + s(1));
        let resumed = t0 + s(41);
        assert_eq!(
            index.workload_counts(resumed),
            (1, 0),
            "before the sweep runs"
        );
        let (removed, changed) = index.sweep(t0 + s(1), resumed);
        assert!(removed.is_empty() && !changed);
        assert_eq!(index.workload_counts(resumed), (1, 0), "after it");
        // 31 s of real silence after the pause: not ready.
        let later = resumed + s(31);
        index.sweep(later - s(1), later);
        assert_eq!(index.workload_counts(later), (0, 1));
    }

    #[test]
    fn a_namespace_holds_at_most_its_cap() {
        let now = Instant::now();
        let mut index = Index::new("west", "cluster.local", Liveness::default());
        index.set_max_per_namespace(1);
        index
            .register(reg("shop", "api-0", "api", &[], "10.0.0.1"), now)
            .unwrap();
        assert!(matches!(
            index.register(reg("shop", "api-1", "api", &[], "10.0.0.2"), now),
            Err(RegistryError::NamespaceFull { max: 1, .. })
        ));
        index
            .register(reg("shop", "api-0", "api", &[], "10.0.0.3"), now)
            .expect("replacing its own registration is not a new one");
        index
            .register(reg("billing", "db-0", "db", &[], "10.0.0.4"), now)
            .expect("another namespace has its own cap");
    }

    #[test]
    fn only_the_owner_changes_a_registration() {
        let now = Instant::now();
        let mut index = Index::new("west", "cluster.local", Liveness::default());
        index
            .register(reg("shop", "api-0", "api", &[], "10.0.0.1"), now)
            .unwrap();
        let thief = reg("shop", "api-0", "web", &[], "10.0.0.9");
        assert!(matches!(
            index.register(thief, now),
            Err(RegistryError::NotOwner { .. })
        ));
        let key = ("shop".to_owned(), "api-0".to_owned());
        let web = "spiffe://west.mesh.local/ns/shop/sa/web";
        assert!(matches!(
            index.deregister(&key, web),
            Err(RegistryError::NotOwner { .. })
        ));
        assert!(matches!(
            index.heartbeat(&key, web, false, now),
            Err(RegistryError::NotOwner { .. })
        ));
    }
}
