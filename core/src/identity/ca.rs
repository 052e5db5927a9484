//! The certificate authority of one trust domain: a root (the trust anchor,
//! possibly shared by several clusters) and an issuer (the intermediate that
//! signs leaf SVIDs).
//!
//! The CA never takes an identity from a CSR. The caller authorizes an
//! identity (from a join token, a renewal's mTLS peer, ...) and passes it in.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use super::{
    cert::{CertError, CertInfo, human_duration},
    csr::{self, CsrError},
    spiffe_id::{SpiffeId, TrustDomain},
};

/// How far a leaf's notBefore is set back to absorb clock skew between hosts.
pub const NOT_BEFORE_SKEW: Duration = Duration::from_secs(60);
/// Default leaf lifetime (DESIGN.md section 3).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default issuer lifetime.
pub const DEFAULT_ISSUER_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default root lifetime.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the CA could not be created, loaded or could not issue.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("{id} is not in trust domain {ca}; this CA only issues for its own trust domain")]
    WrongTrustDomain { id: SpiffeId, ca: TrustDomain },
    #[error("the issuer expired {} ago; create a new issuer (`mesh identity ca create`)", human_duration(*.ago))]
    IssuerExpired { ago: Duration },
    #[error("the root key is not available; a CA cannot be created from a root without its key")]
    NoRootKey,
    #[error("requested lifetime must be more than zero")]
    ZeroTtl,
    #[error("the root certificate expires before the issuer could be valid")]
    RootExpired,
    #[error("certificate could not be read: {0}")]
    Cert(#[from] CertError),
    #[error("could not sign: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A trust anchor, with its key when this process may sign with it.
#[derive(Debug)]
pub struct RootCa {
    cert: CertificateDer<'static>,
    info: CertInfo,
    key: Option<KeyPair>,
}

impl RootCa {
    /// Creates a new self-signed root. It names no trust domain, so it can be
    /// shared by several clusters.
    pub fn generate(lifetime: Duration, now: OffsetDateTime) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params("Mesh root CA", now - NOT_BEFORE_SKEW, now + lifetime)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key)?.der().clone();
        let info = CertInfo::parse(&cert)?;
        Ok(Self {
            cert,
            info,
            key: Some(key),
        })
    }

    /// A root read from files; `key` is `None` for a root that only anchors trust.
    pub fn from_parts(
        cert: CertificateDer<'static>,
        key: Option<KeyPair>,
    ) -> Result<Self, CaError> {
        let info = CertInfo::parse(&cert)?;
        Ok(Self { cert, info, key })
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The root key in PKCS#8 PEM, if this root has one.
    pub fn key_pem(&self) -> Option<String> {
        self.key.as_ref().map(KeyPair::serialize_pem)
    }
}

/// A leaf SVID just issued.
#[derive(Clone, Debug)]
pub struct IssuedSvid {
    /// Leaf first, then the issuer and any further intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The signing half of a trust domain's CA.
#[derive(Debug)]
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// The issuer certificate first, then any intermediates up to the root.
    chain: Vec<CertificateDer<'static>>,
    issuer_info: CertInfo,
    root: CertificateDer<'static>,
}

impl CertificateAuthority {
    /// Creates a new issuer for `trust_domain`, signed by `root`. The issuer
    /// carries the trust domain's own ID (`spiffe://<td>`) as its URI SAN.
    pub fn generate(
        trust_domain: TrustDomain,
        root: &RootCa,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<Self, CaError> {
        let root_key = root.key.as_ref().ok_or(CaError::NoRootKey)?;
        let not_after = (now + lifetime).min(root.info.not_after);
        if not_after <= now {
            return Err(CaError::RootExpired);
        }
        let not_before = (now - NOT_BEFORE_SKEW).max(root.info.not_before);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(
            &format!("Mesh issuer {trust_domain}"),
            not_before,
            not_after,
        )?;
        // The issuer signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.subject_alt_names = vec![SanType::URI(trust_domain.id().as_str().try_into()?)];
        let root_issuer = Issuer::from_ca_cert_der(&root.cert, root_key)?;
        let cert = params.signed_by(&key, &root_issuer)?.der().clone();
        Self::from_parts(trust_domain, vec![cert], key, root.cert.clone())
    }

    /// Assembles a CA from its parts (as read from disk). The caller has
    /// checked that `chain` leads to `root`.
    pub fn from_parts(
        trust_domain: TrustDomain,
        chain: Vec<CertificateDer<'static>>,
        key: KeyPair,
        root: CertificateDer<'static>,
    ) -> Result<Self, CaError> {
        let issuer_cert = chain.first().ok_or(CertError::NoPemCertificate)?;
        let issuer_info = CertInfo::parse(issuer_cert)?;
        let issuer = Issuer::from_ca_cert_der(issuer_cert, key)?;
        Ok(Self {
            trust_domain,
            issuer,
            chain,
            issuer_info,
            root,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn issuer_info(&self) -> &CertInfo {
        &self.issuer_info
    }

    /// The issuer and any intermediates, as a leaf's chain should carry them.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    pub fn issuer_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Signs `csr_der` into a leaf SVID for `id`, valid for `ttl` from now.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedSvid, CaError> {
        self.sign_csr_at(csr_der, id, ttl, super::cert::now())
    }

    /// [`Self::sign_csr`] with an explicit clock, for tests and replays.
    pub fn sign_csr_at(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<IssuedSvid, CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::WrongTrustDomain {
                id: id.clone(),
                ca: self.trust_domain.clone(),
            });
        }
        if ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        if let Err(ago) = self.issuer_info.remaining(now) {
            return Err(CaError::IssuerExpired { ago });
        }
        let public_key = csr::verified_public_key(csr_der)?;

        // A leaf never outlives its issuer, and never starts before it.
        let not_after = (now + ttl).min(self.issuer_info.not_after);
        let not_before = (now - NOT_BEFORE_SKEW).max(self.issuer_info.not_before);

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Mesh");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;

        let leaf = params.signed_by(&public_key, &self.issuer)?.der().clone();
        let info = CertInfo::parse(&leaf)?;
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(leaf);
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedSvid {
            chain,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }
}

/// A TLS server certificate for DNS names, with its key (PKCS#8 DER).
#[derive(Debug)]
pub struct DnsServerCert {
    /// The leaf, then the issuer and any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
    pub not_after: OffsetDateTime,
}

impl CertificateAuthority {
    /// A server certificate for DNS `names` and no SPIFFE ID: what the
    /// Kubernetes API server checks when it calls the injection webhook.
    /// Mesh peers never accept it, as it names no workload.
    pub fn issue_dns_server(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<DnsServerCert, CaError> {
        if ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        let now = super::cert::now();
        if let Err(ago) = self.issuer_info.remaining(now) {
            return Err(CaError::IssuerExpired { ago });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Mesh");
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = (now - NOT_BEFORE_SKEW).max(self.issuer_info.not_before);
        params.not_after = (now + ttl).min(self.issuer_info.not_after);
        let leaf = params.signed_by(&key, &self.issuer)?.der().clone();
        let mut chain = vec![leaf];
        chain.extend(self.chain.iter().cloned());
        Ok(DnsServerCert {
            chain,
            key_der: key.serialize_der(),
            not_after: params.not_after,
        })
    }
}

fn ca_params(
    common_name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mesh");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// 128 random bits, positive, as RFC 5280 asks of serial numbers.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    crate::crypto::fill_random(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{cert::certs_to_pem, svid::leaf_spiffe_id};

    fn ca(td: &str) -> CertificateAuthority {
        let now = crate::identity::cert::now();
        let root = RootCa::generate(DEFAULT_ROOT_TTL, now).unwrap();
        CertificateAuthority::generate(td.parse().unwrap(), &root, DEFAULT_ISSUER_TTL, now).unwrap()
    }

    #[test]
    fn leaf_has_the_authorized_identity_and_svid_shape() {
        let ca = ca("west.mesh.local");
        let (_, csr) = csr::new_key_and_csr().unwrap();
        let id: SpiffeId = "spiffe://west.mesh.local/ns/shop/sa/web".parse().unwrap();
        let svid = ca.sign_csr(&csr, &id, DEFAULT_LEAF_TTL).unwrap();
        assert_eq!(svid.chain.len(), 2, "leaf then issuer");
        let info = CertInfo::parse(&svid.chain[0]).unwrap();
        assert_eq!(leaf_spiffe_id(&info).unwrap(), id);
        assert!(info.key_usage_critical, "key usage must be critical");
        assert_eq!(info.ext_key_usage, Some((true, true)));
        assert_eq!(info.serial, svid.serial);
        let life = info.not_after - info.not_before;
        assert_eq!(
            life.whole_seconds() as u64,
            (DEFAULT_LEAF_TTL + NOT_BEFORE_SKEW).as_secs()
        );
        assert!(!certs_to_pem(&svid.chain).is_empty());
    }

    #[test]
    fn csr_extensions_are_ignored() {
        // The CSR asks for a different SAN, CA rights and cert signing.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            "spiffe://west.mesh.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let csr = params.serialize_request(&key).unwrap();

        let ca = ca("west.mesh.local");
        let id: SpiffeId = "spiffe://west.mesh.local/ns/shop/sa/web".parse().unwrap();
        let svid = ca.sign_csr(csr.der(), &id, DEFAULT_LEAF_TTL).unwrap();
        let info = CertInfo::parse(&svid.chain[0]).unwrap();
        assert_eq!(info.uri_sans, vec![id.to_string()]);
        assert!(!info.is_ca);
        assert_eq!(leaf_spiffe_id(&info).unwrap(), id);
    }

    #[test]
    fn lifetime_is_clamped_to_the_issuer() {
        let now = crate::identity::cert::now();
        let root = RootCa::generate(DEFAULT_ROOT_TTL, now).unwrap();
        let td: TrustDomain = "east.mesh.local".parse().unwrap();
        let ca = CertificateAuthority::generate(td, &root, Duration::from_secs(3600), now).unwrap();
        let (_, csr) = csr::new_key_and_csr().unwrap();
        let id: SpiffeId = "spiffe://east.mesh.local/ns/a/sa/b".parse().unwrap();
        let svid = ca.sign_csr_at(&csr, &id, DEFAULT_LEAF_TTL, now).unwrap();
        assert_eq!(svid.not_after, ca.issuer_info().not_after);
        assert_eq!(
            svid.not_after,
            CertInfo::parse(&svid.chain[0]).unwrap().not_after
        );

        let later = now + Duration::from_secs(2 * 3600);
        assert!(matches!(
            ca.sign_csr_at(&csr, &id, DEFAULT_LEAF_TTL, later),
            Err(CaError::IssuerExpired { .. })
        ));
    }

    #[test]
    fn refuses_other_trust_domains_and_zero_ttl() {
        let ca = ca("west.mesh.local");
        let (_, csr) = csr::new_key_and_csr().unwrap();
        let other: SpiffeId = "spiffe://east.mesh.local/ns/a/sa/b".parse().unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &other, DEFAULT_LEAF_TTL),
            Err(CaError::WrongTrustDomain { .. })
        ));
        let id: SpiffeId = "spiffe://west.mesh.local/ns/a/sa/b".parse().unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &id, Duration::ZERO),
            Err(CaError::ZeroTtl)
        ));
    }
}
