//! Verifying a peer's X.509-SVID chain.
//!
//! Order of checks: bounded shape first (no crypto spent on an oversized
//! chain), then the leaf's SVID rules and validity, then the chain against
//! the bundle of the **peer's own** trust domain (named by its SVID, never a
//! merged pool), and last the identity the caller expected.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    sync::Mutex,
    time::Duration,
};

use rustls::pki_types::TrustAnchor;
use rustls::pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use webpki::{EndEntityCert, KeyUsage};

use super::{
    bundle::TrustBundleSet,
    cert::{CertError, CertInfo, LeafMemo, der_digest, human_duration},
    spiffe_id::{SpiffeId, TrustDomain},
    svid::{SvidError, leaf_spiffe_id},
};

/// Intermediates a peer may present: issuer, plus two levels for
/// organisations that chain cluster issuers under a shared intermediate.
pub const MAX_INTERMEDIATES: usize = 3;
/// A certificate larger than this is refused unparsed.
pub const MAX_CERT_LEN: usize = 16 * 1024;

/// Which identities a caller accepts from the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectedIdentity {
    /// Exactly this SPIFFE ID (an outbound call to a known destination).
    Exact(SpiffeId),
    /// Any of these SPIFFE IDs (a destination served by several identities).
    AnyOf(BTreeSet<SpiffeId>),
    /// Any ID in these trust domains (an inbound port; policy decides later).
    TrustDomains(BTreeSet<TrustDomain>),
    /// Any ID whose own trust domain's bundle verified it: the trust
    /// domains are those of the bundle set at handshake time (a control
    /// plane's API, which linked clusters reach; each RPC then decides).
    AnyTrusted,
}

impl ExpectedIdentity {
    pub fn trust_domain(td: TrustDomain) -> Self {
        Self::TrustDomains(BTreeSet::from([td]))
    }

    pub fn accepts(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::AnyOf(set) => set.contains(id),
            Self::TrustDomains(tds) => tds.iter().any(|td| id.is_member_of(td)),
            Self::AnyTrusted => true,
        }
    }
}

impl fmt::Display for ExpectedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |items: Vec<&str>| items.join(", ");
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::AnyOf(ids) => write!(
                f,
                "one of [{}]",
                join(ids.iter().map(SpiffeId::as_str).collect())
            ),
            Self::TrustDomains(tds) => write!(
                f,
                "any identity in trust domain(s) [{}]",
                join(tds.iter().map(TrustDomain::as_str).collect())
            ),
            Self::AnyTrusted => write!(f, "any identity of a trusted trust domain"),
        }
    }
}

/// The role the peer plays in the handshake, which decides the EKU checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerRole {
    Server,
    Client,
}

/// Why a peer's chain was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error(
        "peer {id} was issued by a CA of trust domain {issuer_td}; a CA may only issue for its own trust domain"
    )]
    IssuerTrustDomainMismatch {
        id: SpiffeId,
        issuer_td: TrustDomain,
    },
    #[error(
        "peer chain holds {intermediates} intermediates; at most {MAX_INTERMEDIATES} are accepted"
    )]
    ChainTooDeep { intermediates: usize },
    #[error("peer certificate is {len} bytes; the limit is {MAX_CERT_LEN}")]
    CertTooLarge { len: usize },
    #[error("peer certificate is malformed: {0}")]
    Malformed(#[from] CertError),
    #[error("peer certificate is not a valid X.509-SVID: {0}")]
    Svid(#[from] SvidError),
    #[error("peer SVID for {id} is not valid for another {}", human_duration(*.wait))]
    NotYetValid { id: SpiffeId, wait: Duration },
    #[error("peer SVID for {id} expired {} ago", human_duration(*.ago))]
    Expired { id: SpiffeId, ago: Duration },
    #[error(
        "peer {id} is from trust domain {td}, which is not trusted here; link it (`mesh multicluster link`) or add its bundle"
    )]
    UnknownTrustDomain { id: SpiffeId, td: TrustDomain },
    #[error("peer {id} does not chain to a root of trust domain {td}: {reason}")]
    UntrustedChain {
        id: SpiffeId,
        td: TrustDomain,
        reason: webpki::Error,
    },
    #[error("peer is {got}, but {expected} was expected")]
    UnexpectedIdentity {
        got: SpiffeId,
        expected: ExpectedIdentity,
    },
}

impl VerifyError {
    /// A short, stable label for metrics (`reason="expired"` and so on).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::ChainTooDeep { .. } => "chain_too_deep",
            Self::CertTooLarge { .. } => "cert_too_large",
            Self::Malformed(_) => "malformed",
            Self::Svid(SvidError::LeafIsCa { .. }) => "leaf_is_ca",
            Self::Svid(SvidError::MultipleUriSans { .. }) => "multiple_uri_sans",
            Self::Svid(_) => "not_an_svid",
            Self::IssuerTrustDomainMismatch { .. } => "issuer_trust_domain_mismatch",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::Expired { .. } => "expired",
            Self::UnknownTrustDomain { .. } => "unknown_trust_domain",
            Self::UntrustedChain { .. } => "untrusted_chain",
            Self::UnexpectedIdentity { .. } => "unexpected_identity",
        }
    }
}

/// Issuers whose chain to a root was fully verified, so that later
/// handshakes only check the leaf's signature against them: one ECDSA
/// verification instead of two. An entry is used only with the same roots
/// it was verified against and until the issuer expires. Under each issuer,
/// the leaves whose signature checked out (by SHA-256 of their DER): a peer
/// reconnecting with the same certificate costs no chain signature at all.
/// Every handshake still checks the leaf's validity, SVID rules and
/// identity, and the peer's proof that it holds the leaf's key.
#[derive(Debug, Default)]
pub struct VerifiedIssuers(Mutex<Vec<VerifiedIssuer>>);

#[derive(Debug)]
struct VerifiedIssuer {
    issuer: CertificateDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    anchor: TrustAnchor<'static>,
    not_after: u64,
    /// The trust domains the issuer's URI SANs name.
    domains: Vec<TrustDomain>,
    /// Leaves whose signature by this issuer (and key usage for a role)
    /// checked out: SHA-256 of the leaf's DER and the role -> the leaf's
    /// expiry. They go with the issuer when its roots change.
    leaves: HashMap<([u8; 32], PeerRole), u64>,
}

/// Enough for every issuer a proxy meets (one per linked trust domain).
const VERIFIED_ISSUERS: usize = 16;
/// Leaves remembered per issuer: a proxy's distinct peers, with room for
/// each one's rotation. Past this, expired entries go, then any entry.
const VERIFIED_LEAVES: usize = 1024;

/// The trust domains an issuer's SPIFFE URI SANs name.
fn issuer_domains(info: &CertInfo) -> Vec<TrustDomain> {
    info.uri_sans
        .iter()
        .filter_map(|u| SpiffeId::parse(u).ok())
        .map(|id| id.trust_domain())
        .collect()
}

/// What the cache knows of a leaf and its one issuer.
enum Known {
    /// The issuer is not remembered with these roots: verify the chain.
    Nothing,
    /// The issuer is: verify the leaf against it.
    Issuer(TrustAnchor<'static>),
    /// This very leaf (same DER, same role) verified under that issuer.
    Leaf,
}

impl VerifiedIssuers {
    /// One look at the cache for `leaf` (by digest and role) under `issuer`
    /// with these roots, both still within their validity.
    fn known(
        &self,
        issuer: &CertificateDer<'_>,
        roots: &[CertificateDer<'static>],
        leaf: &([u8; 32], PeerRole),
        now: UnixTime,
    ) -> Known {
        let cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.iter().find(|e| {
            e.issuer.as_ref() == issuer.as_ref() && e.roots == roots && now.as_secs() < e.not_after
        });
        match entry {
            None => Known::Nothing,
            Some(e) if e.leaves.get(leaf).is_some_and(|&t| now.as_secs() < t) => Known::Leaf,
            Some(e) => Known::Issuer(e.anchor.clone()),
        }
    }

    /// Notes that `leaf` verified under `issuer` (already remembered with
    /// these roots) for a role, until `not_after`.
    fn remember_leaf(
        &self,
        issuer: &CertificateDer<'_>,
        roots: &[CertificateDer<'static>],
        leaf: ([u8; 32], PeerRole),
        not_after: u64,
        now: UnixTime,
    ) {
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = cache
            .iter_mut()
            .find(|e| e.issuer.as_ref() == issuer.as_ref() && e.roots == roots)
        else {
            return;
        };
        if entry.leaves.len() >= VERIFIED_LEAVES {
            entry.leaves.retain(|_, until| now.as_secs() < *until);
        }
        if entry.leaves.len() >= VERIFIED_LEAVES
            && let Some(any) = entry.leaves.keys().next().copied()
        {
            entry.leaves.remove(&any);
        }
        entry.leaves.insert(leaf, not_after);
    }

    /// The trust domains a remembered issuer names (a fact of its bytes,
    /// whatever roots it was verified against), sparing a parse.
    fn domains(&self, issuer: &CertificateDer<'_>) -> Option<Vec<TrustDomain>> {
        let cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .iter()
            .find(|e| e.issuer.as_ref() == issuer.as_ref())
            .map(|e| e.domains.clone())
    }

    fn remember(&self, issuer: &CertificateDer<'_>, roots: &[CertificateDer<'static>]) {
        let Ok(info) = CertInfo::parse(issuer) else {
            return;
        };
        let issuer = CertificateDer::from(issuer.to_vec());
        let Ok(anchor) = webpki::anchor_from_trusted_cert(&issuer).map(|a| a.to_owned()) else {
            return;
        };
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|e| e.issuer != issuer);
        if cache.len() >= VERIFIED_ISSUERS {
            cache.remove(0);
        }
        cache.push(VerifiedIssuer {
            issuer,
            roots: roots.to_vec(),
            anchor,
            not_after: u64::try_from(info.not_after.unix_timestamp()).unwrap_or(0),
            domains: issuer_domains(&info),
            leaves: HashMap::new(),
        });
    }
}

/// Verifies `chain` (leaf first) and returns the peer's SPIFFE ID.
pub fn verify_peer(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundleSet,
    expected: &ExpectedIdentity,
    role: PeerRole,
    now: UnixTime,
) -> Result<SpiffeId, VerifyError> {
    verify_peer_with(chain, bundles, expected, role, now, None)
}

/// [`verify_peer`], reusing (and filling) `issuers` when the chain is a
/// leaf and one issuer.
pub fn verify_peer_with(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundleSet,
    expected: &ExpectedIdentity,
    role: PeerRole,
    now: UnixTime,
    issuers: Option<&VerifiedIssuers>,
) -> Result<SpiffeId, VerifyError> {
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
    if intermediates.len() > MAX_INTERMEDIATES {
        return Err(VerifyError::ChainTooDeep {
            intermediates: intermediates.len(),
        });
    }
    if let Some(big) = chain.iter().find(|c| c.len() > MAX_CERT_LEN) {
        return Err(VerifyError::CertTooLarge { len: big.len() });
    }

    // One digest names the leaf in the parse memo and in the cache below.
    let digest = der_digest(leaf);
    let info = LeafMemo::shared().parse_digested(leaf, digest)?;
    let id = leaf_spiffe_id(&info)?;
    let now_dt = OffsetDateTime::from_unix_timestamp(now.as_secs() as i64)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    if now_dt < info.not_before {
        let wait = (info.not_before - now_dt).unsigned_abs();
        return Err(VerifyError::NotYetValid { id, wait });
    }
    if let Err(ago) = info.remaining(now_dt) {
        return Err(VerifyError::Expired { id, ago });
    }

    // With a root shared by several trust domains, the root alone cannot
    // tell their issuers apart. Mesh issuers name their trust domain, so an
    // issuer of one domain cannot vouch for another's IDs.
    for der in intermediates {
        let domains = match issuers.and_then(|c| c.domains(der)) {
            Some(domains) => domains,
            None => issuer_domains(&CertInfo::parse(der)?),
        };
        if let Some(other) = domains
            .into_iter()
            .find(|d| d.as_str() != id.trust_domain_str())
        {
            return Err(VerifyError::IssuerTrustDomainMismatch {
                id,
                issuer_td: other,
            });
        }
    }

    let td = id.trust_domain();
    let Some(bundle) = bundles.get(&td) else {
        return Err(VerifyError::UnknownTrustDomain { id, td });
    };
    let untrusted = |reason| VerifyError::UntrustedChain {
        id: id.clone(),
        td: td.clone(),
        reason,
    };
    let usage = match role {
        PeerRole::Server => KeyUsage::server_auth(),
        PeerRole::Client => KeyUsage::client_auth(),
    };
    // A chain of [leaf, issuer]: one look at the cache.
    let cached = match (issuers, intermediates) {
        (Some(cache), [issuer]) => {
            let seen = (digest, role);
            let known = cache.known(issuer, bundle.roots(), &seen, now);
            Some((cache, issuer, seen, known))
        }
        _ => None,
    };
    match cached {
        // The leaf's signature and key usage are facts about its exact
        // bytes: this leaf (same DER, same role) was checked under this
        // issuer before. Its validity was checked above, now.
        Some((.., Known::Leaf)) => {}
        // The issuer's own chain was verified against these same roots.
        Some((cache, issuer, seen, Known::Issuer(anchor))) => {
            EndEntityCert::try_from(leaf)
                .map_err(untrusted)?
                .verify_for_usage(
                    webpki::ALL_VERIFICATION_ALGS,
                    &[anchor],
                    &[],
                    now,
                    usage,
                    None,
                    None,
                )
                .map_err(untrusted)?;
            let until = u64::try_from(info.not_after.unix_timestamp()).unwrap_or(0);
            cache.remember_leaf(issuer, bundle.roots(), seen, until, now);
        }
        _ => {
            let ee = EndEntityCert::try_from(leaf).map_err(untrusted)?;
            let anchors = bundle
                .roots()
                .iter()
                .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(untrusted)?;
            // webpki bounds the work itself: at most 100 signature checks and a
            // bounded number of path-building steps per call.
            let path = ee
                .verify_for_usage(
                    webpki::ALL_VERIFICATION_ALGS,
                    &anchors,
                    intermediates,
                    now,
                    usage,
                    None,
                    None,
                )
                .map_err(untrusted)?;
            // Remember the issuer only when the verified path went through it:
            // with roots that sign leaves directly (SPIRE's layout), a chain
            // `[leaf, X]` verifies without ever using `X`, and remembering `X`
            // would let leaves that `X` signs skip the chain check.
            if let (Some(cache), [issuer]) = (issuers, intermediates) {
                let mut used = path.intermediate_certificates();
                let through_issuer = used
                    .next()
                    .is_some_and(|c| c.der().as_ref() == issuer.as_ref());
                if through_issuer && used.next().is_none() {
                    cache.remember(issuer, bundle.roots());
                }
            }
        }
    }

    if !expected.accepts(&id) {
        return Err(VerifyError::UnexpectedIdentity {
            got: id,
            expected: expected.clone(),
        });
    }
    Ok(id)
}
