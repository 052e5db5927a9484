//! rustls configs for mesh connections: TLS 1.3 only, mutual authentication,
//! SPIFFE verification of the peer, and credentials that can be swapped
//! while connections are open.
//!
//! Rotation works because rustls asks the resolver for a certificate on each
//! handshake: swapping the [`CredentialStore`] changes what new handshakes
//! present and leaves established sessions alone. Session resumption is off
//! on both sides, so a new connection always carries (and verifies) the
//! current certificates.

use std::sync::{Arc, RwLock};

use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        ClientHello, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use super::{
    bundle::TrustBundleSet,
    cert::{CertError, CertInfo, LeafMemo},
    spiffe_id::SpiffeId,
    svid::{SvidError, leaf_spiffe_id},
    verify::{ExpectedIdentity, PeerRole, VerifiedIssuers, VerifyError, verify_peer_with},
};
use crate::crypto;

/// Why credentials or a config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("certificate is not a valid X.509-SVID: {0}")]
    Svid(#[from] SvidError),
    #[error("private key does not match the certificate, or cannot be used: {0}")]
    Key(rustls::Error),
    #[error(
        "new credentials are for {new}, but this store holds {current}; an identity never changes in place"
    )]
    IdentityChanged { current: SpiffeId, new: SpiffeId },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// One X.509-SVID with its key, ready for rustls.
#[derive(Clone, Debug)]
pub struct Credentials {
    id: SpiffeId,
    info: CertInfo,
    key: Arc<CertifiedKey>,
    /// The private key as given, for those who hand it on or keep it on
    /// disk (the VM agent's Workload API and its state directory).
    key_der: Arc<PrivateKeyDer<'static>>,
}

impl Credentials {
    /// Builds credentials from a chain (leaf first) and the leaf's key.
    /// Checks that the leaf is an SVID and that the key matches it.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::EmptyChain)?;
        let info = CertInfo::parse(leaf)?;
        let id = leaf_spiffe_id(&info)?;
        let provider = crypto::provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(TlsError::Key)?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(TlsError::Key)?;
        Ok(Self {
            id,
            info,
            key: Arc::new(certified),
            key_der: Arc::new(key),
        })
    }

    /// The leaf's private key.
    pub fn key_der(&self) -> &PrivateKeyDer<'static> {
        &self.key_der
    }

    /// Whether these are `id`'s credentials, chaining to `bundles`, valid
    /// now: what every holder checks before using credentials it was given
    /// (issued, renewed, or read from disk).
    pub fn check(&self, id: &SpiffeId, bundles: &TrustBundleSet) -> Result<(), VerifyError> {
        super::verify::verify_peer(
            self.chain(),
            bundles,
            &ExpectedIdentity::Exact(id.clone()),
            PeerRole::Client,
            super::cert::unix_time(super::cert::now()),
        )
        .map(|_| ())
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }
}

/// A value many readers share and a writer replaces whole. Readers get an
/// `Arc` snapshot, so a swap never disturbs one already handed out.
/// Every swap is announced on a watch channel, for those who push the
/// new value on (the VM agent's Workload API streams, its files).
#[derive(Debug)]
struct Slot<T> {
    value: Arc<RwLock<Arc<T>>>,
    swapped: Arc<tokio::sync::watch::Sender<()>>,
}

impl<T: Default> Default for Slot<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            swapped: self.swapped.clone(),
        }
    }
}

impl<T> Slot<T> {
    fn new(value: T) -> Self {
        Self {
            value: Arc::new(RwLock::new(Arc::new(value))),
            swapped: Arc::new(tokio::sync::watch::Sender::new(())),
        }
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.swapped.subscribe()
    }

    fn get(&self) -> Arc<T> {
        self.value.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the value if `check` accepts the swap from the current one.
    fn swap_if<E>(&self, value: T, check: impl FnOnce(&T, &T) -> Result<(), E>) -> Result<(), E> {
        {
            let mut slot = self.value.write().unwrap_or_else(|p| p.into_inner());
            check(&slot, &value)?;
            *slot = Arc::new(value);
        }
        self.swapped.send_replace(());
        Ok(())
    }
}

/// This party's current credentials, shared by every config built from it.
#[derive(Clone, Debug)]
pub struct CredentialStore(Slot<Credentials>);

impl CredentialStore {
    pub fn new(creds: Credentials) -> Self {
        Self(Slot::new(creds))
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.0.get()
    }

    /// Changes each time credentials are rotated.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.0.subscribe()
    }

    /// Puts renewed credentials in place. The identity must stay the same:
    /// a proxy that became someone else mid-flight would confuse every peer.
    pub fn rotate(&self, creds: Credentials) -> Result<(), TlsError> {
        self.0.swap_if(creds, |old, new| {
            if old.id == new.id {
                Ok(())
            } else {
                Err(TlsError::IdentityChanged {
                    current: old.id.clone(),
                    new: new.id.clone(),
                })
            }
        })
    }
}

/// The trust bundles every config built from it verifies against (root
/// rotation and new links reach live configs through it).
#[derive(Clone, Debug, Default)]
pub struct BundleStore(Slot<TrustBundleSet>);

impl BundleStore {
    pub fn new(bundles: TrustBundleSet) -> Self {
        Self(Slot::new(bundles))
    }

    pub fn current(&self) -> Arc<TrustBundleSet> {
        self.0.get()
    }

    /// Changes each time the bundles are replaced.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.0.subscribe()
    }

    pub fn replace(&self, bundles: TrustBundleSet) {
        let _ = self.0.swap_if(bundles, |_, _| Ok::<(), ()>(()));
    }
}

/// A server config that demands a client SVID accepted by `clients`.
pub fn server_config(
    creds: CredentialStore,
    bundles: BundleStore,
    clients: ExpectedIdentity,
) -> Result<ServerConfig, TlsError> {
    build_server_config(creds, bundles, clients, true)
}

/// A server config where a client certificate is optional, but verified
/// like any other when presented (the identity service: bootstrap with a
/// token, renewal with the current SVID).
pub fn server_config_optional_client(
    creds: CredentialStore,
    bundles: BundleStore,
    clients: ExpectedIdentity,
) -> Result<ServerConfig, TlsError> {
    build_server_config(creds, bundles, clients, false)
}

fn build_server_config(
    creds: CredentialStore,
    bundles: BundleStore,
    clients: ExpectedIdentity,
    mandatory: bool,
) -> Result<ServerConfig, TlsError> {
    let (provider, mut verifier) = SpiffeVerifier::new(bundles, clients, PeerRole::Client);
    Arc::get_mut(&mut verifier)
        .expect("a fresh verifier has one owner")
        .client_auth_mandatory = mandatory;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(creds)));
    // No resumption: a resumed session skips certificate verification, so a
    // rotated, expired or no-longer-trusted peer would keep its old
    // standing. Every connection verifies the peer's current SVID.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config that presents our SVID and accepts only a server SVID
/// matching `server`. The server name given to rustls is used for SNI only;
/// identity comes from the SPIFFE ID.
pub fn client_config(
    creds: CredentialStore,
    bundles: BundleStore,
    server: ExpectedIdentity,
) -> Result<ClientConfig, TlsError> {
    build_client_config(Some(creds), bundles, server)
}

/// A client config with no certificate of its own, for a workload that has
/// no SVID yet (its first Certify). The server is still verified.
pub fn client_config_without_cert(
    bundles: BundleStore,
    server: ExpectedIdentity,
) -> Result<ClientConfig, TlsError> {
    build_client_config(None, bundles, server)
}

fn build_client_config(
    creds: Option<CredentialStore>,
    bundles: BundleStore,
    server: ExpectedIdentity,
) -> Result<ClientConfig, TlsError> {
    let (provider, verifier) = SpiffeVerifier::new(bundles, server, PeerRole::Server);
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match creds {
        Some(creds) => builder.with_client_cert_resolver(Arc::new(Resolver(creds))),
        None => builder.with_no_client_auth(),
    };
    // See `server_config`: every connection is fully verified.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The peer's SPIFFE ID once the handshake is done. With our configs the
/// chain was verified, so this only reads the name out of it.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    peer_leaf(conn).map(|(id, _)| id)
}

/// The verified peer's SPIFFE ID and when its certificate expires, from the
/// parse the verifier already made of the leaf (`LeafMemo`).
pub fn peer_leaf(conn: &CommonState) -> Option<(SpiffeId, time::OffsetDateTime)> {
    let leaf = LeafMemo::shared()
        .parse(conn.peer_certificates()?.first()?)
        .ok()?;
    Some((leaf_spiffe_id(&leaf).ok()?, leaf.not_after))
}

/// The metric reason for a refused TLS handshake (from the I/O error the
/// acceptor returned): the verifier's own reason, `protocol_version`,
/// `timeout`, or `handshake`.
pub fn refusal_reason(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(err) => match verify_error(err) {
            Some(v) => v.reason(),
            None if matches!(err, rustls::Error::PeerIncompatible(_)) => "protocol_version",
            None => "handshake",
        },
        None if e.kind() == std::io::ErrorKind::TimedOut => "timeout",
        None => "handshake",
    }
}

/// Finds our [`VerifyError`] inside a rustls error, so callers can tell
/// "expired" from "wrong identity" without parsing strings.
pub fn verify_error(err: &rustls::Error) -> Option<&VerifyError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<VerifyError>()
        }
        _ => None,
    }
}

/// Serves the current credentials to every new handshake, either side.
#[derive(Debug)]
struct Resolver(CredentialStore);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies peers against the bundle of their own trust domain.
#[derive(Debug)]
struct SpiffeVerifier {
    bundles: BundleStore,
    expected: ExpectedIdentity,
    role: PeerRole,
    provider: Arc<CryptoProvider>,
    /// Server side only: whether a client must present a certificate.
    client_auth_mandatory: bool,
    issuers: VerifiedIssuers,
}

impl SpiffeVerifier {
    /// The provider every config uses, and a verifier on it.
    fn new(
        bundles: BundleStore,
        expected: ExpectedIdentity,
        role: PeerRole,
    ) -> (Arc<CryptoProvider>, Arc<Self>) {
        let provider = crypto::provider();
        let verifier = Arc::new(Self {
            bundles,
            expected,
            role,
            provider: provider.clone(),
            client_auth_mandatory: true,
            issuers: VerifiedIssuers::default(),
        });
        (provider, verifier)
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        verify_peer_with(
            &chain,
            &self.bundles.current(),
            &self.expected,
            self.role,
            now,
            Some(&self.issuers),
        )
        .map(|_| ())
        .map_err(|e| {
            tracing::debug!(error = %e, reason = e.reason(), "peer certificate refused");
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })
    }
}

/// The handshake-signature half of both verifier traits is the same: check
/// with the provider's algorithms (TLS 1.2 is never negotiated, but the
/// trait asks, and the answer is still correct).
macro_rules! handshake_signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.provider.signature_verification_algorithms;
            verify_tls12_signature(message, cert, dss, algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.provider.signature_verification_algorithms;
            verify_tls13_signature(message, cert, dss, algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// TLS 1.3 that accepts any server certificate (the handshake's own
/// signatures are still checked). Only for fetching something that is then
/// checked against a pin before anything trusts it or is sent: the VM
/// agent's first look at a cluster's trust bundle.
pub fn client_config_for_pinning() -> Result<ClientConfig, TlsError> {
    let provider = crypto::provider();
    let verifier = Arc::new(AnyServer {
        provider: provider.clone(),
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

#[derive(Debug)]
struct AnyServer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    handshake_signature_methods!();
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
    }

    handshake_signature_methods!();
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client has exactly one SVID and sends it.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth_mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)
            .map(|()| ClientCertVerified::assertion())
    }

    handshake_signature_methods!();
}
