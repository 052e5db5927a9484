//! The `spiffe` crate, a SPIFFE client we did not write, reads what our CA
//! and `TrustBundle` produce.
//!
//! spiffe 0.19 has no parser for a whole SPIFFE bundle document (it reads
//! X.509 authorities as DER, and JWT authorities as a JWKS), so the JSON
//! layer is read here with plain serde_json and each `x5c` authority is
//! handed to spiffe's `X509Bundle`.

mod support;

use mesh_core::identity::{TrustBundle, cert::CertInfo};
use rustls::pki_types::PrivateKeyDer;
use support::*;

#[test]
fn spiffe_crate_parses_our_svid() {
    let west = Domain::new("west.mesh.local");
    let (key, csr) = mesh_core::identity::csr::new_key_and_csr().unwrap();
    let id = west.id("/ns/shop/sa/web");
    let svid = west
        .ca
        .sign_csr(&csr, &id, std::time::Duration::from_secs(3600))
        .unwrap();
    let chain_der: Vec<u8> = svid.chain.iter().flat_map(|c| c.to_vec()).collect();
    let PrivateKeyDer::Pkcs8(pkcs8) = key else {
        panic!("keys are PKCS#8")
    };
    let parsed = spiffe::X509Svid::parse_from_der(&chain_der, pkcs8.secret_pkcs8_der())
        .expect("spiffe crate accepts our X.509-SVID");
    assert_eq!(parsed.spiffe_id().to_string(), id.to_string());
    assert_eq!(parsed.cert_chain().len(), 2);
    assert_eq!(parsed.leaf().as_bytes(), svid.chain[0].as_ref());
}

#[test]
fn spiffe_crate_reads_our_bundle_json() {
    let west = Domain::new("west.mesh.local");
    let mut bundle = west.bundle();
    // A bundle in rotation holds the old and the new root.
    let next_root = Domain::new("west.mesh.local").root;
    bundle.add_root(next_root.clone()).unwrap();
    bundle.set_sequence(7);
    let json = bundle.to_spiffe_json().unwrap();

    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["spiffe_sequence"], 7);
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let td = spiffe::TrustDomain::new("west.mesh.local").unwrap();
    let mut theirs = spiffe::X509Bundle::new(td);
    for key in keys {
        assert_eq!(key["use"], "x509-svid");
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        let x5c = key["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1, "exactly one certificate per x509-svid key");
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(x5c[0].as_str().unwrap())
            .unwrap();
        theirs
            .add_authority(&der)
            .expect("spiffe crate accepts our root");
    }
    let authorities: Vec<&[u8]> = theirs.authorities().iter().map(|c| c.as_bytes()).collect();
    assert_eq!(authorities, vec![west.root.as_ref(), next_root.as_ref()]);

    // And our reader gets back exactly what was written.
    let back = TrustBundle::from_spiffe_json(west.td.clone(), json.as_bytes()).unwrap();
    assert_eq!(back, bundle);
    assert!(CertInfo::parse(&back.roots()[1]).unwrap().is_ca);
}
