//! Real TLS 1.3 handshakes between configs built by `mesh_core::identity::tls`,
//! over TCP on 127.0.0.1: the good case, and each way a peer is refused.

mod support;

use std::sync::Arc;

use mesh_core::identity::{
    BundleStore, Credentials, ExpectedIdentity, TrustBundle, TrustBundleSet,
    svid::SvidError,
    tls::{client_config, server_config},
    verify::VerifyError,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{NamedGroup, ProtocolVersion, RootCertStore};
use support::*;

fn server(
    creds: Credentials,
    bundles: BundleStore,
    clients: ExpectedIdentity,
) -> rustls::ServerConfig {
    server_config(creds_store(creds), bundles, clients).unwrap()
}

fn client(
    creds: Credentials,
    bundles: BundleStore,
    server: ExpectedIdentity,
) -> rustls::ClientConfig {
    client_config(creds_store(creds), bundles, server).unwrap()
}

#[tokio::test]
async fn mutual_tls_with_spiffe_ids_succeeds() {
    let west = Domain::new("west.mesh.local");
    let east = Domain::new("east.mesh.local");
    let bundles = bundles(&[&west, &east]);
    // A west client calls an east server: each trusts the other's domain by
    // its own bundle.
    let srv = server(
        east.creds("/ns/shop/sa/api"),
        bundles.clone(),
        ExpectedIdentity::trust_domain(west.td.clone()),
    );
    let cli = client(
        west.creds("/ns/shop/sa/web"),
        bundles,
        ExpectedIdentity::Exact(east.id("/ns/shop/sa/api")),
    );
    let out = handshake(srv, cli).await;
    assert_eq!(
        out.server.unwrap(),
        west.id("/ns/shop/sa/web"),
        "server sees the client's SPIFFE ID"
    );
    assert_eq!(
        out.client.unwrap(),
        east.id("/ns/shop/sa/api"),
        "client sees the server's SPIFFE ID"
    );
    let (version, group) = out.negotiated.unwrap();
    assert_eq!(version, ProtocolVersion::TLSv1_3);
    assert_eq!(
        group,
        NamedGroup::X25519MLKEM768,
        "post-quantum hybrid key exchange is preferred"
    );
}

#[tokio::test]
async fn client_from_unknown_trust_domain_is_refused() {
    let west = Domain::new("west.mesh.local");
    let rogue = Domain::new("rogue.example");
    let srv = server(
        west.creds("/ns/shop/sa/api"),
        bundles(&[&west]),
        ExpectedIdentity::trust_domain(west.td.clone()),
    );
    // The rogue client trusts west, but west does not trust rogue.
    let cli = client(
        rogue.creds("/ns/x/sa/y"),
        bundles(&[&west, &rogue]),
        ExpectedIdentity::Exact(west.id("/ns/shop/sa/api")),
    );
    let out = handshake(srv, cli).await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(verify_failure(&err), Some(VerifyError::UnknownTrustDomain { td, .. }) if td.as_str() == "rogue.example"),
        "server error: {err}"
    );
    assert!(out.client.is_err(), "client must not get through");
}

/// West's `web` (with `client` credentials) calls west's `api` (served
/// with `server` credentials), each trusting west only.
async fn west_call(west: &Domain, server_creds: Credentials, client_creds: Credentials) -> Outcome {
    let bundles = bundles(&[west]);
    let srv = server(
        server_creds,
        bundles.clone(),
        ExpectedIdentity::trust_domain(west.td.clone()),
    );
    let cli = client(
        client_creds,
        bundles,
        ExpectedIdentity::Exact(west.id("/ns/shop/sa/api")),
    );
    handshake(srv, cli).await
}

#[tokio::test]
async fn server_with_wrong_spiffe_id_is_refused() {
    let west = Domain::new("west.mesh.local");
    let out = west_call(
        &west,
        west.creds("/ns/shop/sa/other"),
        west.creds("/ns/shop/sa/web"),
    )
    .await;
    let err = out.client.unwrap_err();
    match verify_failure(&err) {
        Some(VerifyError::UnexpectedIdentity { got, .. }) => {
            assert_eq!(got, &west.id("/ns/shop/sa/other"))
        }
        other => panic!("want UnexpectedIdentity, got {other:?} ({err})"),
    }
    assert!(out.server.is_err());
}

#[tokio::test]
async fn expired_leaf_is_refused() {
    let west = Domain::new("west.mesh.local");
    let out = west_call(
        &west,
        west.expired_creds("/ns/shop/sa/api"),
        west.creds("/ns/shop/sa/web"),
    )
    .await;
    let err = out.client.unwrap_err();
    let failure = verify_failure(&err).expect("a verification error");
    assert!(matches!(failure, VerifyError::Expired { .. }), "{failure}");
    assert_eq!(
        failure.to_string(),
        "peer SVID for spiffe://west.mesh.local/ns/shop/sa/api expired 1 hour ago"
    );
    assert_eq!(failure.reason(), "expired");
}

/// West's api server meets a client presenting `chain` as is; returns the
/// server's error.
async fn west_server_refuses(
    west: &Domain,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> std::io::Error {
    let bundles = bundles(&[west]);
    let out = handshake(
        server(
            west.creds("/ns/shop/sa/api"),
            bundles.clone(),
            ExpectedIdentity::trust_domain(west.td.clone()),
        ),
        raw_client(
            chain,
            key,
            bundles,
            ExpectedIdentity::Exact(west.id("/ns/shop/sa/api")),
        ),
    )
    .await;
    assert!(out.client.is_err(), "the client must not get through");
    out.server.unwrap_err()
}

#[tokio::test]
async fn leaf_that_is_a_ca_is_refused() {
    let west = Domain::new("west.mesh.local");
    let mut params = svid_params(&["spiffe://west.mesh.local/ns/shop/sa/web"]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let (chain, key) = west.crafted(&params);
    assert!(
        Credentials::new(chain.clone(), key.clone_key()).is_err(),
        "our own loader refuses it too"
    );
    // The client presents it regardless, so the server's verifier is tested.
    let err = west_server_refuses(&west, chain, key).await;
    assert!(
        matches!(
            verify_failure(&err),
            Some(VerifyError::Svid(SvidError::LeafIsCa { .. }))
        ),
        "{err}"
    );
}

#[tokio::test]
async fn leaf_with_two_uri_sans_is_refused() {
    let west = Domain::new("west.mesh.local");
    let params = svid_params(&[
        "spiffe://west.mesh.local/ns/shop/sa/web",
        "spiffe://west.mesh.local/ns/kube-system/sa/admin",
    ]);
    let (chain, key) = west.crafted(&params);
    let err = west_server_refuses(&west, chain, key).await;
    assert!(
        matches!(
            verify_failure(&err),
            Some(VerifyError::Svid(SvidError::MultipleUriSans { count: 2 }))
        ),
        "{err}"
    );
}

#[tokio::test]
async fn chain_too_deep_is_refused() {
    // root -> five intermediates -> leaf, all in trust domain deep.mesh.local.
    let td = "deep.mesh.local";
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let root_params = ca_params("deep root", None);
    let root = root_params.self_signed(&root_key).unwrap();
    let mut issuer = Issuer::new(root_params, root_key);
    let mut intermediates = Vec::new();
    for i in 0..5 {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = ca_params(&format!("deep {i}"), Some(td));
        let cert = params.signed_by(&key, &issuer).unwrap();
        intermediates.insert(0, cert.der().clone());
        issuer = Issuer::new(params, key);
    }
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = svid_params(&["spiffe://deep.mesh.local/ns/a/sa/b"])
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let mut chain = vec![leaf.der().clone()];
    chain.extend(intermediates);

    let west = Domain::new("west.mesh.local");
    let deep = TrustBundle::with_roots(td.parse().unwrap(), [root.der().clone()]).unwrap();
    let set: TrustBundleSet = [west.bundle(), deep].into_iter().collect();
    let bundles = BundleStore::new(set);
    let out = handshake(
        server(
            west.creds("/ns/shop/sa/api"),
            bundles.clone(),
            ExpectedIdentity::trust_domain(td.parse().unwrap()),
        ),
        raw_client(
            chain,
            pkcs8(&leaf_key),
            bundles,
            ExpectedIdentity::Exact(west.id("/ns/shop/sa/api")),
        ),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(
            verify_failure(&err),
            Some(VerifyError::ChainTooDeep { intermediates: 5 })
        ),
        "{err}"
    );
}

/// A stock aws-lc-rs provider: ours offers TLS 1.3 suites only, so a
/// TLS 1.2-only peer needs its own.
fn tls12_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let west = Domain::new("west.mesh.local");
    let srv = server(
        west.creds("/ns/shop/sa/api"),
        bundles(&[&west]),
        ExpectedIdentity::trust_domain(west.td.clone()),
    );
    let mut roots = RootCertStore::empty();
    roots.add(west.root.clone()).unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(tls12_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let out = handshake(srv, tls12).await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(rustls_error(&err), Some(rustls::Error::PeerIncompatible(_))),
        "server must refuse a TLS 1.2-only client: {err}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn tls12_only_server_is_refused() {
    let west = Domain::new("west.mesh.local");
    let (chain, key) = west.crafted(&svid_params(&["spiffe://west.mesh.local/ns/shop/sa/api"]));
    let tls12 = rustls::ServerConfig::builder_with_provider(tls12_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let cli = client(
        west.creds("/ns/shop/sa/web"),
        bundles(&[&west]),
        ExpectedIdentity::Exact(west.id("/ns/shop/sa/api")),
    );
    let out = handshake(tls12, cli).await;
    let err = out.client.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::PeerIncompatible(_) | rustls::Error::AlertReceived(_))
        ),
        "client must refuse a TLS 1.2-only server: {err}"
    );
}

/// A client config presenting `chain` as is (even one our loader refuses),
/// so the server's verifier is what gets tested.
fn raw_client(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    bundles: BundleStore,
    server: ExpectedIdentity,
) -> rustls::ClientConfig {
    // Borrow the SPIFFE server verifier from a normal config, then replace
    // the client credentials with the raw chain.
    let provider = mesh_core::crypto::provider();
    let signing = provider.key_provider.load_private_key(key).unwrap();
    let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, signing));
    let normal = Domain::new("scratch.local");
    let mut cfg = client(normal.creds("/x"), bundles, server);
    cfg.client_auth_cert_resolver = Arc::new(Fixed(certified));
    cfg
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn ca_params(cn: &str, td: Option<&str>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Some(td) = td {
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    }
    p
}
