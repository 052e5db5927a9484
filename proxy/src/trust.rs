//! Trust in linked clusters: the control plane streams their bundles
//! (`Federation.WatchTrust`), and the proxy verifies callers from each
//! linked trust domain against that domain's own bundle (never merged with
//! ours). While the control plane is away, the last state keeps applying.

use mesh_core::{
    api::v1::{LinkedTrust, WatchTrustRequest, federation_client::FederationClient},
    identity::{BundleStore, TrustBundle, TrustBundleSet},
};
use tonic::transport::Channel;

use crate::follow::Follower;

/// The linked clusters as the control plane streams them (reconnecting;
/// the last state kept while it is away).
pub fn linked_trust(api: Channel) -> crate::follow::Latest<LinkedTrust> {
    let client = FederationClient::new(api);
    Follower::new("linked trust", move |(): ()| {
        let mut client = client.clone();
        async move {
            client
                .watch_trust(WatchTrustRequest {})
                .await
                .map(tonic::Response::into_inner)
        }
    })
    .watch(&())
}

/// Keeps `bundles` at our own `local` bundle plus every linked cluster's.
pub async fn follow_linked_bundles(api: Channel, local: TrustBundle, bundles: BundleStore) {
    let mut updates = linked_trust(api);
    loop {
        if let Some(trust) = updates.borrow_and_update().clone() {
            bundles.replace(trusted(&local, &trust));
        }
        if updates.changed().await.is_err() {
            return;
        }
    }
}

/// Our bundle and each linked one that parses (for its own trust domain).
pub fn trusted(local: &TrustBundle, trust: &LinkedTrust) -> TrustBundleSet {
    let mut set: TrustBundleSet = [local.clone()].into_iter().collect();
    for linked in &trust.bundles {
        let parsed = linked
            .trust_domain
            .parse()
            .map_err(|e| format!("{e}"))
            .and_then(|td| {
                TrustBundle::from_spiffe_json(td, linked.trust_bundle.as_bytes())
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok(bundle) if bundle.trust_domain() != local.trust_domain() => {
                set.insert(bundle);
            }
            Ok(_) => {
                tracing::warn!(cluster = %linked.cluster, "a linked bundle names our own trust domain; ignored")
            }
            Err(e) => {
                tracing::warn!(cluster = %linked.cluster, error = %e, "a linked cluster's bundle does not parse; ignored")
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use mesh_core::{
        api::v1::LinkedBundle,
        identity::{RootCa, ca::DEFAULT_ROOT_TTL, cert::now},
    };

    use super::*;

    fn bundle(td: &str) -> TrustBundle {
        let root = RootCa::generate(DEFAULT_ROOT_TTL, now()).unwrap();
        let mut bundle = TrustBundle::new(td.parse().unwrap());
        bundle.add_root(root.cert().clone()).unwrap();
        bundle
    }

    fn linked(cluster: &str, td: &str, json: String) -> LinkedBundle {
        LinkedBundle {
            cluster: cluster.into(),
            trust_domain: td.into(),
            trust_bundle: json,
            ..LinkedBundle::default()
        }
    }

    #[test]
    fn each_linked_bundle_counts_for_its_own_trust_domain_only() {
        let west = bundle("west.mesh.local");
        let east = bundle("east.mesh.local");
        let impostor = bundle("west.mesh.local");
        let trust = LinkedTrust {
            bundles: vec![
                linked("east", "east.mesh.local", east.to_spiffe_json().unwrap()),
                linked(
                    "evil",
                    "west.mesh.local",
                    impostor.to_spiffe_json().unwrap(),
                ),
                linked("broken", "north.mesh.local", "not json".into()),
            ],
        };
        let set = trusted(&west, &trust);
        assert_eq!(set.get(&"east.mesh.local".parse().unwrap()), Some(&east));
        assert_eq!(
            set.get(&"west.mesh.local".parse().unwrap()),
            Some(&west),
            "a link cannot replace our own bundle"
        );
        assert!(set.get(&"north.mesh.local".parse().unwrap()).is_none());
    }
}
