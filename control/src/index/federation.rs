//! Federation: what this cluster exports, and the clusters it is linked to.

use std::{collections::BTreeSet, time::Instant};

use mesh_core::{
    api::v1::{
        ExportedPort, ExportedService, Exports, LinkedBundle, LinkedTrust, discovery_update::Kind,
    },
    identity::{TrustBundle, TrustDomain},
};

use super::{Index, discovery::app_protocol_hint};
use crate::resources::{parse::link_bundle, types::is_exported};

/// A linked cluster, as its `Link` resource describes it.
#[derive(Clone, Debug)]
pub struct LinkedCluster {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub bundle: TrustBundle,
    pub spec: crate::resources::types::LinkSpec,
}

impl Index {
    /// This cluster's exports at `now`, with `bundle` (this cluster's own,
    /// as a SPIFFE bundle document).
    pub fn exports(&self, trust_domain: &str, bundle: &str, now: Instant) -> Exports {
        let services = self
            .services
            .values()
            .filter(|svc| is_exported(svc))
            .map(|svc| {
                let (ns, name) = (&svc.metadata.namespace, &svc.metadata.name);
                let mut identities = BTreeSet::new();
                let mut ready = 0;
                // Endpoints are the same workloads for every port; the first
                // port's answer counts them.
                if let Some(port) = svc.spec.ports.first() {
                    let authority =
                        format!("{name}.{ns}.svc.{}:{}", self.cluster_domain, port.port);
                    if let Some(Kind::Endpoints(set)) = self.discovery_here(&authority, now).kind {
                        ready = set.endpoints.len();
                        identities.extend(set.endpoints.into_iter().map(|e| e.spiffe_id));
                    }
                }
                identities.remove("");
                ExportedService {
                    namespace: ns.clone(),
                    name: name.clone(),
                    ports: svc
                        .spec
                        .ports
                        .iter()
                        .map(|p| ExportedPort {
                            port: u32::from(p.port),
                            protocol: app_protocol_hint(p.app_protocol.as_deref()) as i32,
                            target_port: u32::from(p.target_port.unwrap_or(p.port)),
                        })
                        .collect(),
                    identities: identities.into_iter().collect(),
                    ready_endpoints: u32::try_from(ready).unwrap_or(u32::MAX),
                }
            })
            .collect();
        Exports {
            cluster: self.cluster.clone(),
            trust_domain: trust_domain.to_owned(),
            trust_bundle: bundle.to_owned(),
            services,
        }
    }

    /// The clusters `Link` resources name (validated when parsed).
    pub fn linked_clusters(&self) -> Vec<LinkedCluster> {
        self.links
            .values()
            .filter_map(|link| {
                let bundle = link_bundle(&link.spec).ok()?;
                Some(LinkedCluster {
                    cluster: link.spec.cluster_name.clone(),
                    trust_domain: bundle.trust_domain().clone(),
                    bundle,
                    spec: link.spec.clone(),
                })
            })
            .collect()
    }

    /// The linked clusters' bundles and gateways, for this cluster's own
    /// workloads (a Link naming `local` itself is left out).
    pub fn linked_trust(&self, local: &TrustDomain) -> LinkedTrust {
        let bundles = self
            .linked_clusters()
            .into_iter()
            .filter(|l| &l.trust_domain != local)
            .filter_map(|l| {
                Some(LinkedBundle {
                    cluster: l.cluster,
                    trust_domain: l.trust_domain.to_string(),
                    trust_bundle: l.bundle.to_spiffe_json().ok()?,
                    gateway_addresses: l.spec.gateway_addresses,
                    gateway_identity: l.spec.gateway_identity,
                    transport: l.spec.transport.unwrap_or_else(|| "quic".into()),
                })
            })
            .collect();
        LinkedTrust { bundles }
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

    const CONFIG: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: shop\n  labels: {multicluster.mesh.rs/exported: \"true\"}\nspec:\n  selector: {app: api}\n  ports: [{port: 80, targetPort: 8080, appProtocol: http}, {port: 9090, appProtocol: grpc}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  selector: {app: db}\n  ports: [{port: 5432}]\n";

    #[test]
    fn labelled_services_are_exported_with_their_ready_identities() {
        let now = Instant::now();
        let mut index = Index::new("east", "cluster.local", Liveness::default());
        let res = parse_file(std::path::Path::new("t.yaml"), CONFIG).unwrap();
        index.set_resources(res.into_iter().map(|(_, r)| r).collect());
        for (name, ip) in [("api-0", "10.0.0.1"), ("api-1", "10.0.0.2")] {
            index
                .register(reg("shop", name, "api", &[("app", "api")], ip), now)
                .unwrap();
        }
        let exports = index.exports("east.mesh.local", "{}", now);
        assert_eq!(
            (exports.cluster.as_str(), exports.trust_domain.as_str()),
            ("east", "east.mesh.local")
        );
        assert_eq!(exports.services.len(), 1, "db is not exported");
        let api = &exports.services[0];
        assert_eq!((api.namespace.as_str(), api.name.as_str()), ("shop", "api"));
        assert_eq!(api.ready_endpoints, 2);
        assert_eq!(
            api.identities,
            ["spiffe://west.mesh.local/ns/shop/sa/api"],
            "one identity, however many endpoints"
        );
        let ports: Vec<u32> = api.ports.iter().map(|p| p.port).collect();
        assert_eq!(ports, [80, 9090]);

        // Readiness lapses: still exported, nothing ready.
        let later = now + Duration::from_secs(31);
        let exports = index.exports("east.mesh.local", "{}", later);
        assert_eq!(exports.services[0].ready_endpoints, 0);
        assert!(exports.services[0].identities.is_empty());
    }
}
