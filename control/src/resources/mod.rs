//! Configuration resources: their schema, parsing, and the watched config
//! directory of the `local` store.

pub mod dir;
pub mod parse;
pub mod types;

pub use dir::ConfigDir;
pub use parse::ConfigError;
pub use types::Resource;

/// The `Link` to cluster `cluster` (trust domain of `bundle`) through
/// `gateways` (`host:port`), as YAML to put in another cluster's config
/// directory. `transport` is `tcp` or `quic`. Without gateways the Link
/// only admits the trust domain (what `mesh multicluster allow` prints).
pub fn link_yaml(
    cluster: &str,
    gateways: &[String],
    transport: &str,
    bundle: &mesh_core::identity::TrustBundle,
) -> Result<String, mesh_core::identity::bundle::BundleError> {
    let td = bundle.trust_domain();
    let json = bundle.to_spiffe_json()?.replace('\n', "");
    if gateways.is_empty() {
        return Ok(format!(
            "apiVersion: multicluster.mesh.rs/v1alpha1\nkind: Link\nmetadata:\n  name: {cluster}\n  namespace: mesh-system\nspec:\n  clusterName: {cluster}\n  trustDomain: {td}\n  trustBundle: '{json}'\n"
        ));
    }
    let gateways: Vec<String> = gateways.iter().map(|g| format!("\"{g}\"")).collect();
    Ok(format!(
        "apiVersion: multicluster.mesh.rs/v1alpha1\nkind: Link\nmetadata:\n  name: {cluster}\n  namespace: mesh-system\nspec:\n  clusterName: {cluster}\n  trustDomain: {td}\n  gatewayAddresses: [{gateways}]\n  gatewayIdentity: spiffe://{td}/ns/mesh-system/sa/gateway\n  transport: {transport}\n  trustBundle: '{json}'\n",
        gateways = gateways.join(", "),
    ))
}
