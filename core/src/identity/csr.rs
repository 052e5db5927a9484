//! Certificate signing requests: making one for a fresh key, and reading one
//! that arrives from a workload.
//!
//! A CSR is untrusted input. We take exactly two things from it: its public
//! key, and proof (its own signature) that the sender holds the private key.
//! Everything else it asks for (names, extensions, usages) is ignored; the
//! CA decides those.

use rcgen::{
    CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm,
};
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

/// A fresh ECDSA P-256 key and a CSR for it. The CSR names nothing: the CA
/// puts the identity it has authorized into the certificate.
pub fn new_key_and_csr() -> Result<(PrivateKeyDer<'static>, Vec<u8>), CsrError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((key_der, csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
