//! `mesh multicluster link` prints a Link the control plane accepts, and
//! `unlink` names the files to delete.

mod support;

use support::mesh;

/// A CA for `td` in `dir/name`, made with `mesh identity ca create`.
fn ca(dir: &std::path::Path, name: &str, td: &str) -> std::path::PathBuf {
    let ca = dir.join(name);
    let (ok, _, err) = mesh(&[
        "identity",
        "ca",
        "create",
        "--trust-domain",
        td,
        "--out",
        &ca.display().to_string(),
    ]);
    assert!(ok, "{err}");
    ca
}

#[test]
fn link_prints_a_link_the_control_plane_accepts_and_unlink_finds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ca(tmp.path(), "east-ca", "east.mesh.local");
    let ca_str = ca.display().to_string();

    let (ok, link, err) = mesh(&[
        "multicluster",
        "link",
        "--cluster-name",
        "east",
        "--gateway",
        "127.0.0.1",
        "--gateway",
        "gw.east.example:443",
        "--ca",
        &ca_str,
        "--transport",
        "tcp",
    ]);
    assert!(ok, "{err}");
    let parsed =
        mesh_control::resources::parse::parse_file(std::path::Path::new("link-east.yaml"), &link)
            .unwrap_or_else(|e| panic!("{e}\n{link}"));
    let mesh_control::resources::Resource::Link(l) = &parsed[0].1 else {
        panic!("{link}");
    };
    assert_eq!(l.spec.cluster_name, "east");
    assert_eq!(l.spec.trust_domain, "east.mesh.local");
    assert_eq!(
        l.spec.gateway_addresses,
        ["127.0.0.1:4143", "gw.east.example:443"],
        "the default port is added"
    );
    assert_eq!(
        l.spec.gateway_identity,
        "spiffe://east.mesh.local/ns/mesh-system/sa/gateway"
    );
    assert_eq!(l.spec.transport.as_deref(), Some("tcp"));

    // A bundle file alone does not name its trust domain.
    let bundle = ca.join("bundle.json").display().to_string();
    let (ok, _, err) = mesh(&[
        "multicluster",
        "link",
        "--cluster-name",
        "east",
        "--gateway",
        "gw",
        "--ca",
        &bundle,
    ]);
    assert!(!ok);
    assert!(err.contains("give --trust-domain"), "{err}");

    // unlink names the file holding the Link.
    let config = tmp.path().join("west-config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("link-east.yaml"), &link).unwrap();
    let (ok, out, err) = mesh(&[
        "multicluster",
        "unlink",
        "--cluster-name",
        "east",
        "--config-dir",
        &config.display().to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("rm {}", config.join("link-east.yaml").display())),
        "{out}"
    );
    let (ok, out, _) = mesh(&[
        "multicluster",
        "unlink",
        "--cluster-name",
        "north",
        "--config-dir",
        &config.display().to_string(),
    ]);
    assert!(!ok && out.contains("No Link to north"), "{out}");
}

#[test]
fn allow_prints_a_trust_only_link_the_control_plane_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_str = ca(tmp.path(), "west-ca", "west.mesh.local")
        .display()
        .to_string();
    let (ok, allow, err) = mesh(&[
        "multicluster",
        "allow",
        "--cluster-name",
        "west",
        "--ca",
        &ca_str,
    ]);
    assert!(ok, "{err}");
    let parsed =
        mesh_control::resources::parse::parse_file(std::path::Path::new("allow-west.yaml"), &allow)
            .unwrap_or_else(|e| panic!("{e}\n{allow}"));
    let mesh_control::resources::Resource::Link(l) = &parsed[0].1 else {
        panic!("{allow}");
    };
    assert_eq!(l.spec.cluster_name, "west");
    assert_eq!(l.spec.trust_domain, "west.mesh.local");
    assert!(l.spec.gateway_addresses.is_empty(), "{allow}");
    assert!(l.spec.gateway_identity.is_empty(), "{allow}");
    let bundle = mesh_control::resources::parse::link_bundle(&l.spec).unwrap();
    assert_eq!(bundle.roots().len(), 1);

    // A gateway identity without addresses is a mistake, and says so.
    let half = allow.replace(
        "  trustDomain: west.mesh.local\n",
        "  trustDomain: west.mesh.local\n  gatewayIdentity: spiffe://west.mesh.local/ns/mesh-system/sa/gateway\n",
    );
    let parsed = mesh_control::resources::parse::parse_file(std::path::Path::new("x.yaml"), &half);
    let err = match parsed {
        Err(e) => e.to_string(),
        Ok(rs) => match &rs[0].1 {
            mesh_control::resources::Resource::Link(l) => {
                mesh_control::resources::parse::link_bundle(&l.spec).unwrap_err()
            }
            _ => panic!(),
        },
    };
    assert!(err.contains("gatewayAddresses is empty"), "{err}");
}
