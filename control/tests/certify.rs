//! Identity.Certify over real gRPC and TLS: first issuance with a join
//! token, renewal with the current SVID, and each refusal with its own
//! status and counter.

mod support;

use std::time::Duration;

use mesh_control::store::TokenRecord;
use mesh_core::{
    api::v1::CertifyRequest,
    identity::{
        ExpectedIdentity,
        cert::{now, unix_time},
        csr::new_key_and_csr,
        verify::{PeerRole, verify_peer},
    },
};
use support::*;
use tonic::Code;

#[tokio::test]
async fn token_then_renewal_then_each_refusal() {
    let tp = TestPlane::start().await;
    let web_id = format!("spiffe://{TD}/ns/shop/sa/web");

    // First issuance with a token: a valid SVID for exactly that identity.
    let token = tp.token("shop", "web");
    let creds = certify(&mut tp.anonymous_identity(), &web_id, &token)
        .await
        .unwrap();
    assert_eq!(creds.id().as_str(), web_id);
    let set = tp.bundles.current();
    verify_peer(
        creds.chain(),
        &set,
        &ExpectedIdentity::trust_domain(TD.parse().unwrap()),
        PeerRole::Client,
        unix_time(now()),
    )
    .expect("the issued chain verifies against the trust domain's bundle");

    // Token reuse.
    let err = certify(&mut tp.anonymous_identity(), &web_id, &token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert!(err.message().contains("already used"), "{err}");

    // Expired token.
    let expired = mesh_control::tokens::generate();
    let t = now().unix_timestamp();
    tp.plane()
        .store()
        .create_token(
            &mesh_control::tokens::hash(&expired).unwrap(),
            &TokenRecord {
                namespace: "shop".into(),
                service_account: "web".into(),
                created_at: t - 700,
                expires_at: t - 100,
                used_at: None,
                claims: None,
            },
        )
        .unwrap();
    let err = certify(&mut tp.anonymous_identity(), &web_id, &expired)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("expired 1 minute ago"), "{err}");

    // A token for web used to ask for api.
    let token = tp.token("shop", "web");
    let err = certify(
        &mut tp.anonymous_identity(),
        &format!("spiffe://{TD}/ns/shop/sa/api"),
        &token,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        err.message()
            .contains(&format!("this join token is for {web_id}")),
        "{err}"
    );

    // Renewal with the current SVID: same ID only.
    let renewed = certify(&mut tp.identity_as(&creds), &web_id, "")
        .await
        .unwrap();
    assert_eq!(renewed.id(), creds.id());
    assert_ne!(renewed.info().serial, creds.info().serial);
    let err = certify(
        &mut tp.identity_as(&creds),
        &format!("spiffe://{TD}/ns/shop/sa/admin"),
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(
        err.message()
            .contains("a renewal may only ask for that same ID"),
        "{err}"
    );

    // Neither token nor certificate; a malformed token; a bad CSR.
    let err = certify(&mut tp.anonymous_identity(), &web_id, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = certify(&mut tp.anonymous_identity(), &web_id, "hunter2")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let token = tp.token("shop", "web");
    let err = tp
        .anonymous_identity()
        .certify(CertifyRequest {
            identity: web_id.clone(),
            csr: b"not a csr".to_vec(),
            token: token.clone(),
            ttl_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // A refused CSR does not burn the token.
    certify(&mut tp.anonymous_identity(), &web_id, &token)
        .await
        .unwrap();

    let m = tp.metrics().await;
    for (reason, want) in [
        ("token_reused", 1.0),
        ("token_expired", 1.0),
        ("token_identity_mismatch", 1.0),
        ("renewal_identity_mismatch", 1.0),
        ("no_credentials", 1.0),
        ("token_malformed", 1.0),
        ("bad_csr", 1.0),
    ] {
        let got = sample(
            &m,
            &format!("mesh_control_certify_refused_total{{reason=\"{reason}\"}}"),
        );
        assert_eq!(got, want, "reason {reason}:\n{m}");
    }
    assert_eq!(
        sample(&m, "mesh_control_certify_issued_total{via=\"token\"}"),
        2.0
    );
    assert_eq!(
        sample(&m, "mesh_control_certify_issued_total{via=\"renewal\"}"),
        1.0
    );
}

#[tokio::test]
async fn ttl_is_clamped_and_anchors_are_returned() {
    let tp = TestPlane::start_with(|c| c.leaf_ttl = Duration::from_secs(3600)).await;
    let (_key, csr) = new_key_and_csr().unwrap();
    let resp = tp
        .anonymous_identity()
        .certify(CertifyRequest {
            identity: format!("spiffe://{TD}/ns/shop/sa/web"),
            csr,
            token: tp.token("shop", "web"),
            ttl_seconds: 7 * 24 * 3600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.not_after - resp.not_before <= 3600 + 60,
        "lifetime is clamped to --leaf-ttl"
    );
    let roots: Vec<Vec<u8>> = bundle_roots(&tp.bundles)
        .iter()
        .map(|r| r.to_vec())
        .collect();
    assert_eq!(resp.trust_anchors, roots);
}

#[tokio::test]
async fn tls_refusals_are_counted_and_metrics_pass_promtool() {
    // The metrics-only listener Prometheus scrapes from outside the pod.
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let tp = TestPlane::start_with(|c| c.metrics_addr = Some(metrics_addr)).await;
    // A client from another trust domain is refused in the API handshake.
    let rogue_dir = tempfile::tempdir().unwrap();
    let rca = mesh_core::identity::RootCa::generate(Duration::from_secs(3600 * 24), now()).unwrap();
    let rogue = mesh_core::identity::CertificateAuthority::generate(
        "rogue.example".parse().unwrap(),
        &rca,
        Duration::from_secs(3600 * 24),
        now(),
    )
    .unwrap();
    let (key, csr) = new_key_and_csr().unwrap();
    let svid = rogue
        .sign_csr(
            &csr,
            &"spiffe://rogue.example/ns/shop/sa/web".parse().unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let rogue_creds = mesh_core::identity::Credentials::new(svid.chain, key).unwrap();
    drop(rogue_dir);
    let err = tp
        .discovery(&rogue_creds)
        .watch(mesh_core::api::v1::WatchRequest {
            authority: "api.shop.svc.cluster.local:8080".into(),
        })
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("fatal alert"),
        "the handshake must be refused: {err:?}"
    );

    let m = tp.metrics().await;
    let scraped = scrape(metrics_addr).await;
    assert!(
        scraped.contains("mesh_control_tls_refused_total"),
        "{scraped}"
    );
    for path in ["/ready", "/live", "/tap"] {
        let raw = http_get(metrics_addr, path).await;
        assert!(
            raw.contains(" 404 "),
            "{path} on the metrics-only listener: {raw}"
        );
    }
    let refused = sample(
        &m,
        "mesh_control_tls_refused_total{listener=\"api\",reason=\"unknown_trust_domain\"}",
    );
    assert!(refused >= 1.0, "{m}");

    // promtool (Debian's prometheus package) must accept the exposition.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &m).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "this test needs promtool ({e}); install it with `apt-get install -y prometheus`"
            )
        });
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A flood of made-up join tokens from one address: past the burst it is
/// refused by the address's own budget, before the token store is read,
/// and a token from the same address is refused the same way until the
/// budget refills.
#[tokio::test]
async fn a_flood_of_random_tokens_is_limited_before_the_store() {
    let tp = TestPlane::start().await;
    let web_id = format!("spiffe://{TD}/ns/shop/sa/web");
    let mut client = tp.anonymous_identity();
    let (mut unknown, mut limited) = (0, 0);
    for _ in 0..130 {
        let (_, csr) = new_key_and_csr().unwrap();
        let err = client
            .certify(CertifyRequest {
                identity: web_id.clone(),
                csr,
                token: mesh_control::tokens::generate(),
                ttl_seconds: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        match err.code() {
            Code::Unauthenticated => unknown += 1,
            Code::ResourceExhausted => {
                assert!(err.message().contains("this address"), "{err}");
                limited += 1;
            }
            other => panic!("{other:?}: {err}"),
        }
    }
    // The burst (100) plus what refills while the flood runs.
    assert!(unknown <= 110, "{unknown} reached the token store");
    assert!(limited >= 20, "only {limited} were rate limited");
    let m = tp.metrics().await;
    assert!(
        sample(
            &m,
            "mesh_control_certify_refused_total{reason=\"rate_limited\"}"
        ) >= 20.0,
        "{m}"
    );
}
