//! CA directories on disk: modes, round trips, and load errors that name the
//! file and the fix.

use std::{fs, os::unix::fs::PermissionsExt, time::Duration};

use mesh_core::identity::{
    CertificateAuthority, RootCa, SpiffeId,
    ca::{DEFAULT_ISSUER_TTL, DEFAULT_LEAF_TTL, DEFAULT_ROOT_TTL},
    cert::now,
    csr::new_key_and_csr,
    files,
};

fn make_ca(dir: &std::path::Path, td: &str) {
    let root = RootCa::generate(DEFAULT_ROOT_TTL, now()).unwrap();
    let ca = CertificateAuthority::generate(td.parse().unwrap(), &root, DEFAULT_ISSUER_TTL, now())
        .unwrap();
    files::write_ca_dir(dir, &root, &ca, true).unwrap();
}

#[test]
fn keys_are_0600_and_the_ca_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    make_ca(tmp.path(), "west.mesh.local");
    for (name, mode) in [
        ("root.key", 0o600),
        ("issuer.key", 0o600),
        ("root.crt", 0o644),
        ("issuer.crt", 0o644),
        ("bundle.json", 0o644),
    ] {
        let meta = fs::metadata(tmp.path().join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
    }
    let ca = files::load_ca(tmp.path()).unwrap();
    assert_eq!(ca.trust_domain().as_str(), "west.mesh.local");
    let (_, csr) = new_key_and_csr().unwrap();
    let id: SpiffeId = "spiffe://west.mesh.local/ns/a/sa/b".parse().unwrap();
    ca.sign_csr(&csr, &id, DEFAULT_LEAF_TTL).unwrap();
}

#[test]
fn expired_issuer_is_named_with_its_age() {
    let tmp = tempfile::tempdir().unwrap();
    make_ca(tmp.path(), "west.mesh.local");
    let later = now() + DEFAULT_ISSUER_TTL + Duration::from_secs(3 * 86_400 + 60);
    let err = files::load_ca_at(tmp.path(), later)
        .unwrap_err()
        .to_string();
    assert!(err.contains("issuer.crt: expired 3 days ago"), "{err}");
    assert!(
        err.contains("mesh identity ca create"),
        "the fix is named: {err}"
    );
}

#[test]
fn mismatched_and_malformed_files_are_named() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    make_ca(a.path(), "west.mesh.local");
    make_ca(b.path(), "west.mesh.local");

    // Another CA's issuer key.
    fs::copy(b.path().join("issuer.key"), a.path().join("issuer.key")).unwrap();
    let err = files::load_ca(a.path()).unwrap_err().to_string();
    assert!(err.contains("issuer.key: does not belong to"), "{err}");

    // Another CA's root: the issuer does not chain to it.
    make_ca(a.path(), "west.mesh.local");
    fs::copy(b.path().join("root.crt"), a.path().join("root.crt")).unwrap();
    let err = files::load_ca(a.path()).unwrap_err().to_string();
    assert!(
        err.contains("issuer.crt: is not signed by root.crt"),
        "{err}"
    );

    fs::write(a.path().join("issuer.crt"), "garbage").unwrap();
    let err = files::load_ca(a.path()).unwrap_err().to_string();
    assert!(
        err.contains("issuer.crt: no PEM `CERTIFICATE` block found"),
        "{err}"
    );

    fs::remove_file(a.path().join("root.crt")).unwrap();
    let err = files::load_ca(a.path()).unwrap_err().to_string();
    assert!(err.contains("root.crt: No such file"), "{err}");
}

/// A private key others can read is refused, as ssh refuses one, with the
/// command that fixes it; after the fix it loads.
#[test]
fn a_key_readable_by_others_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    make_ca(tmp.path(), "west.mesh.local");
    let key = tmp.path().join("issuer.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = files::load_ca(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("issuer.key"), "{err}");
    assert!(err.contains("readable by others (mode 0644)"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    files::load_ca(tmp.path()).unwrap();
}
