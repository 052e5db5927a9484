//! Fixtures for mesh-core's integration tests: real CAs, real SVIDs, crafted
//! bad certificates, and a real TLS handshake over TCP on 127.0.0.1.
#![allow(dead_code, unreachable_pub)]

use std::{io, sync::Arc, time::Duration};

use mesh_core::identity::{
    BundleStore, CertificateAuthority, CredentialStore, Credentials, RootCa, SpiffeId, TrustBundle,
    TrustBundleSet, TrustDomain,
    ca::{DEFAULT_ISSUER_TTL, DEFAULT_LEAF_TTL, DEFAULT_ROOT_TTL},
    cert::now,
    csr::new_key_and_csr,
    tls::{peer_identity, verify_error},
    verify::VerifyError,
};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{
    ClientConfig, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// One trust domain with its own (or a shared) root and an issuer.
pub struct Domain {
    pub td: TrustDomain,
    pub root: CertificateDer<'static>,
    pub ca: CertificateAuthority,
}

impl Domain {
    pub fn new(td: &str) -> Self {
        let root = RootCa::generate(DEFAULT_ROOT_TTL, now()).unwrap();
        Self::under(td, &root)
    }

    /// A domain whose issuer is signed by `root` (shared-root setups).
    pub fn under(td: &str, root: &RootCa) -> Self {
        let td: TrustDomain = td.parse().unwrap();
        let ca =
            CertificateAuthority::generate(td.clone(), root, DEFAULT_ISSUER_TTL, now()).unwrap();
        Self {
            td,
            root: root.cert().clone(),
            ca,
        }
    }

    pub fn id(&self, path: &str) -> SpiffeId {
        format!("spiffe://{}{path}", self.td).parse().unwrap()
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::with_roots(self.td.clone(), [self.root.clone()]).unwrap()
    }

    /// A real SVID for `path`, issued through a CSR.
    pub fn creds(&self, path: &str) -> Credentials {
        let (key, csr) = new_key_and_csr().unwrap();
        let svid = self
            .ca
            .sign_csr(&csr, &self.id(path), DEFAULT_LEAF_TTL)
            .unwrap();
        Credentials::new(svid.chain, key).unwrap()
    }

    /// An SVID that expired an hour ago.
    pub fn expired_creds(&self, path: &str) -> Credentials {
        let (key, csr) = new_key_and_csr().unwrap();
        let two_hours_ago = now() - Duration::from_secs(2 * 3600);
        let svid = self
            .ca
            .sign_csr_at(
                &csr,
                &self.id(path),
                Duration::from_secs(3600),
                two_hours_ago,
            )
            .unwrap();
        Credentials::new(svid.chain, key).unwrap()
    }

    /// The issuer as an rcgen signer, to craft certificates our CA refuses to make.
    pub fn rcgen_issuer(&self) -> Issuer<'static, KeyPair> {
        let key = KeyPair::from_pem(&self.ca.issuer_key_pem()).unwrap();
        Issuer::from_ca_cert_der(&self.ca.chain()[0], key).unwrap()
    }

    /// A chain + key signed by this domain's issuer from hand-made params.
    pub fn crafted(
        &self,
        params: &CertificateParams,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = params.signed_by(&key, &self.rcgen_issuer()).unwrap();
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.ca.chain().iter().cloned());
        (chain, pkcs8(&key))
    }
}

pub fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// SVID-shaped leaf params for `uris`, which the tests then spoil.
pub fn svid_params(uris: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mesh");
    params.distinguished_name = dn;
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now() - Duration::from_secs(60);
    params.not_after = now() + Duration::from_secs(3600);
    params
}

pub fn bundles(domains: &[&Domain]) -> BundleStore {
    BundleStore::new(
        domains
            .iter()
            .map(|d| d.bundle())
            .collect::<TrustBundleSet>(),
    )
}

/// What each side of a handshake saw.
pub struct Outcome {
    pub server: Result<SpiffeId, io::Error>,
    pub client: Result<SpiffeId, io::Error>,
    /// What the client negotiated, when the handshake completed.
    pub negotiated: Option<(rustls::ProtocolVersion, rustls::NamedGroup)>,
}

/// Runs a real TLS handshake over TCP, then one echo round trip.
pub async fn handshake(server: ServerConfig, client: ClientConfig) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer = peer_identity(tls.get_ref().1)
            .ok_or_else(|| io::Error::other("no peer identity after handshake"))?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.shutdown().await?;
        Ok::<_, io::Error>(peer)
    });
    let mut negotiated = None;
    let client = async {
        let tcp = TcpStream::connect(addr).await?;
        let connector = TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from("mesh.local").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let conn = tls.get_ref().1;
        negotiated = conn
            .protocol_version()
            .zip(conn.negotiated_key_exchange_group().map(|g| g.name()));
        let peer = peer_identity(tls.get_ref().1)
            .ok_or_else(|| io::Error::other("no peer identity after handshake"))?;
        tls.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"hello");
        Ok::<_, io::Error>(peer)
    }
    .await;
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server side hung")
        .unwrap();
    Outcome {
        server,
        client,
        negotiated,
    }
}

/// The rustls error inside an I/O error from tokio-rustls.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Our verification error inside an I/O error, if that is what failed.
pub fn verify_failure(e: &io::Error) -> Option<&VerifyError> {
    verify_error(rustls_error(e)?)
}

pub fn creds_store(c: Credentials) -> CredentialStore {
    CredentialStore::new(c)
}
