//! Mesh on Kubernetes, against a real kube-apiserver (with its controller
//! manager) built from the Kubernetes Go modules: `tests/kube-apiserver/`.

use std::process::{Command, Stdio};

use mesh_tests::{kube::Kube, mesh_exe};

/// `mesh ARGS`, which must succeed; its stdout.
fn mesh(args: &[&str]) -> String {
    let out = Command::new(mesh_exe())
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mesh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

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
    assert_eq!(applied.lines().count(), 7, "{applied}");
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

    // Uninstall: what it prints deletes the CRDs (and their objects).
    let out = kube.kubectl_with_input(
        &["delete", "--ignore-not-found", "-f", "-"],
        &mesh(&["uninstall"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let left = kube.kubectl_ok(&["get", "crd", "-o", "name"]);
    assert!(!left.contains("mesh.rs"), "{left}");
}
