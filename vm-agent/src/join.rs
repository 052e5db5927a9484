//! `mesh-vm-agent join`: the one command a VM runs.
//!
//! `check config -> fetch bundle -> pin -> certify (token) -> write -> systemd`.
//! The bundle is fetched over a TLS connection that cannot be verified yet
//! (the VM has no roots); it is trusted only when its pin matches the join
//! string's, and only then is the token sent, over a connection verified
//! against those roots, to the control plane's own SPIFFE ID. No config or
//! key is written before the pin matched; a refused token changes nothing.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_core::{
    api::v1::{CertifyRequest, TrustBundleRequest, identity_client::IdentityClient},
    grpc,
    identity::{
        BundleStore, Credentials, ExpectedIdentity, SpiffeId, TrustBundle, TrustBundleSet,
        TrustDomain,
        cert::{certs_to_pem, key_to_pem},
        csr::new_key_and_csr,
        enroll::EnrollmentKey,
        files,
        tls::{self, client_config_without_cert},
    },
};
use rustls::pki_types::CertificateDer;

use crate::{
    config::{AgentConfig, BUNDLE, ENROLL_KEY, LEAF_CRT, LEAF_KEY, WorkloadApiConfig},
    health::HealthConfig,
    join_string::JoinString,
};

/// How long each step of a join may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// What `join` was asked to do beyond the join string.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    /// The address registered for discovery; default: the VM's address on
    /// the route to the control plane.
    pub address: Option<IpAddr>,
    pub app_ip: IpAddr,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub health: Option<HealthConfig>,
    pub workload_api: WorkloadApiConfig,
    pub dns: Option<crate::config::DnsConfig>,
    /// Transparent capture; none: explicit only.
    pub capture: Option<crate::capture::CaptureConfig>,
    /// Rejoin even when a config exists.
    pub force: bool,
}

/// Why a join failed. Each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "this VM already joined as {workload} in cluster {cluster} ({path}); nothing was changed. Run `mesh-vm-agent leave` first, or join again with --force"
    )]
    AlreadyJoined {
        workload: String,
        cluster: String,
        path: String,
    },
    #[error("cannot reach the control plane at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error(
        "the trust bundle served at {addr} does not match the join string's pin (expected {expected}, got {got}). Either something between this VM and the cluster is intercepting the connection, or the cluster's root changed after the join string was made: create a new one with `mesh vm token create`. Nothing was sent and nothing was changed"
    )]
    PinMismatch {
        addr: String,
        expected: String,
        got: String,
    },
    #[error(
        "the control plane at {addr} serves trust domain {got}, but the join string is for {expected}"
    )]
    WrongTrustDomain {
        addr: String,
        expected: String,
        got: String,
    },
    #[error("the control plane refused the join token: {0}")]
    Refused(String),
    #[error("the certificate the control plane issued is unusable: {0}")]
    BadCertificate(String),
    #[error("{0}")]
    File(#[from] files::FileError),
    #[error("{0}")]
    Other(String),
}

/// What a join did, for the report it prints.
#[derive(Debug)]
pub struct Joined {
    pub config: AgentConfig,
    pub identity: SpiffeId,
    pub not_after: time::OffsetDateTime,
    pub files: Vec<PathBuf>,
}

/// Joins: fetches and pins the bundle, certifies with the token, writes
/// the config and the keys. systemd is the caller's next step.
pub async fn join(js: &JoinString, opts: &JoinOptions) -> Result<Joined, JoinError> {
    if !opts.force && opts.config_path.exists() {
        let (workload, cluster) = match AgentConfig::load(&opts.config_path) {
            Ok(c) => (format!("{}/{}", c.namespace, c.workload), c.cluster),
            Err(_) => ("an unknown workload".into(), "an unknown cluster".into()),
        };
        return Err(JoinError::AlreadyJoined {
            workload,
            cluster,
            path: opts.config_path.display().to_string(),
        });
    }
    // Fail before the token is spent if the files cannot be written.
    prepare_dirs(opts)?;
    let td: TrustDomain = js
        .trust_domain
        .parse()
        .map_err(|e| JoinError::Other(format!("trust domain: {e}")))?;
    let address = match opts.address {
        Some(a) => a,
        None => route_source(js.gateway.as_deref().unwrap_or(&js.identity_addr))?,
    };
    let config = AgentConfig {
        cluster: js.cluster.clone(),
        trust_domain: js.trust_domain.clone(),
        identity_addr: js.identity_addr.clone(),
        api_addr: js.api_addr.clone(),
        gateway: js.gateway.clone(),
        namespace: js.namespace.clone(),
        service_account: js.service_account.clone(),
        workload: js.workload.clone(),
        labels: js.labels.clone(),
        ports: js.ports.clone(),
        address,
        app_ip: opts.app_ip,
        inbound_addr: opts.inbound_addr,
        outbound_addr: opts.outbound_addr,
        admin_addr: opts.admin_addr,
        state_dir: opts.state_dir.clone(),
        health: opts.health.clone(),
        workload_api: opts.workload_api.clone(),
        dns: opts.dns.clone(),
        capture: opts.capture.clone(),
    };
    // Refused before the token is spent: a config `run` would refuse.
    config.check().map_err(JoinError::Other)?;
    let bundle = fetch_pinned_bundle(js, &td).await?;
    let identity = SpiffeId::workload(&td, &js.namespace, &js.service_account)
        .map_err(|e| JoinError::Other(e.to_string()))?;
    let enroll = EnrollmentKey::generate().map_err(|e| JoinError::Other(e.to_string()))?;
    let creds = certify_with_token(js, &identity, &bundle, &enroll).await?;

    let state = |name: &str| opts.state_dir.join(name);
    write_credentials(&opts.state_dir, &creds)?;
    files::write_private(&state(BUNDLE), bundle.to_pem().as_bytes())?;
    files::write_private(&state(ENROLL_KEY), enroll.pkcs8())?;
    config
        .save(&opts.config_path)
        .map_err(|e| JoinError::Other(e.to_string()))?;
    Ok(Joined {
        identity,
        not_after: creds.info().not_after,
        files: vec![
            opts.config_path.clone(),
            state(LEAF_CRT),
            state(LEAF_KEY),
            state(BUNDLE),
            state(ENROLL_KEY),
        ],
        config,
    })
}

/// Writes the SVID and its key, 0600.
pub fn write_credentials(state_dir: &Path, creds: &Credentials) -> Result<(), files::FileError> {
    files::write_private(
        &state_dir.join(LEAF_CRT),
        certs_to_pem(creds.chain()).as_bytes(),
    )?;
    files::write_private(
        &state_dir.join(LEAF_KEY),
        key_to_pem(creds.key_der()).as_bytes(),
    )
}

fn prepare_dirs(opts: &JoinOptions) -> Result<(), JoinError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |path: &Path, source| files::FileError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.state_dir)
        .map_err(|e| io(&opts.state_dir, e))?;
    std::fs::set_permissions(&opts.state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io(&opts.state_dir, e))?;
    if let Some(parent) = opts.config_path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| io(parent, e))?;
    }
    // A probe write, so a read-only location fails before the token is used.
    let probe = opts.state_dir.join(".join-probe");
    files::write_private(&probe, b"")?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Fetches the trust bundle and accepts it only if its pin matches.
pub async fn fetch_pinned_bundle(
    js: &JoinString,
    td: &TrustDomain,
) -> Result<TrustBundle, JoinError> {
    let unreachable = |reason: String| JoinError::Unreachable {
        addr: js.identity_addr.clone(),
        reason,
    };
    let tls = tls::client_config_for_pinning().map_err(|e| unreachable(e.to_string()))?;
    let channel = match &js.gateway {
        // Through the gateway: neither it nor the control plane can be
        // verified yet; the pin decides.
        Some(gateway) => crate::via_gateway::identity_channel(gateway, tls.clone(), tls),
        None => grpc::channel(&js.identity_addr, tls).map_err(|e| e.to_string()),
    }
    .map_err(unreachable)?;
    let answer = tokio::time::timeout(
        STEP_TIMEOUT,
        IdentityClient::new(channel).trust_bundle(TrustBundleRequest {}),
    )
    .await
    .map_err(|_| unreachable(format!("no answer in {STEP_TIMEOUT:?}")))?
    .map_err(|s| unreachable(s.message().to_owned()))?
    .into_inner();
    if answer.trust_domain != td.as_str() {
        return Err(JoinError::WrongTrustDomain {
            addr: js.identity_addr.clone(),
            expected: td.to_string(),
            got: answer.trust_domain,
        });
    }
    if answer.roots.len() > 16 {
        return Err(unreachable("the bundle holds more than 16 roots".into()));
    }
    let bundle = TrustBundle::with_roots(
        td.clone(),
        answer.roots.into_iter().map(CertificateDer::from),
    )
    .map_err(|e| unreachable(format!("the served bundle is invalid: {e}")))?;
    let got = bundle.pin();
    if got != js.pin {
        return Err(JoinError::PinMismatch {
            addr: js.identity_addr.clone(),
            expected: js.pin.clone(),
            got,
        });
    }
    Ok(bundle)
}

async fn certify_with_token(
    js: &JoinString,
    identity: &SpiffeId,
    bundle: &TrustBundle,
    enroll: &EnrollmentKey,
) -> Result<Credentials, JoinError> {
    let td = bundle.trust_domain().clone();
    let bundles = BundleStore::new([bundle.clone()].into_iter().collect::<TrustBundleSet>());
    let unreachable = |reason: String| JoinError::Unreachable {
        addr: js
            .gateway
            .clone()
            .unwrap_or_else(|| js.identity_addr.clone()),
        reason,
    };
    let channel = identity_channel(&td, &js.identity_addr, js.gateway.as_deref(), &bundles)
        .map_err(unreachable)?;
    let (key, csr) = new_key_and_csr().map_err(|e| JoinError::Other(e.to_string()))?;
    let request = CertifyRequest {
        identity: identity.to_string(),
        csr,
        token: js.token.clone(),
        enrollment_key: enroll.public_key(),
        ..Default::default()
    };
    let answer = tokio::time::timeout(STEP_TIMEOUT, IdentityClient::new(channel).certify(request))
        .await
        .map_err(|_| unreachable(format!("no answer in {STEP_TIMEOUT:?}")))?;
    let answer = match answer {
        Ok(a) => a.into_inner(),
        Err(s) if mesh_proxy::identity::is_refusal(s.code()) => {
            return Err(JoinError::Refused(s.message().to_owned()));
        }
        Err(s) => return Err(unreachable(s.message().to_owned())),
    };
    let chain = answer.chain.into_iter().map(CertificateDer::from).collect();
    let creds =
        Credentials::new(chain, key).map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    creds
        .check(identity, &bundles.current())
        .map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    Ok(creds)
}

/// A channel to the identity service, verified against `bundles`: direct,
/// or through the gateway (no client certificate on the tunnel).
pub fn identity_channel(
    td: &TrustDomain,
    identity_addr: &str,
    gateway: Option<&str>,
    bundles: &BundleStore,
) -> Result<tonic::transport::Channel, String> {
    let id = |sa: &str| SpiffeId::workload(td, "mesh-system", sa).map_err(|e| e.to_string());
    let expect = |sa: &str| -> Result<rustls::ClientConfig, String> {
        client_config_without_cert(bundles.clone(), ExpectedIdentity::Exact(id(sa)?))
            .map_err(|e| e.to_string())
    };
    match gateway {
        Some(gateway) => {
            crate::via_gateway::identity_channel(gateway, expect("gateway")?, expect("control")?)
        }
        None => grpc::channel(identity_addr, expect("control")?).map_err(|e| e.to_string()),
    }
}

/// The local address of the route to `addr` (no packet is sent).
fn route_source(addr: &str) -> Result<IpAddr, JoinError> {
    use std::net::ToSocketAddrs;
    let err = |reason: String| {
        JoinError::Other(format!(
            "cannot tell this VM's address on the route to {addr} ({reason}); pass --address"
        ))
    };
    let target = addr
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| err(e.to_string()))?;
    socket.connect(target).map_err(|e| err(e.to_string()))?;
    Ok(socket.local_addr().map_err(|e| err(e.to_string()))?.ip())
}
