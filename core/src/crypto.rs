//! The one TLS crypto provider of the workspace: rustls on aws-lc-rs, TLS 1.3
//! with X25519MLKEM768 preferred. Nothing else may be compiled in.
//!
//! AES-128-GCM with SHA-256 is preferred over AES-256-GCM with SHA-384: it
//! is TLS 1.3's mandatory suite, and the key schedule then runs on the
//! CPU's SHA-256 instructions, where SHA-384 has none. Measured with
//! `mesh bench`, SHA-512 blocks were 9 % of a proxy's CPU per handshake.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The provider every Mesh config is built with.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::aws_lc_rs::cipher_suite;
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider.cipher_suites = vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ];
            Arc::new(provider)
        })
        .clone()
}

/// Installs [`provider`] as the process default. Every binary calls this
/// first, so a dependency that asks rustls for "the default" gets ours.
/// Calling it twice is harmless.
pub fn install_default_provider() {
    // Err means a provider is already installed; with only aws-lc-rs
    // compiled in, that is ours.
    let _ = CryptoProvider::install_default((*provider()).clone());
}

/// Fills `buf` from the provider's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    provider()
        .secure_random
        .fill(buf)
        .expect("the system random generator failed; no key or serial can be made safely");
}
