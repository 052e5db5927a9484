//! Discovery: the ready endpoints behind a service authority.

use std::{net::SocketAddr, time::Instant};

use mesh_core::api::v1::{
    DiscoveryUpdate, Endpoint, EndpointSet, NoSuchService, ProtocolHint, ViaGateway,
    discovery_update,
};

use super::Index;
use crate::resources::types::{Object, ServicePort, ServiceSpec};

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
                })
            }
        };
        DiscoveryUpdate { kind: Some(kind) }
    }

    /// Whether `w` can be an endpoint: one reached through the gateway
    /// needs a gateway to be reached through.
    fn reachable(&self, w: &super::Workload) -> bool {
        !w.reg.via_gateway || self.gateway.is_some()
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
