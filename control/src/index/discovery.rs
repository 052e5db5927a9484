//! Discovery: the ready endpoints behind a service authority.

use std::{net::SocketAddr, time::Instant};

use mesh_core::api::v1::{
    DiscoveryUpdate, Endpoint, EndpointSet, Failover, FailoverTier, NoSuchService, ProtocolHint,
    ViaGateway, discovery_update,
};

use super::Index;
use crate::resources::types::{
    DEFAULT_FAILBACK_DELAY, DEFAULT_THRESHOLD, FailoverPolicySpec, LOCAL_TIER, Object, ServicePort,
    ServiceSpec, parse_duration,
};

/// A parsed `<service>.<namespace>.svc.<cluster-domain>:<port>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    pub service: String,
    pub namespace: String,
    pub port: u16,
}

impl Authority {
    pub fn parse(s: &str, cluster_domain: &str) -> Result<Self, String> {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| {
            format!("authority {s:?} has no port; write <svc>.<ns>.svc.{cluster_domain}:<port>")
        })?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("authority {s:?} has an invalid port"))?;
        let suffix = format!(".svc.{cluster_domain}");
        let Some(name) = host.strip_suffix(&suffix) else {
            return Err(format!(
                "authority {s:?} is not in this cluster's domain; write <svc>.<ns>.svc.{cluster_domain}:<port>"
            ));
        };
        let (service, namespace) = name
            .split_once('.')
            .filter(|(svc, ns)| !svc.is_empty() && !ns.is_empty() && !ns.contains('.'))
            .ok_or_else(|| format!("authority {s:?} must name <svc>.<ns>"))?;
        Ok(Self {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            port,
        })
    }

    pub fn render(&self, cluster_domain: &str) -> String {
        format!(
            "{}.{}.svc.{cluster_domain}:{}",
            self.service, self.namespace, self.port
        )
    }
}

/// Maps a Service port's `appProtocol` to the wire hint.
pub(super) fn app_protocol_hint(p: Option<&str>) -> ProtocolHint {
    match p.map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "http/1.1" | "kubernetes.io/http") => ProtocolHint::Http1,
        Some("h2c" | "http2" | "kubernetes.io/h2c") => ProtocolHint::Http2,
        Some("grpc") => ProtocolHint::Grpc,
        Some("opaque" | "tcp") => ProtocolHint::Opaque,
        _ => ProtocolHint::Unknown,
    }
}

impl Index {
    /// The service and port an authority names, or why there is none.
    pub(super) fn service_port(
        &self,
        authority: &str,
    ) -> Result<(Authority, &Object<ServiceSpec>, &ServicePort), String> {
        let auth = Authority::parse(authority, &self.cluster_domain)?;
        let key = (auth.namespace.clone(), auth.service.clone());
        let svc = self.services.get(&key).ok_or_else(|| {
            format!(
                "no Service {} in namespace {}",
                auth.service, auth.namespace
            )
        })?;
        let port = svc
            .spec
            .ports
            .iter()
            .find(|p| p.port == auth.port)
            .ok_or_else(|| {
                let ports: Vec<String> =
                    svc.spec.ports.iter().map(|p| p.port.to_string()).collect();
                format!(
                    "Service {}/{} has no port {} (ports: {})",
                    auth.namespace,
                    auth.service,
                    auth.port,
                    ports.join(", ")
                )
            })?;
        Ok((auth, svc, port))
    }

    /// The full discovery answer for `authority` at `now`. An authority
    /// that is an `ip:port` (what a transparently intercepted connection
    /// knows) answers for the workloads registered at that IP.
    pub fn discovery(&self, authority: &str, now: Instant) -> DiscoveryUpdate {
        if let Ok(addr) = authority.parse::<SocketAddr>() {
            return self.discovery_by_address(authority, addr, now);
        }
        if let Some(update) = self.discovery_with_failover(authority, now) {
            return update;
        }
        self.discovery_here(authority, now)
    }

    /// [`Index::discovery`] without failover: this cluster's endpoints of
    /// a service (or a mirror's). What this cluster exports and what its
    /// gateway reaches are these, never another cluster's.
    pub fn discovery_here(&self, authority: &str, now: Instant) -> DiscoveryUpdate {
        if let Ok(addr) = authority.parse::<SocketAddr>() {
            return self.discovery_by_address(authority, addr, now);
        }
        if let Some(update) = self.discovery_of_mirror(authority) {
            return update;
        }
        let kind = match self.service_port(authority) {
            Err(reason) => discovery_update::Kind::NoSuchService(NoSuchService {
                authority: authority.to_owned(),
                reason,
            }),
            Ok((auth, svc, port)) => {
                let target = port.target_port.unwrap_or(port.port);
                let protocol = app_protocol_hint(port.app_protocol.as_deref());
                // A Service without a selector has no automatic endpoints.
                let selects = |labels: &std::collections::BTreeMap<String, String>| {
                    !svc.spec.selector.is_empty()
                        && svc
                            .spec
                            .selector
                            .iter()
                            .all(|(k, v)| labels.get(k) == Some(v))
                };
                let endpoints = self
                    .workloads
                    .values()
                    .filter(|w| w.reg.namespace == auth.namespace)
                    .filter(|w| {
                        selects(&w.reg.labels) && self.is_ready(w, now) && self.reachable(w)
                    })
                    .filter_map(|w| {
                        let ip = *w.reg.addresses.first()?;
                        Some(self.endpoint(w, SocketAddr::new(ip, target), protocol as i32))
                    })
                    .collect();
                discovery_update::Kind::Endpoints(EndpointSet {
                    authority: authority.to_owned(),
                    endpoints,
                    failover: None,
                })
            }
        };
        DiscoveryUpdate { kind: Some(kind) }
    }

    /// The answer for a service a FailoverPolicy steers: each tier's
    /// endpoints with the tier as their priority (`local`: this cluster's;
    /// a linked cluster: its mirror of the service of the same name), and
    /// the policy's settings. `None` when no policy names the service.
    fn discovery_with_failover(&self, authority: &str, now: Instant) -> Option<DiscoveryUpdate> {
        let auth = Authority::parse(authority, &self.cluster_domain).ok()?;
        let policy = self.failover_policy(&auth.namespace, &auth.service)?;
        let spec = &policy.spec;
        let local = self.discovery_here(authority, now);
        let local_endpoints = match local.kind {
            Some(discovery_update::Kind::Endpoints(set)) => Some(set.endpoints),
            // No local Service: a federated name served by mirrors only.
            _ => None,
        };
        let mut endpoints = Vec::new();
        let mut port_known = local_endpoints.is_some();
        for (priority, tier) in spec.tiers.iter().enumerate() {
            let priority = u32::try_from(priority).unwrap_or(u32::MAX);
            for cluster in &tier.clusters {
                if cluster == LOCAL_TIER {
                    for mut e in local_endpoints.iter().flatten().cloned() {
                        e.priority = priority;
                        endpoints.push(e);
                    }
                    continue;
                }
                let Some(mirror) = self.mirror_of(&auth.namespace, &auth.service, cluster) else {
                    continue;
                };
                port_known |= mirror.spec.ports.iter().any(|p| p.port == auth.port);
                let name = format!(
                    "{}.{}.svc.{}:{}",
                    mirror.metadata.name, auth.namespace, self.cluster_domain, auth.port
                );
                if let Some(discovery_update::Kind::Endpoints(set)) =
                    self.discovery_of_mirror(&name).and_then(|u| u.kind)
                {
                    for mut e in set.endpoints {
                        e.priority = priority;
                        endpoints.push(e);
                    }
                }
            }
        }
        let kind = if port_known {
            discovery_update::Kind::Endpoints(EndpointSet {
                authority: authority.to_owned(),
                endpoints,
                failover: Some(Failover {
                    policy: format!("{}/{}", policy.metadata.namespace, policy.metadata.name),
                    threshold: spec.threshold.map_or(DEFAULT_THRESHOLD, |r| r.0),
                    failback_delay_ms: spec
                        .failback_delay
                        .as_deref()
                        .and_then(|d| parse_duration(d).ok())
                        .unwrap_or(DEFAULT_FAILBACK_DELAY)
                        .as_millis()
                        .try_into()
                        .unwrap_or(u32::MAX),
                    tiers: spec
                        .tiers
                        .iter()
                        .map(|t| FailoverTier {
                            clusters: t.clusters.clone(),
                        })
                        .collect(),
                }),
            })
        } else {
            discovery_update::Kind::NoSuchService(NoSuchService {
                authority: authority.to_owned(),
                reason: format!(
                    "FailoverPolicy {}/{} steers {} but neither a local Service nor a mirror of it has port {}",
                    policy.metadata.namespace, policy.metadata.name, auth.service, auth.port
                ),
            })
        };
        Some(DiscoveryUpdate { kind: Some(kind) })
    }

    /// The FailoverPolicy for `service` in `namespace` (the first by name
    /// when several name it).
    pub fn failover_policy(
        &self,
        namespace: &str,
        service: &str,
    ) -> Option<&Object<FailoverPolicySpec>> {
        self.failovers
            .values()
            .find(|p| p.metadata.namespace == namespace && p.spec.service == service)
    }

    /// The mirror of `service` that comes from linked cluster `cluster`.
    fn mirror_of(
        &self,
        namespace: &str,
        service: &str,
        cluster: &str,
    ) -> Option<&Object<crate::resources::types::MirroredServiceSpec>> {
        self.mirrors.values().find(|m| {
            m.metadata.namespace == namespace
                && m.spec.remote_name == service
                && m.spec.link == cluster
        })
    }

    /// What is wrong with the FailoverPolicies that the resources alone
    /// could not tell: clusters no Link names. Each names the field.
    pub fn failover_problems(&self) -> Vec<String> {
        let linked: std::collections::BTreeSet<&str> = self
            .links
            .values()
            .map(|l| l.spec.cluster_name.as_str())
            .collect();
        let mut problems = Vec::new();
        for p in self.failovers.values() {
            for (i, tier) in p.spec.tiers.iter().enumerate() {
                for (j, cluster) in tier.clusters.iter().enumerate() {
                    if cluster != LOCAL_TIER && !linked.contains(cluster.as_str()) {
                        problems.push(format!(
                            "FailoverPolicy {}/{} spec.tiers[{i}].clusters[{j}]: unknown cluster {cluster:?}: no Link names it (linked: {}); that tier has no endpoints from it",
                            p.metadata.namespace,
                            p.metadata.name,
                            if linked.is_empty() { "none".to_owned() } else { linked.iter().copied().collect::<Vec<_>>().join(", ") }
                        ));
                    }
                }
            }
        }
        problems
    }

    /// Whether `w` can be an endpoint: one reached through the gateway
    /// needs a gateway to be reached through.
    fn reachable(&self, w: &super::Workload) -> bool {
        !w.reg.via_gateway || self.gateway.is_some()
    }

    /// The mirror an authority names and its port (no local Service of
    /// that name).
    pub(super) fn mirror_port(&self, authority: &str) -> Option<(Authority, &ServicePort)> {
        let auth = Authority::parse(authority, &self.cluster_domain).ok()?;
        let key = (auth.namespace.clone(), auth.service.clone());
        if self.services.contains_key(&key) {
            return None;
        }
        let port = self
            .mirrors
            .get(&key)?
            .spec
            .ports
            .iter()
            .find(|p| p.port == auth.port)?;
        Some((auth, port))
    }

    /// A mirrored service's answer: one "via gateway" endpoint when the
    /// mirror is ready and its Link is known, else an empty set. `None`
    /// when the authority names no mirror (a local Service wins a name
    /// clash).
    fn discovery_of_mirror(&self, authority: &str) -> Option<DiscoveryUpdate> {
        let auth = Authority::parse(authority, &self.cluster_domain).ok()?;
        let key = (auth.namespace.clone(), auth.service.clone());
        if self.services.contains_key(&key) {
            return None;
        }
        let mirror = self.mirrors.get(&key)?;
        let port = mirror.spec.ports.iter().find(|p| p.port == auth.port)?;
        let link = self
            .links
            .values()
            .find(|l| l.spec.cluster_name == mirror.spec.link);
        let endpoints = match link {
            Some(link) if mirror.spec.ready && !link.spec.gateway_addresses.is_empty() => {
                vec![Endpoint {
                    address: String::new(),
                    spiffe_id: mirror.spec.identities.first().cloned().unwrap_or_default(),
                    weight: 1,
                    cluster: link.spec.cluster_name.clone(),
                    priority: 0,
                    protocol: app_protocol_hint(port.app_protocol.as_deref()) as i32,
                    labels: Default::default(),
                    via_gateway: Some(ViaGateway {
                        gateway_addresses: link.spec.gateway_addresses.clone(),
                        gateway_identity: link.spec.gateway_identity.clone(),
                        target_authority: format!(
                            "{}.{}.svc.{}:{}",
                            mirror.spec.remote_name, auth.namespace, self.cluster_domain, port.port
                        ),
                        destination_identities: mirror.spec.identities.clone(),
                        quic: link.spec.transport.as_deref() != Some("tcp"),
                        target_port: u32::from(port.target_port.unwrap_or(port.port)),
                    }),
                    workload: format!("{}/{}", auth.namespace, auth.service),
                    proxy_port: 0,
                }]
            }
            _ => Vec::new(),
        };
        Some(DiscoveryUpdate {
            kind: Some(discovery_update::Kind::Endpoints(EndpointSet {
                authority: authority.to_owned(),
                endpoints,
                failover: None,
            })),
        })
    }

    /// Workload `w` as an endpoint at `address`; through this cluster's
    /// gateway when it registered as reached that way.
    fn endpoint(&self, w: &super::Workload, address: SocketAddr, protocol: i32) -> Endpoint {
        let via_gateway = match (&self.gateway, w.reg.via_gateway) {
            (Some(gw), true) => Some(ViaGateway {
                gateway_addresses: gw.addresses.clone(),
                gateway_identity: gw.identity.clone(),
                target_authority: mesh_core::targets::vm(
                    &w.reg.namespace,
                    &w.reg.name,
                    w.reg.proxy_port,
                ),
                destination_identities: vec![w.reg.spiffe_id.clone()],
                quic: false,
                target_port: u32::from(address.port()),
            }),
            _ => None,
        };
        Endpoint {
            address: address.to_string(),
            spiffe_id: w.reg.spiffe_id.clone(),
            weight: 1,
            cluster: self.cluster.clone(),
            priority: 0,
            protocol,
            labels: w.reg.labels.clone().into_iter().collect(),
            via_gateway,
            workload: format!("{}/{}", w.reg.namespace, w.reg.name),
            proxy_port: u32::from(w.reg.proxy_port),
        }
    }

    /// The meshed workloads at `addr`'s IP, each as an endpoint on
    /// `addr`'s port. A registered workload that is not ready still makes
    /// the address meshed (an empty set, so callers refuse rather than go
    /// in plaintext); an IP no workload registered is no service.
    fn discovery_by_address(
        &self,
        authority: &str,
        addr: SocketAddr,
        now: Instant,
    ) -> DiscoveryUpdate {
        let at_ip: Vec<_> = self
            .workloads
            .values()
            .filter(|w| w.reg.proxy_port != 0 && w.reg.addresses.contains(&addr.ip()))
            .collect();
        let kind = if at_ip.is_empty() {
            discovery_update::Kind::NoSuchService(NoSuchService {
                authority: authority.to_owned(),
                reason: format!("no meshed workload registered at {}", addr.ip()),
            })
        } else {
            let endpoints = at_ip
                .into_iter()
                .filter(|w| self.is_ready(w, now) && self.reachable(w))
                .map(|w| {
                    let protocol = w
                        .reg
                        .ports
                        .iter()
                        .find(|p| p.port == addr.port())
                        .map_or(ProtocolHint::Unknown as i32, |p| p.protocol);
                    self.endpoint(w, addr, protocol)
                })
                .collect();
            discovery_update::Kind::Endpoints(EndpointSet {
                authority: authority.to_owned(),
                endpoints,
                failover: None,
            })
        };
        DiscoveryUpdate { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        index::{Liveness, tests::reg},
        resources::parse::parse_file,
    };

    fn index(yaml: &str) -> Index {
        let mut index = Index::new("west", "cluster.local", Liveness::default());
        let res = parse_file(std::path::Path::new("t.yaml"), yaml).unwrap();
        index.set_resources(res.into_iter().map(|(_, r)| r).collect());
        index
    }

    const API: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{port: 80, targetPort: 8080, appProtocol: http}]\n";

    fn endpoints(u: DiscoveryUpdate) -> Vec<Endpoint> {
        match u.kind.unwrap() {
            discovery_update::Kind::Endpoints(set) => set.endpoints,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_vm_behind_the_gateway_is_reached_through_it_and_only_with_one() {
        let now = Instant::now();
        let mut index = index(API);
        let mut vm = reg("shop", "api-vm", "api", &[("app", "api")], "10.0.2.15");
        vm.via_gateway = true;
        index.register(vm, now).unwrap();
        let auth = "api.shop.svc.cluster.local:80";
        assert!(
            endpoints(index.discovery(auth, now)).is_empty(),
            "without a gateway it cannot be reached"
        );
        index.set_gateway(Some(crate::index::LocalGateway {
            addresses: vec!["gw.west:4143".into()],
            identity: "spiffe://west.mesh.local/ns/mesh-system/sa/gateway".into(),
        }));
        let eps = endpoints(index.discovery(auth, now));
        assert_eq!(eps.len(), 1);
        let via = eps[0].via_gateway.as_ref().expect("through the gateway");
        assert_eq!(via.gateway_addresses, vec!["gw.west:4143"]);
        assert_eq!(via.target_authority, "api-vm.shop.vm.mesh:4143");
        assert_eq!(via.target_port, 8080);
        assert_eq!(
            via.destination_identities,
            vec!["spiffe://west.mesh.local/ns/shop/sa/api"]
        );
        let behind = index.gateway_workloads(now).workloads;
        assert_eq!(behind.len(), 1);
        assert_eq!((behind[0].name.as_str(), behind[0].ready), ("api-vm", true));
    }

    #[test]
    fn ready_selected_workloads_are_endpoints() {
        let now = Instant::now();
        let mut index = index(API);
        index
            .register(
                reg("shop", "api-0", "api", &[("app", "api")], "10.0.0.1"),
                now,
            )
            .unwrap();
        index
            .register(
                reg("shop", "web-0", "web", &[("app", "web")], "10.0.0.2"),
                now,
            )
            .unwrap();
        index
            .register(
                reg("other", "api-0", "api", &[("app", "api")], "10.0.0.3"),
                now,
            )
            .unwrap();
        let mut sick = reg("shop", "api-1", "api", &[("app", "api")], "10.0.0.4");
        sick.healthy = false;
        index.register(sick, now).unwrap();

        let eps = endpoints(index.discovery("api.shop.svc.cluster.local:80", now));
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].address, "10.0.0.1:8080");
        assert_eq!(eps[0].spiffe_id, "spiffe://west.mesh.local/ns/shop/sa/api");
        assert_eq!(eps[0].protocol, ProtocolHint::Http1 as i32);
        assert_eq!((eps[0].proxy_port, eps[0].cluster.as_str()), (4143, "west"));

        let later = now + Duration::from_secs(31);
        assert!(endpoints(index.discovery("api.shop.svc.cluster.local:80", later)).is_empty());
    }

    #[test]
    fn an_address_answers_for_the_meshed_workload_there() {
        let now = Instant::now();
        let mut index = index(API);
        index
            .register(
                reg("shop", "api-0", "api", &[("app", "api")], "10.0.0.1"),
                now,
            )
            .unwrap();
        let eps = endpoints(index.discovery("10.0.0.1:5432", now));
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].address, "10.0.0.1:5432");
        assert_eq!(eps[0].spiffe_id, "spiffe://west.mesh.local/ns/shop/sa/api");
        assert_eq!(eps[0].proxy_port, 4143);
        assert_eq!(
            endpoints(index.discovery("10.0.0.1:8080", now))[0].protocol,
            1,
            "the registered port's protocol"
        );
        // Not ready: still meshed, with nothing to send to (never plaintext).
        let later = now + Duration::from_secs(31);
        assert!(endpoints(index.discovery("10.0.0.1:5432", later)).is_empty());
        match index.discovery("10.0.0.9:80", now).kind.unwrap() {
            discovery_update::Kind::NoSuchService(n) => {
                assert_eq!(n.reason, "no meshed workload registered at 10.0.0.9");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_mirror_is_one_endpoint_via_its_links_gateway() {
        let root = mesh_core::identity::RootCa::generate(
            mesh_core::identity::ca::DEFAULT_ROOT_TTL,
            mesh_core::identity::cert::now(),
        )
        .unwrap();
        let mut bundle = mesh_core::identity::TrustBundle::new("east.mesh.local".parse().unwrap());
        bundle.add_root(root.cert().clone()).unwrap();
        let json = bundle.to_spiffe_json().unwrap();
        let mirror = |ready: bool| {
            let docs = [
                serde_json::json!({
                    "apiVersion": "multicluster.mesh.rs/v1alpha1", "kind": "Link",
                    "metadata": { "name": "east" },
                    "spec": {
                        "clusterName": "east", "trustDomain": "east.mesh.local",
                        "gatewayAddresses": ["gw.east:4143"],
                        "gatewayIdentity": "spiffe://east.mesh.local/ns/mesh-system/sa/gateway",
                        "transport": "tcp", "trustBundle": json,
                    },
                }),
                serde_json::json!({
                    "apiVersion": "multicluster.mesh.rs/v1alpha1", "kind": "MirroredService",
                    "metadata": { "name": "api-east", "namespace": "shop" },
                    "spec": {
                        "link": "east", "remoteName": "api",
                        "ports": [{ "port": 80, "targetPort": 8080, "appProtocol": "http" }],
                        "identities": ["spiffe://east.mesh.local/ns/shop/sa/api"],
                        "ready": ready,
                    },
                }),
            ];
            serde_saphyr::to_string_multiple(&docs).unwrap()
        };
        let eps = endpoints(
            index(&mirror(true)).discovery("api-east.shop.svc.cluster.local:80", Instant::now()),
        );
        assert_eq!(eps.len(), 1);
        let via = eps[0].via_gateway.as_ref().unwrap();
        assert_eq!(via.gateway_addresses, ["gw.east:4143"]);
        assert_eq!(via.target_authority, "api.shop.svc.cluster.local:80");
        assert_eq!(via.target_port, 8080);
        assert_eq!(
            via.destination_identities,
            ["spiffe://east.mesh.local/ns/shop/sa/api"]
        );
        assert!(!via.quic);
        assert_eq!((eps[0].cluster.as_str(), eps[0].proxy_port), ("east", 0));
        assert!(
            endpoints(
                index(&mirror(false))
                    .discovery("api-east.shop.svc.cluster.local:80", Instant::now())
            )
            .is_empty(),
            "a mirror whose gateway is down has nothing ready"
        );
    }

    /// Links to east and north and their mirrors of `api` (ready), plus
    /// `extra`, serialized as one multi-document YAML.
    fn linked(extra: &[serde_json::Value]) -> String {
        let root = mesh_core::identity::RootCa::generate(
            mesh_core::identity::ca::DEFAULT_ROOT_TTL,
            mesh_core::identity::cert::now(),
        )
        .unwrap();
        let mut docs = Vec::new();
        for cluster in ["east", "north"] {
            let td = format!("{cluster}.mesh.local");
            let mut bundle = mesh_core::identity::TrustBundle::new(td.parse().unwrap());
            bundle.add_root(root.cert().clone()).unwrap();
            docs.push(serde_json::json!({
                "apiVersion": "multicluster.mesh.rs/v1alpha1", "kind": "Link",
                "metadata": { "name": cluster },
                "spec": {
                    "clusterName": cluster, "trustDomain": td,
                    "gatewayAddresses": [format!("gw.{cluster}:4143")],
                    "gatewayIdentity": format!("spiffe://{td}/ns/mesh-system/sa/gateway"),
                    "transport": "tcp", "trustBundle": bundle.to_spiffe_json().unwrap(),
                },
            }));
            docs.push(serde_json::json!({
                "apiVersion": "multicluster.mesh.rs/v1alpha1", "kind": "MirroredService",
                "metadata": { "name": format!("api-{cluster}"), "namespace": "shop" },
                "spec": {
                    "link": cluster, "remoteName": "api",
                    "ports": [{ "port": 80, "targetPort": 8080, "appProtocol": "http" }],
                    "identities": [format!("spiffe://{td}/ns/shop/sa/api")],
                    "ready": true,
                },
            }));
        }
        docs.extend_from_slice(extra);
        serde_saphyr::to_string_multiple(&docs).unwrap()
    }

    /// `api` in shop: port 80 to 8080, selecting `app: api`.
    fn api_service() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": 8080, "appProtocol": "http"}]},
        })
    }

    /// A FailoverPolicy for `api` in shop with these tiers, plus `extra`
    /// spec fields.
    fn failover_policy(tiers: &[&[&str]], extra: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "service": "api",
            "tiers": tiers.iter().map(|c| serde_json::json!({"clusters": c})).collect::<Vec<_>>(),
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::json!({
            "apiVersion": "multicluster.mesh.rs/v1alpha1", "kind": "FailoverPolicy",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": spec,
        })
    }

    #[test]
    fn a_failover_policy_puts_each_tier_in_its_priority() {
        let now = Instant::now();
        let policy = failover_policy(
            &[&["local"], &["east"], &["north"]],
            serde_json::json!({"threshold": 0.6, "failbackDelay": "2s"}),
        );
        let mut index = index(&linked(&[api_service(), policy]));
        index
            .register(
                reg("shop", "api-0", "api", &[("app", "api")], "10.0.0.1"),
                now,
            )
            .unwrap();
        let update = index.discovery("api.shop.svc.cluster.local:80", now);
        let Some(discovery_update::Kind::Endpoints(set)) = update.kind else {
            panic!("{update:?}")
        };
        let tiers: Vec<(u32, &str)> = set
            .endpoints
            .iter()
            .map(|e| (e.priority, e.cluster.as_str()))
            .collect();
        assert_eq!(tiers, [(0, "west"), (1, "east"), (2, "north")]);
        assert_eq!(
            set.endpoints[1]
                .via_gateway
                .as_ref()
                .unwrap()
                .target_authority,
            "api.shop.svc.cluster.local:80"
        );
        let failover = set.failover.expect("the policy's settings");
        assert_eq!(failover.policy, "shop/api");
        assert!((failover.threshold - 0.6).abs() < 1e-9);
        assert_eq!(failover.failback_delay_ms, 2000);
        assert_eq!(failover.tiers.len(), 3);
        // What this cluster exports and its gateway reach stay local.
        assert_eq!(
            endpoints(index.discovery_here("api.shop.svc.cluster.local:80", now)).len(),
            1
        );
        assert!(index.failover_problems().is_empty());
    }

    #[test]
    fn a_federated_service_is_one_tier_over_clusters_even_without_a_local_service() {
        let now = Instant::now();
        let policy = failover_policy(&[&["local", "east", "north"]], serde_json::json!({}));
        let index = index(&linked(&[policy]));
        let eps = endpoints(index.discovery("api.shop.svc.cluster.local:80", now));
        let clusters: Vec<(u32, &str)> = eps
            .iter()
            .map(|e| (e.priority, e.cluster.as_str()))
            .collect();
        assert_eq!(clusters, [(0, "east"), (0, "north")]);
        // A port no mirror has is no service.
        let other = index.discovery("api.shop.svc.cluster.local:81", now);
        assert!(
            matches!(other.kind, Some(discovery_update::Kind::NoSuchService(_))),
            "{other:?}"
        );
    }

    #[test]
    fn a_cluster_no_link_names_is_reported_with_its_field() {
        let policy = failover_policy(&[&["local"], &["east", "esat"]], serde_json::json!({}));
        let index = index(&linked(&[api_service(), policy]));
        let problems = index.failover_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains(
                "FailoverPolicy shop/api spec.tiers[1].clusters[1]: unknown cluster \"esat\""
            ) && problems[0].contains("linked: east, north"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn unknown_authorities_say_what_is_missing() {
        let index = index(API);
        let reason = |a: &str| match index.discovery(a, Instant::now()).kind.unwrap() {
            discovery_update::Kind::NoSuchService(n) => n.reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason("db.shop.svc.cluster.local:5432"),
            "no Service db in namespace shop"
        );
        assert_eq!(
            reason("api.shop.svc.cluster.local:81"),
            "Service shop/api has no port 81 (ports: 80)"
        );
        assert!(reason("api.shop:80").contains("not in this cluster's domain"));
        assert!(reason("api.shop.svc.cluster.local").contains("has no port"));
    }
}
