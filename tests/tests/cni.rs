//! `mesh-cni` run as a container runtime runs it: `CNI_*` variables, the
//! chained configuration with `prevResult` on stdin, a real network
//! namespace (root), and pods read from a real kube-apiserver.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use mesh_tests::{kube::Kube, workspace_exe};
use serde_json::{Value, json};

/// A network namespace of this test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add (run the tests as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(name.to_owned())
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    /// `iptables -t nat -S CHAIN` inside; `None` when the chain is absent.
    fn chain(&self, chain: &str) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.0, "iptables", "-t", "nat", "-S", chain,
            ])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn iptables(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "iptables"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// One CNI call: the variables, the configuration on stdin.
fn cni(command: &str, netns: &str, pod: &str, config: &str) -> Output {
    let mut child = Command::new(workspace_exe("mesh-cni"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=c0ffee"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn json_out(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// ADD applies the rules the injected pod asks for (its proxy user and
/// skipped ports) in its namespace and passes prevResult on; CHECK passes,
/// then reports drift; DEL removes them, twice as well as once; a pod
/// without the proxy is passed through; VERSION lists the versions; bad
/// input gets a CNI error result, never a panic; an API server that cannot
/// be reached fails the call so a meshed pod never starts unintercepted.
#[test]
fn mesh_cni_follows_the_cni_spec_in_a_real_network_namespace() {
    let kube = Kube::start();
    kube.kubectl_ok(&["create", "namespace", "shop"]);
    // What installs it on nodes is accepted by the API server.
    kube.kubectl_ok(&["create", "namespace", "mesh-system"]);
    let daemonset = mesh_tests::kube::mesh(&["install-cni"]);
    let out = kube.kubectl_with_input(&["apply", "--dry-run=server", "-f", "-"], &daemonset);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("daemonset.apps/mesh-cni created"));
    let pod = |name: &str, injected: bool| {
        let mut spec = json!({ "containers": [{ "name": "app", "image": "demo" }] });
        if injected {
            spec["initContainers"] = json!([{
                "name": "mesh-proxy", "image": "mesh", "restartPolicy": "Always",
                "securityContext": { "runAsUser": 2102 },
            }]);
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "shop",
                "annotations": { "config.mesh.rs/skip-outbound-ports": "5432" } },
            "spec": spec,
        })
        .to_string()
    };
    kube.apply(&pod("meshed", true));
    kube.apply(&pod("plain", false));

    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{ "name": "eth0", "sandbox": "/var/run/netns/x" }],
        "ips": [{ "address": "10.244.0.9/24", "interface": 0 }],
    });
    let config = |kubeconfig: &str| {
        json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
            "kubeconfig": kubeconfig, "prevResult": prev,
        })
        .to_string()
    };
    let good = config(kube.kubeconfig.to_str().unwrap());
    let ns = Netns::new("mesh-cni-test");

    // ADD: the rules of the meshed pod, prevResult passed on.
    let out = cni("ADD", &ns.path(), "meshed", &good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_out(&out), prev);
    let outbound = ns.chain("MESH_OUTBOUND").expect("MESH_OUTBOUND after ADD");
    assert!(
        outbound.contains("--uid-owner 2102 -j RETURN"),
        "{outbound}"
    );
    assert!(outbound.contains("--dport 5432 -j RETURN"), "{outbound}");
    assert!(outbound.contains("--to-ports 4140"), "{outbound}");
    let inbound = ns.chain("MESH_INBOUND").expect("MESH_INBOUND after ADD");
    assert!(inbound.contains("--dport 4191 -j RETURN") && inbound.contains("--to-ports 4143"));
    assert!(
        Netns::chain_host_free(),
        "the host's own tables are untouched"
    );

    // CHECK: fine, then drift is reported.
    let out = cni("CHECK", &ns.path(), "meshed", &good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    ns.iptables(&["-t", "nat", "-F", "MESH_INBOUND"]);
    let out = cni("CHECK", &ns.path(), "meshed", &good);
    assert!(!out.status.success());
    let err = json_out(&out);
    assert_eq!(err["code"], 100, "{err}");
    assert!(
        err["details"].as_str().unwrap().contains("MESH_INBOUND"),
        "{err}"
    );

    // DEL removes everything, and may run again.
    for _ in 0..2 {
        let out = cni("DEL", &ns.path(), "meshed", &good);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(ns.chain("MESH_INBOUND").is_none() && ns.chain("MESH_OUTBOUND").is_none());
    }
    let out = cni("DEL", "/var/run/netns/gone-already", "meshed", &good);
    assert!(
        out.status.success(),
        "DEL of a namespace that is gone succeeds"
    );

    // A pod without the proxy: passed through, no rules.
    let out = cni("ADD", &ns.path(), "plain", &good);
    assert!(out.status.success());
    assert_eq!(json_out(&out), prev);
    assert!(ns.chain("MESH_INBOUND").is_none());

    // VERSION.
    let out = cni("VERSION", "", "", r#"{"cniVersion":"1.0.0"}"#);
    let v = json_out(&out);
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")),
        "{v}"
    );

    // Bad input: error results with their codes, never a panic.
    for (command, input, code) in [
        ("ADD", "{not json".to_owned(), 6),
        (
            "ADD",
            r#"{"cniVersion":"9.9.9","type":"mesh-cni"}"#.to_owned(),
            1,
        ),
        (
            "ADD",
            r#"{"cniVersion":"1.0.0","type":"mesh-cni"}"#.to_owned(),
            7,
        ),
        ("EXPLODE", good.clone(), 4),
    ] {
        let out = cni(command, &ns.path(), "meshed", &input);
        assert!(!out.status.success());
        let err = json_out(&out);
        assert_eq!(err["code"], code, "{command} {input}: {err}");
        assert!(err["msg"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }

    // The API server cannot be reached: try again later, no rules.
    let dir = tempfile::tempdir().unwrap();
    let unreachable = dir.path().join("kubeconfig");
    let port = mesh_tests::kube::free_port();
    std::fs::write(
        &unreachable,
        std::fs::read_to_string(&kube.kubeconfig)
            .unwrap()
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("server:") {
                    format!("    server: https://127.0.0.1:{port}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let out = cni(
        "ADD",
        &ns.path(),
        "meshed",
        &config(unreachable.to_str().unwrap()),
    );
    assert!(!out.status.success());
    assert_eq!(json_out(&out)["code"], 11);
    assert!(ns.chain("MESH_INBOUND").is_none());
}

impl Netns {
    /// The host namespace has no MESH_ chains (the rules went into the pod's).
    fn chain_host_free() -> bool {
        !Command::new("iptables")
            .args(["-t", "nat", "-S", "MESH_INBOUND"])
            .output()
            .unwrap()
            .status
            .success()
    }
}
