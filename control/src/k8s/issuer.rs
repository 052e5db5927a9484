//! The issuer from a Secret (`--ca-secret NS/NAME`, what `mesh install
//! --ca` creates): its `root.crt`, `issuer.crt`, `issuer.key` and
//! `bundle.json` are written into a private directory the control plane
//! loads as its CA directory, and rewritten when the Secret changes, so
//! the issuer reload that watches CA files picks the new issuer up.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use mesh_core::identity::files;
use tokio_stream::StreamExt;

/// The keys the Secret must hold.
pub const KEYS: [&str; 4] = [
    files::ROOT_CERT,
    files::ISSUER_CERT,
    files::ISSUER_KEY,
    files::BUNDLE,
];
/// Largest value accepted per key.
const MAX_VALUE: usize = 64 * 1024;

/// `NS/NAME`.
pub fn parse_ref(text: &str) -> Result<(String, String), String> {
    let (ns, name) = text.split_once('/').ok_or_else(|| {
        format!("--ca-secret {text:?}: write NAMESPACE/NAME, e.g. mesh-system/mesh-issuer")
    })?;
    crate::resources::parse::check_name("--ca-secret namespace", ns)?;
    crate::resources::parse::check_name("--ca-secret name", name)?;
    Ok((ns.to_owned(), name.to_owned()))
}

/// Writes the Secret's files into `dir` (created 0700). Refuses a Secret
/// that lacks a key or holds an oversized value, naming it.
pub fn write(secret: &Secret, dir: &Path) -> Result<(), String> {
    let name = secret.metadata.name.as_deref().unwrap_or("?");
    let data = secret.data.as_ref();
    let mut values = Vec::new();
    for key in KEYS {
        let value = data.and_then(|d| d.get(key)).ok_or_else(|| {
            format!("Secret {name} has no {key:?}; create it with `mesh install --ca DIR` (keys: {KEYS:?})")
        })?;
        if value.0.len() > MAX_VALUE {
            return Err(format!("Secret {name}: {key} is over {MAX_VALUE} bytes"));
        }
        values.push((key, &value.0));
    }
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for (key, value) in values {
        let path = dir.join(key);
        // A re-list delivers the same Secret again: leave the files (and
        // the issuer reload that watches them) alone.
        if std::fs::read(&path).is_ok_and(|old| &old == value) {
            continue;
        }
        let written = if key == files::ISSUER_KEY {
            files::write_private(&path, value)
        } else {
            files::write_public(&path, value)
        };
        written.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Fetches the Secret once (at start: without it there is nothing to sign
/// with) into `dir`.
pub async fn fetch(
    client: &Client,
    (ns, name): &(String, String),
    dir: &Path,
) -> Result<(), String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = api
        .get(name)
        .await
        .map_err(|e| format!("cannot read Secret {ns}/{name}: {e}"))?;
    write(&secret, dir)
}

/// Rewrites `dir` whenever the Secret changes, until aborted.
pub async fn follow(client: Client, (ns, name): (String, String), dir: PathBuf) {
    let api: Api<Secret> = Api::namespaced(client, &ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api, config).default_backoff().applied_objects();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(secret) => match write(&secret, &dir) {
                Ok(()) => tracing::debug!("issuer Secret {ns}/{name} written to {}", dir.display()),
                Err(e) => tracing::error!(
                    "issuer Secret {ns}/{name} refused, the current issuer keeps signing: {e}"
                ),
            },
            Err(e) => {
                tracing::warn!(error = %e, "watch of issuer Secret {ns}/{name} failed; retrying")
            }
        }
    }
}
