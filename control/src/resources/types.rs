//! The resource kinds the control plane reads, Kubernetes shaped
//! (`apiVersion`, `kind`, `metadata`, `spec`). Unknown fields are errors, so
//! a typo is reported instead of silently ignored.

use std::{collections::BTreeMap, time::Duration};

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const CORE_V1: &str = "v1";
pub const POLICY_V1ALPHA1: &str = "policy.mesh.rs/v1alpha1";
pub const GATEWAY_V1: &str = "gateway.networking.k8s.io/v1";
pub const MULTICLUSTER_V1ALPHA1: &str = "multicluster.mesh.rs/v1alpha1";
/// The label that exports a Service to linked clusters.
pub const EXPORTED_LABEL: &str = "multicluster.mesh.rs/exported";

/// `metadata` of every resource.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// One parsed resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    Service(Object<ServiceSpec>),
    Server(Object<ServerSpec>),
    AuthorizationPolicy(Object<AuthorizationPolicySpec>),
    MeshTlsAuthentication(Object<MeshTlsAuthenticationSpec>),
    HttpRoute(Object<HttpRouteSpec>),
    Link(Object<LinkSpec>),
    MirroredService(Object<MirroredServiceSpec>),
    FailoverPolicy(Object<FailoverPolicySpec>),
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Service(_) => "Service",
            Self::Server(_) => "Server",
            Self::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Self::MeshTlsAuthentication(_) => "MeshTLSAuthentication",
            Self::HttpRoute(_) => "HTTPRoute",
            Self::Link(_) => "Link",
            Self::MirroredService(_) => "MirroredService",
            Self::FailoverPolicy(_) => "FailoverPolicy",
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Self::Service(o) => &o.metadata,
            Self::Server(o) => &o.metadata,
            Self::AuthorizationPolicy(o) => &o.metadata,
            Self::MeshTlsAuthentication(o) => &o.metadata,
            Self::HttpRoute(o) => &o.metadata,
            Self::Link(o) => &o.metadata,
            Self::MirroredService(o) => &o.metadata,
            Self::FailoverPolicy(o) => &o.metadata,
        }
    }
}

/// A whole document of one kind.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Object<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

/// `v1/Service`: a selector over workload labels and the ports it serves.
/// Label `multicluster.mesh.rs/exported: "true"` exports it (federation).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// The workload port; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// `http`, `h2c`/`http2`, `grpc` or `opaque`/`tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// Only `TCP` is meshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `policy.mesh.rs/v1alpha1/Server`: a port of the workloads a label
/// selector picks, which authorization policies then target.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "policy.mesh.rs",
    version = "v1alpha1",
    kind = "Server",
    namespaced,
    status = "ServerStatus",
    shortname = "meshserver",
    category = "mesh"
)]
pub struct ServerSpec {
    pub pod_selector: LabelSelector,
    /// A port number, or the name of a registered workload port.
    #[schemars(schema_with = "int_or_string")]
    pub port: PortRef,
    /// `HTTP/1`, `HTTP/2`, `gRPC`, `opaque` or `unknown` (detect).
    #[serde(default)]
    pub proxy_protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// A Kubernetes `IntOrString`: what a structural schema allows for an
/// untagged number-or-name.
fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-int-or-string": true })
}

/// `policy.mesh.rs/v1alpha1/AuthorizationPolicy`: who may use a Server.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "policy.mesh.rs",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    category = "mesh"
)]
pub struct AuthorizationPolicySpec {
    pub target_ref: TargetRef,
    pub required_authentication_refs: Vec<TargetRef>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// `policy.mesh.rs/v1alpha1/MeshTLSAuthentication`: a set of identities.
/// Each entry is an exact SPIFFE ID, `spiffe://<trust-domain>/*` for a whole
/// trust domain, or `*` for any verified identity.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "policy.mesh.rs",
    version = "v1alpha1",
    kind = "MeshTLSAuthentication",
    root = "MeshTlsAuthentication",
    namespaced,
    category = "mesh"
)]
pub struct MeshTlsAuthenticationSpec {
    pub identities: Vec<String>,
}

/// `gateway.networking.k8s.io/v1/HTTPRoute`, attached to a Service port.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "policy.mesh.rs",
    version = "v1alpha1",
    kind = "HTTPRoute",
    root = "HttpRoute",
    namespaced,
    category = "mesh"
)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Service port; absent means every port.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// `PathPrefix` (default) or `Exact`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub value: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeaderMatch {
    /// Only `Exact` is supported.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
}

fn one() -> u32 {
    1
}

/// Gateway API durations (`10s`, `500ms`, `1m30s`), kept as written.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub backoff: Option<String>,
}

/// Parses a Gateway API duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (write e.g. 10s or 500ms)"))
}

/// `multicluster.mesh.rs/v1alpha1/Link`: another cluster this one calls
/// (its gateway) and trusts (its trust domain and bundle). Written by
/// `mesh multicluster link`, run against the other cluster.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "multicluster.mesh.rs",
    version = "v1alpha1",
    kind = "Link",
    namespaced,
    status = "LinkStatus",
    category = "mesh"
)]
pub struct LinkSpec {
    /// The other cluster's name (mirrors are named `<svc>-<cluster>`).
    pub cluster_name: String,
    pub trust_domain: String,
    /// `host:port` of its gateway; hosts may be DNS names. Empty: the Link
    /// only admits the trust domain (`mesh multicluster allow`) and nothing
    /// is mirrored or reached through it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_addresses: Vec<String>,
    /// The SPIFFE ID its gateway presents (required with gateway addresses).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway_identity: String,
    /// `quic` (the default) or `tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Its trust bundle: a SPIFFE bundle document (JSON) or PEM roots.
    pub trust_bundle: String,
}

/// `multicluster.mesh.rs/v1alpha1/MirroredService`: a service of a linked
/// cluster, named `<svc>-<cluster>` in the same namespace, reached through
/// that cluster's gateway. Written by the service mirror (or by hand).
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "multicluster.mesh.rs",
    version = "v1alpha1",
    kind = "MirroredService",
    namespaced,
    category = "mesh"
)]
pub struct MirroredServiceSpec {
    /// The `clusterName` of the Link it comes through.
    pub link: String,
    /// The service's name in the remote cluster (same namespace).
    pub remote_name: String,
    pub ports: Vec<ServicePort>,
    /// The SPIFFE IDs the remote endpoints present.
    pub identities: Vec<String>,
    /// Whether the remote gateway answers and the service has ready endpoints.
    #[serde(default)]
    pub ready: bool,
}

/// `multicluster.mesh.rs/v1alpha1/FailoverPolicy`: where callers of a
/// service go when its home tier is not healthy enough. Tiers are ordered;
/// each is `local` (this cluster's endpoints) and/or linked clusters (their
/// mirrors of the service of the same name). Several clusters in one tier
/// make a federated service: one balancer over all of them.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "multicluster.mesh.rs",
    version = "v1alpha1",
    kind = "FailoverPolicy",
    namespaced,
    category = "mesh"
)]
pub struct FailoverPolicySpec {
    /// The service, in the policy's namespace, whose callers it steers.
    pub service: String,
    /// Ordered tiers, best first (at most [`MAX_FAILOVER_TIERS`]).
    pub tiers: Vec<FailoverTier>,
    /// A tier takes all the traffic that reaches it while its healthy share
    /// is at least this; below, it takes `share / threshold` of it and the
    /// rest spills to the next tier. 0 to 1; default [`DEFAULT_THRESHOLD`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Ratio>,
    /// How long a better tier must have been healthier before traffic goes
    /// back to it (hysteresis); default 3s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback_delay: Option<String>,
}

/// One tier: `local` and/or linked clusters' names.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailoverTier {
    pub clusters: Vec<String>,
}

/// The name a tier uses for this cluster.
pub const LOCAL_TIER: &str = "local";
/// Tiers a policy may list.
pub const MAX_FAILOVER_TIERS: usize = 8;
/// Clusters one tier may list.
pub const MAX_TIER_CLUSTERS: usize = 16;
/// Envoy's default overprovisioning factor is 1.4: a priority takes all the
/// load down to 1/1.4 = 71 % healthy. Kuma's zone failover threshold is a
/// share of healthy endpoints too.
pub const DEFAULT_THRESHOLD: f64 = 0.7;
/// The hysteresis before failback.
pub const DEFAULT_FAILBACK_DELAY: Duration = Duration::from_secs(3);

/// A number from 0 to 1.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct Ratio(pub f64);

// Validation refuses NaN, so equality is total on the values served.
impl Eq for Ratio {}

/// A Service is exported when it carries the export label.
pub fn is_exported(service: &Object<ServiceSpec>) -> bool {
    service
        .metadata
        .labels
        .get(EXPORTED_LABEL)
        .map(String::as_str)
        == Some("true")
}

/// Where an operator looks first: the standard condition list.
pub type Condition = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// `Server` status: `Accepted` says whether the control plane serves it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// `Link` status: `Alive` (its gateway answers probes) and how many of its
/// services are mirrored here.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirrored_services: Option<u32>,
}

/// `workload.mesh.rs/v1alpha1/ExternalWorkload`: a workload outside
/// Kubernetes (a VM, a bare-metal host) in the mesh. On the `kube` store a
/// workload's registration is kept as one of these, named like the
/// workload, in its namespace; its labels are the object's labels.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "workload.mesh.rs",
    version = "v1alpha1",
    kind = "ExternalWorkload",
    namespaced,
    status = "ExternalWorkloadStatus",
    category = "mesh"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalWorkloadSpec {
    /// The SPIFFE ID it presents (the identity that registered it).
    pub identity: String,
    /// Its IP addresses.
    pub addresses: Vec<String>,
    /// Its application ports.
    #[serde(default)]
    pub ports: Vec<ExternalWorkloadPort>,
    /// Its proxy's inbound port; absent when it has no proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_port: Option<u16>,
    /// Reached through this cluster's gateway (a VM with no route from the
    /// cluster's pods).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub via_gateway: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalWorkloadPort {
    pub name: String,
    pub port: u16,
    /// `http`, `http2`, `grpc`, `opaque` or absent (detect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `ExternalWorkload` status: `Ready` follows its heartbeats.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalWorkloadStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
