//! Join tokens: 256 random bits, shown once, stored only as SHA-256.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

/// Every token starts with this, so it is recognisable in logs and by
/// secret scanners.
pub const PREFIX: &str = "mesh-join-";
const RANDOM_BYTES: usize = 32;

/// A new token (give it to the workload once; it is not kept).
pub fn generate() -> String {
    let mut bytes = [0u8; RANDOM_BYTES];
    mesh_core::crypto::fill_random(&mut bytes);
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The key a token is stored under. `None` when the text is not shaped like
/// a token at all (so it never reaches the database).
pub fn hash(token: &str) -> Option<[u8; 32]> {
    let body = token.strip_prefix(PREFIX)?;
    let raw = URL_SAFE_NO_PAD.decode(body).ok()?;
    if raw.len() != RANDOM_BYTES {
        return None;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    digest.as_ref().try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_and_malformed_ones_do_not() {
        let t = generate();
        assert!(t.starts_with(PREFIX));
        assert_ne!(generate(), t);
        assert_eq!(hash(&t), hash(&t.clone()));
        assert!(hash("mesh-join-short").is_none());
        assert!(hash(&t.replacen(PREFIX, "other-", 1)).is_none());
        assert!(hash(&format!("{t}A")).is_none());
    }
}
