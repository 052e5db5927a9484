//! The admin socket: a Unix socket (mode 0600, same user or root only)
//! through which `mesh control token create` reaches a running control
//! plane. One JSON request line in, one JSON response line out.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    metrics::Metrics,
    resources::parse::check_name,
    store::{Store, TokenRecord, WorkloadClaims},
    tokens,
};

/// The socket file inside `--data-dir` unless `--admin-socket` says otherwise.
pub const SOCKET_FILE: &str = "admin.sock";
/// Longest join token lifetime accepted.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_REQUEST: u64 = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    CreateToken {
        namespace: String,
        service_account: String,
        ttl_seconds: u64,
        /// The workload it is for (what its identity may register).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        claims: Option<WorkloadClaims>,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Who issued it, for a join string: the cluster, its trust domain and
    /// the pin of its trust bundle (`TrustBundle::pin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterFacts>,
}

/// What a joining VM must be told about this cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFacts {
    pub cluster: String,
    pub trust_domain: String,
    pub bundle_pin: String,
}

/// Where [`ClusterFacts`] come from in a running control plane.
#[derive(Clone, Debug)]
pub struct Facts {
    pub cluster: String,
    pub trust_domain: mesh_core::identity::TrustDomain,
    pub bundles: mesh_core::identity::BundleStore,
}

impl Facts {
    /// The facts as of now (the bundle may have rotated since start).
    pub fn now(&self) -> Option<ClusterFacts> {
        let bundles = self.bundles.current();
        let bundle = bundles.get(&self.trust_domain)?;
        Some(ClusterFacts {
            cluster: self.cluster.clone(),
            trust_domain: self.trust_domain.to_string(),
            bundle_pin: bundle.pin(),
        })
    }
}

/// Creates and stores a join token; returns it (shown once) and its record.
pub fn create_token(
    store: &dyn Store,
    namespace: &str,
    service_account: &str,
    ttl: Duration,
    now: i64,
    claims: Option<WorkloadClaims>,
) -> Result<(String, TokenRecord), String> {
    if let Some(claims) = &claims {
        claims.check()?;
    }
    check_name("namespace", namespace)?;
    check_name("service account", service_account)?;
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(format!(
            "token lifetime must be between 1s and {}",
            humantime::format_duration(MAX_TOKEN_TTL)
        ));
    }
    let token = tokens::generate();
    let hash = tokens::hash(&token).expect("generated tokens are well formed");
    let record = TokenRecord {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        created_at: now,
        expires_at: now + ttl.as_secs() as i64,
        used_at: None,
        claims,
    };
    store
        .create_token(&hash, &record)
        .map_err(|e| e.to_string())?;
    Ok((token, record))
}

/// Why the admin socket could not be served.
#[derive(Debug, thiserror::Error)]
#[error("admin socket {}: {source}", path.display())]
pub struct SocketError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Binds the socket (replacing a stale file) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    mesh_core::unix_socket::bind(path, 0o600).map_err(|source| SocketError {
        path: path.to_owned(),
        source,
    })
}

/// Serves admin requests until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    store: Arc<dyn Store>,
    metrics: Metrics,
    facts: Facts,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (store, metrics, path) = (store.clone(), metrics.clone(), path.clone());
        let facts = facts.now();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &path, store, &metrics, facts).await {
                tracing::warn!(error = %e, "admin socket request failed");
            }
        });
    }
}

async fn handle(
    stream: UnixStream,
    path: &Path,
    store: Arc<dyn Store>,
    metrics: &Metrics,
    facts: Option<ClusterFacts>,
) -> std::io::Result<()> {
    // The file mode already keeps others out; check the peer as well, in
    // case the directory or mode was loosened.
    let owner = std::fs::metadata(path)?.uid();
    let peer = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let response = if peer != owner && peer != 0 {
        tracing::warn!(
            peer_uid = peer,
            "admin socket: refused a request from another user"
        );
        AdminResponse {
            error: Some(format!("uid {peer} may not use this admin socket")),
            ..Default::default()
        }
    } else {
        let mut line = String::new();
        BufReader::new(read.take(MAX_REQUEST))
            .read_line(&mut line)
            .await?;
        match serde_json::from_str::<AdminRequest>(&line) {
            Err(e) => AdminResponse {
                error: Some(format!("malformed admin request: {e}")),
                ..Default::default()
            },
            Ok(AdminRequest::CreateToken {
                namespace,
                service_account,
                ttl_seconds,
                claims,
            }) => {
                let now = mesh_core::identity::cert::now().unix_timestamp();
                let ttl = Duration::from_secs(ttl_seconds);
                let created = tokio::task::spawn_blocking(move || {
                    create_token(
                        store.as_ref(),
                        &namespace,
                        &service_account,
                        ttl,
                        now,
                        claims,
                    )
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                match created {
                    Ok((token, record)) => {
                        metrics.tokens_created.inc();
                        tracing::info!(
                            namespace = %record.namespace,
                            service_account = %record.service_account,
                            expires_at = record.expires_at,
                            "join token created"
                        );
                        AdminResponse {
                            token: Some(token),
                            expires_at: Some(record.expires_at),
                            error: None,
                            cluster: facts,
                        }
                    }
                    Err(e) => AdminResponse {
                        error: Some(e),
                        ..Default::default()
                    },
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Sends one request to a running control plane.
pub async fn request(path: &Path, req: &AdminRequest) -> std::io::Result<AdminResponse> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(read).read_line(&mut answer).await?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

#[cfg(test)]
mod bind_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// The socket appears at its path already 0600 (it was given its mode
    /// before it was put there), and nothing is left beside it.
    #[tokio::test]
    async fn the_socket_arrives_with_its_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(SOCKET_FILE);
        let _listener = bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        UnixStream::connect(&path).await.unwrap();
    }
}
