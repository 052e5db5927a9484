//! The CustomResourceDefinitions, generated from the same Rust types the
//! local store parses (kube's `CustomResource` derive and schemars), so
//! the API server enforces the schema the control plane reads.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::resources::types::{
    AuthorizationPolicy, ExternalWorkload, FailoverPolicy, HttpRoute, Link, MeshTlsAuthentication,
    MirroredService, Server,
};

/// Label on every object `mesh install` prints.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "mesh");

/// Every CRD Mesh installs, in a fixed order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        Server::crd(),
        AuthorizationPolicy::crd(),
        MeshTlsAuthentication::crd(),
        HttpRoute::crd(),
        Link::crd(),
        MirroredService::crd(),
        FailoverPolicy::crd(),
        ExternalWorkload::crd(),
    ];
    for crd in &mut crds {
        crd.metadata
            .labels
            .get_or_insert_default()
            .insert(PART_OF.0.to_owned(), PART_OF.1.to_owned());
    }
    crds
}

/// The names (`<plural>.<group>`) of [`crds`].
pub fn crd_names() -> Vec<String> {
    crds().into_iter().filter_map(|c| c.metadata.name).collect()
}

/// The CRDs as one YAML stream (`mesh install --crds`).
pub fn crds_yaml() -> Result<String, super::manifest::ManifestError> {
    let docs = crds()
        .iter()
        .map(|crd| super::manifest::value("a CRD", crd))
        .collect::<Result<Vec<_>, _>>()?;
    super::manifest::yaml(&docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the API server requires of a structural schema, checked here
    /// too so a change to the types fails fast.
    #[test]
    fn the_crds_are_structural() {
        let yaml = crds_yaml().unwrap();
        assert_eq!(crds().len(), 8);
        assert!(!yaml.contains("anyOf"), "{yaml}");
        assert!(yaml.contains("x-kubernetes-int-or-string: true"), "{yaml}");
        assert_eq!(yaml, crds_yaml().unwrap(), "same input, same bytes");
    }
}
