//! The SPIFFE Workload API (X.509 profile) on a Unix socket, for the VM's
//! apps: `FetchX509SVID` and `FetchX509Bundles`, each a stream that sends
//! the current state at once and again whenever the SVID rotates or a
//! bundle changes.
//!
//! Per the SPIFFE Workload API specification, every call must carry the
//! metadata `workload.spiffe.io: true` (else `InvalidArgument`). Callers are
//! attested by their Unix uid, read from the socket (SO_PEERCRED), against
//! the allow-list in the config; anyone else gets `PermissionDenied`. The
//! socket itself is 0666 so that the check, not the file mode, decides and
//! every refusal is counted. JWT-SVIDs are not served yet (`Unimplemented`).
//! Connections go through `uds`, which lets gRPC C-core clients (py-spiffe)
//! in.

use std::path::{Path, PathBuf};

use mesh_core::identity::{BundleStore, CredentialStore, TrustDomain};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use tokio::{net::UnixListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
pub mod pb {
    tonic::include_proto!("_");
}

use pb::{
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
    spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer},
};

/// The metadata every call must carry.
pub const HEADER: &str = "workload.spiffe.io";

#[derive(Clone, Debug, Default)]
pub struct WorkloadApiMetrics {
    pub refused: Family<crate::health::ReasonLabel, Counter>,
    pub streams: Gauge,
}

impl WorkloadApiMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "mesh_vm_agent_workload_api_refused",
            "Workload API calls refused, by reason (missing_header, uid_not_allowed, no_peer_credentials)",
            self.refused.clone(),
        );
        r.register(
            "mesh_vm_agent_workload_api_streams",
            "Workload API streams open",
            self.streams.clone(),
        );
    }

    fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&crate::health::ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }
}

#[derive(Clone, Debug)]
pub struct WorkloadApi {
    creds: CredentialStore,
    bundles: BundleStore,
    own: TrustDomain,
    allowed_uids: Vec<u32>,
    metrics: WorkloadApiMetrics,
}

impl WorkloadApi {
    pub fn new(
        creds: CredentialStore,
        bundles: BundleStore,
        own: TrustDomain,
        allowed_uids: Vec<u32>,
        metrics: WorkloadApiMetrics,
    ) -> Self {
        Self {
            creds,
            bundles,
            own,
            allowed_uids,
            metrics,
        }
    }

    /// The header, then the caller's uid.
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let header = req.metadata().get(HEADER).and_then(|v| v.to_str().ok());
        if header != Some("true") {
            self.metrics.refuse("missing_header");
            return Err(Status::invalid_argument(format!(
                "security header missing from request: set the gRPC metadata `{HEADER}: true`"
            )));
        }
        let uid = req
            .extensions()
            .get::<crate::uds::PeerUid>()
            .and_then(|peer| peer.0);
        let Some(uid) = uid else {
            self.metrics.refuse("no_peer_credentials");
            return Err(Status::permission_denied(
                "the caller's credentials could not be read from the socket",
            ));
        };
        if !self.allowed_uids.contains(&uid) {
            self.metrics.refuse("uid_not_allowed");
            tracing::warn!(
                uid,
                "Workload API: refused a caller whose uid is not allowed"
            );
            return Err(Status::permission_denied(format!(
                "uid {uid} may not fetch this VM's identity; allow it with `mesh-vm-agent join --workload-api-uid {uid}` (or in workload_api.allowed_uids)"
            )));
        }
        Ok(())
    }

    fn svid_response(&self) -> X509svidResponse {
        let creds = self.creds.current();
        let bundles = self.bundles.current();
        let own = bundles
            .get(&self.own)
            .map(|b| der_concat(b.roots()))
            .unwrap_or_default();
        X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: creds.id().to_string(),
                x509_svid: der_concat(creds.chain()),
                x509_svid_key: creds.key_der().secret_der().to_vec(),
                bundle: own,
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: bundles
                .iter()
                .filter(|b| *b.trust_domain() != self.own)
                .map(|b| (td_id(b.trust_domain()), der_concat(b.roots())))
                .collect(),
        }
    }

    fn bundles_response(&self) -> X509BundlesResponse {
        X509BundlesResponse {
            crl: Vec::new(),
            bundles: self
                .bundles
                .current()
                .iter()
                .map(|b| (td_id(b.trust_domain()), der_concat(b.roots())))
                .collect(),
        }
    }

    /// Sends `make()` now and after every rotation or bundle change, until
    /// the caller goes away.
    fn stream<T: Send + 'static>(
        &self,
        make: impl Fn(&Self) -> T + Send + 'static,
    ) -> ReceiverStream<Result<T, Status>> {
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut creds = this.creds.subscribe();
            let mut bundles = this.bundles.subscribe();
            this.metrics.streams.inc();
            loop {
                if tx.send(Ok(make(&this))).await.is_err() {
                    break;
                }
                tokio::select! {
                    changed = creds.changed() => if changed.is_err() { break },
                    changed = bundles.changed() => if changed.is_err() { break },
                    () = tx.closed() => break,
                }
            }
            this.metrics.streams.dec();
        });
        ReceiverStream::new(rx)
    }
}

/// `spiffe://<td>`, how the spec keys bundles.
fn td_id(td: &TrustDomain) -> String {
    format!("spiffe://{td}")
}

fn der_concat(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ReceiverStream<Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.admit(&request)?;
        Ok(Response::new(self.stream(Self::svid_response)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.admit(&request)?;
        Ok(Response::new(self.stream(Self::bundles_response)))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Workload API socket {}: {source}", path.display())]
pub struct SocketError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Binds the socket (replacing a stale one), mode 0666: the uid check
/// decides who is served.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    mesh_core::unix_socket::bind(path, 0o666).map_err(|source| SocketError {
        path: path.to_owned(),
        source,
    })
}

/// Serves the Workload API until the task is dropped.
pub async fn serve(listener: UnixListener, api: WorkloadApi) {
    // Bounded: at most 256 connections (`uds`), each with at most 16
    // streams, each one task and a 4-message buffer.
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(16))
        .add_service(SpiffeWorkloadApiServer::new(api))
        .serve_with_incoming(crate::uds::incoming(listener))
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "the Workload API server stopped");
    }
}
