//! The injected spec runs. The test takes pods the webhook injected, read
//! back from a real API server, and starts what they say as the kubelet
//! would: in a network namespace per pod, `mesh-init`'s command to
//! completion, the proxy sidecar with its env (field references resolved),
//! its user and its projected token mounted where the spec says, held until
//! its startup probe passes, then the app. The apps' unmodified traffic
//! then flows with mTLS, and `mesh check --proxy` judges the result. Needs
//! root.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    kube::{Kube, control_pod_runs_at, install_with},
    mesh_exe,
};
use serde_json::{Value, json};

/// The control plane's pod IP here (the webhook test uses .50).
const CONTROL_IP: &str = "10.244.0.51";
/// The pods' bridge on this host, and its address (their gateway).
const BRIDGE: &str = "meshinj0";
const GATEWAY: &str = "10.246.0.1";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {} (run the tests as root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pod network: a bridge with the pods' gateway address.
struct Bridge;

impl Bridge {
    fn new() -> Self {
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
        sh(&["ip", "addr", "add", &format!("{GATEWAY}/24"), "dev", BRIDGE]);
        sh(&["ip", "link", "set", BRIDGE, "up"]);
        Self
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    }
}

/// One pod's network namespace on the bridge, with the cluster DNS name of
/// the control plane in its hosts file (`ip netns exec` mounts
/// `/etc/netns/NAME/hosts` over `/etc/hosts`).
struct PodNet {
    name: String,
}

impl PodNet {
    fn new(name: &str, ip: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh(&["ip", "netns", "add", name]);
        let host_end = format!("v-{name}");
        let _ = Command::new("ip").args(["link", "del", &host_end]).output();
        sh(&[
            "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", name,
        ]);
        sh(&["ip", "link", "set", &host_end, "master", BRIDGE, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", name];
            all.extend_from_slice(args);
            sh(&all);
        };
        inside(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        inside(&["ip", "link", "set", "eth0", "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        inside(&["ip", "route", "add", "default", "via", GATEWAY]);
        let etc = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            format!("{etc}/hosts"),
            format!("127.0.0.1 localhost\n{CONTROL_IP} mesh-control.mesh-system.svc\n"),
        )
        .unwrap();
        Self {
            name: name.to_owned(),
        }
    }

    fn exec(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]);
        cmd
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &format!("v-{}", self.name)])
            .output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// A pod's processes, killed on drop.
struct Running {
    children: Vec<(String, Child)>,
    dir: tempfile::TempDir,
}

impl Running {
    fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(name, _)| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                format!("--- {name}\n{log}")
            })
            .collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A container's environment, field references resolved from the pod.
fn env_of(pod: &Value, container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            if let Some(v) = e["value"].as_str() {
                return (name, v.to_owned());
            }
            let path = e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap();
            let value = match path {
                "metadata.name" => pod["metadata"]["name"].as_str().unwrap().to_owned(),
                "metadata.namespace" => pod["metadata"]["namespace"].as_str().unwrap().to_owned(),
                "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                "status.podIP" => pod["status"]["podIP"].as_str().unwrap().to_owned(),
                "status.podIPs" => pod["status"]["podIPs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|ip| ip["ip"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
                    .join(","),
                other => panic!("the kubelet here does not know fieldRef {other}"),
            };
            (name, value)
        })
        .collect()
}

/// What a container runs: the Mesh image's entrypoint is `mesh`; the app
/// image "demo" is `mesh demo serve` on the pod's IP.
fn argv(pod: &Value, container: &Value) -> Vec<String> {
    let mesh = mesh_exe().display().to_string();
    if container["image"] == "demo" {
        let ip = pod["status"]["podIP"].as_str().unwrap();
        let name = pod["metadata"]["name"].as_str().unwrap();
        return [
            &mesh,
            "demo",
            "serve",
            "--cluster",
            "west",
            "--workload",
            name,
            "--ip",
            ip,
            "--http-port",
            "8080",
        ]
        .map(str::to_owned)
        .to_vec();
    }
    assert!(
        container["image"].as_str().unwrap().contains("mesh"),
        "{container}"
    );
    let mut out = vec![mesh];
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let command = list(&container["command"]);
    if let Some(rest) = command
        .first()
        .filter(|c| *c == "/usr/bin/mesh")
        .map(|_| &command[1..])
    {
        out.extend(rest.iter().cloned());
    }
    out.extend(list(&container["args"]));
    out
}

/// Starts (or runs to completion) one container in the pod's namespace:
/// its user, env and mounted projected tokens.
fn container_command(
    kube: &Kube,
    pod: &Value,
    c: &Value,
    net: &PodNet,
    dir: &std::path::Path,
) -> Command {
    let ns = pod["metadata"]["namespace"].as_str().unwrap();
    let sa = pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default");
    let mut script = String::from("set -e\n");
    for mount in c["volumeMounts"].as_array().into_iter().flatten() {
        let volume = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let source = &volume["projected"]["sources"][0]["serviceAccountToken"];
        let audience = source["audience"].as_str();
        let token = kube.token(ns, sa, audience, "1h");
        let vol_dir = dir.join(mount["name"].as_str().unwrap());
        std::fs::create_dir_all(&vol_dir).unwrap();
        std::fs::write(vol_dir.join(source["path"].as_str().unwrap()), token).unwrap();
        let target = mount["mountPath"].as_str().unwrap();
        std::fs::create_dir_all(target).unwrap();
        script.push_str(&format!(
            "mount --bind '{}' '{target}'\n",
            vol_dir.display()
        ));
    }
    script.push_str("exec \"$@\"\n");
    let mut cmd = net.exec();
    cmd.args([
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    if let Some(uid) = c["securityContext"]["runAsUser"].as_u64() {
        let gid = c["securityContext"]["runAsGroup"].as_u64().unwrap_or(uid);
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
        ]);
    }
    cmd.args(argv(pod, c));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .envs(env_of(pod, c));
    cmd
}

/// Runs the pod as the kubelet would.
fn kubelet(kube: &Kube, pod: &Value, net: &PodNet) -> Running {
    let mut running = Running {
        children: Vec::new(),
        dir: tempfile::tempdir().unwrap(),
    };
    std::fs::set_permissions(
        running.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let log = |running: &Running, name: &str| {
        std::fs::File::create(running.dir.path().join(format!("{name}.log"))).unwrap()
    };
    let inits: Vec<Value> = pod["spec"]["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let apps: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for c in inits.iter().chain(&apps) {
        let name = c["name"].as_str().unwrap().to_owned();
        let mut cmd = container_command(kube, pod, c, net, running.dir.path());
        cmd.stdout(Stdio::null()).stderr(log(&running, &name));
        let sidecar = c["restartPolicy"] == "Always";
        let is_init = inits.iter().any(|i| i["name"] == c["name"]);
        if is_init && !sidecar {
            let status = cmd.status().unwrap();
            let text =
                std::fs::read_to_string(running.dir.path().join(format!("{name}.log"))).unwrap();
            assert!(status.success(), "init container {name} failed: {text}");
            continue;
        }
        running.children.push((name.clone(), cmd.spawn().unwrap()));
        // A sidecar holds the next containers until its startup probe passes.
        if let Some(probe) = c["startupProbe"]["exec"]["command"].as_array() {
            let probe: Vec<String> = probe
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let mut check = net.exec();
                check
                    .arg(mesh_exe())
                    .args(&probe[1..])
                    .env_clear()
                    .envs(env_of(pod, c));
                if check.output().unwrap().status.success() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "startup probe of {name} never passed:\n{}",
                    running.logs()
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
    running
}

/// As the kubelet reports it: the sidecar started and ready.
fn report_ready(kube: &Kube, pod: &Value) {
    let name = pod["metadata"]["name"].as_str().unwrap();
    let status = |c: &Value, ready: bool| {
        json!({
            "name": c["name"], "image": c["image"], "imageID": "", "restartCount": 0,
            "ready": ready, "started": true, "state": { "running": { "startedAt": "2026-11-30T00:00:00Z" } },
        })
    };
    let inits: Vec<Value> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| status(c, c["name"] == "mesh-proxy"))
        .collect();
    let apps: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| status(c, true))
        .collect();
    let patch = json!({ "status": { "initContainerStatuses": inits, "containerStatuses": apps } });
    kube.kubectl_ok(&[
        "patch",
        "pod",
        name,
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ]);
}

fn check_proxy(kube: &Kube, ns: &str) -> (bool, String) {
    let out = Command::new(mesh_exe())
        .args(["check", "--proxy", "-n", ns, "--kubeconfig"])
        .arg(&kube.kubeconfig)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn injected_pods_run_as_the_kubelet_would_and_talk_over_mtls() {
    mesh_tests::kube::pod_network();
    let kube = Kube::start();
    let flags = [
        "--identity-addr",
        &format!("{CONTROL_IP}:8080"),
        "--api-addr",
        &format!("{CONTROL_IP}:8086"),
        "--webhook-addr",
        &format!("{CONTROL_IP}:8443"),
    ];
    let installed = install_with(&kube, "west.mesh.local", "west", &[], &flags);
    control_pod_runs_at(&kube, &installed, CONTROL_IP);
    kube.apply(&mesh_tests::kube::only_web_may_call_api(
        "west.mesh.local",
        json!({ "mesh.rs/inject": "enabled" }),
    ));
    let _bridge = Bridge::new();
    let mut pods = Vec::new();
    for (name, sa, ip) in [
        ("api-0", "api", "10.246.0.2"),
        ("web-0", "web", "10.246.0.3"),
    ] {
        kube.apply(
            &json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": name, "namespace": "shop", "labels": { "app": sa } },
                "spec": {
                    "serviceAccountName": sa,
                    "containers": [{ "name": "app", "image": "demo", "ports": [{ "name": "http", "containerPort": 8080 }] }],
                },
            })
            .to_string(),
        );
        kube.run_pod("shop", name, ip);
        let pod: Value = serde_json::from_str(
            &kube.kubectl_ok(&["get", "pod", name, "-n", "shop", "-o", "json"]),
        )
        .unwrap();
        assert_eq!(
            pod["spec"]["initContainers"][1]["name"], "mesh-proxy",
            "injected: {pod}"
        );
        let net = PodNet::new(&format!("inj-{sa}"), ip);
        let running = kubelet(&kube, &pod, &net);
        pods.push((pod, net, running));
    }

    // web's app, unmodified, calls api's pod address; both proxies carry
    // it over mTLS and api's app sees web's verified identity.
    let web = &pods[1];
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let out = web
            .1
            .exec()
            .args(["curl", "-sS", "-m", "5", "http://10.246.0.2:8080/hello"])
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && body.contains("client_id") && !body.contains("\"-\"") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "web -> api through both proxies: {body} {}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            web.2.logs(),
            pods[0].2.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        body.contains("spiffe://west.mesh.local/ns/shop/sa/web"),
        "{body}"
    );
    assert!(body.contains("api-0"), "{body}");

    // mesh check --proxy: not ready until the kubelet says so, then fine.
    let (ok, text) = check_proxy(&kube, "shop");
    assert!(!ok && text.contains("its proxy is not ready"), "{text}");
    for (pod, _, _) in &pods {
        report_ready(&kube, pod);
    }
    let (ok, text) = check_proxy(&kube, "shop");
    assert!(ok, "{text}");
    assert!(text.contains("2 pods, version"), "{text}");

    // A pod that escaped injection is named with its fix.
    kube.apply(r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"late"}}"#);
    kube.apply(r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"early","namespace":"late"},"spec":{"containers":[{"name":"app","image":"demo"}]}}"#);
    kube.kubectl_ok(&["label", "namespace", "late", "mesh.rs/inject=enabled"]);
    let (ok, text) = check_proxy(&kube, "late");
    assert!(!ok, "{text}");
    assert!(
        text.contains("pod late/early: should be meshed but has no proxy"),
        "{text}"
    );
    assert!(text.contains("kubectl replace --force"), "{text}");
}
