//! `mesh.v1.Identity/Certify`: join token -> first SVID; current SVID ->
//! renewal of the same ID.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use mesh_core::{
    api::v1::{
        CertifyRequest, CertifyResponse, TrustBundleRequest, TrustBundleResponse,
        identity_server::Identity,
    },
    grpc,
    identity::{
        BundleStore, CertificateAuthority, SpiffeId, TrustDomain, ca::CaError, cert::now,
        csr::MAX_CSR_LEN, enroll,
    },
};
use tonic::{Code, Request, Response, Status};

use crate::{
    metrics::{CertifyLabels, Metrics},
    ratelimit::RateLimiter,
    store::{SerialRecord, Store, TokenError},
    tokens,
};

/// The CA that signs, swappable when the issuer files are reloaded.
pub type CaSlot = Arc<RwLock<Arc<CertificateAuthority>>>;

pub fn current_ca(slot: &CaSlot) -> Arc<CertificateAuthority> {
    slot.read().unwrap_or_else(|p| p.into_inner()).clone()
}

#[derive(Clone, Debug)]
pub struct IdentityService {
    pub ca: CaSlot,
    pub trust_domain: TrustDomain,
    pub bundles: BundleStore,
    pub store: Arc<dyn Store>,
    pub limiter: Arc<RateLimiter>,
    pub metrics: Metrics,
    /// Default and maximum leaf lifetime.
    pub leaf_ttl: Duration,
    /// On the `kube` store: service-account tokens are checked with the
    /// API server's TokenReview.
    pub reviewer: Option<crate::k8s::review::TokenReviewer>,
}

/// A refusal: the gRPC status and the metric reason.
struct Refusal {
    reason: &'static str,
    status: Status,
}

fn refuse(reason: &'static str, code: Code, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        status: Status::new(code, message),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = grpc::peer(&request).cloned();
        self.handle(peer.as_ref(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn trust_bundle(
        &self,
        _request: Request<TrustBundleRequest>,
    ) -> Result<Response<TrustBundleResponse>, Status> {
        // Public facts: the roots verify this control plane's certificate,
        // which every client sees anyway.
        let roots = self
            .bundles
            .current()
            .get(&self.trust_domain)
            .map(|b| b.roots().iter().map(|r| r.to_vec()).collect())
            .unwrap_or_default();
        Ok(Response::new(TrustBundleResponse {
            trust_domain: self.trust_domain.to_string(),
            roots,
        }))
    }
}

impl IdentityService {
    /// Answers one Certify request from `peer` (the verified TLS peer, if
    /// any): the whole handler, metrics and logs included.
    pub async fn handle(
        &self,
        peer: Option<&grpc::PeerInfo>,
        request: CertifyRequest,
    ) -> Result<CertifyResponse, Status> {
        let started = Instant::now();
        let result = self.certify(peer, request).await;
        self.metrics
            .certify_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(response) => Ok(response),
            Err(refusal) => {
                self.metrics.refuse_certify(refusal.reason);
                tracing::warn!(
                    peer = ?peer.as_ref().map(|p| p.remote),
                    peer_id = ?peer.as_ref().and_then(|p| p.identity.as_ref()).map(SpiffeId::as_str),
                    reason = refusal.reason,
                    "Certify refused: {}",
                    refusal.status.message()
                );
                Err(refusal.status)
            }
        }
    }

    async fn certify(
        &self,
        peer: Option<&grpc::PeerInfo>,
        req: CertifyRequest,
    ) -> Result<CertifyResponse, Refusal> {
        let requested = SpiffeId::parse(&req.identity).map_err(|e| {
            refuse(
                "bad_identity",
                Code::InvalidArgument,
                format!("identity {:?}: {e}", req.identity),
            )
        })?;
        if !requested.is_member_of(&self.trust_domain) {
            return Err(refuse(
                "foreign_trust_domain",
                Code::InvalidArgument,
                format!(
                    "this control plane issues only for trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        if req.csr.len() > MAX_CSR_LEN {
            return Err(refuse(
                "bad_csr",
                Code::InvalidArgument,
                format!("CSR is over {MAX_CSR_LEN} bytes"),
            ));
        }
        let ttl = match req.ttl_seconds {
            0 => self.leaf_ttl,
            s => Duration::from_secs(s).min(self.leaf_ttl),
        };
        if req.token.is_empty() && !req.workload.is_empty() {
            self.reenroll(peer, requested, &req, ttl).await
        } else if req.token.is_empty() {
            self.renew(peer, requested, &req.csr, ttl).await
        } else {
            // Unauthenticated: limited by the caller's address, which costs
            // nothing to look up, before the token store is read. (The
            // identity's own budget applies too, once the token names it.)
            if let Some(peer) = peer {
                self.limit_key(&format!("ip:{}", peer.remote.ip()), "this address")?;
            }
            match &self.reviewer {
                Some(reviewer) if crate::k8s::review::looks_like_jwt(&req.token) => {
                    self.redeem_service_account(reviewer, &req.token, requested, &req.csr, ttl)
                        .await
                }
                _ => {
                    let key = enrollment_key(&req.enrollment_key)?;
                    self.redeem(&req.token, requested, &req.csr, ttl, key).await
                }
            }
        }
    }

    async fn redeem(
        &self,
        token: &str,
        requested: SpiffeId,
        csr: &[u8],
        ttl: Duration,
        enrollment_key: Option<String>,
    ) -> Result<CertifyResponse, Refusal> {
        let hash = tokens::hash(token).ok_or_else(|| {
            refuse(
                "token_malformed",
                Code::Unauthenticated,
                "join token is malformed; tokens come from `mesh control token create`",
            )
        })?;
        let store = self.store.clone();
        let record = blocking(move || store.get_token(&hash))
            .await?
            .ok_or_else(|| refuse("token_unknown", Code::Unauthenticated, "unknown join token"))?;
        let bound = SpiffeId::workload(
            &self.trust_domain,
            &record.namespace,
            &record.service_account,
        )
        .map_err(|e| {
            refuse(
                "store",
                Code::Internal,
                format!("stored token names a bad identity: {e}"),
            )
        })?;
        self.limit(&bound)?;
        let now_s = now().unix_timestamp();
        let early = match record.used_at {
            Some(at) => Some(TokenError::Used { at }),
            None if record.expires_at <= now_s => Some(TokenError::Expired {
                ago: now_s - record.expires_at,
            }),
            None => None,
        };
        if let Some(e) = early {
            return Err(token_refusal(e));
        }
        if requested != bound {
            return Err(refuse(
                "token_identity_mismatch",
                Code::PermissionDenied,
                format!("this join token is for {bound}, not {requested}"),
            ));
        }
        let response = self.sign(csr, &requested, ttl)?;
        let mut serial = self.serial_record(&response, &requested, "token");
        serial.enrollment_key = enrollment_key;
        let store = self.store.clone();
        blocking(move || store.consume_token(&hash, now_s, &serial))
            .await?
            .map_err(token_refusal)?;
        self.issued("token");
        Ok(response)
    }

    /// A Kubernetes service-account token: the API server says whose it
    /// is, and only that service account's SPIFFE ID is issued.
    async fn redeem_service_account(
        &self,
        reviewer: &crate::k8s::review::TokenReviewer,
        token: &str,
        requested: SpiffeId,
        csr: &[u8],
        ttl: Duration,
    ) -> Result<CertifyResponse, Refusal> {
        let reviewed = reviewer.review(token).await.map_err(|e| {
            let code = match e {
                crate::k8s::review::Refused::Unavailable(_) => Code::Unavailable,
                _ => Code::Unauthenticated,
            };
            refuse(e.reason(), code, e.to_string())
        })?;
        let bound = SpiffeId::workload(
            &self.trust_domain,
            &reviewed.namespace,
            &reviewed.service_account,
        )
        .map_err(|e| {
            refuse(
                "token_invalid",
                Code::Unauthenticated,
                format!("the token's service account is not a valid identity: {e}"),
            )
        })?;
        self.limit(&bound)?;
        if requested != bound {
            return Err(refuse(
                "token_identity_mismatch",
                Code::PermissionDenied,
                format!("this service-account token is for {bound}, not {requested}"),
            ));
        }
        self.issue_recorded(csr, &requested, ttl, "service_account")
            .await
    }

    async fn renew(
        &self,
        peer: Option<&grpc::PeerInfo>,
        requested: SpiffeId,
        csr: &[u8],
        ttl: Duration,
    ) -> Result<CertifyResponse, Refusal> {
        let Some(current) = peer.and_then(|p| p.identity.clone()) else {
            return Err(refuse(
                "no_credentials",
                Code::Unauthenticated,
                "present a join token (first issuance) or your current SVID as client certificate (renewal)",
            ));
        };
        self.limit(&current)?;
        if requested != current {
            return Err(refuse(
                "renewal_identity_mismatch",
                Code::Unauthenticated,
                format!(
                    "your certificate is for {current}; a renewal may only ask for that same ID, not {requested}"
                ),
            ));
        }
        self.issue_recorded(csr, &requested, ttl, "renewal").await
    }

    /// A workload whose SVID expired proves it holds the enrollment key its
    /// grant recorded at join (see `mesh_core::identity::enroll`).
    async fn reenroll(
        &self,
        peer: Option<&grpc::PeerInfo>,
        requested: SpiffeId,
        req: &CertifyRequest,
        ttl: Duration,
    ) -> Result<CertifyResponse, Refusal> {
        if let Some(peer) = peer {
            self.limit_key(&format!("ip:{}", peer.remote.ip()), "this address")?;
        }
        self.limit(&requested)?;
        let denied = |why: String| refuse("enrollment_refused", Code::PermissionDenied, why);
        let Some(namespace) = crate::services::workload_namespace(&requested) else {
            return Err(denied(format!(
                "{requested} is not a workload identity; only workloads re-enroll"
            )));
        };
        if crate::resources::parse::check_name("workload", &req.workload).is_err() {
            return Err(refuse(
                "bad_workload",
                Code::InvalidArgument,
                format!("workload {:?} is not a valid name", req.workload),
            ));
        }
        let store = self.store.clone();
        let (ns, name) = (namespace.clone(), req.workload.clone());
        let grant = blocking(move || store.grant(&ns, &name)).await?;
        let rejoin = format!(
            "create a new token with `mesh vm token create --namespace {namespace} --workload {}` and join again",
            req.workload
        );
        let Some(grant) = grant else {
            return Err(denied(format!(
                "workload {namespace}/{} has no grant (it left, or never joined); {rejoin}",
                req.workload
            )));
        };
        if grant.spiffe_id != requested.as_str() {
            return Err(denied(format!(
                "workload {namespace}/{} belongs to {}, not {requested}",
                req.workload, grant.spiffe_id
            )));
        }
        let Some(key) = grant.enrollment_key.as_deref() else {
            return Err(denied(format!(
                "workload {namespace}/{} joined without an enrollment key, so it cannot re-enroll; {rejoin}",
                req.workload
            )));
        };
        if !enroll::verify(
            key,
            requested.as_str(),
            &req.workload,
            &req.csr,
            &req.enrollment_signature,
        ) {
            return Err(denied(format!(
                "the re-enrollment of {namespace}/{} is not signed by the key it joined with",
                req.workload
            )));
        }
        self.issue_recorded(&req.csr, &requested, ttl, "reenrollment")
            .await
    }

    /// Signs `id` and records the serial: the end of every path that has
    /// no token to consume.
    async fn issue_recorded(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        via: &'static str,
    ) -> Result<CertifyResponse, Refusal> {
        let response = self.sign(csr, id, ttl)?;
        let serial = self.serial_record(&response, id, via);
        let store = self.store.clone();
        blocking(move || store.record_serial(&serial)).await?;
        self.issued(via);
        Ok(response)
    }

    fn limit(&self, id: &SpiffeId) -> Result<(), Refusal> {
        self.limit_key(id.as_str(), id.as_str())
    }

    /// One request from `key`'s budget; `who` names it in the refusal.
    fn limit_key(&self, key: &str, who: &str) -> Result<(), Refusal> {
        self.limiter.check(key, Instant::now()).map_err(|wait| {
            refuse(
                "rate_limited",
                Code::ResourceExhausted,
                format!(
                    "{who} is certifying too often; retry in {} ms",
                    wait.as_millis().max(1)
                ),
            )
        })
    }

    fn sign(&self, csr: &[u8], id: &SpiffeId, ttl: Duration) -> Result<CertifyResponse, Refusal> {
        let ca = current_ca(&self.ca);
        let svid = ca.sign_csr(csr, id, ttl).map_err(|e| match e {
            CaError::Csr(e) => refuse("bad_csr", Code::InvalidArgument, e.to_string()),
            other => refuse("cannot_sign", Code::Unavailable, other.to_string()),
        })?;
        let anchors = self
            .bundles
            .current()
            .get(&self.trust_domain)
            .map(|b| b.roots().iter().map(|r| r.to_vec()).collect())
            .unwrap_or_default();
        Ok(CertifyResponse {
            chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
            not_before: svid.not_before.unix_timestamp(),
            not_after: svid.not_after.unix_timestamp(),
            serial: svid.serial,
            trust_anchors: anchors,
        })
    }

    fn serial_record(&self, r: &CertifyResponse, id: &SpiffeId, via: &str) -> SerialRecord {
        SerialRecord {
            serial: r.serial.clone(),
            spiffe_id: id.to_string(),
            not_after: r.not_after,
            issued_at: now().unix_timestamp(),
            via: via.to_owned(),
            enrollment_key: None,
        }
    }

    fn issued(&self, via: &str) {
        self.metrics
            .certify_issued
            .get_or_create(&CertifyLabels { via: via.into() })
            .inc();
    }
}

/// The enrollment key given with a token, checked for shape.
fn enrollment_key(key: &[u8]) -> Result<Option<String>, Refusal> {
    if key.is_empty() {
        return Ok(None);
    }
    if !enroll::valid_public_key(key) {
        return Err(refuse(
            "bad_enrollment_key",
            Code::InvalidArgument,
            "enrollment_key must be an uncompressed P-256 point (65 bytes)",
        ));
    }
    Ok(Some(enroll::encode_public_key(key)))
}

fn token_refusal(e: TokenError) -> Refusal {
    let code = match e {
        TokenError::Unknown => {
            return refuse("token_unknown", Code::Unauthenticated, e.to_string());
        }
        TokenError::Used { .. } => Code::AlreadyExists,
        TokenError::Expired { .. } => Code::FailedPrecondition,
    };
    let reason = if code == Code::AlreadyExists {
        "token_reused"
    } else {
        "token_expired"
    };
    refuse(reason, code, e.to_string())
}

/// Runs a store call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Refusal> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(refuse("store", Code::Internal, e.to_string())),
        Err(e) => Err(refuse("store", Code::Internal, e.to_string())),
    }
}
