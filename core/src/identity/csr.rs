//! Certificate signing requests: making one for a fresh key, and reading one
//! that arrives from a workload.
//!
//! A CSR is untrusted input. We take exactly two things from it: its public
//! key, and proof (its own signature) that the sender holds the private key.
//! Everything else it asks for (names, extensions, usages) is ignored; the
//! CA decides those.

use rcgen::{CertificateParams, KeyPair, PublicKeyData, SignatureAlgorithm};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::{certification_request::X509CertificationRequest, prelude::FromDer};

use super::cert::{KeyAlgorithm, key_algorithm};

/// CSRs are small; anything bigger is refused before parsing.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is {len} bytes; the limit is {MAX_CSR_LEN}")]
    TooLarge { len: usize },
    #[error("CSR is not DER PKCS#10: {0}")]
    Malformed(String),
    #[error("CSR has {0} trailing bytes after the request")]
    TrailingBytes(usize),
    #[error("CSR signature does not verify: the sender does not prove it holds the key")]
    BadSignature,
    #[error("CSR key type is not supported; use ECDSA P-256, ECDSA P-384 or Ed25519")]
    UnsupportedKey,
    #[error("could not create a key or CSR: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The public key of a verified CSR, ready to be certified.
#[derive(Clone, Debug)]
pub struct CsrPublicKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Parses a DER CSR, checks its self-signature, and returns its key.
pub fn verified_public_key(csr_der: &[u8]) -> Result<CsrPublicKey, CsrError> {
    if csr_der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge { len: csr_der.len() });
    }
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingBytes(rest.len()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    // Decide the key type before spending a signature check on it.
    let alg = match key_algorithm(spki) {
        KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        KeyAlgorithm::Rsa | KeyAlgorithm::Other => return Err(CsrError::UnsupportedKey),
    };
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    Ok(CsrPublicKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg,
    })
}

/// The kinds of key a workload can make for its SVID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafKey {
    /// What Mesh's own workloads use (ARCHITECTURE.md "Leaf keys are
    /// Ed25519"): every new mTLS connection signs once and verifies the
    /// peer's signature once with the leaf key, and on aws-lc-rs Ed25519
    /// does that in 29 µs where P-256 takes 45 µs.
    Ed25519,
    /// For peers whose TLS library is fastest with it (OpenSSL: the bench's
    /// haproxy pair).
    EcdsaP256,
}

/// A fresh Ed25519 key and a CSR for it. The CSR names nothing: the CA
/// puts the identity it has authorized into the certificate. The CA still
/// certifies P-256 and P-384 keys.
pub fn new_key_and_csr() -> Result<(PrivateKeyDer<'static>, Vec<u8>), CsrError> {
    new_key_and_csr_of(LeafKey::Ed25519)
}

/// A fresh key of `kind` and a CSR for it.
pub fn new_key_and_csr_of(kind: LeafKey) -> Result<(PrivateKeyDer<'static>, Vec<u8>), CsrError> {
    let key = match kind {
        LeafKey::Ed25519 => {
            // PKCS#8 v1, as OpenSSL writes it: not every SPIFFE library reads
            // v2 (py-spiffe, through `cryptography`, refuses its public key
            // field), and the key is handed to workloads.
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let v1 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(&rng)
                .map_err(|_| rcgen::Error::RingUnspecified)?;
            KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(v1.as_ref()),
                &rcgen::PKCS_ED25519,
            )?
        }
        LeafKey::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
    };
    let csr = CertificateParams::default().serialize_request(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((key_der, csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_of_key_make_csrs_of_their_kind() {
        for (kind, alg) in [
            (LeafKey::Ed25519, &rcgen::PKCS_ED25519),
            (LeafKey::EcdsaP256, &rcgen::PKCS_ECDSA_P256_SHA256),
        ] {
            let (_key, csr) = new_key_and_csr_of(kind).unwrap();
            assert_eq!(
                verified_public_key(&csr).unwrap().algorithm(),
                alg,
                "{kind:?}"
            );
        }
        let (key, csr) = new_key_and_csr().unwrap();
        assert_eq!(
            verified_public_key(&csr).unwrap().algorithm(),
            &rcgen::PKCS_ED25519,
            "workloads make Ed25519 keys"
        );
        // PKCS#8 v1: SEQUENCE { INTEGER 0, ... }, with no public key field.
        let der = key.secret_der();
        assert_eq!(
            &der[2..5],
            &[0x02, 0x01, 0x00],
            "version 0 (v1): {der:02x?}"
        );
        assert_eq!(der.len(), 48, "no [1] public key: {der:02x?}");
    }

    #[test]
    fn accepts_own_csr_and_rejects_tampering() {
        let (_key, csr) = new_key_and_csr().unwrap();
        verified_public_key(&csr).unwrap();

        // Flip one bit inside the signed part: the signature must fail.
        let mut bad = csr.clone();
        let i = bad.len() / 3;
        bad[i] ^= 0x01;
        assert!(
            matches!(
                verified_public_key(&bad),
                Err(CsrError::BadSignature | CsrError::Malformed(_) | CsrError::UnsupportedKey)
            ),
            "tampered CSR must not verify"
        );

        let mut long = csr.clone();
        long.push(0);
        assert!(matches!(
            verified_public_key(&long),
            Err(CsrError::TrailingBytes(1))
        ));
        assert!(matches!(
            verified_public_key(&vec![0u8; MAX_CSR_LEN + 1]),
            Err(CsrError::TooLarge { .. })
        ));
        assert!(matches!(
            verified_public_key(b"not a csr"),
            Err(CsrError::Malformed(_))
        ));
    }

    #[test]
    fn signature_bit_flip_is_bad_signature() {
        let (_key, mut csr) = new_key_and_csr().unwrap();
        // The signature BIT STRING is the last element; its last byte is
        // part of the ECDSA `s` integer.
        let last = csr.len() - 1;
        csr[last] ^= 0x01;
        assert!(matches!(
            verified_public_key(&csr),
            Err(CsrError::BadSignature)
        ));
    }
}
