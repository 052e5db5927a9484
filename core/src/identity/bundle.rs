//! Trust bundles: the root certificates of each trust domain, kept per
//! domain and never merged (SPIFFE federation), in the SPIFFE bundle format
//! (a JWK Set whose keys have `use: "x509-svid"`) and in PEM.
//!
//! A bundle may hold several roots at once: that is how a root is rotated
//! (add the new root, reissue, then drop the old one).

use std::collections::{BTreeMap, btree_map};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::{
    cert::{CertError, CertInfo, PublicKeyParts, certs_from_pem, certs_to_pem, public_key_parts},
    spiffe_id::TrustDomain,
};

/// A bundle document larger than this is refused before parsing.
pub const MAX_BUNDLE_LEN: usize = 1024 * 1024;
/// Roots one trust domain may hold (old and new during rotation, plus slack).
pub const MAX_ROOTS_PER_DOMAIN: usize = 32;

const X509_SVID_USE: &str = "x509-svid";

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is {len} bytes; the limit is {MAX_BUNDLE_LEN}")]
    TooLarge { len: usize },
    #[error("bundle is not valid SPIFFE bundle JSON (line {line}, column {column}): {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("bundle has no x509-svid authorities; it cannot verify any SVID")]
    NoAuthorities,
    #[error(
        "key {index}: x509-svid keys must carry exactly one certificate in `x5c`, found {count}"
    )]
    X5cCount { index: usize, count: usize },
    #[error("key {index}: `x5c` is not standard base64")]
    X5cBase64 { index: usize },
    #[error("key {index}: {source}")]
    Cert {
        index: usize,
        #[source]
        source: CertError,
    },
    #[error("key {index}: the JWK parameters do not match the public key of its `x5c` certificate")]
    KeyMismatch { index: usize },
    #[error("root {index} is not a CA certificate (basicConstraints cA=true is required)")]
    NotCa { index: usize },
    #[error("bundle holds more than {MAX_ROOTS_PER_DOMAIN} roots")]
    TooManyRoots,
    #[error(transparent)]
    Pem(#[from] CertError),
}

/// The roots of one trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    /// `spiffe_sequence`: grows with every change the publisher makes.
    sequence: Option<u64>,
    /// `spiffe_refresh_hint`, in seconds.
    refresh_hint: Option<u64>,
}

impl TrustBundle {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            roots: Vec::new(),
            sequence: None,
            refresh_hint: None,
        }
    }

    /// A bundle with the given roots; each must parse and be a CA.
    pub fn with_roots(
        trust_domain: TrustDomain,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let mut bundle = Self::new(trust_domain);
        for root in roots {
            bundle.add_root(root)?;
        }
        Ok(bundle)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    pub fn set_sequence(&mut self, sequence: u64) {
        self.sequence = Some(sequence);
    }

    /// Adds a root (for rotation, beside the current ones). Returns false
    /// when it was already present. A root must parse, be a CA, and have a
    /// key type we can verify with and publish (EC P-256/P-384, Ed25519, RSA).
    pub fn add_root(&mut self, root: CertificateDer<'static>) -> Result<bool, BundleError> {
        let index = self.roots.len();
        let info = CertInfo::parse(&root).map_err(|source| BundleError::Cert { index, source })?;
        public_key_parts(&root).map_err(|source| BundleError::Cert { index, source })?;
        if !info.is_ca {
            return Err(BundleError::NotCa { index });
        }
        if self.roots.contains(&root) {
            return Ok(false);
        }
        if self.roots.len() >= MAX_ROOTS_PER_DOMAIN {
            return Err(BundleError::TooManyRoots);
        }
        self.roots.push(root);
        Ok(true)
    }

    /// Drops a root (the last step of a rotation). Returns false when absent.
    pub fn remove_root(&mut self, root: &CertificateDer<'_>) -> bool {
        let before = self.roots.len();
        self.roots.retain(|r| r.as_ref() != root.as_ref());
        before != self.roots.len()
    }

    /// Reads a SPIFFE bundle document. The document does not name its trust
    /// domain, so the caller says which one it belongs to. Keys for other
    /// uses (`jwt-svid`, unknown) are ignored, as the standard asks.
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        if json.len() > MAX_BUNDLE_LEN {
            return Err(BundleError::TooLarge { len: json.len() });
        }
        let doc: BundleDoc = serde_json::from_slice(json).map_err(|e| BundleError::Json {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        let mut bundle = Self::new(trust_domain);
        bundle.sequence = doc.spiffe_sequence;
        bundle.refresh_hint = doc.spiffe_refresh_hint;
        for (index, jwk) in doc.keys.iter().enumerate() {
            if jwk.use_.as_deref() != Some(X509_SVID_USE) {
                continue;
            }
            let x5c = jwk.x5c.as_deref().unwrap_or_default();
            let [cert_b64] = x5c else {
                return Err(BundleError::X5cCount {
                    index,
                    count: x5c.len(),
                });
            };
            let der = STANDARD
                .decode(cert_b64)
                .map_err(|_| BundleError::X5cBase64 { index })?;
            let parts =
                public_key_parts(&der).map_err(|source| BundleError::Cert { index, source })?;
            if !jwk.matches(&parts) {
                return Err(BundleError::KeyMismatch { index });
            }
            bundle
                .add_root(CertificateDer::from(der))
                .map_err(|e| match e {
                    BundleError::NotCa { .. } => BundleError::NotCa { index },
                    BundleError::Cert { source, .. } => BundleError::Cert { index, source },
                    other => other,
                })?;
        }
        if bundle.roots.is_empty() {
            return Err(BundleError::NoAuthorities);
        }
        Ok(bundle)
    }

    /// Writes the SPIFFE bundle document (pretty JSON, trailing newline).
    pub fn to_spiffe_json(&self) -> Result<String, BundleError> {
        let keys = self
            .roots
            .iter()
            .enumerate()
            .map(|(index, root)| {
                let parts =
                    public_key_parts(root).map_err(|source| BundleError::Cert { index, source })?;
                Ok(Jwk::for_root(root, parts))
            })
            .collect::<Result<Vec<_>, BundleError>>()?;
        let doc = BundleDoc {
            keys,
            spiffe_sequence: self.sequence,
            spiffe_refresh_hint: self.refresh_hint,
        };
        let mut out = serde_json::to_string_pretty(&doc).map_err(|e| BundleError::Json {
            line: 0,
            column: 0,
            message: e.to_string(),
        })?;
        out.push('\n');
        Ok(out)
    }

    /// Reads a bundle from PEM (`CERTIFICATE` blocks).
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        if pem.len() > MAX_BUNDLE_LEN {
            return Err(BundleError::TooLarge { len: pem.len() });
        }
        Self::with_roots(trust_domain, certs_from_pem(pem)?)
    }

    /// Reads either format, telling them apart by the first character.
    pub fn from_any(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Self::from_spiffe_json(trust_domain, bytes),
            _ => Self::from_pem(trust_domain, bytes),
        }
    }

    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.roots)
    }

    /// The pin of this bundle's roots, `sha256:<hex>`: SHA-256 over the
    /// roots' SubjectPublicKeyInfo, sorted, each preceded by its length (4
    /// bytes, big endian). A join string carries it, so a VM can check the
    /// roots it fetched over a connection it could not verify yet, as
    /// `kubeadm join --discovery-token-ca-cert-hash` does. Covering the
    /// whole set means a bundle with an extra root does not match.
    pub fn pin(&self) -> String {
        let mut spkis: Vec<Vec<u8>> = self
            .roots
            .iter()
            .map(|root| {
                x509_parser::parse_x509_certificate(root)
                    .map(|(_, c)| c.tbs_certificate.subject_pki.raw.to_vec())
                    // Roots were parsed when the bundle was made; a
                    // certificate that does not parse pins as a whole.
                    .unwrap_or_else(|_| root.to_vec())
            })
            .collect();
        spkis.sort();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for spki in &spkis {
            ctx.update(&(spki.len() as u32).to_be_bytes());
            ctx.update(spki);
        }
        format!("sha256:{}", super::cert::hex(ctx.finish().as_ref()))
    }
}

/// The bundles of every trust domain this party trusts, one per domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustBundleSet {
    bundles: BTreeMap<TrustDomain, TrustBundle>,
}

impl TrustBundleSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `bundle` in place of its trust domain's bundle (never merging
    /// roots across domains). Returns the bundle it replaced.
    pub fn insert(&mut self, bundle: TrustBundle) -> Option<TrustBundle> {
        self.bundles.insert(bundle.trust_domain.clone(), bundle)
    }

    pub fn remove(&mut self, td: &TrustDomain) -> Option<TrustBundle> {
        self.bundles.remove(td)
    }

    pub fn get(&self, td: &TrustDomain) -> Option<&TrustBundle> {
        self.bundles.get(td)
    }

    /// Looks a bundle up by the trust domain's name.
    pub fn get_by_name(&self, td: &str) -> Option<&TrustBundle> {
        self.bundles
            .iter()
            .find_map(|(k, v)| (k.as_str() == td).then_some(v))
    }

    pub fn iter(&self) -> btree_map::Values<'_, TrustDomain, TrustBundle> {
        self.bundles.values()
    }

    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

impl FromIterator<TrustBundle> for TrustBundleSet {
    fn from_iter<I: IntoIterator<Item = TrustBundle>>(iter: I) -> Self {
        let mut set = Self::new();
        for b in iter {
            set.insert(b);
        }
        set
    }
}

#[derive(Serialize, Deserialize)]
struct BundleDoc {
    keys: Vec<Jwk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

/// One JWK of a SPIFFE bundle; unknown members are ignored.
#[derive(Serialize, Deserialize)]
struct Jwk {
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    use_: Option<String>,
    kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

impl Jwk {
    fn for_root(root: &CertificateDer<'_>, parts: PublicKeyParts) -> Self {
        let b64 = |v: &[u8]| Some(URL_SAFE_NO_PAD.encode(v));
        let mut jwk = Jwk {
            use_: Some(X509_SVID_USE.to_owned()),
            kty: String::new(),
            crv: None,
            x: None,
            y: None,
            n: None,
            e: None,
            x5c: Some(vec![STANDARD.encode(root)]),
        };
        match parts {
            PublicKeyParts::Ec { curve, x, y } => {
                jwk.kty = "EC".into();
                jwk.crv = Some(curve.into());
                jwk.x = b64(&x);
                jwk.y = b64(&y);
            }
            PublicKeyParts::Okp { curve, x } => {
                jwk.kty = "OKP".into();
                jwk.crv = Some(curve.into());
                jwk.x = b64(&x);
            }
            PublicKeyParts::Rsa { n, e } => {
                jwk.kty = "RSA".into();
                jwk.n = b64(&n);
                jwk.e = b64(&e);
            }
        }
        jwk
    }

    /// Whether the JWK's key parameters (where given) match the certificate.
    fn matches(&self, parts: &PublicKeyParts) -> bool {
        let same = |field: &Option<String>, want: &[u8]| {
            field
                .as_deref()
                .is_none_or(|v| URL_SAFE_NO_PAD.decode(v).is_ok_and(|got| got == want))
        };
        match parts {
            PublicKeyParts::Ec { curve, x, y } => {
                self.kty == "EC"
                    && self.crv.as_deref().is_none_or(|c| c == *curve)
                    && same(&self.x, x)
                    && same(&self.y, y)
            }
            PublicKeyParts::Okp { curve, x } => {
                self.kty == "OKP"
                    && self.crv.as_deref().is_none_or(|c| c == *curve)
                    && same(&self.x, x)
            }
            PublicKeyParts::Rsa { n, e } => {
                self.kty == "RSA" && same(&self.n, n) && same(&self.e, e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{
        ca::{DEFAULT_ROOT_TTL, RootCa},
        cert::now,
    };

    fn root() -> CertificateDer<'static> {
        RootCa::generate(DEFAULT_ROOT_TTL, now())
            .unwrap()
            .cert()
            .clone()
    }

    fn td() -> TrustDomain {
        "west.mesh.local".parse().unwrap()
    }

    #[test]
    fn the_pin_covers_exactly_the_set_of_roots() {
        let (a, b) = (root(), root());
        let one = TrustBundle::with_roots(td(), [a.clone()]).unwrap();
        let both = TrustBundle::with_roots(td(), [a.clone(), b.clone()]).unwrap();
        let swapped = TrustBundle::with_roots(td(), [b.clone(), a.clone()]).unwrap();
        assert!(one.pin().starts_with("sha256:") && one.pin().len() == 7 + 64);
        assert_eq!(one.pin(), one.clone().pin(), "the pin is stable");
        assert_eq!(both.pin(), swapped.pin(), "order does not matter");
        assert_ne!(one.pin(), both.pin(), "an extra root changes the pin");
        let other = TrustBundle::with_roots(td(), [b]).unwrap();
        assert_ne!(one.pin(), other.pin());
    }

    #[test]
    fn json_and_pem_round_trip_with_rotation() {
        let (old, new) = (root(), root());
        let mut bundle = TrustBundle::with_roots(td(), [old.clone(), new.clone()]).unwrap();
        assert!(
            !bundle.add_root(old.clone()).unwrap(),
            "duplicates are not added twice"
        );
        let json = bundle.to_spiffe_json().unwrap();
        assert_eq!(
            TrustBundle::from_spiffe_json(td(), json.as_bytes()).unwrap(),
            bundle
        );
        assert_eq!(
            TrustBundle::from_any(td(), json.as_bytes()).unwrap(),
            bundle
        );
        let pem = bundle.to_pem();
        assert_eq!(
            TrustBundle::from_any(td(), pem.as_bytes()).unwrap().roots(),
            bundle.roots()
        );

        assert!(bundle.remove_root(&old));
        assert_eq!(bundle.roots(), &[new]);
    }

    #[test]
    fn jwt_keys_are_ignored_and_x509_keys_checked() {
        let r = root();
        let good: serde_json::Value = serde_json::from_str(
            &TrustBundle::with_roots(td(), [r.clone()])
                .unwrap()
                .to_spiffe_json()
                .unwrap(),
        )
        .unwrap();
        let x509 = good["keys"][0].clone();
        let jwt = serde_json::json!({"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"});

        let doc = serde_json::json!({"keys": [jwt, x509]});
        let b = TrustBundle::from_spiffe_json(td(), doc.to_string().as_bytes()).unwrap();
        assert_eq!(b.roots(), std::slice::from_ref(&r));

        let only_jwt = serde_json::json!({"keys": [jwt]});
        assert!(matches!(
            TrustBundle::from_spiffe_json(td(), only_jwt.to_string().as_bytes()),
            Err(BundleError::NoAuthorities)
        ));

        let mut two = x509.clone();
        two["x5c"] = serde_json::json!([x509["x5c"][0], x509["x5c"][0]]);
        let doc = serde_json::json!({"keys": [two]});
        assert!(matches!(
            TrustBundle::from_spiffe_json(td(), doc.to_string().as_bytes()),
            Err(BundleError::X5cCount { index: 0, count: 2 })
        ));

        let mut lying = x509.clone();
        lying["x"] = good["keys"][0]["y"].clone();
        let doc = serde_json::json!({"keys": [lying]});
        assert!(matches!(
            TrustBundle::from_spiffe_json(td(), doc.to_string().as_bytes()),
            Err(BundleError::KeyMismatch { index: 0 })
        ));

        let mut bad64 = x509.clone();
        bad64["x5c"] = serde_json::json!(["***"]);
        let doc = serde_json::json!({"keys": [bad64]});
        assert!(matches!(
            TrustBundle::from_spiffe_json(td(), doc.to_string().as_bytes()),
            Err(BundleError::X5cBase64 { index: 0 })
        ));
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let err =
            TrustBundle::from_spiffe_json(td(), b"{\n  \"keys\": [\n    oops\n]}").unwrap_err();
        match err {
            BundleError::Json { line, column, .. } => assert_eq!((line, column), (3, 5)),
            other => panic!("{other}"),
        }
        let big = vec![b' '; MAX_BUNDLE_LEN + 1];
        assert!(matches!(
            TrustBundle::from_spiffe_json(td(), &big),
            Err(BundleError::TooLarge { .. })
        ));
    }

    /// Found by the `bundle` fuzz target: a root whose curve OID is unknown
    /// was accepted from PEM and then could not be written as SPIFFE JSON.
    #[test]
    fn a_root_with_an_unsupported_key_is_refused() {
        let mut der = root().to_vec();
        let p256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let at = der.windows(p256.len()).position(|w| w == p256).unwrap();
        der[at + 5] = 0x10; // a curve nobody has heard of
        let pem = certs_to_pem([&CertificateDer::from(der)]);
        let err = TrustBundle::from_pem(td(), pem.as_bytes()).unwrap_err();
        assert!(matches!(err, BundleError::Cert { index: 0, .. }), "{err}");
        assert!(
            err.to_string().contains("unsupported public key type"),
            "{err}"
        );
    }

    #[test]
    fn a_leaf_is_not_a_root() {
        let ca = crate::identity::CertificateAuthority::generate(
            td(),
            &RootCa::generate(DEFAULT_ROOT_TTL, now()).unwrap(),
            DEFAULT_ROOT_TTL,
            now(),
        )
        .unwrap();
        let (_, csr) = crate::identity::csr::new_key_and_csr().unwrap();
        let leaf = ca
            .sign_csr(
                &csr,
                &"spiffe://west.mesh.local/x".parse().unwrap(),
                DEFAULT_ROOT_TTL,
            )
            .unwrap()
            .chain
            .remove(0);
        assert!(matches!(
            TrustBundle::with_roots(td(), [leaf]),
            Err(BundleError::NotCa { index: 0 })
        ));
    }

    #[test]
    fn set_replaces_per_domain() {
        let mut set = TrustBundleSet::new();
        let east: TrustDomain = "east.mesh.local".parse().unwrap();
        set.insert(TrustBundle::with_roots(td(), [root()]).unwrap());
        set.insert(TrustBundle::with_roots(east.clone(), [root()]).unwrap());
        let newer = TrustBundle::with_roots(td(), [root()]).unwrap();
        assert!(set.insert(newer.clone()).is_some());
        assert_eq!(set.len(), 2);
        assert_eq!(set.get(&td()), Some(&newer));
        assert_eq!(
            set.get_by_name("east.mesh.local").unwrap().trust_domain(),
            &east
        );
    }
}
