//! Enrollment keys: how a workload that joined with a token (a VM agent)
//! gets a new SVID after its old one expired while the control plane was
//! away, without a new token and without a valid certificate.
//!
//! At its first Certify the workload gives the public half of a P-256 key
//! that it keeps on disk and never uses for TLS; the control plane records
//! it in the workload's grant. To re-enroll, the workload signs its new CSR
//! together with its identity and workload name. A captured request is of
//! no use to anyone else: it certifies only the key of its own CSR.

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    },
};
use base64::{Engine, engine::general_purpose::STANDARD};

/// Length of an uncompressed P-256 point.
pub const PUBLIC_KEY_LEN: usize = 65;
/// Longest ASN.1 DER ECDSA P-256 signature.
pub const MAX_SIGNATURE_LEN: usize = 72;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enrollment key: {0}")]
    Key(String),
}

/// What is signed to re-enroll.
pub fn message(identity: &str, workload: &str, csr: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + identity.len() + workload.len() + csr.len());
    m.extend_from_slice(b"mesh-reenroll-v1\0");
    m.extend_from_slice(identity.as_bytes());
    m.push(0);
    m.extend_from_slice(workload.as_bytes());
    m.push(0);
    m.extend_from_slice(csr);
    m
}

/// A workload's enrollment key.
#[derive(Debug)]
pub struct EnrollmentKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl EnrollmentKey {
    pub fn generate() -> Result<Self, EnrollError> {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                .map_err(|e| EnrollError::Key(e.to_string()))?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// From the PKCS#8 DER that [`Self::pkcs8`] gave.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, EnrollError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der)
            .map_err(|e| EnrollError::Key(format!("not a P-256 PKCS#8 key: {e}")))?;
        Ok(Self {
            pair,
            pkcs8: der.to_vec(),
        })
    }

    /// The private key, PKCS#8 DER (write it 0600).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key, an uncompressed point.
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// Signs the re-enrollment message for this CSR.
    pub fn sign(&self, identity: &str, workload: &str, csr: &[u8]) -> Result<Vec<u8>, EnrollError> {
        self.pair
            .sign(&SystemRandom::new(), &message(identity, workload, csr))
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| EnrollError::Key(e.to_string()))
    }
}

/// Whether `key` is shaped like a P-256 public key (checked before it is
/// stored).
pub fn valid_public_key(key: &[u8]) -> bool {
    key.len() == PUBLIC_KEY_LEN && key[0] == 0x04
}

/// The stored form of a public key.
pub fn encode_public_key(key: &[u8]) -> String {
    STANDARD.encode(key)
}

/// Whether `signature` over the re-enrollment message was made by the
/// stored key `stored` (as [`encode_public_key`] wrote it).
pub fn verify(stored: &str, identity: &str, workload: &str, csr: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = STANDARD.decode(stored) else {
        return false;
    };
    if !valid_public_key(&key) || signature.len() > MAX_SIGNATURE_LEN {
        return false;
    }
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
        .verify(&message(identity, workload, csr), signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_identity_workload_and_csr() {
        let key = EnrollmentKey::generate().unwrap();
        let stored = encode_public_key(&key.public_key());
        let id = "spiffe://west.mesh.local/ns/shop/sa/billing";
        let sig = key.sign(id, "billing-1", b"csr").unwrap();
        assert!(verify(&stored, id, "billing-1", b"csr", &sig));
        assert!(
            !verify(&stored, id, "billing-2", b"csr", &sig),
            "another workload"
        );
        assert!(
            !verify(&stored, id, "billing-1", b"csr2", &sig),
            "another CSR"
        );
        assert!(!verify(
            &stored,
            "spiffe://west.mesh.local/ns/shop/sa/web",
            "billing-1",
            b"csr",
            &sig
        ));
        let other = EnrollmentKey::generate().unwrap();
        let forged = other.sign(id, "billing-1", b"csr").unwrap();
        assert!(
            !verify(&stored, id, "billing-1", b"csr", &forged),
            "another key"
        );
        let reloaded = EnrollmentKey::from_pkcs8(key.pkcs8()).unwrap();
        assert_eq!(reloaded.public_key(), key.public_key());
        assert!(!verify("not base64!", id, "billing-1", b"csr", &sig));
    }
}
