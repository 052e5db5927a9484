//! Transparent interception, as root: in a network namespace of its own, an
//! unmodified `curl` (run as another user, no proxy settings) reaches a
//! service through both proxies once `mesh proxy init --apply` has set up
//! iptables, and the app sees curl's workload identity. Needs root, `ip`,
//! `iptables`, `curl`, `setpriv` and `python3`; fails loudly without them.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use mesh_tests::{
    mesh_exe,
    netns::{Host, http_app, require_root_and_tools, run},
};

/// An opaque TCP app: answers each line with `pong <line>`.
const TCP_APP: &str = r#"
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"pong " + line)
socketserver.ThreadingTCPServer(("127.0.0.2", 9001), H).serve_forever()
"#;

/// A server-speaks-first app (as MySQL or SMTP): a banner on accept.
const BANNER_APP: &str = r#"
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"hello from api\n")
        self.rfile.readline()
socketserver.ThreadingTCPServer(("127.0.0.2", 9002), H).serve_forever()
"#;

/// Connects to the banner app and waits for its first line, sending
/// nothing: prints the line and how long it took.
const BANNER_CLIENT: &str = r#"
import socket, time
start = time.monotonic()
s = socket.create_connection(("127.0.0.2", 9002), timeout=8)
line = s.makefile().readline().strip()
print("%s in %.1fs" % (line, time.monotonic() - start))
"#;

/// An opaque TCP client: one line to 127.0.0.2:9001, prints the answer.
const TCP_CLIENT: &str = r#"
import socket
s = socket.create_connection(("127.0.0.2", 9001), timeout=10)
s.sendall(b"ping\n")
print(s.makefile().readline().strip())
"#;

fn proxy_env(
    dir: &Path,
    sa: &str,
    ip: &str,
    outbound: &str,
    admin: &str,
    app_ports: &str,
    labels: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("MESH_PROXY_CLUSTER", "west".into()),
        ("MESH_PROXY_TRUST_DOMAIN", "west.mesh.local".into()),
        ("MESH_PROXY_NAMESPACE", "shop".into()),
        ("MESH_PROXY_SERVICE_ACCOUNT", sa.into()),
        ("MESH_PROXY_WORKLOAD", format!("{sa}-0")),
        ("MESH_PROXY_CONTROL_IDENTITY_ADDR", "127.0.0.1:18080".into()),
        ("MESH_PROXY_CONTROL_API_ADDR", "127.0.0.1:18086".into()),
        (
            "MESH_PROXY_TRUST_ANCHORS",
            dir.join("ca/bundle.json").display().to_string(),
        ),
        (
            "MESH_PROXY_JOIN_TOKEN_FILE",
            dir.join(format!("{sa}.token")).display().to_string(),
        ),
        ("MESH_PROXY_INBOUND_ADDR", format!("{ip}:4143")),
        ("MESH_PROXY_OUTBOUND_ADDR", outbound.into()),
        ("MESH_PROXY_ADMIN_ADDR", admin.into()),
        ("MESH_PROXY_APP_IP", ip.into()),
        ("MESH_PROXY_APP_PORTS", app_ports.into()),
        ("MESH_PROXY_LABELS", labels.into()),
    ]
}

#[test]
fn unmodified_curl_reaches_a_service_through_both_proxies() {
    require_root_and_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mesh = mesh_exe();
    let mesh_s = mesh.display().to_string();
    let mesh_str = mesh_s.as_str();
    run(
        &mesh,
        &[
            "identity",
            "ca",
            "create",
            "--trust-domain",
            "west.mesh.local",
            "--out",
            &dir.join("ca").display().to_string(),
        ],
    );
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(
        dir.join("config/shop.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{port: 9000, appProtocol: http}]\n",
    )
    .unwrap();

    let mut ns = Host::new("test", dir);
    let (ca, config, data) = (dir.join("ca"), dir.join("config"), dir.join("data"));
    ns.spawn(
        "control",
        &[
            mesh_str,
            "control",
            "--cluster",
            "west",
            "--ca",
            &ca.display().to_string(),
            "--config-dir",
            &config.display().to_string(),
            "--data-dir",
            &data.display().to_string(),
            "--identity-addr",
            "127.0.0.1:18080",
            "--api-addr",
            "127.0.0.1:18086",
            "--admin-addr",
            "127.0.0.1:19990",
        ],
        &[],
    );
    ns.wait_ok("http://127.0.0.1:19990/ready", "the control plane");
    for (sa, ip) in [("api", "127.0.0.2"), ("web", "127.0.0.3")] {
        // The admin socket is a file, so it is reachable from outside the
        // namespace. Each token grants exactly the workload its proxy
        // registers.
        let out = run(
            &mesh,
            &[
                "control",
                "token",
                "create",
                "--ns",
                "shop",
                "--sa",
                sa,
                "--workload",
                &format!("{sa}-0"),
                "--labels",
                &format!("app={sa}"),
                "--addresses",
                ip,
                "--data-dir",
                &data.display().to_string(),
            ],
        );
        std::fs::write(dir.join(format!("{sa}.token")), out.stdout).unwrap();
    }
    ns.spawn("app", &["python3", "-c", &http_app("127.0.0.2", 9000)], &[]);
    ns.spawn("tcp-app", &["python3", "-c", TCP_APP], &[]);
    ns.spawn("banner-app", &["python3", "-c", BANNER_APP], &[]);
    ns.wait_ok("http://127.0.0.2:9000/", "the app");
    ns.spawn(
        "api-proxy",
        &[mesh_str, "proxy"],
        &proxy_env(
            dir,
            "api",
            "127.0.0.2",
            "127.0.0.2:4140",
            "127.0.0.1:14191",
            "http=9000,tcp=9001,banner=9002",
            "app=api",
        ),
    );
    // 9002 is server-speaks-first: opaque at once, no 10 s detection wait.
    let mut web_env = proxy_env(
        dir,
        "web",
        "127.0.0.3",
        "127.0.0.1:4140",
        "127.0.0.1:24191",
        "",
        "app=web",
    );
    web_env.push(("MESH_PROXY_OPAQUE_PORTS", "9002".into()));
    ns.spawn("web-proxy", &[mesh_str, "proxy"], &web_env);
    ns.wait_ok("http://127.0.0.1:14191/ready", "the api proxy");
    ns.wait_ok("http://127.0.0.1:24191/ready", "the web proxy");

    // curl as `nobody`, knowing nothing of the mesh: --resolve stands in for DNS.
    let curl = |ns: &Host| {
        let out = ns.as_nobody(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            "api.shop.svc.cluster.local:9000:127.0.0.2",
            "http://api.shop.svc.cluster.local:9000/hello",
        ]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // Before interception, curl reaches the app directly: no identity.
    let direct = curl(&ns);
    assert!(direct.contains("client=- path=/hello"), "{direct}");

    let out = ns.exec(&[
        mesh_str,
        "proxy",
        "init",
        "--apply",
        "--proxy-uid",
        "0",
        "--skip-inbound-ports",
        "14191,24191,18080,18086,19990",
    ]);
    assert!(
        out.status.success(),
        "mesh proxy init --apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = ns.exec(&["iptables", "-t", "nat", "-S", "MESH_OUTBOUND"]);
    assert!(String::from_utf8_lossy(&rules.stdout).contains("--to-ports 4140"));
    // IPv6 is on in the namespace: its TCP is redirected too, never
    // leaving the workload around the proxy.
    let rules6 = ns.exec(&["ip6tables", "-t", "nat", "-S", "MESH_OUTBOUND"]);
    assert!(
        String::from_utf8_lossy(&rules6.stdout).contains("--to-ports 4140"),
        "{}",
        String::from_utf8_lossy(&rules6.stderr)
    );

    // Now the same curl goes through the web proxy, over mTLS, to the api
    // proxy, and the app sees web's verified identity.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let meshed = curl(&ns);
        if meshed.contains("client=spiffe://west.mesh.local/ns/shop/sa/web path=/hello") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "curl did not go through the mesh: {meshed}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // By IP, the same: the address is a meshed workload's, so never plaintext.
    let by_ip = ns.as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://127.0.0.2:9000/by-ip",
    ]);
    let by_ip = String::from_utf8_lossy(&by_ip.stdout);
    assert!(
        by_ip.contains("client=spiffe://west.mesh.local/ns/shop/sa/web path=/by-ip"),
        "{by_ip}"
    );

    // A Host discovery does not know, sent to the meshed workload's
    // address: the original destination is asked about too, so it still
    // rides mTLS instead of going there in plaintext.
    let unknown_host = ns.as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-H",
        "Host: not-a-service.example",
        "http://127.0.0.2:9000/unknown-host",
    ]);
    let unknown_host = String::from_utf8_lossy(&unknown_host.stdout);
    assert!(
        unknown_host.contains("client=spiffe://west.mesh.local/ns/shop/sa/web path=/unknown-host"),
        "{unknown_host}"
    );

    // Opaque TCP to the meshed workload's address rides mTLS between the
    // proxies: api's proxy counts it from web's verified identity.
    let tcp = ns.as_nobody(&[
        // The system python: one under root's home is not for `nobody`.
        "/usr/bin/python3",
        "-c",
        TCP_CLIENT,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&tcp.stdout).trim(),
        "pong ping",
        "{}",
        String::from_utf8_lossy(&tcp.stderr)
    );
    // A banner before the client says anything: with 9002 opaque it comes
    // at once (without MESH_PROXY_OPAQUE_PORTS, only after the 10 s
    // detect timeout, past this client's 8 s).
    let banner = ns.as_nobody(&["/usr/bin/python3", "-c", BANNER_CLIENT]);
    let banner = String::from_utf8_lossy(&banner.stdout);
    let took: f64 = banner
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|t| t.trim_end_matches('s').parse().ok())
        .unwrap_or(99.0);
    assert!(
        banner.starts_with("hello from api in") && took < 2.0,
        "{banner}"
    );
    // Both opaque connections (ping and banner) came over mTLS from web.
    let metrics = ns.exec(&["curl", "-s", "http://127.0.0.1:14191/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("mesh_proxy_tcp_connections_total{direction=\"inbound\",peer=\"spiffe://west.mesh.local/ns/shop/sa/web\",tls=\"mtls\"} 2"),
        "{metrics}"
    );

    let again = ns.exec(&[mesh_str, "proxy", "init", "--apply", "--proxy-uid", "0"]);
    assert!(!again.status.success(), "applying twice is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already applied"));
}
