//! A CA directory on disk, as `mesh identity ca create` writes it:
//!
//! | file          | what                                         | mode |
//! |---------------|----------------------------------------------|------|
//! | `root.crt`    | trust anchor (PEM)                           | 0644 |
//! | `root.key`    | its key; absent when the root is shared      | 0600 |
//! | `issuer.crt`  | issuer (intermediate), then any further intermediates | 0644 |
//! | `issuer.key`  | the issuer's key (PKCS#8 PEM)                | 0600 |
//! | `bundle.json` | the trust domain's SPIFFE bundle             | 0644 |
//!
//! Every load error names the file and says what to do.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use rcgen::{KeyPair, PublicKeyData};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{
    bundle::TrustBundle,
    ca::{CertificateAuthority, RootCa},
    cert::{CertInfo, certs_from_pem, certs_to_pem, human_duration},
    spiffe_id::{SpiffeId, TrustDomain},
};

pub const ROOT_CERT: &str = "root.crt";
pub const ROOT_KEY: &str = "root.key";
pub const ISSUER_CERT: &str = "issuer.crt";
pub const ISSUER_KEY: &str = "issuer.key";
pub const BUNDLE: &str = "bundle.json";

/// A file that could not be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
}

impl FileError {
    pub fn invalid(path: &Path, problem: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(|source| FileError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key: mode 0600 from the first byte, replaced atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_atomic(path, contents, 0o600)
}

/// Writes a public file (certificates, bundles): mode 0644, atomically.
pub fn write_public(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let io_err = |source| FileError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // A leftover temp file may have looser permissions; never reuse it.
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    // The umask may have narrowed the mode; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err)?;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

/// The files `write_ca_dir` would create in `dir` that already exist.
pub fn existing_ca_files(dir: &Path) -> Vec<PathBuf> {
    [ROOT_CERT, ROOT_KEY, ISSUER_CERT, ISSUER_KEY, BUNDLE]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect()
}

/// Writes a CA directory. `root.key` is written only when `root` holds a key
/// and `with_root_key` is set (a shared root's key stays where it lives).
pub fn write_ca_dir(
    dir: &Path,
    root: &RootCa,
    ca: &CertificateAuthority,
    with_root_key: bool,
) -> Result<Vec<PathBuf>, FileError> {
    fs::create_dir_all(dir).map_err(|source| FileError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    let mut put = |name: &str, contents: String, private: bool| {
        let path = dir.join(name);
        if private {
            write_private(&path, contents.as_bytes())?;
        } else {
            write_public(&path, contents.as_bytes())?;
        }
        written.push(path);
        Ok::<_, FileError>(())
    };
    put(ROOT_CERT, certs_to_pem([root.cert()]), false)?;
    if let (true, Some(key)) = (with_root_key, root.key_pem()) {
        put(ROOT_KEY, key, true)?;
    }
    put(ISSUER_CERT, certs_to_pem(ca.chain()), false)?;
    put(ISSUER_KEY, ca.issuer_key_pem(), true)?;
    let bundle = TrustBundle::with_roots(ca.trust_domain().clone(), [root.cert().clone()])
        .and_then(|b| b.to_spiffe_json())
        .map_err(|e| FileError::invalid(&dir.join(ROOT_CERT), e.to_string()))?;
    put(BUNDLE, bundle, false)?;
    Ok(written)
}

/// Loads a root with its key, to sign a new issuer under it (`--shared-root`).
pub fn load_root(dir: &Path) -> Result<RootCa, FileError> {
    let cert_path = dir.join(ROOT_CERT);
    let key_path = dir.join(ROOT_KEY);
    let cert = one_cert(&cert_path)?;
    let info = CertInfo::parse(&cert).map_err(|e| FileError::invalid(&cert_path, e.to_string()))?;
    if !info.is_ca {
        return Err(FileError::invalid(
            &cert_path,
            "is not a CA certificate (cA=false)",
        ));
    }
    if let Err(ago) = info.remaining(super::cert::now()) {
        return Err(FileError::invalid(
            &cert_path,
            format!("expired {} ago; create a new root", human_duration(ago)),
        ));
    }
    let key = load_key(&key_path)?;
    if !key_matches(&key, &cert) {
        return Err(FileError::invalid(
            &key_path,
            format!("does not belong to {}", cert_path.display()),
        ));
    }
    RootCa::from_parts(cert, Some(key)).map_err(|e| FileError::invalid(&cert_path, e.to_string()))
}

/// Loads the issuing half of a CA directory and checks it is usable now:
/// the key matches, the issuer names a trust domain, has not expired, and
/// chains to `root.crt`.
pub fn load_ca(dir: &Path) -> Result<CertificateAuthority, FileError> {
    load_ca_at(dir, super::cert::now())
}

pub fn load_ca_at(dir: &Path, now: OffsetDateTime) -> Result<CertificateAuthority, FileError> {
    let root_path = dir.join(ROOT_CERT);
    let issuer_path = dir.join(ISSUER_CERT);
    let key_path = dir.join(ISSUER_KEY);

    let root = one_cert(&root_path)?;
    let chain = certs_from_pem(&read(&issuer_path)?)
        .map_err(|e| FileError::invalid(&issuer_path, e.to_string()))?;
    let issuer = &chain[0];
    let info =
        CertInfo::parse(issuer).map_err(|e| FileError::invalid(&issuer_path, e.to_string()))?;
    if !info.is_ca {
        return Err(FileError::invalid(
            &issuer_path,
            "is not a CA certificate (cA=false); it cannot sign SVIDs",
        ));
    }
    let td = issuer_trust_domain(&info).ok_or_else(|| {
        FileError::invalid(
            &issuer_path,
            "names no trust domain (expected one URI SAN spiffe://<trust-domain>); was it made by `mesh identity ca create`?",
        )
    })?;
    if let Err(ago) = info.remaining(now) {
        return Err(FileError::invalid(
            &issuer_path,
            format!(
                "expired {} ago (notAfter {}); create a new issuer with `mesh identity ca create`",
                human_duration(ago),
                info.not_after
            ),
        ));
    }
    if now < info.not_before {
        return Err(FileError::invalid(
            &issuer_path,
            format!(
                "is not valid until {}; check this host's clock",
                info.not_before
            ),
        ));
    }
    let key = load_key(&key_path)?;
    if !key_matches(&key, issuer) {
        return Err(FileError::invalid(
            &key_path,
            format!("does not belong to {}", issuer_path.display()),
        ));
    }
    check_signed_chain(&chain, &root)
        .map_err(|problem| FileError::invalid(&issuer_path, problem))?;
    CertificateAuthority::from_parts(td, chain, key, root)
        .map_err(|e| FileError::invalid(&issuer_path, e.to_string()))
}

/// Loads `bundle.json` of a CA directory (or any bundle file) for `td`.
pub fn load_bundle(path: &Path, td: TrustDomain) -> Result<TrustBundle, FileError> {
    TrustBundle::from_any(td, &read(path)?).map_err(|e| FileError::invalid(path, e.to_string()))
}

fn one_cert(path: &Path) -> Result<CertificateDer<'static>, FileError> {
    let mut certs =
        certs_from_pem(&read(path)?).map_err(|e| FileError::invalid(path, e.to_string()))?;
    if certs.len() != 1 {
        return Err(FileError::invalid(
            path,
            format!("holds {} certificates; expected exactly one", certs.len()),
        ));
    }
    Ok(certs.remove(0))
}

fn load_key(path: &Path) -> Result<KeyPair, FileError> {
    // As ssh does: a key others can read may already be someone else's.
    let mode = fs::metadata(path)
        .map_err(|source| FileError::Io {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(FileError::invalid(
            path,
            format!(
                "is a private key readable by others (mode {:04o}); run `chmod 600 {}`",
                mode & 0o7777,
                path.display()
            ),
        ));
    }
    let text = String::from_utf8(read(path)?)
        .map_err(|_| FileError::invalid(path, "is not a PEM text file"))?;
    KeyPair::from_pem(&text)
        .map_err(|e| FileError::invalid(path, format!("is not a usable PKCS#8 private key: {e}")))
}

fn key_matches(key: &KeyPair, cert: &CertificateDer<'_>) -> bool {
    X509Certificate::from_der(cert)
        .is_ok_and(|(_, c)| c.public_key().raw == key.subject_public_key_info())
}

/// The trust domain an issuer certificate names (`spiffe://<td>`, no path).
fn issuer_trust_domain(info: &CertInfo) -> Option<TrustDomain> {
    match info.uri_sans.as_slice() {
        [uri] => SpiffeId::parse(uri)
            .ok()
            .filter(|id| id.path().is_empty())
            .map(|id| id.trust_domain()),
        _ => None,
    }
}

/// Checks each certificate of `chain` is signed by the next, and the last by `root`.
fn check_signed_chain(
    chain: &[CertificateDer<'_>],
    root: &CertificateDer<'_>,
) -> Result<(), String> {
    fn parse<'a>(c: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
        X509Certificate::from_der(c)
            .map(|(_, x)| x)
            .map_err(|e| format!("cannot parse certificate: {e}"))
    }
    let root_cert = parse(root)?;
    for (i, cert) in chain.iter().enumerate() {
        let child = parse(cert)?;
        let parent = match chain.get(i + 1) {
            Some(next) => parse(next)?,
            None => root_cert.clone(),
        };
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|_| {
                if i + 1 == chain.len() {
                    format!(
                        "is not signed by {ROOT_CERT}; the issuer and root do not belong together"
                    )
                } else {
                    format!(
                        "certificate {} is not signed by certificate {}",
                        i + 1,
                        i + 2
                    )
                }
            })?;
    }
    Ok(())
}
