//! `mesh identity ...` as a user runs it, checked by OpenSSL (a verifier we
//! did not write). Needs the `openssl` command: CI installs it; without it
//! these tests fail and say so.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
};

fn mesh(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run mesh")
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mesh failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "expected failure, got success");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `mesh identity ca create --trust-domain TD --out OUT [extra...]`, which must succeed.
fn create_ca(dir: &Path, td: &str, out: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "identity",
        "ca",
        "create",
        "--trust-domain",
        td,
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    ok(mesh(&args, dir))
}

/// The args of `mesh identity issue --ca CA --spiffe-id ID --out OUT`.
fn issue_args<'a>(ca: &'a str, id: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "identity",
        "issue",
        "--ca",
        ca,
        "--spiffe-id",
        id,
        "--out",
        out,
    ]
}

fn openssl(args: &[&str], cwd: &Path) -> Output {
    match Command::new("openssl").args(args).current_dir(cwd).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "this test needs the `openssl` command ({e}); install it with `apt-get install -y openssl`"
        ),
    }
}

#[test]
fn openssl_accepts_an_issued_svid() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create_ca(dir, "west.mesh.local", "west", &[]);
    let issued = ok(mesh(
        &[
            "identity",
            "issue",
            "--ca",
            "west",
            "--spiffe-id",
            "spiffe://west.mesh.local/ns/shop/sa/web",
            "--ttl",
            "1h",
            "--out",
            "web",
        ],
        dir,
    ));
    assert!(
        issued.contains("issued spiffe://west.mesh.local/ns/shop/sa/web"),
        "{issued}"
    );

    // Keys are private to their owner.
    for key in ["west/root.key", "west/issuer.key", "web/leaf.key"] {
        let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }

    let verify = openssl(
        &[
            "verify",
            "-CAfile",
            "west/root.crt",
            "-untrusted",
            "west/issuer.crt",
            "web/leaf.crt",
        ],
        dir,
    );
    assert!(
        verify.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    let text = openssl(&["x509", "-in", "web/leaf.crt", "-noout", "-text"], dir);
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(
        text.matches("URI:").count(),
        1,
        "exactly one URI SAN:\n{text}"
    );
    assert!(
        text.contains("URI:spiffe://west.mesh.local/ns/shop/sa/web"),
        "{text}"
    );
    // Leaf keys are Ed25519 (ARCHITECTURE.md "Leaf keys are Ed25519").
    assert!(text.contains("Public Key Algorithm: ED25519"), "{text}");
    let squashed: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        squashed.contains("X509v3 Key Usage: critical Digital Signature X509v3"),
        "{text}"
    );
    assert!(
        squashed.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(
        squashed.contains("X509v3 Basic Constraints: critical CA:FALSE"),
        "{text}"
    );
    assert!(!squashed.contains("Certificate Sign"), "{text}");

    // A different CA's root does not verify it.
    create_ca(dir, "west.mesh.local", "other", &[]);
    let verify = openssl(
        &[
            "verify",
            "-CAfile",
            "other/root.crt",
            "-untrusted",
            "west/issuer.crt",
            "web/leaf.crt",
        ],
        dir,
    );
    assert!(
        !verify.status.success(),
        "a foreign root must not verify the leaf"
    );
}

#[test]
fn shared_root_issuer_verifies_under_the_shared_root() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create_ca(dir, "west.mesh.local", "west", &[]);
    let out = create_ca(dir, "east.mesh.local", "east", &["--shared-root", "west"]);
    assert!(out.contains("key not copied"), "{out}");
    assert!(
        !dir.join("east/root.key").exists(),
        "a shared root's key stays where it is"
    );
    assert_eq!(
        fs::read(dir.join("west/root.crt")).unwrap(),
        fs::read(dir.join("east/root.crt")).unwrap()
    );
    ok(mesh(
        &issue_args("east", "spiffe://east.mesh.local/ns/shop/sa/api", "api"),
        dir,
    ));
    let verify = openssl(
        &[
            "verify",
            "-CAfile",
            "west/root.crt",
            "-untrusted",
            "east/issuer.crt",
            "api/leaf.crt",
        ],
        dir,
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn inspect_and_bundle_report_what_they_see() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create_ca(dir, "west.mesh.local", "west", &[]);
    create_ca(dir, "west.mesh.local", "other", &[]);
    ok(mesh(
        &issue_args("west", "spiffe://west.mesh.local/ns/shop/sa/web", "web"),
        dir,
    ));

    let out = ok(mesh(
        &[
            "identity",
            "inspect",
            "web/leaf.crt",
            "--bundle",
            "west/bundle.json",
        ],
        dir,
    ));
    for want in [
        "spiffe id:    spiffe://west.mesh.local/ns/shop/sa/web",
        "trust domain: west.mesh.local",
        "subject:      O=Mesh\n",
        "issuer:       O=Mesh, CN=Mesh issuer west.mesh.local\n",
        "serial:",
        "not after:",
        "remaining:    23 hours",
        "chain:        2 certificate(s)",
        "verifies:     yes, against west/bundle.json",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let out = fails(mesh(
        &[
            "identity",
            "inspect",
            "web/leaf.crt",
            "--bundle",
            "other/bundle.json",
        ],
        dir,
    ));
    assert!(
        out.contains(
            "verifies:     no: peer spiffe://west.mesh.local/ns/shop/sa/web does not chain"
        ),
        "{out}"
    );
    let out = ok(mesh(&["identity", "inspect", "west/issuer.crt"], dir));
    assert!(
        out.contains("spiffe id:    none (a CA certificate)"),
        "{out}"
    );
    assert!(
        out.contains("verifies:     not checked (pass --bundle)"),
        "{out}"
    );

    let pem = ok(mesh(
        &["identity", "bundle", "--ca", "west", "--format", "pem"],
        dir,
    ));
    assert_eq!(pem, fs::read_to_string(dir.join("west/root.crt")).unwrap());
    let json = ok(mesh(&["identity", "bundle", "--ca", "west"], dir));
    assert_eq!(
        json,
        fs::read_to_string(dir.join("west/bundle.json")).unwrap()
    );
    assert!(json.contains("\"use\": \"x509-svid\""), "{json}");
}

#[test]
fn errors_name_the_file_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create_ca(dir, "west.mesh.local", "west", &[]);

    let err = fails(mesh(
        &[
            "identity",
            "ca",
            "create",
            "--trust-domain",
            "west.mesh.local",
            "--out",
            "west",
        ],
        dir,
    ));
    assert!(
        err.contains("west/root.crt already exists; pass --force"),
        "{err}"
    );

    let err = fails(mesh(
        &issue_args("west", "spiffe://east.mesh.local/ns/a/sa/b", "x"),
        dir,
    ));
    assert!(
        err.contains("is not in trust domain west.mesh.local"),
        "{err}"
    );

    let err = fails(mesh(
        &issue_args("nowhere", "spiffe://west.mesh.local/ns/a/sa/b", "x"),
        dir,
    ));
    assert!(err.contains("nowhere/root.crt: No such file"), "{err}");

    let err = fails(mesh(
        &issue_args("west", "spiffe://West.mesh.local/a", "x"),
        dir,
    ));
    assert!(err.contains("trust domain must be lower case"), "{err}");

    fs::write(
        dir.join("west/issuer.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = fails(mesh(
        &issue_args("west", "spiffe://west.mesh.local/ns/a/sa/b", "x"),
        dir,
    ));
    assert!(
        err.contains("west/issuer.key: is not a usable PKCS#8 private key"),
        "{err}"
    );
}
