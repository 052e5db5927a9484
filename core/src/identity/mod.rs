//! SPIFFE identity: IDs and trust domains, the certificate authority, trust
//! bundles, SVID chain validation and the rustls configs built on them.
//!
//! This module makes every trust decision about certificates in Mesh. It does
//! not talk to the network: the control plane serves it, proxies use it.

pub mod bundle;
pub mod ca;
pub mod cert;
pub mod csr;
pub mod enroll;
pub mod files;
pub mod spiffe_id;
pub mod svid;
pub mod tls;
pub mod verify;

pub use bundle::{TrustBundle, TrustBundleSet};
pub use ca::{CertificateAuthority, IssuedSvid, RootCa};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use tls::{BundleStore, CredentialStore, Credentials};
pub use verify::{ExpectedIdentity, VerifyError};
