//! Sidecar injection against a real kube-apiserver: the webhook `mesh
//! install` registers, served by the control plane as a process, called by
//! the API server over HTTPS for pods the controller manager creates.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::kube::{Kube, control_pod_runs_at, install_with, mesh, pods_until};
use serde_json::{Value, json};

/// The control plane's pod IP in the first test: the webhook's Service
/// endpoint.
const CONTROL_IP: &str = "10.244.0.50";

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn env_of(container: &Value, name: &str) -> Value {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} in {container}"))
}

fn pod(ns: &str, name: &str, labels: Value, annotations: Value) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels, "annotations": annotations },
        "spec": { "containers": [{ "name": "app", "image": "demo", "ports": [{ "name": "http", "containerPort": 8080 }] }] },
    })
    .to_string()
}

/// The serial of the certificate the webhook presents.
fn webhook_serial(root: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("{CONTROL_IP}:8443")])
        .args([
            "-servername",
            "mesh-control.mesh-system.svc",
            "-verify_return_error",
        ])
        .arg("-CAfile")
        .arg(root)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("Verify return code: 0 (ok)") && text.contains("TLSv1.3"),
        "the webhook's certificate verifies against the root, over TLS 1.3:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem_start = text.find("-----BEGIN CERTIFICATE-----").unwrap();
    let pem_end = text.find("-----END CERTIFICATE-----").unwrap() + 25;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    x509.stdin
        .take()
        .unwrap()
        .write_all(&text.as_bytes()[pem_start..pem_end])
        .unwrap();
    String::from_utf8(x509.wait_with_output().unwrap().stdout).unwrap()
}

/// The webhook's own answer for `pod` (as the API server would ask),
/// applied: the pod it would create.
fn webhook_output(root: &std::path::Path, ns: &str, pod: &Value) -> Value {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "test-1", "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "operation": "CREATE", "namespace": ns, "object": pod,
        },
    });
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(root)
        .args([
            "--resolve",
            &format!("mesh-control.mesh-system.svc:8443:{CONTROL_IP}"),
        ])
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(review.to_string())
        .arg("https://mesh-control.mesh-system.svc:8443/inject")
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["response"]["uid"], "test-1");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    use base64::Engine;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut injected = pod.clone();
    json_patch::patch(&mut injected, &patch).unwrap();
    injected
}

/// `mesh install` registers the webhook; the API server calls it for pods
/// the controller manager creates from a Deployment in a labelled
/// namespace, and for a labelled pod elsewhere; excluded namespaces and
/// opted-out ones are left alone; a bad `config.mesh.rs/` value is refused
/// naming it; `mesh inject --manual` renders exactly the webhook's pod;
/// the caBundle is restored by the writer; the serving certificate is
/// renewed without a restart; with the webhook down, pod creation fails
/// closed in a meshed namespace only.
#[test]
fn the_webhook_injects_what_controllers_create_and_fails_closed_only_where_asked() {
    mesh_tests::kube::pod_network();
    let kube = Kube::start();
    let webhook_addr = format!("{CONTROL_IP}:8443");
    let installed = install_with(
        &kube,
        "west.mesh.local",
        "west",
        &[],
        &["--webhook-addr", &webhook_addr, "--webhook-cert-ttl", "20s"],
    );
    let root = installed.ca_dir.join("root.crt");
    let bundle = std::fs::read_to_string(installed.ca_dir.join("bundle.json")).unwrap();

    // The writer puts back a caBundle that went missing.
    kube.kubectl_ok(&[
        "patch",
        "mutatingwebhookconfiguration",
        "mesh-proxy-injector",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/webhooks/1/clientConfig/caBundle"}]"#,
    ]);
    // The Deployment's pod runs at CONTROL_IP, where the process listens.
    control_pod_runs_at(&kube, &installed, CONTROL_IP);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hooks: Value = serde_json::from_str(&kube.kubectl_ok(&[
            "get",
            "mutatingwebhookconfiguration",
            "mesh-proxy-injector",
            "-o",
            "json",
        ]))
        .unwrap();
        if hooks["webhooks"][1]["clientConfig"]["caBundle"].is_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "caBundle restored: {hooks}\n{}",
            installed.control.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let first = webhook_serial(&root);
    kube.apply(
        &json!({ "apiVersion": "v1", "kind": "List", "items": [
            { "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop", "labels": { "mesh.rs/inject": "enabled" } } },
            { "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "plain" } },
            { "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "optout", "labels": { "mesh.rs/inject": "enabled", "config.mesh.rs/admission-webhooks": "disabled" } } },
        ] })
        .to_string(),
    );
    kube.apply(
        &json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": "web", "namespace": "shop" },
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": { "app": "web" } },
                "template": {
                    "metadata": { "labels": { "app": "web" }, "annotations": { "config.mesh.rs/proxy-memory-limit": "128Mi" } },
                    "spec": { "containers": [{ "name": "web", "image": "nginx", "ports": [{ "name": "http", "containerPort": 8080 }] }] },
                },
            },
        })
        .to_string(),
    );
    // Read back from the API server: what the ReplicaSet controller made.
    let web = pods_until(&kube, "shop", "app=web", 1, Some(&installed.control)).remove(0);
    let spec = &web["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["mesh-init", "mesh-proxy"],
        "{web}"
    );
    assert_eq!(names(&spec["containers"]), ["web"]);
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(
        proxy["resources"]["limits"]["memory"], "128Mi",
        "the annotation applied"
    );
    assert_eq!(
        env_of(proxy, "MESH_PROXY_TRUST_ANCHORS_BUNDLE")["value"],
        bundle.as_str()
    );
    assert_eq!(env_of(proxy, "MESH_PROXY_APP_PORTS")["value"], "http=8080");
    assert!(
        proxy["startupProbe"]["exec"]["command"]
            .to_string()
            .contains("ready")
    );
    let token = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mesh-identity-token")
        .expect("the projected token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "identity.mesh.rs"
    );
    assert_eq!(
        spec["initContainers"][0]["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(
        web["metadata"]["annotations"]["mesh.rs/proxy-version"],
        env!("CARGO_PKG_VERSION")
    );

    // A labelled pod in an unlabelled namespace: the second webhook.
    kube.apply(&pod(
        "plain",
        "solo",
        json!({ "mesh.rs/inject": "enabled" }),
        json!({}),
    ));
    let solo: Value = serde_json::from_str(
        &kube.kubectl_ok(&["get", "pod", "solo", "-n", "plain", "-o", "json"]),
    )
    .unwrap();
    assert_eq!(
        names(&solo["spec"]["initContainers"]),
        ["mesh-init", "mesh-proxy"]
    );
    // Excluded and opted-out namespaces are never sent.
    for ns in ["kube-system", "optout"] {
        kube.apply(&pod(
            ns,
            "left-alone",
            json!({ "mesh.rs/inject": "enabled" }),
            json!({}),
        ));
        let p: Value = serde_json::from_str(&kube.kubectl_ok(&[
            "get",
            "pod",
            "left-alone",
            "-n",
            ns,
            "-o",
            "json",
        ]))
        .unwrap();
        assert!(p["spec"]["initContainers"].is_null(), "{ns}: {p}");
    }
    // A bad value is refused with its annotation named.
    let bad = kube.kubectl_with_input(
        &["create", "-f", "-"],
        &pod(
            "shop",
            "bad",
            json!({}),
            json!({ "config.mesh.rs/proxy-cpu-limit": "lots" }),
        ),
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success()
            && err.contains("config.mesh.rs/proxy-cpu-limit")
            && err.contains("lots"),
        "{err}"
    );

    // --manual renders what the webhook does.
    let sample: Value = serde_json::from_str(&pod(
        "shop",
        "sample",
        json!({ "app": "sample" }),
        json!({ "config.mesh.rs/skip-outbound-ports": "5432", "config.mesh.rs/native-sidecar": "disabled" }),
    ))
    .unwrap();
    let file = installed.ca_dir.parent().unwrap().join("sample.json");
    std::fs::write(&file, sample.to_string()).unwrap();
    let manual: Value = serde_json::from_str(&mesh(&[
        "inject",
        "--manual",
        "--kubeconfig",
        kube.kubeconfig.to_str().unwrap(),
        file.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(manual, webhook_output(&root, "shop", &sample));
    assert_eq!(
        names(&manual["spec"]["containers"]),
        ["mesh-proxy", "app"],
        "classic sidecar"
    );

    // Renewed at half of 20 s, with no restart; injection goes on.
    std::thread::sleep(Duration::from_secs(12));
    let second = webhook_serial(&root);
    assert_ne!(first, second, "a new serving certificate");
    kube.apply(&pod("shop", "after-renewal", json!({}), json!({})));
    let after: Value = serde_json::from_str(&kube.kubectl_ok(&[
        "get",
        "pod",
        "after-renewal",
        "-n",
        "shop",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        names(&after["spec"]["initContainers"]),
        ["mesh-init", "mesh-proxy"]
    );

    // The webhook down: meshed namespaces refuse pods, others do not.
    drop(installed);
    let refused = kube.kubectl_with_input(
        &["create", "-f", "-"],
        &pod("shop", "while-down", json!({}), json!({})),
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("namespaces.inject.mesh.rs"),
        "fails closed: {err}"
    );
    let fine = kube.kubectl_with_input(
        &["create", "-f", "-"],
        &pod("plain", "while-down", json!({}), json!({})),
    );
    assert!(
        fine.status.success(),
        "{}",
        String::from_utf8_lossy(&fine.stderr)
    );
}
