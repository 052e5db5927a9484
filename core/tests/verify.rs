//! Chain validation without a handshake: trust-domain isolation under a
//! shared root, validity windows, and each refusal's reason label.

mod support;

use std::time::Duration;

use mesh_core::identity::{
    ExpectedIdentity, RootCa, TrustBundleSet,
    ca::DEFAULT_ROOT_TTL,
    cert::{now, unix_time},
    verify::{PeerRole, VerifyError, verify_peer},
};
use support::*;

fn check(
    chain: &[rustls::pki_types::CertificateDer<'static>],
    set: &TrustBundleSet,
    expected: &ExpectedIdentity,
) -> Result<mesh_core::identity::SpiffeId, VerifyError> {
    verify_peer(chain, set, expected, PeerRole::Client, unix_time(now()))
}

#[test]
fn shared_root_verifies_each_domain_but_issuers_cannot_cross() {
    let root = RootCa::generate(DEFAULT_ROOT_TTL, now()).unwrap();
    let west = Domain::under("west.mesh.local", &root);
    let east = Domain::under("east.mesh.local", &root);
    let set: TrustBundleSet = [west.bundle(), east.bundle()].into_iter().collect();
    let any = ExpectedIdentity::TrustDomains([west.td.clone(), east.td.clone()].into());

    let web = west.creds("/ns/shop/sa/web");
    assert_eq!(
        check(web.chain(), &set, &any).unwrap(),
        west.id("/ns/shop/sa/web")
    );
    let api = east.creds("/ns/shop/sa/api");
    assert_eq!(
        check(api.chain(), &set, &any).unwrap(),
        east.id("/ns/shop/sa/api")
    );

    // East's issuer signs a west identity (as a stolen east issuer key
    // could): the shared root alone would accept it, the verifier must not.
    let params = svid_params(&["spiffe://west.mesh.local/ns/kube-system/sa/admin"]);
    let (forged, _key) = east.crafted(&params);
    let err = check(&forged, &set, &any).unwrap_err();
    assert!(
        matches!(&err, VerifyError::IssuerTrustDomainMismatch { issuer_td, .. } if issuer_td.as_str() == "east.mesh.local"),
        "{err}"
    );
    assert_eq!(err.reason(), "issuer_trust_domain_mismatch");

    // The same with east's issuer remembered (its trust domains come from
    // the cache, not a parse): still refused.
    let issuers = mesh_core::identity::verify::VerifiedIssuers::default();
    let cached = |chain: &[rustls::pki_types::CertificateDer<'static>]| {
        mesh_core::identity::verify::verify_peer_with(
            chain,
            &set,
            &any,
            PeerRole::Client,
            unix_time(now()),
            Some(&issuers),
        )
    };
    for _ in 0..2 {
        cached(api.chain()).unwrap();
    }
    let err = cached(&forged).unwrap_err();
    assert_eq!(err.reason(), "issuer_trust_domain_mismatch", "{err}");
}

#[test]
fn bundles_are_never_merged_across_domains() {
    let west = Domain::new("west.mesh.local");
    let east = Domain::new("east.mesh.local");
    // West's root filed under east's name: a west SVID must not verify,
    // because west's own bundle is what counts.
    let mislabelled =
        mesh_core::identity::TrustBundle::with_roots(east.td.clone(), [west.root.clone()]).unwrap();
    let set: TrustBundleSet = [mislabelled, east.bundle()].into_iter().collect();
    let web = west.creds("/ns/shop/sa/web");
    let err = check(
        web.chain(),
        &set,
        &ExpectedIdentity::trust_domain(west.td.clone()),
    )
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::UnknownTrustDomain { .. }),
        "{err}"
    );

    // East's bundle does not anchor a west chain even when west is known.
    let set: TrustBundleSet =
        [
            mesh_core::identity::TrustBundle::with_roots(west.td.clone(), [east.root.clone()])
                .unwrap(),
        ]
        .into_iter()
        .collect();
    let err = check(
        web.chain(),
        &set,
        &ExpectedIdentity::trust_domain(west.td.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::UntrustedChain { .. }), "{err}");
    assert_eq!(err.reason(), "untrusted_chain");
}

#[test]
fn validity_window_and_expectations() {
    let west = Domain::new("west.mesh.local");
    let set: TrustBundleSet = [west.bundle()].into_iter().collect();
    let web = west.creds("/ns/shop/sa/web");
    let td = ExpectedIdentity::trust_domain(west.td.clone());

    let early = unix_time(now() - Duration::from_secs(3600));
    let err = verify_peer(web.chain(), &set, &td, PeerRole::Client, early).unwrap_err();
    assert!(matches!(err, VerifyError::NotYetValid { .. }), "{err}");

    let late = unix_time(now() + Duration::from_secs(2 * 24 * 3600));
    let err = verify_peer(web.chain(), &set, &td, PeerRole::Server, late).unwrap_err();
    assert!(matches!(err, VerifyError::Expired { .. }), "{err}");

    let set_of =
        ExpectedIdentity::AnyOf([west.id("/ns/shop/sa/api"), west.id("/ns/shop/sa/web")].into());
    assert!(check(web.chain(), &set, &set_of).is_ok());
    let other = ExpectedIdentity::AnyOf([west.id("/ns/shop/sa/api")].into());
    let err = check(web.chain(), &set, &other).unwrap_err();
    assert_eq!(
        err.to_string(),
        "peer is spiffe://west.mesh.local/ns/shop/sa/web, but one of [spiffe://west.mesh.local/ns/shop/sa/api] was expected"
    );

    assert!(matches!(
        check(&[], &set, &td),
        Err(VerifyError::NoCertificate)
    ));
    let junk = vec![rustls::pki_types::CertificateDer::from(vec![0x30, 0x00])];
    assert!(matches!(
        check(&junk, &set, &td),
        Err(VerifyError::Malformed(_))
    ));
}

#[test]
fn a_remembered_issuer_still_checks_every_leaf_and_the_roots() {
    use mesh_core::identity::verify::{VerifiedIssuers, verify_peer_with};
    let west = Domain::new("west.mesh.local");
    let set: TrustBundleSet = [west.bundle()].into_iter().collect();
    let td = ExpectedIdentity::trust_domain(west.td.clone());
    let issuers = VerifiedIssuers::default();
    let check = |chain: &[rustls::pki_types::CertificateDer<'static>], set: &TrustBundleSet| {
        verify_peer_with(
            chain,
            set,
            &td,
            PeerRole::Client,
            unix_time(now()),
            Some(&issuers),
        )
    };
    let web = west.creds("/ns/shop/sa/web");
    // The first verification walks to the root and remembers the issuer;
    // the second takes the short path.
    for _ in 0..2 {
        assert_eq!(
            check(web.chain(), &set).unwrap(),
            west.id("/ns/shop/sa/web")
        );
    }

    // A leaf from another CA of the same name, presented with west's
    // remembered issuer: its signature does not check out.
    let impostor = Domain::new("west.mesh.local");
    let forged = impostor.creds("/ns/shop/sa/web");
    let chain = [forged.chain()[0].clone(), web.chain()[1].clone()];
    let err = check(&chain, &set).unwrap_err();
    assert_eq!(err.reason(), "untrusted_chain", "{err}");

    // The roots changed: the remembered issuer no longer counts.
    let rotated: TrustBundleSet = [impostor.bundle()].into_iter().collect();
    let err = check(web.chain(), &rotated).unwrap_err();
    assert_eq!(err.reason(), "untrusted_chain", "{err}");

    // An expired leaf under the remembered issuer is still refused.
    let old = west.expired_creds("/ns/shop/sa/web");
    let err = check(old.chain(), &set).unwrap_err();
    assert_eq!(err.reason(), "expired", "{err}");
}

/// SPIRE's default layout: the root signs leaves directly. An attacker
/// appends a CA of their own to a genuine leaf's chain; the chain verifies
/// through the root without using it, and that CA must not be remembered
/// as a verified issuer (or leaves it signs would take the short path).
#[test]
fn an_intermediate_off_the_verified_path_is_never_remembered() {
    use mesh_core::identity::{
        TrustBundle,
        verify::{VerifiedIssuers, verify_peer_with},
    };
    use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};

    let root = RootCa::generate(DEFAULT_ROOT_TTL, now()).unwrap();
    let root_signer = Issuer::from_ca_cert_der(
        root.cert(),
        KeyPair::from_pem(&root.key_pem().unwrap()).unwrap(),
    )
    .unwrap();
    let td = "spire.example".parse().unwrap();
    let set: TrustBundleSet = [TrustBundle::with_roots(td, [root.cert().clone()]).unwrap()]
        .into_iter()
        .collect();
    let any = ExpectedIdentity::AnyTrusted;
    let cache = VerifiedIssuers::default();
    let check = |chain: &[rustls::pki_types::CertificateDer<'static>]| {
        verify_peer_with(
            chain,
            &set,
            &any,
            PeerRole::Client,
            unix_time(now()),
            Some(&cache),
        )
    };

    // The attacker's own CA, never signed by the root.
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.not_before = now() - Duration::from_secs(60);
    ca_params.not_after = now() + Duration::from_secs(3600);
    let evil_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let evil = ca_params.self_signed(&evil_key).unwrap();
    let evil_signer = Issuer::from_ca_cert_der(evil.der(), evil_key).unwrap();

    // A genuine leaf, signed by the root, with the attacker's CA appended.
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let genuine = svid_params(&["spiffe://spire.example/ns/shop/sa/web"])
        .signed_by(&leaf_key, &root_signer)
        .unwrap();
    let padded = [genuine.der().clone(), evil.der().clone()];
    assert!(check(&padded).is_ok(), "the genuine leaf verifies");

    // A leaf the attacker's CA signed, presented with that CA.
    let forged_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = svid_params(&["spiffe://spire.example/ns/kube-system/sa/admin"])
        .signed_by(&forged_key, &evil_signer)
        .unwrap();
    let err = check(&[forged.der().clone(), evil.der().clone()]).unwrap_err();
    assert_eq!(err.reason(), "untrusted_chain", "{err}");
}

/// A leaf remembered under its issuer skips only its own signature check:
/// the same bytes with a different signature, the same leaf under rotated
/// roots, and the same leaf past its expiry are each refused.
#[test]
fn a_remembered_leaf_is_only_its_exact_bytes_with_the_same_roots_while_valid() {
    use mesh_core::identity::verify::{VerifiedIssuers, verify_peer_with};
    let west = Domain::new("west.mesh.local");
    let set: TrustBundleSet = [west.bundle()].into_iter().collect();
    let td = ExpectedIdentity::trust_domain(west.td.clone());
    let issuers = VerifiedIssuers::default();
    let check = |chain: &[rustls::pki_types::CertificateDer<'static>],
                 set: &TrustBundleSet,
                 at: std::time::SystemTime| {
        verify_peer_with(
            chain,
            set,
            &td,
            PeerRole::Client,
            rustls::pki_types::UnixTime::since_unix_epoch(
                at.duration_since(std::time::UNIX_EPOCH).unwrap(),
            ),
            Some(&issuers),
        )
    };
    let web = west.creds("/ns/shop/sa/web");
    let now = std::time::SystemTime::now();
    // Full path (issuer remembered), short path (leaf remembered), cached.
    for _ in 0..3 {
        check(web.chain(), &set, now).unwrap();
    }

    // The same certificate with its signature's last byte changed: another
    // digest, so the signature is checked, and it fails.
    let mut tampered = web.chain()[0].to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let chain = [tampered.into(), web.chain()[1].clone()];
    let err = check(&chain, &set, now).unwrap_err();
    assert_eq!(err.reason(), "untrusted_chain", "{err}");

    // Other roots: the issuer, and the leaves under it, no longer count.
    let other = Domain::new("west.mesh.local");
    let rotated: TrustBundleSet = [other.bundle()].into_iter().collect();
    let err = check(web.chain(), &rotated, now).unwrap_err();
    assert_eq!(err.reason(), "untrusted_chain", "{err}");

    // Past the leaf's expiry the remembered leaf is refused as expired.
    let later = now + Duration::from_secs(400 * 24 * 3600);
    let err = check(web.chain(), &set, later).unwrap_err();
    assert_eq!(err.reason(), "expired", "{err}");
    // And it still verifies now.
    check(web.chain(), &set, now).unwrap();
}
