//! The X.509-SVID rules for a leaf certificate (SPIFFE X509-SVID standard,
//! sections 4 and 5): exactly one URI SAN holding a SPIFFE ID, not a CA,
//! key usage `digitalSignature` and nothing a CA would use.

use super::{
    cert::CertInfo,
    spiffe_id::{SpiffeId, SpiffeIdError},
};

/// Why a certificate is not a valid leaf X.509-SVID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate has no URI SAN, so it names no SPIFFE ID")]
    NoUriSan,
    #[error("certificate has {count} URI SANs; an X.509-SVID must have exactly one")]
    MultipleUriSans { count: usize },
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {source}")]
    BadSpiffeId {
        uri: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("certificate for {id} is a CA (basicConstraints cA=true); a leaf SVID must not be")]
    LeafIsCa { id: SpiffeId },
    #[error("certificate for {id} lacks key usage digitalSignature")]
    NoDigitalSignature { id: SpiffeId },
    #[error("certificate for {id} has CA key usage (keyCertSign or cRLSign)")]
    CaKeyUsage { id: SpiffeId },
}

/// Checks the leaf rules and returns the SPIFFE ID the leaf names.
pub fn leaf_spiffe_id(info: &CertInfo) -> Result<SpiffeId, SvidError> {
    let uri = match info.uri_sans.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => one,
        many => return Err(SvidError::MultipleUriSans { count: many.len() }),
    };
    let id = SpiffeId::parse(uri).map_err(|source| SvidError::BadSpiffeId {
        uri: uri.chars().take(256).collect(),
        source,
    })?;
    if info.is_ca {
        return Err(SvidError::LeafIsCa { id });
    }
    match info.key_usage {
        Some(ku) if ku.key_cert_sign || ku.crl_sign => Err(SvidError::CaKeyUsage { id }),
        Some(ku) if ku.digital_signature => Ok(id),
        _ => Err(SvidError::NoDigitalSignature { id }),
    }
}
