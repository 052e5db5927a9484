//! Discovery, Policy and Registry over real gRPC with mTLS.

mod support;

use std::time::{Duration, Instant};

use mesh_control::index::Liveness;
use mesh_core::api::v1::{
    DeregisterRequest, DiscoveryUpdate, HeartbeatRequest, InboundRequest, OutboundRequest,
    RegisterRequest, WatchRequest, discovery_update::Kind,
};
use support::*;
use tonic::{Code, Streaming};

const AUTHORITY: &str = "api.shop.svc.cluster.local:8080";

async fn next(stream: &mut Streaming<DiscoveryUpdate>, within: Duration) -> Kind {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("no update in time")
        .unwrap()
        .unwrap()
        .kind
        .unwrap()
}

/// A discovery watch on the `api` service, as `creds`.
async fn watch_api(
    tp: &TestPlane,
    creds: &mesh_core::identity::Credentials,
) -> Streaming<DiscoveryUpdate> {
    tp.discovery(creds)
        .watch(WatchRequest {
            authority: AUTHORITY.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn addresses(kind: &Kind) -> Vec<String> {
    match kind {
        Kind::Endpoints(set) => set.endpoints.iter().map(|e| e.address.clone()).collect(),
        Kind::NoSuchService(n) => panic!("no such service: {}", n.reason),
    }
}

#[tokio::test]
async fn registration_reaches_a_watcher_within_a_second() {
    let tp = TestPlane::start().await;
    std::fs::write(tp.config_dir().join("shop.yaml"), API_SERVICE).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let web = tp.join("shop", "web").await;
    let mut watch = watch_api(&tp, &web).await;
    assert!(
        addresses(&next(&mut watch, Duration::from_secs(2)).await).is_empty(),
        "full (empty) state first"
    );

    let api = tp
        .join_workload(("shop", "api"), "api-0", "api", "127.0.0.7")
        .await;
    let started = Instant::now();
    tp.registry(&api)
        .register(register_request("shop", "api-0", "api", "127.0.0.7"))
        .await
        .unwrap();
    let update = next(&mut watch, Duration::from_secs(1)).await;
    let took = started.elapsed();
    assert_eq!(addresses(&update), vec!["127.0.0.7:8080"]);
    if let Kind::Endpoints(set) = &update {
        assert_eq!(
            set.endpoints[0].spiffe_id,
            format!("spiffe://{TD}/ns/shop/sa/api")
        );
        assert_eq!(set.endpoints[0].proxy_port, 4143);
    }
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // Deregistering removes it again.
    tp.registry(&api)
        .deregister(DeregisterRequest {
            namespace: "shop".into(),
            name: "api-0".into(),
        })
        .await
        .unwrap();
    assert!(addresses(&next(&mut watch, Duration::from_secs(1)).await).is_empty());
}

#[tokio::test]
async fn config_edits_reach_watchers_and_bad_files_keep_the_old_state() {
    let tp = TestPlane::start().await;
    let web = tp.join("shop", "web").await;
    let mut watch = watch_api(&tp, &web).await;
    match next(&mut watch, Duration::from_secs(2)).await {
        Kind::NoSuchService(n) => assert_eq!(n.reason, "no Service api in namespace shop"),
        other => panic!("{other:?}"),
    }

    // The Service appears by editing the config directory; no restart.
    let file = tp.config_dir().join("shop.yaml");
    std::fs::write(&file, API_SERVICE).unwrap();
    assert!(addresses(&next(&mut watch, Duration::from_secs(3)).await).is_empty());

    // A broken edit is refused and the old version keeps serving.
    std::fs::write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  ports: [{port: 8080}\n").unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(800), watch.message()).await;
    assert!(
        quiet.is_err(),
        "a rejected file must not change what is served"
    );
    let mut fresh = watch_api(&tp, &web).await;
    assert!(matches!(
        next(&mut fresh, Duration::from_secs(2)).await,
        Kind::Endpoints(_)
    ));
    let m = tp.metrics().await;
    assert_eq!(
        sample(&m, "mesh_control_config_errors_total{reason=\"yaml\"}"),
        1.0,
        "{m}"
    );

    // Deleting the file removes the Service.
    std::fs::remove_file(&file).unwrap();
    assert!(matches!(
        next(&mut watch, Duration::from_secs(3)).await,
        Kind::NoSuchService(_)
    ));
}

#[tokio::test]
async fn silent_workloads_leave_discovery_and_come_back() {
    let tp = TestPlane::start_with(|c| {
        c.liveness = Liveness {
            heartbeat_interval: Duration::from_millis(200),
            misses: 3,
            grace: Duration::from_secs(60),
        }
    })
    .await;
    std::fs::write(tp.config_dir().join("shop.yaml"), API_SERVICE).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let api = tp
        .join_workload(("shop", "api"), "api-0", "api", "127.0.0.7")
        .await;
    let mut registry = tp.registry(&api);
    let resp = registry
        .register(register_request("shop", "api-0", "api", "127.0.0.7"))
        .await
        .unwrap();
    assert_eq!(
        resp.into_inner().heartbeat_interval_seconds,
        0,
        "sub-second interval rounds down"
    );
    let mut watch = watch_api(&tp, &api).await;
    assert_eq!(
        addresses(&next(&mut watch, Duration::from_secs(1)).await).len(),
        1
    );
    // No heartbeats: gone after three missed intervals (600 ms) plus a sweep.
    assert!(addresses(&next(&mut watch, Duration::from_secs(3)).await).is_empty());
    registry
        .heartbeat(HeartbeatRequest {
            namespace: "shop".into(),
            name: "api-0".into(),
            healthy: true,
        })
        .await
        .unwrap();
    assert_eq!(
        addresses(&next(&mut watch, Duration::from_secs(2)).await).len(),
        1
    );
}

#[tokio::test]
async fn registry_refuses_other_namespaces_and_other_owners() {
    let tp = TestPlane::start().await;
    let api = tp
        .join_workload(("shop", "api"), "api-0", "api", "127.0.0.7")
        .await;
    let other = tp.join("shop", "other").await;
    let err = tp
        .registry(&api)
        .register(register_request("billing", "api-0", "api", "127.0.0.7"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    tp.registry(&api)
        .register(register_request("shop", "api-0", "api", "127.0.0.7"))
        .await
        .unwrap();
    let err = tp
        .registry(&other)
        .register(register_request("shop", "api-0", "api", "127.0.0.8"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("only its owner"), "{err}");
    let err = tp
        .registry(&other)
        .heartbeat(HeartbeatRequest {
            namespace: "shop".into(),
            name: "nope".into(),
            healthy: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let m = tp.metrics().await;
    assert_eq!(
        sample(
            &m,
            "mesh_control_registry_refused_total{reason=\"namespace_mismatch\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "mesh_control_registry_refused_total{reason=\"not_owner\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn policy_streams_follow_the_config() {
    let tp = TestPlane::start().await;
    std::fs::write(
        tp.config_dir().join("policy.yaml"),
        format!(
            "{API_SERVICE}---\napiVersion: policy.mesh.rs/v1alpha1\nkind: Server\nmetadata: {{name: api-http, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  port: 8080\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: web-only, namespace: shop}}\nspec:\n  targetRef: {{kind: Server, name: api-http}}\n  requiredAuthenticationRefs: [{{kind: MeshTLSAuthentication, name: web}}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {{name: web, namespace: shop}}\nspec:\n  identities: [\"spiffe://{TD}/ns/shop/sa/web\"]\n"
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let api = tp
        .join_workload(("shop", "api"), "api-0", "api", "127.0.0.7")
        .await;
    tp.registry(&api)
        .register(register_request("shop", "api-0", "api", "127.0.0.7"))
        .await
        .unwrap();
    let mut inbound = tp
        .policy(&api)
        .watch_inbound(InboundRequest {
            namespace: "shop".into(),
            workload: "api-0".into(),
            port: 8080,
        })
        .await
        .unwrap()
        .into_inner();
    let p = inbound.message().await.unwrap().unwrap();
    assert_eq!(p.server, "shop/api-http");
    assert_eq!(
        p.authorizations[0].identities,
        vec![format!("spiffe://{TD}/ns/shop/sa/web")]
    );

    let mut outbound = tp
        .policy(&api)
        .watch_outbound(OutboundRequest {
            authority: AUTHORITY.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let o = outbound.message().await.unwrap().unwrap();
    assert!(o.no_such_service.is_empty() && o.routes.is_empty());

    let err = tp
        .policy(&api)
        .watch_inbound(InboundRequest {
            namespace: "billing".into(),
            workload: "x".into(),
            port: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// A workload with a valid identity tries to claim more than its token
/// granted: a Service's selector labels, another workload's address, a
/// workload nobody granted, and (with a token that fixed no address) an
/// address another workload holds. Each is refused with its reason, and
/// discovery still lists only the real endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_claims_only_what_its_token_granted() {
    let tp = TestPlane::start().await;
    std::fs::write(tp.config_dir().join("shop.yaml"), API_SERVICE).unwrap();
    let api = tp
        .join_workload(("shop", "api"), "api-0", "api", "127.0.0.7")
        .await;
    tp.registry(&api)
        .register(register_request("shop", "api-0", "api", "127.0.0.7"))
        .await
        .unwrap();
    let web = tp
        .join_workload(("shop", "web"), "web-0", "web", "127.0.0.9")
        .await;
    let refused = |req: RegisterRequest, creds: &mesh_core::identity::Credentials| {
        let mut registry = tp.registry(creds);
        async move { registry.register(req).await.unwrap_err() }
    };
    // The api Service's selector, from a token that granted app=web.
    let err = refused(register_request("shop", "web-0", "api", "127.0.0.9"), &web).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("labels its token granted"), "{err}");
    // api's address.
    let err = refused(register_request("shop", "web-0", "web", "127.0.0.7"), &web).await;
    assert!(
        err.message().contains("may not register address 127.0.0.7"),
        "{err}"
    );
    // A workload no token named.
    let err = refused(register_request("shop", "api-9", "api", "127.0.0.9"), &web).await;
    assert!(err.message().contains("no join token was created"), "{err}");
    // A token that fixed no address: any address but another workload's.
    let token = tp.token_with(
        "shop",
        "web",
        Some(mesh_control::store::WorkloadClaims {
            addresses: vec![],
            ..claims("web-1", "web", "127.0.0.1")
        }),
    );
    let web1 = tp.clients().join(&token, "shop", "web").await;
    let err = refused(register_request("shop", "web-1", "web", "127.0.0.7"), &web1).await;
    assert!(
        err.message().contains("registered by workload shop/api-0"),
        "{err}"
    );
    tp.registry(&web1)
        .register(register_request("shop", "web-1", "web", "127.0.0.10"))
        .await
        .unwrap();

    let m = tp.metrics().await;
    for reason in [
        "labels_not_granted",
        "address_not_granted",
        "not_granted",
        "address_taken",
    ] {
        assert_eq!(
            sample(
                &m,
                &format!("mesh_control_registry_refused_total{{reason=\"{reason}\"}}")
            ),
            1.0,
            "{reason}"
        );
    }
    let mut watch = tp
        .discovery(&web)
        .watch(WatchRequest {
            authority: "api.shop.svc.cluster.local:8080".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The Service file is read within a poll or two.
    let mut kind = next(&mut watch, Duration::from_secs(5)).await;
    while !matches!(&kind, Kind::Endpoints(set) if !set.endpoints.is_empty()) {
        kind = next(&mut watch, Duration::from_secs(5)).await;
    }
    assert_eq!(addresses(&kind), ["127.0.0.7:8080"]);
}
