//! Mesh on Kubernetes, against a real kube-apiserver (with its controller
//! manager) built from the Kubernetes Go modules: `tests/kube-apiserver/`.

use std::process::{Command, Stdio};

use mesh_tests::{
    kube::{Control, ControlAddrs, Kube, install, mesh, stderr},
    mesh_exe,
};

/// The CRDs apply; the API server's structural schema then refuses a bad
/// AuthorizationPolicy naming the field, and accepts a good one; the
/// control plane's manifests apply with `--dry-run=server`, HA included;
/// `mesh uninstall` names what to delete and deletes it.
#[test]
fn crds_and_the_control_plane_apply_to_a_real_api_server() {
    let kube = Kube::start();
    eprintln!("API server ready in {:?}", kube.started_in);
    let version = kube.kubectl_ok(&["version", "-o", "json"]);
    assert!(version.contains("\"gitVersion\": \"v1.34.4\""), "{version}");

    let applied = kube.apply(&mesh(&["install", "--crds"]));
    assert_eq!(applied.lines().count(), 8, "{applied}");
    kube.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ]);
    kube.kubectl_ok(&["create", "namespace", "shop"]);

    // A misspelt field, and a field of the wrong type: each refused by
    // the API server, naming the field.
    let misspelt = "apiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: shop}\nspec:\n  targetRef: {kind: Server, name: api}\n  requiredAuthenticationRef: [{kind: MeshTLSAuthentication, name: web}]\n";
    let out = kube.kubectl_with_input(&["apply", "-f", "-"], misspelt);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown field \"spec.requiredAuthenticationRef\""),
        "{}",
        stderr(&out)
    );
    let wrong_type = "apiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: shop}\nspec:\n  targetRef: {kind: Server, name: 7}\n  requiredAuthenticationRefs: []\n";
    let out = kube.kubectl_with_input(&["apply", "-f", "-"], wrong_type);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("spec.targetRef.name"),
        "{}",
        stderr(&out)
    );
    let missing = "apiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: shop}\nspec:\n  targetRef: {kind: Server, name: api}\n";
    let out = kube.kubectl_with_input(&["apply", "-f", "-"], missing);
    assert!(
        stderr(&out).contains("spec.requiredAuthenticationRefs"),
        "{}",
        stderr(&out)
    );
    // The same shapes the local store reads are accepted.
    kube.apply(
        "apiVersion: policy.mesh.rs/v1alpha1\nkind: Server\nmetadata: {name: api-http, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  port: http\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web-only, namespace: shop}\nspec:\n  targetRef: {kind: Server, name: api-http}\n  requiredAuthenticationRefs: [{kind: MeshTLSAuthentication, name: web}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {name: web, namespace: shop}\nspec:\n  identities: [\"spiffe://east.mesh.local/ns/shop/sa/web\"]\n",
    );

    // The control plane: namespace first (a server dry run creates
    // nothing, so namespaced objects need it to exist), then everything.
    let ca = tempfile::tempdir().unwrap();
    let ca_dir = ca.path().join("ca");
    mesh(&[
        "identity",
        "ca",
        "create",
        "--trust-domain",
        "east.mesh.local",
        "--out",
        ca_dir.to_str().unwrap(),
    ]);
    let ca_arg = ca_dir.to_str().unwrap();
    kube.kubectl_ok(&["create", "namespace", "mesh-system"]);
    for extra in [&[][..], &["--ha"][..]] {
        let mut args = vec!["install", "--ca", ca_arg, "--set", "cluster=east"];
        args.extend_from_slice(extra);
        let manifests = mesh(&args);
        assert_eq!(manifests, mesh(&args), "same input, same bytes");
        let out = kube.kubectl_with_input(&["apply", "--dry-run=server", "-f", "-"], &manifests);
        assert!(out.status.success(), "{}\n{manifests}", stderr(&out));
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            printed.contains("deployment.apps/mesh-control created (server dry run)"),
            "{printed}"
        );
        assert_eq!(
            printed.contains("poddisruptionbudget.policy/mesh-control"),
            !extra.is_empty(),
            "{printed}"
        );
    }

    // Uninstall: what it prints deletes the CRDs (and their objects). The
    // namespace finishes terminating in the background.
    let out = kube.kubectl_with_input(
        &["delete", "--ignore-not-found", "--wait=false", "-f", "-"],
        &mesh(&["uninstall"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Deleted means: gone, or being deleted (the API server's CRD
    // finalizer removes the objects first; under load it has taken minutes
    // here, with the namespace controller cleaning up beside it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let crds: serde_json::Value =
            serde_json::from_str(&kube.kubectl_ok(&["get", "crd", "-o", "json"])).unwrap();
        let ours: Vec<&serde_json::Value> = crds["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["metadata"]["name"].as_str().unwrap().contains("mesh.rs"))
            .collect();
        if ours.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            for crd in ours {
                assert!(
                    crd["metadata"]["deletionTimestamp"].is_string(),
                    "not deleted: {}",
                    crd["metadata"]["name"]
                );
                eprintln!(
                    "{} still terminating: {}",
                    crd["metadata"]["name"], crd["status"]["conditions"]
                );
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A Discovery client presenting an SVID for `id`, signed with the CA in
/// `ca_dir` (the test is the operator here).
fn discovery_client(
    api: std::net::SocketAddr,
    ca_dir: &std::path::Path,
    id: &str,
) -> mesh_core::api::v1::discovery_client::DiscoveryClient<tonic::transport::Channel> {
    use mesh_core::identity::{
        BundleStore, CredentialStore, Credentials, ExpectedIdentity, SpiffeId, TrustBundleSet,
        cert, files, tls,
    };
    let out = tempfile::tempdir().unwrap();
    mesh(&[
        "identity",
        "issue",
        "--ca",
        ca_dir.to_str().unwrap(),
        "--spiffe-id",
        id,
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let chain = cert::certs_from_pem(&std::fs::read(out.path().join("leaf.crt")).unwrap()).unwrap();
    let key = cert::key_from_pem(&std::fs::read(out.path().join("leaf.key")).unwrap()).unwrap();
    let id = SpiffeId::parse(id).unwrap();
    let td = id.trust_domain().clone();
    let bundle = files::load_bundle(&ca_dir.join(files::BUNDLE), td.clone()).unwrap();
    let control = SpiffeId::workload(&td, "mesh-system", "control").unwrap();
    let cfg = tls::client_config(
        CredentialStore::new(Credentials::new(chain, key).unwrap()),
        BundleStore::new([bundle].into_iter().collect::<TrustBundleSet>()),
        ExpectedIdentity::Exact(control),
    )
    .unwrap();
    mesh_core::api::v1::discovery_client::DiscoveryClient::new(
        mesh_core::grpc::channel(&api.to_string(), cfg).unwrap(),
    )
}

/// Watches `authority` until `done` holds for its endpoints (30 s at most).
async fn endpoints_until(
    client: &mut mesh_core::api::v1::discovery_client::DiscoveryClient<tonic::transport::Channel>,
    authority: &str,
    done: impl Fn(&[mesh_core::api::v1::Endpoint]) -> bool,
) -> Vec<mesh_core::api::v1::Endpoint> {
    use mesh_core::api::v1::{WatchRequest, discovery_update::Kind};
    let mut stream = client
        .watch(WatchRequest {
            authority: authority.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let update = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{authority}: not as expected in 30 s; last: {last:?}"))
            .unwrap()
            .expect("the stream stays open");
        if let Some(Kind::Endpoints(set)) = &update.kind
            && done(&set.endpoints)
        {
            return set.endpoints.clone();
        }
        last = Some(update);
    }
}

/// The control plane runs as a process with a token of the `mesh-control`
/// ServiceAccount (so the RBAC `mesh install` prints is what is tested),
/// becomes ready, and serves discovery from Services, EndpointSlices and
/// Pods: the pod the test "runs" (status patched Ready) is an mTLS
/// endpoint with its service account's SPIFFE ID and its proxy's port; one
/// that is not ready is not an endpoint; readiness lost is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_on_the_kube_store_serves_discovery() {
    let kube = Kube::start();
    let installed = install(&kube, "east.mesh.local", "east");
    let (control, ca_dir) = (installed.control, installed.ca_dir);

    kube.apply(
        r#"apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: api, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  ports: [{name: http, port: 8080, targetPort: 8080, appProtocol: http}]
"#,
    );
    for name in ["api-0", "api-1"] {
        kube.apply(&mesh_tests::kube::meshed_pod(
            "shop",
            name,
            "api",
            &[("app", "api")],
        ));
    }
    kube.run_pod("shop", "api-0", "10.244.0.7");

    let mut client = discovery_client(
        control.api,
        &ca_dir,
        "spiffe://east.mesh.local/ns/shop/sa/web",
    );
    let authority = "api.shop.svc.cluster.local:8080";
    let eps = endpoints_until(&mut client, authority, |eps| !eps.is_empty()).await;
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0].address, "10.244.0.7:8080");
    assert_eq!(eps[0].spiffe_id, "spiffe://east.mesh.local/ns/shop/sa/api");
    assert_eq!(eps[0].proxy_port, 4143);
    assert_eq!(eps[0].cluster, "east");
    assert_eq!(eps[0].workload, "shop/api-0");
    // The controller manager made the EndpointSlice the control plane read.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let slices = kube.kubectl_ok(&[
            "get",
            "endpointslices",
            "-n",
            "shop",
            "-l",
            "kubernetes.io/service-name=api",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[*]}",
        ]);
        if slices.trim() == "10.244.0.7" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no EndpointSlice lists api-0: {slices:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // Readiness lost (the kubelet would report it): no endpoint.
    let unready =
        serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    kube.kubectl_ok(&[
        "patch",
        "pod",
        "api-0",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        &unready.to_string(),
    ]);
    endpoints_until(&mut client, authority, |eps| eps.is_empty()).await;
    drop(control);
}

/// A meshed workload as the kubelet would run it: its app (`mesh demo
/// serve`) and its proxy (`mesh proxy`, bootstrapped with the projected
/// service-account token `kubectl create token` makes), at its pod IP.
struct PodProcesses {
    children: Vec<std::process::Child>,
    outbound: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for PodProcesses {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_meshed(
    kube: &Kube,
    cluster: &str,
    control: ControlAddrs,
    ca_dir: &std::path::Path,
    td: &str,
    sa: &str,
    pod: &str,
    ip: &str,
    labels: &str,
) -> PodProcesses {
    use mesh_tests::kube::free_ports;
    let pod_labels: Vec<(&str, &str)> = labels
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    kube.apply(&mesh_tests::kube::meshed_pod("shop", pod, sa, &pod_labels));
    kube.run_pod("shop", pod, ip);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let token = kube.token("shop", sa, Some("identity.mesh.rs"), "1h");
    std::fs::write(&token_file, token).unwrap();
    let [outbound, admin] = free_ports::<2>();
    let outbound: std::net::SocketAddr = format!("127.0.0.1:{outbound}").parse().unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let log = |what: &str| std::fs::File::create(dir.path().join(format!("{what}.log"))).unwrap();
    let app = Command::new(mesh_exe())
        .args([
            "demo",
            "serve",
            "--cluster",
            cluster,
            "--workload",
            pod,
            "--ip",
            ip,
            "--http-port",
            "8080",
        ])
        .stdout(Stdio::null())
        .stderr(log("app"))
        .spawn()
        .unwrap();
    let c = control;
    let env = [
        ("CLUSTER", cluster.to_owned()),
        ("TRUST_DOMAIN", td.to_owned()),
        ("NAMESPACE", "shop".to_owned()),
        ("SERVICE_ACCOUNT", sa.to_owned()),
        ("WORKLOAD", pod.to_owned()),
        ("CONTROL_IDENTITY_ADDR", c.identity.to_string()),
        ("CONTROL_API_ADDR", c.api.to_string()),
        (
            "TRUST_ANCHORS",
            ca_dir.join("bundle.json").display().to_string(),
        ),
        ("JOIN_TOKEN_FILE", token_file.display().to_string()),
        ("INBOUND_ADDR", format!("{ip}:4143")),
        ("OUTBOUND_ADDR", outbound.to_string()),
        ("ADMIN_ADDR", admin.to_string()),
        ("APP_IP", ip.to_owned()),
        ("APP_PORTS", "http=8080".to_owned()),
        ("WORKLOAD_ADDRESSES", ip.to_owned()),
        ("LABELS", labels.to_owned()),
        ("SHUTDOWN_GRACE", "1s".to_owned()),
    ];
    let proxy = Command::new(mesh_exe())
        .arg("proxy")
        .env(
            "RUST_LOG",
            std::env::var("MESH_TEST_PROXY_LOG").unwrap_or_else(|_| "info".into()),
        )
        .envs(env.iter().map(|(k, v)| (format!("MESH_PROXY_{k}"), v)))
        .stdout(Stdio::null())
        .stderr(log("proxy"))
        .spawn()
        .unwrap();
    let processes = PodProcesses {
        children: vec![app, proxy],
        outbound,
        admin,
        _dir: dir,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while mesh_tests::get(admin, "/ready").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy of {pod} was not ready in 30 s:\n{}",
            std::fs::read_to_string(processes._dir.path().join("proxy.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    processes
}

/// End to end on the kube store: pods created through the API (status
/// patched by the test), their apps and proxies as local processes. Each
/// proxy bootstraps with a real `kubectl create token` token (TokenReview),
/// web reaches api over mTLS with its identity, a forbidden identity gets
/// 403.
#[test]
fn meshed_pods_talk_with_mtls_and_policy_on_the_kube_store() {
    mesh_tests::kube::pod_network();
    let kube = Kube::start();
    let td = "east.mesh.local";
    let installed = install(&kube, td, "east");
    kube.apply(&mesh_tests::kube::only_web_may_call_api(
        td,
        serde_json::json!({}),
    ));

    let _api = run_meshed(
        &kube,
        "east",
        installed.control.addrs(),
        &installed.ca_dir,
        td,
        "api",
        "api-0",
        "10.244.0.10",
        "app=api",
    );
    let web = run_meshed(
        &kube,
        "east",
        installed.control.addrs(),
        &installed.ca_dir,
        td,
        "web",
        "web-0",
        "10.244.0.11",
        "app=web",
    );
    let stranger = run_meshed(
        &kube,
        "east",
        installed.control.addrs(),
        &installed.ca_dir,
        td,
        "stranger",
        "stranger-0",
        "10.244.0.12",
        "app=stranger",
    );

    let url = "http://api.shop.svc.cluster.local:8080/hello";
    let (status, body) = mesh_tests::kube::get_until(
        web.outbound,
        url,
        std::time::Duration::from_secs(30),
        |s, _| s == 200,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("spiffe://east.mesh.local/ns/shop/sa/web"),
        "{body}"
    );
    assert!(body.contains("api-0"), "{body}");

    let (status, body) = mesh_tests::kube::http_get_via(stranger.outbound, url);
    assert_eq!(status, 403, "{body}");
    let _ = web.admin;
}

/// Certify on Kubernetes: a service-account token is checked with
/// TokenReview; the wrong audience, an expired token, a deleted service
/// account and an identity of another namespace are each refused with
/// their own status and `reason` label, and a good token gets its
/// service account's SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_checks_service_account_tokens_with_token_review() {
    use mesh_core::{
        api::v1::{CertifyRequest, identity_client::IdentityClient},
        identity::{
            BundleStore, ExpectedIdentity, SpiffeId, TrustBundleSet, csr::new_key_and_csr, files,
            tls,
        },
    };
    let kube = Kube::start();
    let td = "east.mesh.local";
    let installed = install(&kube, td, "east");
    kube.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: gone, namespace: shop}\n");

    let td_parsed: mesh_core::identity::TrustDomain = td.parse().unwrap();
    let bundle =
        files::load_bundle(&installed.ca_dir.join(files::BUNDLE), td_parsed.clone()).unwrap();
    let cfg = tls::client_config_without_cert(
        BundleStore::new([bundle].into_iter().collect::<TrustBundleSet>()),
        ExpectedIdentity::Exact(SpiffeId::workload(&td_parsed, "mesh-system", "control").unwrap()),
    )
    .unwrap();
    let mut client = IdentityClient::new(
        mesh_core::grpc::channel(&installed.control.identity.to_string(), cfg).unwrap(),
    );
    let mut certify = async |id: &str, token: &str| {
        let (_, csr) = new_key_and_csr().unwrap();
        client
            .certify(CertifyRequest {
                identity: id.to_owned(),
                csr,
                token: token.to_owned(),
                ttl_seconds: 0,
                ..Default::default()
            })
            .await
    };
    let web = "spiffe://east.mesh.local/ns/shop/sa/web";

    let good = kube.token("shop", "web", Some("identity.mesh.rs"), "1h");
    let issued = certify(web, &good)
        .await
        .expect("a good token is honoured")
        .into_inner();
    assert!(!issued.chain.is_empty());

    let for_the_api_server = kube.token("shop", "web", None, "1h");
    let e = certify(web, &for_the_api_server).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("audience"), "{e:?}");

    let expired = kube.expired_token("shop", "web", "identity.mesh.rs");
    let e = certify(web, &expired).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");

    let orphan = kube.token("shop", "gone", Some("identity.mesh.rs"), "1h");
    kube.kubectl_ok(&["delete", "sa", "gone", "-n", "shop"]);
    let e = certify("spiffe://east.mesh.local/ns/shop/sa/gone", &orphan)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("no longer exists"), "{e:?}");

    let e = certify("spiffe://east.mesh.local/ns/bank/sa/web", &good)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("ns/shop/sa/web"), "{e:?}");

    let metrics = mesh_tests::metrics(installed.control.admin);
    for reason in [
        "token_wrong_audience",
        "token_expired",
        "token_service_account_gone",
        "token_identity_mismatch",
    ] {
        let counted = mesh_tests::sum(&metrics, "mesh_control_certify_refused_total", |s| {
            s.label("reason") == reason
        });
        assert!(counted > 0.0, "no refusal counted as {reason}: {metrics:?}");
    }
}

/// An anonymous Identity client and mTLS Registry clients of a control
/// plane of trust domain `td` whose bundle is in `ca_dir`.
fn identity_client(
    control: &Control,
    ca_dir: &std::path::Path,
    td: &str,
) -> mesh_core::api::v1::identity_client::IdentityClient<tonic::transport::Channel> {
    use mesh_core::identity::{
        BundleStore, ExpectedIdentity, SpiffeId, TrustBundleSet, files, tls,
    };
    let td: mesh_core::identity::TrustDomain = td.parse().unwrap();
    let bundle = files::load_bundle(&ca_dir.join(files::BUNDLE), td.clone()).unwrap();
    let cfg = tls::client_config_without_cert(
        BundleStore::new([bundle].into_iter().collect::<TrustBundleSet>()),
        ExpectedIdentity::Exact(SpiffeId::workload(&td, "mesh-system", "control").unwrap()),
    )
    .unwrap();
    mesh_core::api::v1::identity_client::IdentityClient::new(
        mesh_core::grpc::channel(&control.identity.to_string(), cfg).unwrap(),
    )
}

/// Certifies `id` with `token`: the chain (leaf first) and the key.
async fn certify(
    client: &mut mesh_core::api::v1::identity_client::IdentityClient<tonic::transport::Channel>,
    id: &str,
    token: &str,
) -> Result<(Vec<Vec<u8>>, rustls::pki_types::PrivateKeyDer<'static>), tonic::Status> {
    let (key, csr) = mesh_core::identity::csr::new_key_and_csr().unwrap();
    let resp = client
        .certify(mesh_core::api::v1::CertifyRequest {
            identity: id.to_owned(),
            csr,
            token: token.to_owned(),
            ttl_seconds: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((resp.chain, key))
}

/// What the local store keeps in redb lives in the API server on the kube
/// store: a join token is a Secret holding only its hash, redeemed once
/// (a compare-and-swap); the registration its workload makes is an
/// ExternalWorkload; the SVID issued is an Event on the ServiceAccount. A
/// new control plane with an empty data directory serves the registration.
/// And the issuer comes from its Secret: a new issuer put there is what
/// the next SVID is signed with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_the_issuer_live_in_the_api_server() {
    use mesh_core::api::v1::{RegisterRequest, WorkloadPort, registry_client::RegistryClient};
    use mesh_core::identity::{
        BundleStore, CredentialStore, Credentials, ExpectedIdentity, SpiffeId, TrustBundleSet,
        cert, files, tls,
    };
    let kube = Kube::start();
    let td = "east.mesh.local";
    let mut installed = install(&kube, td, "east");
    kube.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: vm, namespace: shop}\nspec:\n  selector: {app: vm}\n  ports: [{name: http, port: 8080}]\n");

    // A join token for a VM, made through the running control plane.
    let socket = installed.control.data.path().join("admin.sock");
    let token = mesh(&[
        "control",
        "token",
        "create",
        "--ns",
        "shop",
        "--sa",
        "vm",
        "--workload",
        "vm-1",
        "--labels",
        "app=vm",
        "--addresses",
        "10.244.0.20",
        "--admin-socket",
        socket.to_str().unwrap(),
    ]);
    let token = token.trim();
    let secrets = kube.kubectl_ok(&[
        "get",
        "secrets",
        "-n",
        "mesh-system",
        "--field-selector",
        "type=mesh.rs/join-token",
        "-o",
        "json",
    ]);
    assert!(secrets.contains("mesh-join-"), "{secrets}");
    assert!(!secrets.contains(token), "the token itself is never stored");

    let vm = "spiffe://east.mesh.local/ns/shop/sa/vm";
    let mut identity = identity_client(&installed.control, &installed.ca_dir, td);
    let (chain, key) = certify(&mut identity, vm, token)
        .await
        .expect("the join token is honoured");
    let reused = certify(&mut identity, vm, token).await.unwrap_err();
    assert_eq!(reused.code(), tonic::Code::AlreadyExists, "{reused:?}");

    // The VM registers; its registration is an ExternalWorkload.
    let tdp: mesh_core::identity::TrustDomain = td.parse().unwrap();
    let bundle = files::load_bundle(&installed.ca_dir.join(files::BUNDLE), tdp.clone()).unwrap();
    let creds = Credentials::new(chain.into_iter().map(Into::into).collect(), key).unwrap();
    let cfg = tls::client_config(
        CredentialStore::new(creds),
        BundleStore::new([bundle].into_iter().collect::<TrustBundleSet>()),
        ExpectedIdentity::Exact(SpiffeId::workload(&tdp, "mesh-system", "control").unwrap()),
    )
    .unwrap();
    let mut registry = RegistryClient::new(
        mesh_core::grpc::channel(&installed.control.api.to_string(), cfg).unwrap(),
    );
    registry
        .register(RegisterRequest {
            namespace: "shop".into(),
            name: "vm-1".into(),
            addresses: vec!["10.244.0.20".into()],
            ports: vec![WorkloadPort {
                name: "http".into(),
                port: 8080,
                protocol: 1,
            }],
            labels: [("app".to_owned(), "vm".to_owned())].into(),
            healthy: true,
            proxy_port: 4143,
            via_gateway: false,
        })
        .await
        .expect("the grant allows this registration");
    let identity_of = kube.kubectl_ok(&[
        "get",
        "externalworkload",
        "vm-1",
        "-n",
        "shop",
        "-o",
        "jsonpath={.spec.identity}",
    ]);
    assert_eq!(identity_of, vm);
    let events = kube.kubectl_ok(&["get", "events", "-n", "shop", "-o", "json"]);
    assert!(
        events.contains("\"Issued\"") && events.contains("ns/shop/sa/vm"),
        "{events}"
    );

    // A new control plane, nothing on its disk: the registration serves.
    drop(std::mem::replace(
        &mut installed.control,
        Control::start(&installed.kubeconfig, "east"),
    ));
    let mut client = discovery_client(
        installed.control.api,
        &installed.ca_dir,
        "spiffe://east.mesh.local/ns/shop/sa/web",
    );
    let eps = endpoints_until(&mut client, "vm.shop.svc.cluster.local:8080", |eps| {
        !eps.is_empty()
    })
    .await;
    assert_eq!(eps[0].address, "10.244.0.20:8080");
    assert_eq!(eps[0].spiffe_id, vm);

    // A new issuer (same root) into the Secret: the next SVID is signed by it.
    let next = tempfile::tempdir().unwrap();
    let next_ca = next.path().join("ca");
    mesh(&[
        "identity",
        "ca",
        "create",
        "--trust-domain",
        td,
        "--shared-root",
        installed.ca_dir.to_str().unwrap(),
        "--out",
        next_ca.to_str().unwrap(),
    ]);
    let file = |dir: &std::path::Path, name: &str| {
        format!("--from-file={name}={}", dir.join(name).display())
    };
    let secret = kube.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "mesh-issuer",
        "-n",
        "mesh-system",
        &file(&installed.ca_dir, "root.crt"),
        &file(&next_ca, "issuer.crt"),
        &file(&next_ca, "issuer.key"),
        &file(&next_ca, "bundle.json"),
        "--dry-run=client",
        "-o",
        "json",
    ]);
    kube.apply(&secret);
    let new_issuer =
        cert::certs_from_pem(&std::fs::read(next_ca.join("issuer.crt")).unwrap()).unwrap();
    let mut identity = identity_client(&installed.control, &installed.ca_dir, td);
    kube.kubectl_ok(&["create", "sa", "vm", "-n", "shop"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let good = kube.token("shop", "vm", Some("identity.mesh.rs"), "1h");
        if let Ok((chain, _)) = certify(&mut identity, vm, &good).await
            && chain.get(1).map(Vec::as_slice) == Some(new_issuer[0].as_ref())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new issuer did not sign in 30 s:\n{}",
            installed.control.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// HA: three replicas on one API server all serve; one holds the writer
/// Lease. A running load (web -> api through their proxies, which reach the
/// control plane through a Service-like address) sees no failed request
/// while the leader is killed; another replica takes over the Lease within
/// 15 s (measured) and writes statuses from then on.
#[test]
fn a_killed_leader_is_replaced_without_failed_requests() {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        },
        time::{Duration, Instant},
    };
    mesh_tests::kube::pod_network();
    let kube = Kube::start();
    let td = "east.mesh.local";
    let first = install(&kube, td, "east");
    let mut replicas = vec![
        first.control,
        Control::start(&first.kubeconfig, "east"),
        Control::start(&first.kubeconfig, "east"),
    ];
    let leader_of = |replicas: &[Control]| -> Vec<usize> {
        replicas
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                mesh_tests::sum(&mesh_tests::metrics(c.admin), "mesh_control_leader", |_| {
                    true
                }) == 1.0
            })
            .map(|(i, _)| i)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let leaders = leader_of(&replicas);
        assert!(leaders.len() <= 1, "two writers at once: {leaders:?}");
        if let [one] = leaders[..] {
            break one;
        }
        assert!(Instant::now() < deadline, "no replica took the Lease");
        std::thread::sleep(Duration::from_millis(200));
    };
    // Proxies reach the control plane as pods do: through a Service, here
    // one that sends them to the leader while it lives, the worst case.
    replicas.swap(0, leader);
    let leader = 0;
    let control = ControlAddrs {
        identity: mesh_tests::kube::service_vip(replicas.iter().map(|c| c.identity).collect()),
        api: mesh_tests::kube::service_vip(replicas.iter().map(|c| c.api).collect()),
    };
    kube.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: api, namespace: shop}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{name: http, port: 8080, targetPort: 8080, appProtocol: http}]\n");
    let api_0 = run_meshed(
        &kube,
        "east",
        control,
        &first.ca_dir,
        td,
        "api",
        "api-0",
        "10.244.0.30",
        "app=api",
    );
    let web = run_meshed(
        &kube,
        "east",
        control,
        &first.ca_dir,
        td,
        "web",
        "web-0",
        "10.244.0.31",
        "app=web",
    );
    let url = "http://api.shop.svc.cluster.local:8080/";
    let (status, body) =
        mesh_tests::kube::get_until(web.outbound, url, Duration::from_secs(30), |s, _| s == 200);
    assert_eq!(status, 200, "web never reached api: {body}");

    // The load: one request every 20 ms until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, sent, failed, outbound) =
            (stop.clone(), sent.clone(), failed.clone(), web.outbound);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = mesh_tests::kube::http_get_via(outbound, url);
                sent.fetch_add(1, Ordering::Relaxed);
                if status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed request: {status} {body}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    let killed_at = Instant::now();
    let mut dead = replicas.remove(leader);
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let deadline = killed_at + Duration::from_secs(30);
    let takeover = loop {
        let leaders = leader_of(&replicas);
        assert!(leaders.len() <= 1, "two writers at once: {leaders:?}");
        if leaders.len() == 1 {
            break killed_at.elapsed();
        }
        assert!(Instant::now() < deadline, "no replica took over in 30 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    // The load has seen the takeover; it stops here, as the next step
    // fails requests on purpose.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    // The proxies follow another replica now: a new api replica is
    // discovered and reached. api-0 goes, so that requests must find
    // api-1: beside a fast api-0, p2c over peak-EWMA would leave the new
    // endpoint (30 ms assumed until it answers, decaying over 10 s) idle
    // for up to half a minute, and reaching it would be luck.
    let _api_1 = run_meshed(
        &kube,
        "east",
        control,
        &first.ca_dir,
        td,
        "api",
        "api-1",
        "10.244.0.32",
        "app=api",
    );
    drop(api_0);
    let (_, body) =
        mesh_tests::kube::get_until(web.outbound, url, Duration::from_secs(30), |_, b| {
            b.contains("api-1")
        });
    assert!(
        body.contains("api-1"),
        "web's proxy never learnt of api-1 after the leader died:\n{}",
        std::fs::read_to_string(web._dir.path().join("proxy.log")).unwrap_or_default()
    );
    // The new writer writes: a Server gets its Accepted condition.
    kube.apply("apiVersion: policy.mesh.rs/v1alpha1\nkind: Server\nmetadata: {name: api-admin, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  port: 9090\n");
    kube.kubectl_ok(&[
        "wait",
        "-n",
        "shop",
        "--for=condition=Accepted",
        "server/api-admin",
        "--timeout=20s",
    ]);
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "leader killed: another replica held the Lease after {takeover:?} (Lease {:?}, renewed every {:?}); {sent} requests during the test, {failed} failed",
        Duration::from_secs(10),
        Duration::from_secs(2),
    );
    assert!(
        takeover <= Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    assert!(sent > 100, "the load ran: {sent}");
    drop(dead);
}

/// `mesh ARGS` with a kubeconfig: exit success and stdout.
fn mesh_on(kube: &Kube, args: &[&str]) -> (bool, String) {
    let out = Command::new(mesh_exe())
        .args(args)
        .env("KUBECONFIG", &kube.kubeconfig)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `mesh check --pre` passes on a fresh cluster; `mesh check` fails there
/// naming the missing CRDs and the control plane with their fixes, passes
/// once Mesh is installed and running, and fails again (non-zero) for a
/// CRD that is not this version's and for an issuer about to expire.
#[test]
fn mesh_check_says_what_is_wrong_and_how_to_fix_it() {
    let kube = Kube::start();
    let (ok, out) = mesh_on(&kube, &["check", "--pre"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("√ can create customresourcedefinitions"),
        "{out}"
    );

    let (ok, out) = mesh_on(&kube, &["check"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("× CRDs are installed: missing: servers.policy.mesh.rs"),
        "{out}"
    );
    assert!(
        out.contains("hint: mesh install --crds | kubectl apply -f -"),
        "{out}"
    );
    assert!(out.contains("× control plane is running"), "{out}");

    let installed = install(&kube, "east.mesh.local", "east");
    // No control-plane pod is ready behind the webhook's Service yet.
    let (ok, out) = mesh_on(&kube, &["check"]);
    assert!(
        !ok && out.contains("× injection webhook is reachable: Service mesh-system/mesh-control has no ready endpoint"),
        "{out}"
    );
    mesh_tests::kube::control_pod_runs_at(&kube, &installed, "10.244.0.53");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let out = loop {
        let (ok, out) = mesh_on(&kube, &["check"]);
        if ok {
            break out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mesh check never passed:\n{out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(out.contains("√ control plane is running"), "{out}");
    assert!(
        out.contains("√ issuer is valid for more than 60 days"),
        "{out}"
    );
    assert!(out.contains("Status check results are √"), "{out}");
    let (ok, out) = mesh_on(&kube, &["check", "--pre"]);
    assert!(
        !ok && out.contains("× no Mesh control plane runs here yet"),
        "{out}"
    );

    // A CRD edited away from this version's schema.
    kube.kubectl_ok(&[
        "patch", "crd", "servers.policy.mesh.rs", "--type=json", "-p",
        r#"[{"op": "add", "path": "/spec/versions/0/additionalPrinterColumns", "value": [{"name": "Port", "type": "string", "jsonPath": ".spec.port"}]}]"#,
    ]);
    let (ok, out) = mesh_on(&kube, &["check"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("× CRDs are current") && out.contains("servers.policy.mesh.rs"),
        "{out}"
    );
    kube.apply(&mesh(&["install", "--crds"]));

    // An issuer with 30 days left.
    let short = tempfile::tempdir().unwrap();
    let short_ca = short.path().join("ca");
    mesh(&[
        "identity",
        "ca",
        "create",
        "--trust-domain",
        "east.mesh.local",
        "--shared-root",
        installed.ca_dir.to_str().unwrap(),
        "--issuer-ttl",
        "30d",
        "--out",
        short_ca.to_str().unwrap(),
    ]);
    kube.apply(&mesh(&[
        "install",
        "--ca",
        short_ca.to_str().unwrap(),
        "--set",
        "cluster=east",
    ]));
    let (ok, out) = mesh_on(&kube, &["check"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("× issuer is valid for more than 60 days: it expires in"),
        "{out}"
    );
    assert!(
        out.contains("mesh identity ca create --shared-root"),
        "{out}"
    );
}

/// A long-running helper process, killed on drop; its log is kept.
struct Daemon {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// `mesh ARGS`, bootstrapped with a token of ServiceAccount
    /// `mesh-system/sa` (for `identity.mesh.rs`) passed as `--join-token-file`.
    fn mesh_with_token(
        kube: &Kube,
        sa: &str,
        args: &[String],
        admin: std::net::SocketAddr,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(
            &token,
            kube.token("mesh-system", sa, Some("identity.mesh.rs"), "1h"),
        )
        .unwrap();
        let log = dir.path().join("log");
        let child = Command::new(mesh_exe())
            .args(args)
            .arg("--join-token-file")
            .arg(&token)
            .args(["--admin-addr", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let daemon = Self {
            child,
            log,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while mesh_tests::get(admin, "/ready").0 != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "mesh {} was not ready in 30 s:\n{}",
                args.join(" "),
                std::fs::read_to_string(&daemon.log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        daemon
    }
}

/// Two clusters, each its own API server and control plane on the kube
/// store. East exports `api`; west links east (a Link applied with
/// kubectl), east admits west. West's service mirror, bootstrapped with
/// its ServiceAccount's token and running with that account's RBAC,
/// writes `api-east` as a MirroredService object; web in west reaches it
/// through east's gateway, and east's api sees web's own identity. The
/// Link's status says alive and one service mirrored. Deleting the Link
/// deletes its mirror and nothing the mirror did not create.
#[test]
fn a_linked_cluster_on_kubernetes_is_mirrored_and_reached_through_its_gateway() {
    use mesh_tests::kube::free_port;
    mesh_tests::kube::pod_network();
    let east = Kube::start();
    let west = Kube::start();
    let east_mesh = install(&east, "east.mesh.local", "east");
    let west_mesh = install(&west, "west.mesh.local", "west");

    east.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: api, namespace: shop}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop, labels: {multicluster.mesh.rs/exported: \"true\"}}\nspec:\n  selector: {app: api}\n  ports: [{name: http, port: 8080, targetPort: 8080, appProtocol: http}]\n",
    );
    let _api = run_meshed(
        &east,
        "east",
        east_mesh.control.addrs(),
        &east_mesh.ca_dir,
        "east.mesh.local",
        "api",
        "api-0",
        "10.244.0.40",
        "app=api",
    );
    let tunnel = format!("127.0.0.1:{}", free_port());
    let c = east_mesh.control.addrs();
    let _gateway = Daemon::mesh_with_token(
        &east,
        "gateway",
        &[
            "gateway",
            "--cluster",
            "east",
            "--trust-domain",
            "east.mesh.local",
            "--control-identity-addr",
            &c.identity.to_string(),
            "--control-api-addr",
            &c.api.to_string(),
            "--trust-anchors",
            &east_mesh.ca_dir.join("bundle.json").display().to_string(),
            "--tunnel-addr",
            &tunnel,
        ]
        .map(str::to_owned),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );

    // The Links, applied as a user would with kubectl.
    west.apply(&mesh(&[
        "multicluster",
        "link",
        "--cluster-name",
        "east",
        "--gateway",
        &tunnel,
        "--ca",
        east_mesh.ca_dir.to_str().unwrap(),
    ]));
    east.apply(&mesh(&[
        "multicluster",
        "allow",
        "--cluster-name",
        "west",
        "--ca",
        west_mesh.ca_dir.to_str().unwrap(),
    ]));

    // West's service mirror, as its own ServiceAccount with its own RBAC.
    let token = west.token("mesh-system", "service-mirror", None, "1h");
    let mirror_kubeconfig = west.kubeconfig_for_token("service-mirror", &token);
    let w = west_mesh.control.addrs();
    west.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n---\napiVersion: multicluster.mesh.rs/v1alpha1\nkind: MirroredService\nmetadata: {name: other-east, namespace: shop, labels: {multicluster.mesh.rs/link: east}}\nspec: {link: east, remoteName: other, ports: [{port: 80}], identities: [\"spiffe://east.mesh.local/ns/shop/sa/other\"]}\n");
    let _mirror = Daemon::mesh_with_token(
        &west,
        "service-mirror",
        &[
            "service-mirror",
            "--store",
            "kube",
            "--cluster",
            "west",
            "--trust-domain",
            "west.mesh.local",
            "--kubeconfig",
            mirror_kubeconfig.to_str().unwrap(),
            "--control-identity-addr",
            &w.identity.to_string(),
            "--control-api-addr",
            &w.api.to_string(),
            "--trust-anchors",
            &west_mesh.ca_dir.join("bundle.json").display().to_string(),
        ]
        .map(str::to_owned),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    west.kubectl_ok(&[
        "wait",
        "-n",
        "shop",
        "--for=jsonpath={.spec.ready}=true",
        "mirroredservice/api-east",
        "--timeout=30s",
    ]);
    let labels = west.kubectl_ok(&[
        "get",
        "mirroredservice",
        "api-east",
        "-n",
        "shop",
        "-o",
        "jsonpath={.metadata.labels}",
    ]);
    assert!(
        labels.contains("mesh-service-mirror")
            && labels.contains("\"multicluster.mesh.rs/link\":\"east\""),
        "{labels}"
    );

    let web = run_meshed(
        &west,
        "west",
        w,
        &west_mesh.ca_dir,
        "west.mesh.local",
        "web",
        "web-0",
        "10.244.0.50",
        "app=web",
    );
    let url = "http://api-east.shop.svc.cluster.local:8080/through-the-gateway";
    let (status, body) = mesh_tests::kube::get_until(
        web.outbound,
        url,
        std::time::Duration::from_secs(30),
        |s, _| s == 200,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("spiffe://west.mesh.local/ns/shop/sa/web"),
        "the caller's own identity crosses the gateway: {body}"
    );
    assert!(body.contains("api-0"), "{body}");

    west.kubectl_ok(&[
        "wait",
        "-n",
        "mesh-system",
        "--for=condition=Alive",
        "link/east",
        "--timeout=20s",
    ]);
    let mirrored = west.kubectl_ok(&[
        "get",
        "link",
        "east",
        "-n",
        "mesh-system",
        "-o",
        "jsonpath={.status.mirroredServices}",
    ]);
    assert_eq!(mirrored, "1");

    // A federated `api` in west, which has no api of its own: a
    // FailoverPolicy object (the CRD, read by the control plane's
    // reflector) makes plain `api` one service over local and east.
    west.apply("apiVersion: multicluster.mesh.rs/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: api, namespace: shop}\nspec:\n  service: api\n  tiers: [{clusters: [local, east]}]\n  threshold: 0.7\n  failbackDelay: 2s\n");
    let (status, body) = mesh_tests::kube::get_until(
        web.outbound,
        "http://api.shop.svc.cluster.local:8080/federated",
        std::time::Duration::from_secs(30),
        |s, _| s == 200,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"cluster\":\"east\"") && body.contains("api-0"),
        "east's api answers west's plain api: {body}"
    );

    // Unlink: the mirror goes; the hand-made object stays.
    west.kubectl_ok(&["delete", "link", "east", "-n", "mesh-system"]);
    west.kubectl_ok(&[
        "wait",
        "-n",
        "shop",
        "--for=delete",
        "mirroredservice/api-east",
        "--timeout=30s",
    ]);
    let left = west.kubectl_ok(&["get", "mirroredservice", "-n", "shop", "-o", "name"]);
    assert_eq!(
        left.trim(),
        "mirroredservice.multicluster.mesh.rs/other-east"
    );
}

/// A watch that breaks reconnects and re-lists without dropping the last
/// good state: with the API server down, discovery still answers with the
/// endpoint it knew; once it is back, a pod added since is discovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_survives_an_api_server_outage_and_resyncs_after() {
    let mut kube = Kube::start();
    let installed = install(&kube, "east.mesh.local", "east");
    kube.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: api, namespace: shop}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{name: http, port: 8080, targetPort: 8080, appProtocol: http}]\n");
    for name in ["api-0", "api-1"] {
        kube.apply(&mesh_tests::kube::meshed_pod(
            "shop",
            name,
            "api",
            &[("app", "api")],
        ));
    }
    kube.run_pod("shop", "api-0", "10.244.0.60");
    let authority = "api.shop.svc.cluster.local:8080";
    let mut client = discovery_client(
        installed.control.api,
        &installed.ca_dir,
        "spiffe://east.mesh.local/ns/shop/sa/web",
    );
    endpoints_until(&mut client, authority, |eps| eps.len() == 1).await;

    kube.stop();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    // A new watch during the outage: the last good state, not nothing.
    let mut client = discovery_client(
        installed.control.api,
        &installed.ca_dir,
        "spiffe://east.mesh.local/ns/shop/sa/web",
    );
    let eps = endpoints_until(&mut client, authority, |_| true).await;
    assert_eq!(
        eps.len(),
        1,
        "the last good state serves during the outage: {eps:?}"
    );
    assert_eq!(eps[0].address, "10.244.0.60:8080");

    kube.start_again();
    kube.run_pod("shop", "api-1", "10.244.0.61");
    let eps = endpoints_until(&mut client, authority, |eps| eps.len() == 2).await;
    let mut addresses: Vec<&str> = eps.iter().map(|e| e.address.as_str()).collect();
    addresses.sort_unstable();
    assert_eq!(addresses, ["10.244.0.60:8080", "10.244.0.61:8080"]);
    assert!(
        installed.control.log_text().contains("works again"),
        "the control plane says its watches recovered:\n{}",
        installed.control.log_text()
    );
}

/// Garbage collection of dead ExternalWorkloads is the writer's, from the
/// heartbeats every replica records: a VM that heartbeats to a replica
/// that does not write is kept for twice the removal grace, and once it
/// falls silent the writer deletes its ExternalWorkload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_collects_dead_external_workloads_from_recorded_heartbeats() {
    use mesh_core::api::v1::{
        HeartbeatRequest, RegisterRequest, WorkloadPort, registry_client::RegistryClient,
    };
    use mesh_core::identity::{
        BundleStore, CredentialStore, Credentials, ExpectedIdentity, SpiffeId, TrustBundleSet,
        files, tls,
    };
    use std::time::{Duration, Instant};
    let kube = Kube::start();
    let td = "east.mesh.local";
    let first = install(&kube, td, "east");
    let fast = ["--removal-grace", "6s", "--heartbeat-interval", "1s"];
    drop(first.control);
    let replicas = [
        Control::start_with(&first.kubeconfig, "east", &fast),
        Control::start_with(&first.kubeconfig, "east", &fast),
    ];
    let is_leader = |c: &Control| {
        mesh_tests::sum(&mesh_tests::metrics(c.admin), "mesh_control_leader", |_| {
            true
        }) == 1.0
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !replicas.iter().any(is_leader) {
        assert!(Instant::now() < deadline, "no replica took the Lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let follower = replicas.iter().find(|c| !is_leader(c)).unwrap();
    kube.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");

    // A VM joins and registers through the replica that does not write.
    let socket = follower.data.path().join("admin.sock");
    let token = mesh(&[
        "control",
        "token",
        "create",
        "--ns",
        "shop",
        "--sa",
        "vm",
        "--workload",
        "vm-1",
        "--labels",
        "app=vm",
        "--admin-socket",
        socket.to_str().unwrap(),
    ]);
    let vm = "spiffe://east.mesh.local/ns/shop/sa/vm";
    let mut identity = identity_client(follower, &first.ca_dir, td);
    let (chain, key) = certify(&mut identity, vm, token.trim()).await.unwrap();
    let tdp: mesh_core::identity::TrustDomain = td.parse().unwrap();
    let bundle = files::load_bundle(&first.ca_dir.join(files::BUNDLE), tdp.clone()).unwrap();
    let cfg = tls::client_config(
        CredentialStore::new(
            Credentials::new(chain.into_iter().map(Into::into).collect(), key).unwrap(),
        ),
        BundleStore::new([bundle].into_iter().collect::<TrustBundleSet>()),
        ExpectedIdentity::Exact(SpiffeId::workload(&tdp, "mesh-system", "control").unwrap()),
    )
    .unwrap();
    let mut registry =
        RegistryClient::new(mesh_core::grpc::channel(&follower.api.to_string(), cfg).unwrap());
    registry
        .register(RegisterRequest {
            namespace: "shop".into(),
            name: "vm-1".into(),
            addresses: vec!["10.244.0.70".into()],
            ports: vec![WorkloadPort {
                name: "http".into(),
                port: 8080,
                protocol: 1,
            }],
            labels: [("app".to_owned(), "vm".to_owned())].into(),
            healthy: true,
            proxy_port: 4143,
            via_gateway: false,
        })
        .await
        .unwrap();
    let exists = || {
        kube.kubectl(&["get", "externalworkload", "vm-1", "-n", "shop"])
            .status
            .success()
    };
    // Alive: heartbeats for twice the grace, and it stays.
    let alive_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < alive_until {
        registry
            .heartbeat(HeartbeatRequest {
                namespace: "shop".into(),
                name: "vm-1".into(),
                healthy: true,
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(exists(), "a live VM's ExternalWorkload was collected");
    }
    // Silent: the writer collects it.
    let silent_at = Instant::now();
    while exists() {
        assert!(
            silent_at.elapsed() < Duration::from_secs(30),
            "a silent VM's ExternalWorkload was never collected"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "collected {:?} after the last heartbeat (removal grace 6 s)",
        silent_at.elapsed()
    );
    let writer = replicas.iter().find(|c| is_leader(c)).unwrap();
    assert!(
        writer.log_text().contains("ExternalWorkload deleted"),
        "{}",
        writer.log_text()
    );
}
