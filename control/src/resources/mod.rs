//! Configuration resources: their schema, parsing, and the watched config
//! directory of the `local` store.

pub mod dir;
pub mod parse;
pub mod types;

pub use dir::ConfigDir;
pub use parse::ConfigError;
pub use types::Resource;

/// Why a Link could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum LinkYamlError {
    #[error(transparent)]
    Bundle(#[from] mesh_core::identity::bundle::BundleError),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot serialize the Link: {0}")]
    Yaml(#[from] serde_saphyr::ser::Error),
}

/// The `Link` to cluster `cluster` (trust domain of `bundle`) through
/// `gateways` (`host:port`), as YAML to put in another cluster's config
/// directory. `transport` is `tcp` or `quic`. Without gateways the Link
/// only admits the trust domain (what `mesh multicluster allow` prints).
/// Built as a typed resource and serialized, and checked by the same rules
/// the control plane applies when it reads it back.
pub fn link_yaml(
    cluster: &str,
    gateways: &[String],
    transport: &str,
    bundle: &mesh_core::identity::TrustBundle,
) -> Result<String, LinkYamlError> {
    let td = bundle.trust_domain();
    let link = types::Object {
        api_version: types::MULTICLUSTER_V1ALPHA1.to_owned(),
        kind: "Link".to_owned(),
        metadata: types::Metadata {
            name: cluster.to_owned(),
            namespace: "mesh-system".to_owned(),
            ..Default::default()
        },
        spec: types::LinkSpec {
            cluster_name: cluster.to_owned(),
            trust_domain: td.to_string(),
            gateway_addresses: gateways.to_vec(),
            gateway_identity: if gateways.is_empty() {
                String::new()
            } else {
                format!("spiffe://{td}/ns/mesh-system/sa/gateway")
            },
            transport: (!gateways.is_empty()).then(|| transport.to_owned()),
            // One line: the file stays readable.
            trust_bundle: bundle.to_spiffe_json()?.replace('\n', ""),
        },
    };
    let yaml = serde_saphyr::to_string(&link)?;
    // What the control plane would refuse is refused here, naming the field.
    parse::parse_file(std::path::Path::new("link.yaml"), &yaml)
        .map_err(|e| LinkYamlError::Invalid(e.reason))?;
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names and addresses an operator types cannot add fields or
    /// documents to the Link: a newline or quote stays inside its value,
    /// and a name the control plane would refuse is refused here.
    #[test]
    fn a_link_is_serialized_not_pasted() {
        let root = mesh_core::identity::RootCa::generate(
            mesh_core::identity::ca::DEFAULT_ROOT_TTL,
            mesh_core::identity::cert::now(),
        )
        .unwrap();
        let bundle = mesh_core::identity::TrustBundle::with_roots(
            "east.mesh.local".parse().unwrap(),
            [root.cert().clone()],
        )
        .unwrap();
        let hostile = "gw:4143\"]\n---\nkind: MeshTLSAuthentication".to_owned();
        match link_yaml("east", &[hostile], "quic", &bundle) {
            Err(LinkYamlError::Invalid(why)) => {
                assert!(why.contains("spec.gatewayAddresses"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let yaml = link_yaml("east", &["gw.east.example:4143".into()], "quic", &bundle).unwrap();
        let parsed = parse::parse_file(std::path::Path::new("l.yaml"), &yaml).unwrap();
        assert_eq!(parsed.len(), 1, "{yaml}");
        let (_, Resource::Link(link)) = &parsed[0] else {
            panic!("{yaml}")
        };
        assert_eq!(link.spec.gateway_addresses, ["gw.east.example:4143"]);
        assert_eq!(link.spec.transport.as_deref(), Some("quic"));
        assert!(matches!(
            link_yaml("East\nkind: x", &[], "tcp", &bundle),
            Err(LinkYamlError::Invalid(_))
        ));
    }
}
