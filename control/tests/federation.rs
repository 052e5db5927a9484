//! Federation on the control plane: a `Link` makes it trust another
//! cluster's trust domain, whose identities may then watch this cluster's
//! exports over mTLS (and call nothing else); callers from other trust
//! domains are refused in the handshake or by the RPC, and counted.

mod support;

use std::time::Duration;

use mesh_core::{
    api::v1::{
        WatchExportsRequest, WatchRequest, WatchTrustRequest, discovery_client::DiscoveryClient,
        federation_client::FederationClient,
    },
    grpc,
    identity::{
        CertificateAuthority, CredentialStore, Credentials, ExpectedIdentity, RootCa, SpiffeId,
        TrustBundle,
        ca::{DEFAULT_ISSUER_TTL, DEFAULT_ROOT_TTL},
        cert::now,
        csr::new_key_and_csr,
        tls::client_config,
    },
};
use support::*;
use tonic::Code;

/// Another cluster's CA, made here: its bundle, and SVIDs it issues.
struct OtherCluster {
    td: String,
    ca: CertificateAuthority,
}

impl OtherCluster {
    fn new(td: &str) -> Self {
        let root = RootCa::generate(DEFAULT_ROOT_TTL, now()).unwrap();
        let ca =
            CertificateAuthority::generate(td.parse().unwrap(), &root, DEFAULT_ISSUER_TTL, now())
                .unwrap();
        Self { td: td.into(), ca }
    }

    fn bundle_json(&self) -> String {
        let mut bundle = TrustBundle::new(self.td.parse().unwrap());
        bundle.add_root(self.ca.root().clone()).unwrap();
        bundle.to_spiffe_json().unwrap()
    }

    fn creds(&self, path: &str) -> Credentials {
        let (key, csr) = new_key_and_csr().unwrap();
        let id: SpiffeId = format!("spiffe://{}{path}", self.td).parse().unwrap();
        let issued = self
            .ca
            .sign_csr(&csr, &id, Duration::from_secs(3600))
            .unwrap();
        Credentials::new(issued.chain, key).unwrap()
    }

    fn link(&self, cluster: &str) -> String {
        let bundle = self.bundle_json().replace('\n', "");
        format!(
            "apiVersion: multicluster.mesh.rs/v1alpha1\nkind: Link\nmetadata: {{name: {cluster}, namespace: mesh-system}}\nspec:\n  clusterName: {cluster}\n  trustDomain: {td}\n  gatewayAddresses: [\"127.0.0.1:4143\"]\n  gatewayIdentity: spiffe://{td}/ns/mesh-system/sa/gateway\n  transport: tcp\n  trustBundle: '{bundle}'\n",
            td = self.td
        )
    }
}

const EXPORTED: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: shop\n  labels: {multicluster.mesh.rs/exported: \"true\"}\nspec:\n  selector: {app: api}\n  ports: [{port: 8080, appProtocol: http}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  selector: {app: db}\n  ports: [{port: 5432}]\n";

fn federation(tp: &TestPlane, creds: &Credentials) -> FederationClient<tonic::transport::Channel> {
    let cfg = client_config(
        CredentialStore::new(creds.clone()),
        tp.clients().bundles.clone(),
        ExpectedIdentity::Exact(TestPlane::control_id()),
    )
    .unwrap();
    FederationClient::new(grpc::channel(&tp.plane().api_addr.to_string(), cfg).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_cluster_watches_exports_and_nothing_else() {
    let tp = TestPlane::start().await;
    let east = OtherCluster::new("east.mesh.local");
    std::fs::write(tp.config_dir().join("shop.yaml"), EXPORTED).unwrap();
    std::fs::write(tp.config_dir().join("link-east.yaml"), east.link("east")).unwrap();
    let api = tp
        .join_workload(("shop", "api"), "api-0", "api", "127.0.0.7")
        .await;
    tp.registry(&api)
        .register(register_request("shop", "api-0", "api", "127.0.0.7"))
        .await
        .unwrap();

    // East's mirror, with an east SVID, reaches west's API once the Link
    // has been read (the config directory is polled).
    let mirror = east.creds("/ns/mesh-system/sa/service-mirror");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut stream = loop {
        let call = federation(&tp, &mirror)
            .watch_exports(WatchExportsRequest {
                cluster: "east".into(),
            })
            .await;
        match call {
            Ok(stream) => break stream.into_inner(),
            Err(status) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never admitted: {status}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let exports = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(exports.trust_domain, TD);
    assert!(exports.trust_bundle.contains("\"keys\""), "a SPIFFE bundle");
    assert_eq!(exports.services.len(), 1, "only the labelled service");
    let svc = &exports.services[0];
    assert_eq!((svc.namespace.as_str(), svc.name.as_str()), ("shop", "api"));
    assert_eq!(svc.ready_endpoints, 1);
    assert_eq!(svc.identities, [format!("spiffe://{TD}/ns/shop/sa/api")]);

    // An export change reaches the watcher: api's endpoint goes away.
    tp.registry(&api)
        .deregister(mesh_core::api::v1::DeregisterRequest {
            namespace: "shop".into(),
            name: "api-0".into(),
        })
        .await
        .unwrap();
    let exports = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("the change in time")
        .unwrap()
        .unwrap();
    assert_eq!(exports.services[0].ready_endpoints, 0);

    // The same east identity may not use this cluster's own APIs.
    let cfg = client_config(
        CredentialStore::new(mirror.clone()),
        tp.clients().bundles.clone(),
        ExpectedIdentity::Exact(TestPlane::control_id()),
    )
    .unwrap();
    let mut discovery =
        DiscoveryClient::new(grpc::channel(&tp.plane().api_addr.to_string(), cfg).unwrap());
    let err = discovery
        .watch(WatchRequest {
            authority: "api.shop.svc.cluster.local:8080".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // West's own workloads learn whom the Link trusts, and how to reach it;
    // east may not ask.
    let web = tp.join("shop", "web").await;
    let trust = federation(&tp, &web)
        .watch_trust(WatchTrustRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(trust.bundles.len(), 1);
    let linked = &trust.bundles[0];
    assert_eq!(
        (linked.cluster.as_str(), linked.trust_domain.as_str()),
        ("east", "east.mesh.local")
    );
    assert_eq!(linked.gateway_addresses, ["127.0.0.1:4143"]);
    assert_eq!(linked.transport, "tcp");
    assert!(linked.trust_bundle.contains("\"keys\""));
    let err = federation(&tp, &mirror)
        .watch_trust(WatchTrustRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // West's gateway (namespace mesh-system) checks exports too.
    let gateway = tp.join("mesh-system", "gateway").await;
    federation(&tp, &gateway)
        .watch_exports(WatchExportsRequest {
            cluster: "west".into(),
        })
        .await
        .expect("the local gateway may watch exports");

    // A west workload is not a linked cluster.
    let err = federation(&tp, &web)
        .watch_exports(WatchExportsRequest {
            cluster: "west".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("Link"), "names the fix: {err:?}");

    // A cluster nobody linked is refused in the handshake.
    let north = OtherCluster::new("north.mesh.local");
    let stranger = north.creds("/ns/mesh-system/sa/service-mirror");
    let refused = federation(&tp, &stranger)
        .watch_exports(WatchExportsRequest {
            cluster: "north".into(),
        })
        .await;
    assert!(refused.is_err(), "an unlinked trust domain gets nothing");
    // The client may see the closed connection before the server counts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while sample(
        &tp.metrics().await,
        "mesh_control_tls_refused_total{listener=\"api\",reason=\"unknown_trust_domain\"}",
    ) < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the handshake refusal was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let m = tp.metrics().await;
    assert_eq!(
        sample(
            &m,
            "mesh_control_registry_refused_total{reason=\"not_linked\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "mesh_control_registry_refused_total{reason=\"foreign_trust_domain\"}"
        ),
        2.0,
        "{m}"
    );
}
