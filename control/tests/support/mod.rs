//! A real control plane on 127.0.0.1:0 with real gRPC clients.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::{path::PathBuf, time::Duration};

use mesh_control::{
    ControlPlane, admin_socket::create_token, config::Config, store::WorkloadClaims,
};
use mesh_core::{
    api::v1::{
        CertifyRequest, CertifyResponse, RegisterRequest, WorkloadPort,
        discovery_client::DiscoveryClient, identity_client::IdentityClient,
        policy_client::PolicyClient, registry_client::RegistryClient,
    },
    grpc,
    identity::{
        BundleStore, CredentialStore, Credentials, ExpectedIdentity, SpiffeId, TrustBundle,
        cert::now,
        csr::new_key_and_csr,
        tls::{client_config, client_config_without_cert},
    },
};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

pub use mesh_control::test_util::{TD, bundles_of, config, make_dirs};

pub struct TestPlane {
    pub plane: Option<ControlPlane>,
    pub dir: tempfile::TempDir,
    pub bundles: BundleStore,
}

impl TestPlane {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        tune(&mut cfg);
        let bundles = bundles_of(&cfg.ca_dir);
        let plane = ControlPlane::start(cfg).await.unwrap();
        Self {
            plane: Some(plane),
            dir,
            bundles,
        }
    }

    pub fn plane(&self) -> &ControlPlane {
        self.plane.as_ref().unwrap()
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn control_id() -> SpiffeId {
        format!("spiffe://{TD}/ns/mesh-system/sa/control")
            .parse()
            .unwrap()
    }

    /// Clients for this control plane.
    pub fn clients(&self) -> Clients {
        Clients {
            bundles: self.bundles.clone(),
            identity: self.plane().identity_addr,
            api: self.plane().api_addr,
        }
    }

    pub fn anonymous_identity(&self) -> IdentityClient<Channel> {
        self.clients().anonymous_identity()
    }

    pub fn identity_as(&self, creds: &Credentials) -> IdentityClient<Channel> {
        self.clients().identity_as(creds)
    }

    pub fn discovery(&self, creds: &Credentials) -> DiscoveryClient<Channel> {
        self.clients().discovery(creds)
    }

    pub fn policy(&self, creds: &Credentials) -> PolicyClient<Channel> {
        self.clients().policy(creds)
    }

    pub fn registry(&self, creds: &Credentials) -> RegistryClient<Channel> {
        self.clients().registry(creds)
    }

    /// A token for `ns/sa` that may register nothing.
    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.token_with(ns, sa, None)
    }

    pub fn token_with(&self, ns: &str, sa: &str, claims: Option<WorkloadClaims>) -> String {
        create_token(
            self.plane().store().as_ref(),
            ns,
            sa,
            Duration::from_secs(600),
            now().unix_timestamp(),
            claims,
        )
        .unwrap()
        .0
    }

    /// Joins as `ns/sa` with a fresh token: the workload's first SVID.
    pub async fn join(&self, ns: &str, sa: &str) -> Credentials {
        self.clients().join(&self.token(ns, sa), ns, sa).await
    }

    /// Joins as `ns/sa` with a token for workload `name` (label
    /// `app=<app>`, address `ip`): what [`register_request`] claims.
    pub async fn join_workload(
        &self,
        (ns, sa): (&str, &str),
        name: &str,
        app: &str,
        ip: &str,
    ) -> Credentials {
        let token = self.token_with(ns, sa, Some(claims(name, app, ip)));
        self.clients().join(&token, ns, sa).await
    }

    pub async fn metrics(&self) -> String {
        scrape(self.plane().admin_addr).await
    }

    pub async fn stop(&mut self) {
        if let Some(plane) = self.plane.take() {
            plane.shutdown(Duration::from_secs(2)).await;
        }
    }
}

/// Real gRPC clients for a control plane, in this process or another.
#[derive(Clone)]
pub struct Clients {
    pub bundles: BundleStore,
    pub identity: std::net::SocketAddr,
    pub api: std::net::SocketAddr,
}

impl Clients {
    /// Identity client without a certificate (first issuance).
    pub fn anonymous_identity(&self) -> IdentityClient<Channel> {
        let cfg = client_config_without_cert(
            self.bundles.clone(),
            ExpectedIdentity::Exact(TestPlane::control_id()),
        )
        .unwrap();
        IdentityClient::new(grpc::channel(&self.identity.to_string(), cfg).unwrap())
    }

    /// Identity client presenting `creds` (renewal).
    pub fn identity_as(&self, creds: &Credentials) -> IdentityClient<Channel> {
        IdentityClient::new(self.mtls(self.identity, creds))
    }

    fn mtls(&self, addr: std::net::SocketAddr, creds: &Credentials) -> Channel {
        let cfg = client_config(
            CredentialStore::new(creds.clone()),
            self.bundles.clone(),
            ExpectedIdentity::Exact(TestPlane::control_id()),
        )
        .unwrap();
        grpc::channel(&addr.to_string(), cfg).unwrap()
    }

    pub fn discovery(&self, creds: &Credentials) -> DiscoveryClient<Channel> {
        DiscoveryClient::new(self.mtls(self.api, creds))
    }

    pub fn policy(&self, creds: &Credentials) -> PolicyClient<Channel> {
        PolicyClient::new(self.mtls(self.api, creds))
    }

    pub fn registry(&self, creds: &Credentials) -> RegistryClient<Channel> {
        RegistryClient::new(self.mtls(self.api, creds))
    }

    /// Certifies `ns/sa` with `token`.
    pub async fn join(&self, token: &str, ns: &str, sa: &str) -> Credentials {
        let id = format!("spiffe://{TD}/ns/{ns}/sa/{sa}");
        certify(&mut self.anonymous_identity(), &id, token)
            .await
            .unwrap()
    }
}

/// Certify with a token; the SVID and its key as credentials.
pub async fn certify(
    client: &mut IdentityClient<Channel>,
    id: &str,
    token: &str,
) -> Result<Credentials, tonic::Status> {
    let (key, csr) = new_key_and_csr().unwrap();
    let resp = client
        .certify(CertifyRequest {
            identity: id.into(),
            csr,
            token: token.into(),
            ttl_seconds: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(credentials(resp, key))
}

pub fn credentials(
    resp: CertifyResponse,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Credentials {
    let chain = resp.chain.into_iter().map(CertificateDer::from).collect();
    Credentials::new(chain, key).unwrap()
}

/// `GET path` from the admin server over a raw socket.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub async fn scrape(addr: std::net::SocketAddr) -> String {
    let resp = http_get(addr, "/metrics").await;
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The value of one sample line (`name{labels} value`), 0 when absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// What a token for [`register_request`]'s workload grants.
pub fn claims(name: &str, app: &str, ip: &str) -> WorkloadClaims {
    WorkloadClaims {
        workload: name.into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        addresses: vec![ip.parse().unwrap()],
        ports: Vec::new(),
    }
}

pub fn register_request(ns: &str, name: &str, app: &str, ip: &str) -> RegisterRequest {
    RegisterRequest {
        namespace: ns.into(),
        name: name.into(),
        addresses: vec![ip.into()],
        ports: vec![WorkloadPort {
            name: "http".into(),
            port: 8080,
            protocol: 1,
        }],
        labels: [("app".to_owned(), app.to_owned())].into(),
        healthy: true,
        proxy_port: 4143,
        via_gateway: false,
    }
}

pub const API_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{port: 8080, appProtocol: http}]\n";

pub fn bundle_roots(set: &BundleStore) -> Vec<CertificateDer<'static>> {
    let current = set.current();
    let b: &TrustBundle = current.get(&TD.parse().unwrap()).unwrap();
    b.roots().to_vec()
}
