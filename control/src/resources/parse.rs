//! Multi-document YAML files into resources, with errors that name the
//! file, the line and the reason.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_core::identity::SpiffeId;
use serde::Deserialize;

use super::types::*;

/// A file that could not be used; nothing of it is applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {reason}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line in the file.
    pub line: usize,
    pub reason: String,
    /// Metric label: `yaml`, `schema`, `unknown_kind`, `api_version`,
    /// `invalid`, `duplicate`, `io`.
    pub kind: &'static str,
}

/// Parses every document of a file. Any error rejects the whole file, so a
/// half-applied file never serves.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<(usize, Resource)>, ConfigError> {
    let mut out = Vec::new();
    for (start, doc) in split_documents(text) {
        let err = |line: usize, reason: String, kind| ConfigError {
            file: file.to_owned(),
            line,
            reason,
            kind,
        };
        let yaml_err = |e: serde_saphyr::Error, kind| {
            let line = e.location().map_or(0, |l| l.line() as usize);
            err(start + line.saturating_sub(1), short_reason(&e), kind)
        };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Header {
            api_version: Option<String>,
            kind: Option<String>,
        }
        let header: Header = serde_saphyr::from_str(&doc).map_err(|e| yaml_err(e, "yaml"))?;
        let (Some(api_version), Some(kind)) = (header.api_version, header.kind) else {
            return Err(err(
                start,
                "every document needs `apiVersion` and `kind`".into(),
                "schema",
            ));
        };
        let want_api = match kind.as_str() {
            "Service" => CORE_V1,
            "Server" | "AuthorizationPolicy" | "MeshTLSAuthentication" => POLICY_V1ALPHA1,
            "HTTPRoute" => GATEWAY_V1,
            "Link" | "MirroredService" | "FailoverPolicy" => MULTICLUSTER_V1ALPHA1,
            other => {
                return Err(err(
                    start,
                    format!(
                        "unknown kind {other:?}; known kinds: Service, Server, AuthorizationPolicy, MeshTLSAuthentication, HTTPRoute, Link, MirroredService, FailoverPolicy"
                    ),
                    "unknown_kind",
                ));
            }
        };
        // HTTPRoute: the Gateway API's group, or ours (what `mesh install
        // --crds` installs on Kubernetes, so it never collides with the
        // cluster's own Gateway API CRDs).
        let also_ok = kind == "HTTPRoute" && api_version == POLICY_V1ALPHA1;
        if api_version != want_api && !also_ok {
            return Err(err(
                start,
                format!("{kind} has apiVersion {api_version:?}; use {want_api:?}"),
                "api_version",
            ));
        }
        let schema = |e| yaml_err(e, "schema");
        let resource = match kind.as_str() {
            "Service" => Resource::Service(serde_saphyr::from_str(&doc).map_err(schema)?),
            "Server" => Resource::Server(serde_saphyr::from_str(&doc).map_err(schema)?),
            "AuthorizationPolicy" => {
                Resource::AuthorizationPolicy(serde_saphyr::from_str(&doc).map_err(schema)?)
            }
            "MeshTLSAuthentication" => {
                Resource::MeshTlsAuthentication(serde_saphyr::from_str(&doc).map_err(schema)?)
            }
            "Link" => Resource::Link(serde_saphyr::from_str(&doc).map_err(schema)?),
            "MirroredService" => {
                Resource::MirroredService(serde_saphyr::from_str(&doc).map_err(schema)?)
            }
            "FailoverPolicy" => {
                Resource::FailoverPolicy(serde_saphyr::from_str(&doc).map_err(schema)?)
            }
            _ => Resource::HttpRoute(serde_saphyr::from_str(&doc).map_err(schema)?),
        };
        validate(&resource).map_err(|reason| err(start, reason, "invalid"))?;
        out.push((start, resource));
    }
    Ok(out)
}

/// Splits on `---` lines; returns each non-empty document with the 1-based
/// line it starts on.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    let mut flush = |current: &mut String, start: usize| {
        let meaningful = current
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        if meaningful {
            docs.push((start, std::mem::take(current)));
        }
        current.clear();
    };
    for (i, line) in text.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ") || line == "...";
        if is_separator {
            flush(&mut current, start);
            start = i + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(&mut current, start);
    docs
}

/// serde-saphyr's first line is "error: line L column C: reason"; keep the reason.
fn short_reason(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    match first
        .find("column ")
        .and_then(|i| first[i..].find(": ").map(|j| i + j + 2))
    {
        Some(at) => first[at..].to_owned(),
        None => first.trim_start_matches("error: ").to_owned(),
    }
}

/// Checks what the schema cannot: names, references, values.
pub fn validate(resource: &Resource) -> Result<(), String> {
    let meta = resource.metadata();
    check_name("metadata.name", &meta.name)?;
    check_name("metadata.namespace", &meta.namespace)?;
    match resource {
        Resource::Service(svc) => {
            if svc.spec.ports.is_empty() {
                return Err("Service spec.ports is empty".into());
            }
            let mut seen = std::collections::BTreeSet::new();
            for p in &svc.spec.ports {
                if p.port == 0 || !seen.insert(p.port) {
                    return Err(format!("Service port {} is zero or listed twice", p.port));
                }
                if let Some(proto) = &p.protocol
                    && proto != "TCP"
                {
                    return Err(format!(
                        "Service port {} protocol {proto:?}: only TCP is meshed",
                        p.port
                    ));
                }
            }
        }
        Resource::Server(srv) => {
            if let Some(p) = &srv.spec.proxy_protocol
                && !matches!(
                    p.as_str(),
                    "HTTP/1" | "HTTP/2" | "gRPC" | "opaque" | "unknown"
                )
            {
                return Err(format!(
                    "Server proxyProtocol {p:?}: use HTTP/1, HTTP/2, gRPC, opaque or unknown"
                ));
            }
        }
        Resource::AuthorizationPolicy(ap) => {
            if ap.spec.target_ref.kind != "Server" {
                return Err(format!(
                    "AuthorizationPolicy targetRef.kind {:?}: only Server is supported",
                    ap.spec.target_ref.kind
                ));
            }
            if let Some(r) = ap
                .spec
                .required_authentication_refs
                .iter()
                .find(|r| r.kind != "MeshTLSAuthentication")
            {
                return Err(format!(
                    "requiredAuthenticationRefs kind {:?}: only MeshTLSAuthentication is supported",
                    r.kind
                ));
            }
        }
        Resource::MeshTlsAuthentication(m) => {
            for id in &m.spec.identities {
                check_identity_pattern(id)?;
            }
        }
        Resource::Link(link) => {
            link_bundle(&link.spec)?;
        }
        Resource::MirroredService(m) => {
            check_name("MirroredService spec.remoteName", &m.spec.remote_name)?;
            if m.spec.ports.is_empty() {
                return Err("MirroredService spec.ports is empty".into());
            }
            for id in &m.spec.identities {
                SpiffeId::parse(id)
                    .map_err(|e| format!("MirroredService spec.identities {id:?}: {e}"))?;
            }
        }
        Resource::FailoverPolicy(p) => check_failover(&p.spec)?,
        Resource::HttpRoute(route) => {
            if route.spec.parent_refs.is_empty() {
                return Err("HTTPRoute spec.parentRefs is empty".into());
            }
            for rule in &route.spec.rules {
                if let Some(t) = &rule.timeouts {
                    for d in [&t.request, &t.backend_request].into_iter().flatten() {
                        parse_duration(d)?;
                    }
                }
                if let Some(r) = &rule.retry {
                    if let Some(b) = &r.backoff {
                        parse_duration(b)?;
                    }
                    if let Some(c) = r.codes.iter().find(|c| !(500..=599).contains(*c)) {
                        return Err(format!("retry code {c}: only 5xx responses are retried"));
                    }
                }
                for m in &rule.matches {
                    if let Some(p) = &m.path {
                        if !matches!(p.kind.as_deref(), None | Some("PathPrefix") | Some("Exact")) {
                            return Err(format!(
                                "path match type {:?}: use PathPrefix or Exact",
                                p.kind
                            ));
                        }
                        if !p.value.starts_with('/') {
                            return Err(format!(
                                "path match value {:?} must start with /",
                                p.value
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// A FailoverPolicy's shape; the clusters it names are checked against
/// the Links where both are known (the index).
fn check_failover(spec: &FailoverPolicySpec) -> Result<(), String> {
    check_name("FailoverPolicy spec.service", &spec.service)?;
    if spec.tiers.is_empty() {
        return Err(
            "FailoverPolicy spec.tiers is empty: list the tiers best first, e.g. [{clusters: [local]}, {clusters: [east]}]"
                .into(),
        );
    }
    if spec.tiers.len() > MAX_FAILOVER_TIERS {
        return Err(format!(
            "FailoverPolicy spec.tiers lists {} tiers; at most {MAX_FAILOVER_TIERS}",
            spec.tiers.len()
        ));
    }
    let mut seen = std::collections::BTreeMap::new();
    for (i, tier) in spec.tiers.iter().enumerate() {
        if tier.clusters.is_empty() {
            return Err(format!(
                "FailoverPolicy spec.tiers[{i}].clusters is empty: name `local` or linked clusters"
            ));
        }
        if tier.clusters.len() > MAX_TIER_CLUSTERS {
            return Err(format!(
                "FailoverPolicy spec.tiers[{i}].clusters lists {}; at most {MAX_TIER_CLUSTERS}",
                tier.clusters.len()
            ));
        }
        for (j, cluster) in tier.clusters.iter().enumerate() {
            check_name(
                &format!("FailoverPolicy spec.tiers[{i}].clusters[{j}]"),
                cluster,
            )?;
            if let Some(before) = seen.insert(cluster.as_str(), i) {
                return Err(format!(
                    "FailoverPolicy spec.tiers[{i}].clusters[{j}]: {cluster:?} is already in tier {before}; a cluster belongs to one tier"
                ));
            }
        }
    }
    if let Some(Ratio(t)) = spec.threshold
        && !(0.0..=1.0).contains(&t)
    {
        return Err(format!(
            "FailoverPolicy spec.threshold {t} is outside 0-1 (the healthy share at which a tier stops spilling; e.g. 0.7)"
        ));
    }
    if let Some(d) = &spec.failback_delay {
        let d = parse_duration(d).map_err(|e| format!("FailoverPolicy spec.failbackDelay: {e}"))?;
        if d > Duration::from_secs(600) {
            return Err(format!(
                "FailoverPolicy spec.failbackDelay {d:?} is over 10 minutes"
            ));
        }
    }
    Ok(())
}

/// A DNS-1123 label, as Kubernetes names are.
pub fn check_name(field: &str, name: &str) -> Result<(), String> {
    if mesh_core::names::is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "{field} {name:?} must be 1-63 lower-case letters, digits or '-', not starting or ending with '-'"
        ))
    }
}

fn check_identity_pattern(pattern: &str) -> Result<(), String> {
    if pattern == "*" {
        return Ok(());
    }
    if let Some(td) = pattern.strip_suffix("/*") {
        return mesh_core::identity::TrustDomain::parse(td)
            .map(|_| ())
            .map_err(|e| format!("identity {pattern:?}: {e}"));
    }
    SpiffeId::parse(pattern)
        .map(|_| ())
        .map_err(|e| format!("identity {pattern:?}: {e}"))
}

/// A Link's trust domain and bundle, checked: the gateway identity must
/// be in that trust domain, every gateway address `host:port`, the
/// transport `quic` or `tcp`, and the bundle must parse with at least one
/// root.
pub fn link_bundle(spec: &LinkSpec) -> Result<mesh_core::identity::TrustBundle, String> {
    use mesh_core::identity::{SpiffeId, TrustBundle, TrustDomain};
    let td: TrustDomain = spec
        .trust_domain
        .parse()
        .map_err(|e| format!("Link spec.trustDomain {:?}: {e}", spec.trust_domain))?;
    if spec.cluster_name.is_empty() {
        return Err("Link spec.clusterName is empty".into());
    }
    // Without gateway addresses the Link only admits the trust domain.
    if !spec.gateway_addresses.is_empty() || !spec.gateway_identity.is_empty() {
        if spec.gateway_identity.is_empty() {
            return Err(format!(
                "Link spec.gatewayIdentity is empty; write spiffe://{td}/ns/mesh-system/sa/gateway"
            ));
        }
        let gateway: SpiffeId = spec
            .gateway_identity
            .parse()
            .map_err(|e| format!("Link spec.gatewayIdentity {:?}: {e}", spec.gateway_identity))?;
        if gateway.trust_domain() != td {
            return Err(format!(
                "Link spec.gatewayIdentity {gateway} is not in trust domain {td}"
            ));
        }
        if spec.gateway_addresses.is_empty() {
            return Err(
                "Link spec.gatewayAddresses is empty; write host:port (port 4143 by default), or drop gatewayIdentity to only admit the trust domain".into(),
            );
        }
    }
    for addr in &spec.gateway_addresses {
        let ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            return Err(format!(
                "Link spec.gatewayAddresses: {addr:?} is not host:port"
            ));
        }
    }
    if !matches!(spec.transport.as_deref(), None | Some("quic") | Some("tcp")) {
        return Err(format!(
            "Link spec.transport {:?}: use quic or tcp",
            spec.transport.as_deref().unwrap_or_default()
        ));
    }
    let text = spec.trust_bundle.trim();
    let bundle = if text.starts_with('{') {
        TrustBundle::from_spiffe_json(td.clone(), text.as_bytes())
    } else {
        TrustBundle::from_pem(td.clone(), text.as_bytes())
    }
    .map_err(|e| format!("Link spec.trustBundle for {td}: {e}"))?;
    if bundle.roots().is_empty() {
        return Err(format!("Link spec.trustBundle for {td} holds no root"));
    }
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<(usize, Resource)>, ConfigError> {
        parse_file(Path::new("cfg/shop.yaml"), text)
    }

    #[test]
    fn multi_document_file_parses_with_start_lines() {
        let text = "# shop\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{port: 8080, appProtocol: http}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {name: web-only, namespace: shop}\nspec:\n  identities: [\"spiffe://west.mesh.local/ns/shop/sa/web\", \"spiffe://east.mesh.local/*\"]\n";
        let docs = parse(text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].0, 3);
        assert_eq!(docs[1].0, 10);
        assert_eq!(docs[0].1.metadata().namespace, "shop");
    }

    #[test]
    fn a_bad_link_names_the_field_and_the_fix() {
        let link = |td: &str, gw: &str, transport: &str, bundle: &str| {
            serde_saphyr::to_string(&serde_json::json!({
                "apiVersion": "multicluster.mesh.rs/v1alpha1", "kind": "Link",
                "metadata": { "name": "east" },
                "spec": {
                    "clusterName": "east", "trustDomain": td, "gatewayAddresses": [gw],
                    "gatewayIdentity": "spiffe://east.mesh.local/ns/mesh-system/sa/gateway",
                    "transport": transport, "trustBundle": bundle,
                },
            }))
            .unwrap()
        };
        let reason = |text: String| parse(&text).unwrap_err().to_string();
        let no_roots = r#"{"keys": []}"#;
        assert!(
            reason(link("north.mesh.local", "gw:4143", "tcp", no_roots))
                .contains("gatewayIdentity spiffe://east.mesh.local/ns/mesh-system/sa/gateway is not in trust domain north.mesh.local")
        );
        assert!(
            reason(link("east.mesh.local", "gw", "tcp", no_roots))
                .contains("\"gw\" is not host:port")
        );
        assert!(
            reason(link("east.mesh.local", "gw:4143", "udp", no_roots)).contains("use quic or tcp")
        );
        let bad = reason(link("east.mesh.local", "gw:4143", "quic", "not a bundle"));
        assert!(
            bad.contains("spec.trustBundle for east.mesh.local"),
            "{bad}"
        );
        assert!(bad.starts_with("cfg/shop.yaml:1:"), "{bad}");
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec:\n  ports: [{port: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec:\n  ports:\n  - prot: 5432\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, 12);
        assert_eq!(err.kind, "schema");
        assert!(
            err.to_string()
                .starts_with("cfg/shop.yaml:12: unknown field `prot`"),
            "{err}"
        );

        let misspelled = serde_saphyr::to_string(&serde_json::json!({
            "apiVersion": "v1", "kind": "Servic", "metadata": { "name": "a" }, "spec": {},
        }))
        .unwrap();
        let err = parse(&misspelled).unwrap_err();
        assert_eq!((err.line, err.kind), (1, "unknown_kind"));
        let err = parse("apiVersion: v2\nkind: Service\nmetadata: {name: a}\nspec: {ports: []}\n")
            .unwrap_err();
        assert_eq!(err.kind, "api_version");
        let err = parse("kind: [\n").unwrap_err();
        assert_eq!((err.line, err.kind), (1, "yaml"));
        let err = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: Api}\nspec: {ports: [{port: 1}]}\n",
        )
        .unwrap_err();
        assert_eq!(err.kind, "invalid");
        assert!(err.reason.contains("metadata.name \"Api\""), "{err}");
        let err = parse("apiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {name: a}\nspec: {identities: [\"spiffe://West/x\"]}\n").unwrap_err();
        assert!(err.reason.contains("lower case"), "{err}");
    }

    #[test]
    fn failover_policy_errors_name_the_field() {
        use serde_json::json;
        // Each document serialized, never pasted together.
        let policy = |spec: serde_json::Value| {
            serde_saphyr::to_string(&json!({
                "apiVersion": "multicluster.mesh.rs/v1alpha1",
                "kind": "FailoverPolicy",
                "metadata": {"name": "api", "namespace": "shop"},
                "spec": spec,
            }))
            .unwrap()
        };
        let tiers = |t: &[&[&str]]| -> Vec<serde_json::Value> {
            t.iter().map(|c| json!({"clusters": c})).collect()
        };
        let ok = policy(json!({
            "service": "api", "tiers": tiers(&[&["local"], &["east", "north"]]),
            "threshold": 0.5, "failbackDelay": "5s",
        }));
        assert!(parse(&ok).is_ok(), "{:?}", parse(&ok));
        let local = tiers(&[&["local"]]);
        for (spec, want) in [
            (
                json!({"service": "api", "tiers": []}),
                "spec.tiers is empty",
            ),
            (
                json!({"service": "api", "tiers": tiers(&[&[]])}),
                "spec.tiers[0].clusters is empty",
            ),
            (
                json!({"service": "api", "tiers": local, "threshold": 1.5}),
                "spec.threshold 1.5 is outside 0-1",
            ),
            (
                json!({"service": "api", "tiers": local, "threshold": -0.1}),
                "outside 0-1",
            ),
            (
                json!({"service": "api", "tiers": tiers(&[&["local"], &["east", "local"]])}),
                "spec.tiers[1].clusters[1]: \"local\" is already in tier 0",
            ),
            (
                json!({"service": "api", "tiers": tiers(&[&["East"]])}),
                "spec.tiers[0].clusters[0]",
            ),
            (json!({"service": "Api", "tiers": local}), "spec.service"),
            (
                json!({"service": "api", "tiers": local, "failbackDelay": "soon"}),
                "spec.failbackDelay",
            ),
            (
                json!({"service": "api", "tiers": local, "colour": "red"}),
                "unknown field",
            ),
        ] {
            let e = parse(&policy(spec.clone())).unwrap_err();
            assert!(e.reason.contains(want), "{spec}: {}", e.reason);
        }
        let names: Vec<String> = (0..9).map(|i| format!("c{i}")).collect();
        let many: Vec<serde_json::Value> = names.iter().map(|n| json!({"clusters": [n]})).collect();
        let e = parse(&policy(json!({"service": "api", "tiers": many}))).unwrap_err();
        assert!(e.reason.contains("at most 8"), "{}", e.reason);
    }
}
