//! A real Kubernetes control plane for tests: etcd, kube-apiserver and
//! kube-controller-manager from `tests/kube-apiserver/` (built once by its
//! `build.sh`, cached under `target/`), on free loopback ports, removed when
//! the [`Kube`] is dropped or the test process ends.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::mesh_exe;

/// The one Node of a test cluster.
pub const NODE: &str = "node-0";

/// At most this many test clusters run at once in one test binary (each
/// is an etcd, an API server and a controller manager: about 0.5 GiB and a
/// burst of CPU at start). A test holding two asks for them one by one.
const MAX_CLUSTERS: usize = 4;

/// Counts running clusters; [`Slot`] gives one back on drop.
static RUNNING: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

#[derive(Debug)]
struct Slot;

impl Slot {
    fn take() -> Self {
        let (lock, freed) = &RUNNING;
        let mut running = lock.lock().unwrap_or_else(|p| p.into_inner());
        while *running >= MAX_CLUSTERS {
            running = freed.wait(running).unwrap_or_else(|p| p.into_inner());
        }
        *running += 1;
        Self
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (lock, freed) = &RUNNING;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        freed.notify_one();
    }
}

/// One running cluster control plane (no kubelet: tests play the kubelet).
#[derive(Debug)]
pub struct Kube {
    _slot: Slot,
    child: Child,
    /// Held open: the control plane exits when this closes.
    _stdin: ChildStdin,
    pub dir: tempfile::TempDir,
    /// An admin (`system:masters`) kubeconfig.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// How long it took to become ready.
    pub started_in: Duration,
}

/// The `mesh-test-kube` binary, built if needed (a cold build takes minutes;
/// `.ci/run` builds it before the tests).
pub fn kube_exe() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let script = crate::repo().join("tests/kube-apiserver/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{} failed; Go is needed to build the test API server",
            script.display()
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

impl Kube {
    /// Starts one and waits until the API server is ready and the
    /// controller manager works (the `default` ServiceAccount exists).
    pub fn start() -> Self {
        let slot = Slot::take();
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let (child, stdin, ready) = first_launch(dir.path());
        let kube = Self {
            _slot: slot,
            child,
            _stdin: stdin,
            kubeconfig: PathBuf::from(ready["kubeconfig"].as_str().unwrap()),
            server: ready["server"].as_str().unwrap().to_owned(),
            dir,
            started_in: started.elapsed(),
        };
        // The node the tests' pods "run" on: EndpointSlices leave out a pod
        // whose node does not exist.
        kube.apply(
            &serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
                .to_string(),
        );
        kube
    }

    /// Stops the API server and the controller manager (an outage); etcd's
    /// data stays for [`Kube::start_again`].
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts them again on the same data, ports, keys and certificates.
    pub fn start_again(&mut self) {
        let (child, stdin, ready) = launch(self.dir.path()).unwrap_or_else(|why| panic!("{why}"));
        assert_eq!(ready["server"].as_str(), Some(self.server.as_str()));
        self.child = child;
        self._stdin = stdin;
    }

    /// `kubectl ARGS` against this cluster as admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_input(args, "")
    }

    /// `kubectl ARGS` with `input` on its stdin.
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Output {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed (.ci/run installs it)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// `kubectl ARGS` that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `kubectl apply -f -` of `yaml`, which must succeed.
    pub fn apply(&self, yaml: &str) -> String {
        let out = self.kubectl_with_input(&["apply", "-f", "-"], yaml);
        assert!(
            out.status.success(),
            "kubectl apply: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// How many times a first start is tried. Its ports are picked free and
/// bound a moment later, so a process of another test can take one in
/// between; the cluster then starts over, fresh, on new ports.
const FIRST_START_TRIES: usize = 3;

/// [`launch`] on a new cluster directory, starting over on new ports when
/// one was taken before the API server bound it.
fn first_launch(dir: &std::path::Path) -> (Child, ChildStdin, serde_json::Value) {
    let mut tries = 1;
    loop {
        match launch(dir) {
            Ok(started) => return started,
            Err(why) if tries < FIRST_START_TRIES && why.contains("address already in use") => {
                eprintln!("the test API server lost a port to another process; starting over");
                let _ = std::fs::remove_dir_all(dir.join("cluster"));
                tries += 1;
            }
            Err(why) => panic!("{why}"),
        }
    }
}

/// Runs `mesh-test-kube up` on `dir` and waits for its READY line; the
/// error says why it did not come, with the log's last lines.
fn launch(dir: &std::path::Path) -> Result<(Child, ChildStdin, serde_json::Value), String> {
    let exe = kube_exe();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("kube.log"))
        .unwrap();
    let mut child = Command::new(&exe)
        .args(["up", "--dir"])
        .arg(dir.join("cluster"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(json) = line.strip_prefix("READY ") {
                let _ = tx.send(json.to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(180)) {
        Ok(ready) => Ok((child, stdin, serde_json::from_str(&ready).unwrap())),
        Err(e) => {
            // Timed out, or it exited (its stdout closed) before READY.
            let _ = child.kill();
            let _ = child.wait();
            let why = match e {
                mpsc::RecvTimeoutError::Timeout => "was not ready in 180 s",
                mpsc::RecvTimeoutError::Disconnected => "exited before it was ready",
            };
            let log = std::fs::read_to_string(dir.join("kube.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            Err(format!(
                "the test API server {why}; last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ))
        }
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        // The controller manager follows: its stdin closes.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound, then released for the process under test).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free loopback ports: each listener is held until all are
/// picked, so two calls in a row cannot be handed the same port.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

impl Kube {
    /// The API server's CA (PEM), as the admin kubeconfig carries it.
    pub fn ca_pem(&self) -> Vec<u8> {
        use base64::Engine as _;
        let data = self.kubectl_ok(&[
            "config",
            "view",
            "--raw",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority-data}",
        ]);
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .expect("base64 CA data")
    }

    /// A kubeconfig file (in this cluster's directory) that authenticates
    /// with `token`, e.g. a ServiceAccount's from `kubectl create token`.
    /// Serialized as JSON, which is YAML.
    pub fn kubeconfig_for_token(&self, name: &str, token: &str) -> PathBuf {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem());
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "test", "cluster": { "server": self.server, "certificate-authority-data": ca } }],
            "users": [{ "name": name, "user": { "token": token } }],
            "contexts": [{ "name": name, "context": { "cluster": "test", "user": name } }],
            "current-context": name,
        });
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        path
    }

    /// A token of ServiceAccount `ns/sa` (`kubectl create token`), for
    /// `audience` when given.
    pub fn token(&self, ns: &str, sa: &str, audience: Option<&str>, duration: &str) -> String {
        let mut args = vec!["create", "token", sa, "-n", ns, "--duration", duration];
        if let Some(audience) = audience {
            args.extend(["--audience", audience]);
        }
        self.kubectl_ok(&args).trim().to_owned()
    }

    /// Plays the scheduler and the kubelet: the Pod `ns/name` is bound to
    /// the test node, runs at `ip` and is Ready.
    pub fn run_pod(&self, ns: &str, name: &str, ip: &str) {
        let node = self.kubectl_ok(&[
            "get",
            "pod",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.nodeName}",
        ]);
        if node.trim().is_empty() {
            let binding = serde_json::json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": { "name": name, "namespace": ns },
                "target": { "apiVersion": "v1", "kind": "Node", "name": NODE },
            });
            let path = format!("/api/v1/namespaces/{ns}/pods/{name}/binding");
            let out = self
                .kubectl_with_input(&["create", "--raw", &path, "-f", "-"], &binding.to_string());
            assert!(
                out.status.success(),
                "binding {ns}/{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let status = serde_json::json!({
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{ "ip": ip }],
                "conditions": [
                    { "type": "Ready", "status": "True" },
                    { "type": "ContainersReady", "status": "True" },
                ],
            }
        });
        self.kubectl_ok(&[
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]);
    }
}

/// The pod network of the test clusters: EndpointSlices refuse loopback
/// addresses, so pods get addresses of this range, which a `local` route
/// on `lo` makes bindable on this machine (like 127.0.0.0/8). Needs root.
pub const POD_NET: &str = "10.244.0.0/24";

/// Adds the local route for [`POD_NET`] (idempotent). Fails loudly
/// without root: the Kubernetes end-to-end tests need it.
pub fn pod_network() {
    let out = Command::new("ip")
        .args(["route", "replace", "local", POD_NET, "dev", "lo"])
        .output()
        .expect("`ip` (iproute2) is installed");
    assert!(
        out.status.success(),
        "cannot route {POD_NET} locally (run the tests as root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A GET of `url` through the HTTP proxy at `proxy`: status and body.
pub fn http_get_via(proxy: std::net::SocketAddr, url: &str) -> (u16, String) {
    use std::io::Read;
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

impl Kube {
    /// A service-account token for `ns/sa` and `audience` that expired an
    /// hour ago, signed with this cluster's service-account key (the API
    /// server mints no token shorter than ten minutes). Everything else is
    /// what `kubectl create token` gives, so only the expiry is wrong.
    pub fn expired_token(&self, ns: &str, sa: &str, audience: &str) -> String {
        use aws_lc_rs::{rand::SystemRandom, signature};
        use base64::Engine as _;
        let uid = self.kubectl_ok(&["get", "sa", sa, "-n", ns, "-o", "jsonpath={.metadata.uid}"]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "aud": [audience],
            "exp": now - 3600,
            "iat": now - 7200,
            "nbf": now - 7200,
            "iss": "https://kubernetes.default.svc",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": { "namespace": ns, "serviceaccount": { "name": sa, "uid": uid.trim() } },
        });
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let header = serde_json::json!({ "alg": "RS256", "typ": "JWT" });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let pem = std::fs::read(self.dir.path().join("cluster/sa.key")).unwrap();
        let key = mesh_core::identity::cert::key_from_pem(&pem).unwrap();
        let rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8) = key else {
            panic!("sa.key is PKCS#8")
        };
        let pair = signature::RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der()).unwrap();
        let mut sig = vec![0; pair.public_modulus_len()];
        pair.sign(
            &signature::RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            signing_input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{signing_input}.{}", b64(&sig))
    }
}

/// What a Kubernetes Service gives the pods of a Deployment (no kube-proxy
/// here): one address in front of the backends. Each new connection goes
/// to the first backend that accepts it, in the order given, so a test
/// knows which one its clients use until that one dies. Lives as long as
/// the test process.
pub fn service_vip(backends: Vec<std::net::SocketAddr>) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let backend = backends.iter().find_map(|to| {
                std::net::TcpStream::connect_timeout(to, Duration::from_millis(500)).ok()
            });
            let Some(backend) = backend else { continue };
            let (Ok(client2), Ok(backend2)) = (client.try_clone(), backend.try_clone()) else {
                continue;
            };
            let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                });
            };
            pipe(client, backend);
            pipe(backend2, client2);
        }
    });
    addr
}

/// A Pod as injection makes it: the app's container (port `http` 8080)
/// and the `mesh-proxy` container with its `mesh-inbound` port. As JSON,
/// which `kubectl apply` reads like YAML.
pub fn meshed_pod(ns: &str, name: &str, sa: &str, labels: &[(&str, &str)]) -> String {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": {
            "serviceAccountName": sa,
            "containers": [
                { "name": "app", "image": "demo", "ports": [{ "name": "http", "containerPort": 8080 }] },
                { "name": "mesh-proxy", "image": "mesh", "ports": [{ "name": "mesh-inbound", "containerPort": 4143 }] },
            ],
        },
    })
    .to_string()
}

/// GETs `url` through `proxy` until `done` holds or `within` passes: the
/// last status and body.
pub fn get_until(
    proxy: std::net::SocketAddr,
    url: &str,
    within: Duration,
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = http_get_via(proxy, url);
        if done(status, &body) || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `mesh ARGS`, which must succeed; its stdout.
pub fn mesh(args: &[&str]) -> String {
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

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `mesh control --store kube` as a process, killed on drop.
#[derive(Debug)]
pub struct Control {
    pub child: std::process::Child,
    pub api: std::net::SocketAddr,
    pub identity: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    pub log: std::path::PathBuf,
    pub data: tempfile::TempDir,
}

impl Control {
    /// Runs it as the Deployment does: issuer from the Secret `mesh install`
    /// made.
    pub fn start(kubeconfig: &std::path::Path, cluster: &str) -> Self {
        Self::start_with(kubeconfig, cluster, &[])
    }

    /// The same, with more flags.
    pub fn start_with(kubeconfig: &std::path::Path, cluster: &str, extra: &[&str]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let log = data.path().join("control.log");
        // Free loopback ports (three distinct ones), unless `extra` names
        // the address.
        let ports = free_ports::<3>();
        let addr = |flag: &str, port: u16| -> std::net::SocketAddr {
            extra
                .iter()
                .position(|a| *a == flag)
                .and_then(|i| extra.get(i + 1))
                .map(|a| a.to_string())
                .unwrap_or_else(|| format!("127.0.0.1:{port}"))
                .parse()
                .unwrap()
        };
        let (api, admin, identity) = (
            addr("--api-addr", ports[0]),
            addr("--admin-addr", ports[1]),
            addr("--identity-addr", ports[2]),
        );
        let extra: Vec<&str> = extra
            .chunks(2)
            .filter(|kv| !["--api-addr", "--admin-addr", "--identity-addr"].contains(&kv[0]))
            .flatten()
            .copied()
            .collect();
        let child = Command::new(mesh_exe())
            .args(["control", "--store", "kube", "--cluster", cluster])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--ca-secret", "mesh-system/mesh-issuer"])
            .arg("--data-dir")
            .arg(data.path())
            .args(["--identity-addr", &identity.to_string()])
            .args(["--api-addr", &api.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut control = Self {
            child,
            api,
            identity,
            admin,
            log,
            data,
        };
        control.wait_ready();
        control
    }

    pub fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the control plane exited ({status}):\n{}", self.log_text());
            }
            if crate::get(self.admin, "/ready").0 == 200 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the control plane was not ready in 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster with Mesh installed as a user would: CRDs, `mesh install`
/// applied for real, and the control plane running as a process with a
/// token of the `mesh-control` ServiceAccount.
#[derive(Debug)]
pub struct Installed {
    pub _ca: tempfile::TempDir,
    pub ca_dir: std::path::PathBuf,
    pub kubeconfig: std::path::PathBuf,
    pub control: Control,
}

pub fn install(kube: &Kube, td: &str, cluster: &str) -> Installed {
    install_with(kube, td, cluster, &[], &[])
}

/// [`install`] with more `mesh install` arguments and control-plane flags.
pub fn install_with(
    kube: &Kube,
    td: &str,
    cluster: &str,
    install_args: &[&str],
    control_flags: &[&str],
) -> Installed {
    kube.apply(&mesh(&["install", "--crds"]));
    kube.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ]);
    let ca = tempfile::tempdir().unwrap();
    let ca_dir = ca.path().join("ca");
    mesh(&[
        "identity",
        "ca",
        "create",
        "--trust-domain",
        td,
        "--out",
        ca_dir.to_str().unwrap(),
    ]);
    let set = format!("cluster={cluster}");
    let mut args = vec!["install", "--ca", ca_dir.to_str().unwrap(), "--set", &set];
    args.extend(install_args);
    kube.apply(&mesh(&args));
    let token = kube.token("mesh-system", "mesh-control", None, "1h");
    let kubeconfig = kube.kubeconfig_for_token("mesh-control", &token);
    let control = Control::start_with(&kubeconfig, cluster, control_flags);
    Installed {
        _ca: ca,
        ca_dir,
        kubeconfig,
        control,
    }
}

/// Where a proxy finds its control plane: identity and API addresses.
#[derive(Clone, Copy, Debug)]
pub struct ControlAddrs {
    pub identity: std::net::SocketAddr,
    pub api: std::net::SocketAddr,
}

impl Control {
    pub fn addrs(&self) -> ControlAddrs {
        ControlAddrs {
            identity: self.identity,
            api: self.api,
        }
    }
}

/// The pods of `ns` matching `selector`, once there are `count`.
pub fn pods_until(
    kube: &Kube,
    ns: &str,
    selector: &str,
    count: usize,
    control: Option<&Control>,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = kube.kubectl_ok(&["get", "pods", "-n", ns, "-l", selector, "-o", "json"]);
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        let items = list["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= count {
            return items;
        }
        if Instant::now() > deadline {
            let events = kube.kubectl(&["get", "events", "-n", ns]);
            panic!(
                "no {count} pods {selector} in {ns} within 60 s; events:\n{}\ncontrol plane:\n{}",
                String::from_utf8_lossy(&events.stdout),
                control.map(|c| c.log_text()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Plays the kubelet for the control plane's Deployment: its pod runs at
/// `ip`, where the process listens; returns once the Service's endpoint
/// is that address.
pub fn control_pod_runs_at(kube: &Kube, installed: &Installed, ip: &str) {
    let control = pods_until(
        kube,
        "mesh-system",
        "app.kubernetes.io/name=mesh-control",
        1,
        None,
    );
    let control_pod = control[0]["metadata"]["name"].as_str().unwrap().to_owned();
    kube.run_pod("mesh-system", &control_pod, ip);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let endpoints = kube.kubectl(&[
            "get",
            "endpoints",
            "mesh-control",
            "-n",
            "mesh-system",
            "-o",
            "jsonpath={.subsets[0].addresses[0].ip}",
        ]);
        if String::from_utf8_lossy(&endpoints.stdout) == ip {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook endpoint is ready:\n{}",
            installed.control.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Namespace `shop` (with `namespace_labels`), ServiceAccounts api, web
/// and stranger, the Service api on 8080, and policy that admits only
/// web (of trust domain `td`) to api's port 8080: a `kind: List` for
/// `kubectl apply`.
pub fn only_web_may_call_api(td: &str, namespace_labels: serde_json::Value) -> String {
    let sa = |name: &str| serde_json::json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": name, "namespace": "shop" } });
    let policy = "policy.mesh.rs/v1alpha1";
    let web = mesh_core::identity::SpiffeId::workload(
        &td.parse().expect("a trust domain"),
        "shop",
        "web",
    )
    .expect("a SPIFFE ID");
    serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": [
        { "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop", "labels": namespace_labels } },
        sa("api"), sa("web"), sa("stranger"),
        { "apiVersion": "v1", "kind": "Service", "metadata": { "name": "api", "namespace": "shop" },
          "spec": { "selector": { "app": "api" },
                    "ports": [{ "name": "http", "port": 8080, "targetPort": 8080, "appProtocol": "http" }] } },
        { "apiVersion": policy, "kind": "Server", "metadata": { "name": "api-http", "namespace": "shop" },
          "spec": { "podSelector": { "matchLabels": { "app": "api" } }, "port": 8080 } },
        { "apiVersion": policy, "kind": "AuthorizationPolicy", "metadata": { "name": "web-only", "namespace": "shop" },
          "spec": { "targetRef": { "kind": "Server", "name": "api-http" },
                    "requiredAuthenticationRefs": [{ "kind": "MeshTLSAuthentication", "name": "web" }] } },
        { "apiVersion": policy, "kind": "MeshTLSAuthentication", "metadata": { "name": "web", "namespace": "shop" },
          "spec": { "identities": [web.to_string()] } },
    ] })
    .to_string()
}
