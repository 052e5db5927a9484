//! A world for VM agent tests: a real control plane on fixed loopback ports
//! (so it can be restarted), an `api` workload with a sidecar proxy, a `web`
//! caller, and join strings made the way `mesh vm token create` makes them.
#![allow(dead_code, unreachable_pub)]

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_control::{ControlPlane, admin_socket::create_token, test_util};
use mesh_core::identity::cert::now;
use mesh_proxy::{
    Config, Proxy,
    env::{AppPort, Bootstrap},
};
use mesh_vm_agent::{
    JoinString,
    config::WorkloadApiConfig,
    join::{JoinOptions, Joined, join},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TD: &str = test_util::TD;
/// Every app in these tests listens on this port, each on its own address.
pub const APP_PORT: u16 = 18_080;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP/1.1 app at `addr` answering `app=<name> client=<mesh-client-id>`.
pub async fn echo_app(addr: SocketAddr, name: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let client = req
                        .headers()
                        .get("mesh-client-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(format!("app={name} client={client}")),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

/// `GET http://<authority>/` through an outbound proxy (explicit mode):
/// the status and the body.
pub async fn get_via(proxy: SocketAddr, authority: &str) -> (u16, String) {
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(proxy).await.ok()?;
        let req = format!(
            "GET http://{authority}/ HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.ok()?;
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.ok()?;
        let status = raw.split_whitespace().nth(1)?.parse().ok()?;
        let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, String::new()))
}

/// Calls until `want(status, body)` holds or `within` passes.
pub async fn until(
    proxy: SocketAddr,
    authority: &str,
    within: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = get_via(proxy, authority).await;
        if want(status, &body) || tokio::time::Instant::now() > deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub cfg: mesh_control::config::Config,
    pub plane: Option<ControlPlane>,
    pub anchors: PathBuf,
}

impl World {
    /// A control plane on fixed ports, with Services `api` and `billing`
    /// (the VM's) on [`APP_PORT`].
    pub async fn new(leaf_ttl: Duration) -> Self {
        Self::with_gateway(leaf_ttl, None).await
    }

    /// [`World::new`], telling the control plane its gateway's address.
    pub async fn with_gateway(leaf_ttl: Duration, gateway: Option<SocketAddr>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_util::config(dir.path());
        cfg.leaf_ttl = leaf_ttl;
        cfg.gateway_addresses = gateway.iter().map(ToString::to_string).collect();
        cfg.identity_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        cfg.api_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let service = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{port: {APP_PORT}, appProtocol: http}}]\n"
            )
        };
        std::fs::write(
            cfg.config_dir.join("shop.yaml"),
            format!("{}---\n{}", service("api"), service("billing")),
        )
        .unwrap();
        let anchors = cfg.ca_dir.join("bundle.json");
        let plane = ControlPlane::start(cfg.clone()).await.unwrap();
        Self {
            dir,
            cfg,
            plane: Some(plane),
            anchors,
        }
    }

    pub fn plane(&self) -> &ControlPlane {
        self.plane.as_ref().expect("the control plane runs")
    }

    pub async fn stop_control_plane(&mut self) {
        if let Some(plane) = self.plane.take() {
            plane.shutdown(Duration::ZERO).await;
        }
    }

    /// Starts it again on the same ports, data and CA.
    pub async fn restart_control_plane(&mut self) {
        assert!(self.plane.is_none());
        self.plane = Some(ControlPlane::start(self.cfg.clone()).await.unwrap());
    }

    /// A join string for `shop/billing` workload `workload`, made through
    /// the admin socket as `mesh vm token create` makes it.
    pub async fn join_string(&self, workload: &str, ttl: Duration) -> JoinString {
        let claims = mesh_control::store::WorkloadClaims {
            workload: workload.into(),
            labels: [("app".to_owned(), "billing".to_owned())].into(),
            addresses: Vec::new(),
            ports: vec![APP_PORT],
        };
        let resp = mesh_control::cli::request_token(
            &self.cfg.admin_socket,
            "shop".into(),
            "billing".into(),
            ttl,
            Some(claims),
        )
        .await
        .unwrap();
        let facts = resp.cluster.expect("the control plane says who it is");
        let js = JoinString {
            cluster: facts.cluster,
            trust_domain: facts.trust_domain,
            identity_addr: self.cfg.identity_addr.to_string(),
            api_addr: self.cfg.api_addr.to_string(),
            gateway: None,
            token: resp.token.unwrap(),
            pin: facts.bundle_pin,
            namespace: "shop".into(),
            service_account: "billing".into(),
            workload: workload.into(),
            labels: [("app".to_owned(), "billing".to_owned())].into(),
            ports: vec![APP_PORT],
        };
        // Through its text form, as a user copies it.
        JoinString::decode(&js.encode()).unwrap()
    }

    /// This cluster's gateway on `addr`, joined with a token.
    pub async fn gateway(&self, addr: SocketAddr) -> mesh_gateway::Gateway {
        let (token, _) = create_token(
            self.plane().store().as_ref(),
            "mesh-system",
            "gateway",
            Duration::from_secs(600),
            now().unix_timestamp(),
            None,
        )
        .unwrap();
        let token_file = self.dir.path().join("gateway.token");
        std::fs::write(&token_file, token).unwrap();
        mesh_gateway::Gateway::start(mesh_gateway::GatewayArgs {
            cluster: "west".into(),
            trust_domain: TD.parse().unwrap(),
            cluster_domain: "cluster.local".into(),
            control_identity_addr: self.cfg.identity_addr.to_string(),
            control_api_addr: self.cfg.api_addr.to_string(),
            control_identity: None,
            trust_anchors: self.anchors.clone(),
            join_token_file: Some(token_file),
            credentials_dir: None,
            tunnel_addr: addr,
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: None,
        })
        .await
        .unwrap()
    }

    /// Where a VM called `name` keeps its files, and how it listens.
    pub fn vm_options(&self, name: &str, ip: IpAddr) -> JoinOptions {
        let root = self.dir.path().join(name);
        JoinOptions {
            config_path: root.join("etc/vm-agent.json"),
            state_dir: root.join("state"),
            address: Some(ip),
            app_ip: ip,
            inbound_addr: SocketAddr::new(ip, 0),
            outbound_addr: SocketAddr::new(ip, 0),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            health: None,
            workload_api: WorkloadApiConfig {
                socket: root.join("run/workload.sock"),
                allowed_uids: vec![0],
            },
            dns: Some(mesh_vm_agent::config::DnsConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                cluster_domain: "cluster.local".into(),
            }),
            capture: None,
            force: false,
        }
    }

    pub async fn join_vm(&self, name: &str, ip: IpAddr) -> Joined {
        let js = self.join_string(name, Duration::from_secs(600)).await;
        join(&js, &self.vm_options(name, ip)).await.unwrap()
    }

    /// A sidecar proxy for `shop/<sa>` (workload `<sa>-0`, label app=<sa>)
    /// on loopback `ip`, its app (if any) on [`APP_PORT`].
    pub async fn sidecar(&self, sa: &str, ip: IpAddr, serves_app: bool) -> Proxy {
        let name = format!("{sa}-0");
        let labels: std::collections::BTreeMap<String, String> =
            [("app".to_owned(), sa.to_owned())].into();
        let claims = mesh_control::store::WorkloadClaims {
            workload: name.clone(),
            labels: labels.clone(),
            addresses: vec![ip],
            ports: Vec::new(),
        };
        let (token, _) = create_token(
            self.plane().store().as_ref(),
            "shop",
            sa,
            Duration::from_secs(600),
            now().unix_timestamp(),
            Some(claims),
        )
        .unwrap();
        let token_file = self.dir.path().join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        let td: mesh_core::identity::TrustDomain = TD.parse().unwrap();
        Proxy::start(Config {
            cluster: "west".into(),
            identity: mesh_core::identity::SpiffeId::workload(&td, "shop", sa).unwrap(),
            control_identity: mesh_core::identity::SpiffeId::workload(
                &td,
                "mesh-system",
                "control",
            )
            .unwrap(),
            trust_domain: td,
            namespace: "shop".into(),
            service_account: sa.into(),
            workload: name,
            control_identity_addr: self.cfg.identity_addr.to_string(),
            control_api_addr: self.cfg.api_addr.to_string(),
            trust_anchors: mesh_proxy::TrustAnchors::File(self.anchors.clone()),
            bootstrap: Bootstrap::TokenFile(token_file),
            inbound_addr: SocketAddr::new(ip, 0),
            outbound_addr: SocketAddr::new(ip, 0),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            app_ip: ip,
            app_ports: if serves_app {
                vec![AppPort {
                    name: "http".into(),
                    port: APP_PORT,
                }]
            } else {
                Vec::new()
            },
            workload_addresses: vec![ip],
            labels,
            inbound_fail_fast: Duration::from_secs(2),
            detect_timeout: Duration::from_secs(1),
            opaque_ports: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            max_in_flight: 100_000,
            shutdown_grace: Duration::from_secs(1),
            worker_threads: 1,
            destinations: Default::default(),
            via_gateway: None,
            metrics_addr: None,
        })
        .await
        .unwrap()
    }
}

/// The mode of a file.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The authority of a service of the test world.
pub fn svc(name: &str) -> String {
    format!("{name}.shop.svc.cluster.local:{APP_PORT}")
}
