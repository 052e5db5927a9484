//! Manifests as YAML: typed Kubernetes objects serialized, several
//! documents in one stream, stable bytes for the same input.

use serde::Serialize;

/// Why manifests could not be printed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot serialize {what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_saphyr::ser::Error),
}

/// One document, as a JSON value (keys sorted, so output is stable).
pub fn value(what: &str, object: &impl Serialize) -> Result<serde_json::Value, ManifestError> {
    serde_json::to_value(object).map_err(|source| ManifestError::Json {
        what: what.to_owned(),
        source,
    })
}

/// The documents as one YAML stream for `kubectl apply -f -`.
pub fn yaml(documents: &[serde_json::Value]) -> Result<String, ManifestError> {
    Ok(serde_saphyr::to_string_multiple(documents)?)
}
