//! What we read out of X.509 certificates, and PEM in and out.
//!
//! Everything here is a plain parse: no trust decision is made. The
//! verifier (`verify.rs`) and the CLI decide what the facts mean.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, UnixTime,
    pem::{self, PemObject},
};
use time::OffsetDateTime;
use x509_parser::{
    extensions::GeneralName, oid_registry as oids, prelude::FromDer, public_key::PublicKey,
    x509::SubjectPublicKeyInfo,
};

/// A certificate that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("not a DER X.509 certificate: {0}")]
    Der(String),
    #[error("a certificate extension is malformed: {0}")]
    Extension(String),
    #[error("no PEM `CERTIFICATE` block found")]
    NoPemCertificate,
    #[error("PEM is malformed: {0}")]
    Pem(String),
    #[error("no PEM private key block found (expected `PRIVATE KEY` in PKCS#8)")]
    NoPemKey,
}

/// The facts about one certificate that Mesh cares about.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub subject: Name,
    pub issuer: Name,
    /// Serial number in lower-case hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// `basicConstraints cA=true`.
    pub is_ca: bool,
    /// Every URI SAN, in order (an SVID must have exactly one).
    pub uri_sans: Vec<String>,
    /// Key usage bits, when the extension is present.
    pub key_usage: Option<KeyUsageBits>,
    pub key_usage_critical: bool,
    /// `(serverAuth, clientAuth)` when the EKU extension is present.
    pub ext_key_usage: Option<(bool, bool)>,
    pub key_algorithm: KeyAlgorithm,
}

/// A distinguished name, kept as its DER and written out only when shown:
/// every handshake parses the peer's leaf, and none of them prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name(Vec<u8>);

impl std::fmt::Display for Name {
    /// As OpenSSL's one-line form (`O=Mesh, CN=...`); the bytes were parsed
    /// once already, so they parse again.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match x509_parser::x509::X509Name::from_der(&self.0) {
            Ok((_, name)) => name.fmt(f),
            Err(_) => f.write_str("(unreadable name)"),
        }
    }
}

/// The key usage bits we check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyUsageBits {
    pub digital_signature: bool,
    pub key_cert_sign: bool,
    pub crl_sign: bool,
}

/// The public key types Mesh issues for and reads in bundles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Rsa,
    Other,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, CertError> {
        let (rest, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Der(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CertError::Der(format!(
                "{} trailing bytes after the certificate",
                rest.len()
            )));
        }
        let ext = |e: x509_parser::error::X509Error| CertError::Extension(e.to_string());
        let uri_sans = cert
            .subject_alternative_name()
            .map_err(ext)?
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(uri) => Some((*uri).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ku = cert.key_usage().map_err(ext)?;
        let key_usage_critical = ku.as_ref().is_some_and(|k| k.critical);
        let key_usage = ku.map(|k| KeyUsageBits {
            digital_signature: k.value.digital_signature(),
            key_cert_sign: k.value.key_cert_sign(),
            crl_sign: k.value.crl_sign(),
        });
        let ext_key_usage = cert
            .extended_key_usage()
            .map_err(ext)?
            .map(|e| (e.value.server_auth, e.value.client_auth));
        let is_ca = cert
            .basic_constraints()
            .map_err(ext)?
            .is_some_and(|bc| bc.value.ca);
        let validity = cert.validity();
        let time = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map_err(|e| CertError::Der(format!("validity time out of range: {e}")))
        };
        Ok(Self {
            subject: Name(cert.subject().as_raw().to_vec()),
            issuer: Name(cert.issuer().as_raw().to_vec()),
            serial: hex(cert.raw_serial()),
            not_before: time(validity.not_before.timestamp())?,
            not_after: time(validity.not_after.timestamp())?,
            is_ca,
            uri_sans,
            key_usage,
            key_usage_critical,
            ext_key_usage,
            key_algorithm: key_algorithm(cert.public_key()),
        })
    }

    /// Time left until `not_after`, or `Err(time since)` when already expired.
    pub fn remaining(&self, now: OffsetDateTime) -> Result<Duration, Duration> {
        let left = self.not_after - now;
        if left.is_negative() {
            Err(left.unsigned_abs())
        } else {
            Ok(left.unsigned_abs())
        }
    }
}

/// Identifies a public key's type from its SubjectPublicKeyInfo.
pub(crate) fn key_algorithm(spki: &SubjectPublicKeyInfo<'_>) -> KeyAlgorithm {
    let alg = &spki.algorithm.algorithm;
    if *alg == oids::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == oids::OID_EC_P256 => KeyAlgorithm::EcdsaP256,
            Some(c) if c == oids::OID_NIST_EC_P384 => KeyAlgorithm::EcdsaP384,
            _ => KeyAlgorithm::Other,
        }
    } else if *alg == oids::OID_SIG_ED25519 {
        KeyAlgorithm::Ed25519
    } else if *alg == oids::OID_PKCS1_RSAENCRYPTION {
        KeyAlgorithm::Rsa
    } else {
        KeyAlgorithm::Other
    }
}

/// The public key of a certificate in the parts a JWK needs.
pub(crate) enum PublicKeyParts {
    Ec {
        curve: &'static str,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    Okp {
        curve: &'static str,
        x: Vec<u8>,
    },
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

/// Splits a certificate's public key into JWK parameters.
pub(crate) fn public_key_parts(der: &[u8]) -> Result<PublicKeyParts, CertError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CertError::Der(e.to_string()))?;
    let spki = cert.public_key();
    let unsupported = || CertError::Der("unsupported public key type".into());
    match key_algorithm(spki) {
        alg @ (KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384) => {
            let (curve, width) = match alg {
                KeyAlgorithm::EcdsaP256 => ("P-256", 32),
                _ => ("P-384", 48),
            };
            let point = &spki.subject_public_key.data;
            // Uncompressed point: 0x04 || X || Y.
            if point.len() != 1 + 2 * width || point[0] != 4 {
                return Err(CertError::Der(
                    "EC public key is not an uncompressed point".into(),
                ));
            }
            Ok(PublicKeyParts::Ec {
                curve,
                x: point[1..=width].to_vec(),
                y: point[1 + width..].to_vec(),
            })
        }
        KeyAlgorithm::Ed25519 => Ok(PublicKeyParts::Okp {
            curve: "Ed25519",
            x: spki.subject_public_key.data.to_vec(),
        }),
        KeyAlgorithm::Rsa => match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => Ok(PublicKeyParts::Rsa {
                n: strip_leading_zeros(rsa.modulus).to_vec(),
                e: strip_leading_zeros(rsa.exponent).to_vec(),
            }),
            _ => Err(unsupported()),
        },
        KeyAlgorithm::Other => Err(unsupported()),
    }
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Reads every `CERTIFICATE` block of a PEM text, in order.
pub fn certs_from_pem(pem_text: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem_text)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::NoPemCertificate);
    }
    Ok(certs)
}

/// Reads the first private key of a PEM text.
pub fn key_from_pem(pem_text: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem_text).map_err(|e| match e {
        pem::Error::NoItemsFound => CertError::NoPemKey,
        other => CertError::Pem(other.to_string()),
    })
}

/// Encodes DER certificates as PEM, one block each.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|c| ::pem::encode(&::pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())))
        .collect()
}

/// Encodes a private key as PEM (`PRIVATE KEY`, PKCS#8).
pub fn key_to_pem(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    ::pem::encode(&::pem::Pem::new(label, key.secret_der().to_vec()))
}

/// The same instant as rustls counts time (clamped at the epoch).
pub fn unix_time(t: OffsetDateTime) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(t.unix_timestamp().max(0) as u64))
}

/// `now` as an `OffsetDateTime` (tests pass their own).
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from(SystemTime::now())
}

/// A duration in the largest whole unit that fits, for messages such as
/// "expired 3 days ago".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = match s {
        0..60 => (s, "second"),
        60..3_600 => (s / 60, "minute"),
        3_600..86_400 => (s / 3_600, "hour"),
        _ => (s / 86_400, "day"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// The SHA-256 of a certificate's exact DER: what names a leaf in the memo
/// below and in the verifier's cache of verified leaves.
pub fn der_digest(der: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Peer leaves parsed before, by the SHA-256 of their DER.
///
/// Every mTLS handshake parses the peer's leaf twice (the verifier, then
/// the connection's identity), and a peer reconnects with the same leaf
/// until it renews. A parse is a function of the bytes alone, so the memo
/// answers exactly what a fresh parse would; it decides nothing. Only
/// leaves that parsed are kept, at most `cap`: when full, the expired go,
/// and if none had, all go (a flood of new leaves costs speed, not memory).
#[derive(Debug)]
pub struct LeafMemo {
    cap: usize,
    parsed: std::sync::Mutex<std::collections::HashMap<[u8; 32], Arc<CertInfo>>>,
}

/// How many peer leaves a process keeps parsed (about 0.5 KiB each).
pub const MEMO_LEAVES: usize = 256;

impl LeafMemo {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            parsed: Default::default(),
        }
    }

    /// The memo the verifier and `tls::peer_leaf` share.
    pub fn shared() -> &'static LeafMemo {
        static MEMO: std::sync::OnceLock<LeafMemo> = std::sync::OnceLock::new();
        MEMO.get_or_init(|| LeafMemo::new(MEMO_LEAVES))
    }

    /// `CertInfo::parse(der)`, from the memo when these bytes parsed before.
    pub fn parse(&self, der: &[u8]) -> Result<Arc<CertInfo>, CertError> {
        self.parse_digested(der, der_digest(der))
    }

    /// [`Self::parse`] for a caller that already holds `der_digest(der)`.
    pub fn parse_digested(&self, der: &[u8], key: [u8; 32]) -> Result<Arc<CertInfo>, CertError> {
        if let Some(info) = self.lock().get(&key) {
            return Ok(info.clone());
        }
        let info = Arc::new(CertInfo::parse(der)?);
        let mut parsed = self.lock();
        if parsed.len() >= self.cap {
            let now = now();
            parsed.retain(|_, i| i.not_after > now);
            if parsed.len() >= self.cap {
                parsed.clear();
            }
        }
        parsed.insert(key, info.clone());
        Ok(info)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 32], Arc<CertInfo>>> {
        // A panic while holding it cannot leave a half-made entry.
        self.parsed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(Duration::from_secs(1)), "1 second");
        assert_eq!(human_duration(Duration::from_secs(150)), "2 minutes");
        assert_eq!(
            human_duration(Duration::from_secs(3 * 86_400 + 5)),
            "3 days"
        );
    }

    #[test]
    fn pem_errors_name_the_problem() {
        assert!(matches!(
            certs_from_pem(b"hello"),
            Err(CertError::NoPemCertificate)
        ));
        assert!(matches!(key_from_pem(b""), Err(CertError::NoPemKey)));
        assert!(matches!(
            CertInfo::parse(b"\x30\x03\x02\x01\x01"),
            Err(CertError::Der(_))
        ));
    }

    /// A self-signed certificate for `uri`, valid until `now + valid_for`
    /// (in the past when negative).
    fn cert(uri: &str, valid_for: time::Duration) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.not_before = now() - time::Duration::days(2);
        params.not_after = now() + valid_for;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_memo_answers_what_a_parse_would_and_parses_once() {
        let memo = LeafMemo::new(4);
        let der = cert("spiffe://a.test/x", time::Duration::hours(1));
        let first = memo.parse(&der).unwrap();
        let again = memo.parse(&der).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the same bytes parse once");
        let fresh = CertInfo::parse(&der).unwrap();
        assert_eq!(first.uri_sans, fresh.uri_sans);
        assert_eq!(first.not_after, fresh.not_after);
        assert_eq!(first.subject, fresh.subject);
        // Other bytes are another entry, never the first's answer.
        let other = cert("spiffe://a.test/y", time::Duration::hours(1));
        assert_eq!(memo.parse(&other).unwrap().uri_sans, ["spiffe://a.test/y"]);
        assert_eq!(memo.len(), 2);
    }

    #[test]
    fn bytes_that_do_not_parse_are_refused_every_time_and_not_kept() {
        let memo = LeafMemo::new(4);
        for _ in 0..2 {
            assert!(matches!(
                memo.parse(b"\x30\x03\x02\x01\x01"),
                Err(CertError::Der(_))
            ));
        }
        assert!(memo.is_empty());
    }

    #[test]
    fn a_full_memo_drops_the_expired_first_and_never_grows_past_its_cap() {
        let memo = LeafMemo::new(2);
        let expired = cert("spiffe://a.test/old", time::Duration::hours(-1));
        let valid = cert("spiffe://a.test/valid", time::Duration::hours(1));
        memo.parse(&expired).unwrap();
        let kept = memo.parse(&valid).unwrap();
        memo.parse(&cert("spiffe://a.test/new", time::Duration::hours(1)))
            .unwrap();
        assert_eq!(memo.len(), 2);
        assert!(
            Arc::ptr_eq(&kept, &memo.parse(&valid).unwrap()),
            "the valid leaf stayed; the expired one made room"
        );
        // A flood of new leaves: the memo stays bounded.
        for i in 0..6 {
            memo.parse(&cert(
                &format!("spiffe://a.test/{i}"),
                time::Duration::hours(1),
            ))
            .unwrap();
            assert!(memo.len() <= 2);
        }
    }
}
