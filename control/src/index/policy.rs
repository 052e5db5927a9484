//! Policy: inbound authorization per workload port, outbound routes per
//! service authority.

use mesh_core::api::v1::{
    Authorization, HeaderMatch, InboundPolicy, OutboundPolicy, PathMatch, ProtocolHint,
    RetryPolicy, Route, RouteMatch, RouteRule, WeightedBackend, path_match,
};

use super::{Index, discovery::app_protocol_hint};
use crate::resources::types::{
    HttpRouteRule, Object, PortRef, ServerSpec, is_exported, parse_duration,
};

/// Default retries when an HTTPRoute asks for retries without details.
const DEFAULT_RETRY_CODES: [u32; 1] = [503];
const DEFAULT_RETRY_BACKOFF_MS: u64 = 25;

fn proxy_protocol_hint(p: Option<&str>) -> ProtocolHint {
    match p {
        Some("HTTP/1") => ProtocolHint::Http1,
        Some("HTTP/2") => ProtocolHint::Http2,
        Some("gRPC") => ProtocolHint::Grpc,
        Some("opaque") => ProtocolHint::Opaque,
        _ => ProtocolHint::Unknown,
    }
}

impl Index {
    /// The Server (if any) selecting `port` of workload `ns/workload`.
    fn server_for(&self, ns: &str, workload: &str, port: u16) -> Option<&Object<ServerSpec>> {
        let w = self.workloads.get(&(ns.to_owned(), workload.to_owned()));
        let empty = Default::default();
        let labels = w.map_or(&empty, |w| &w.reg.labels);
        // Servers are visited in name order, so overlaps resolve the same
        // way every time.
        self.servers
            .iter()
            .filter(|((sns, _), _)| sns == ns)
            .map(|(_, s)| s)
            .find(|s| {
                let port_matches = match &s.spec.port {
                    PortRef::Number(n) => *n == port,
                    PortRef::Name(name) => w.is_some_and(|w| {
                        w.reg
                            .ports
                            .iter()
                            .any(|p| &p.name == name && p.port == port)
                    }),
                };
                port_matches && s.spec.pod_selector.matches(labels)
            })
    }

    /// Inbound policy for one port. Without a Server, any verified identity
    /// from a trusted trust domain is admitted (mTLS still required); with a
    /// Server, only what its AuthorizationPolicies allow.
    pub fn inbound(&self, ns: &str, workload: &str, port: u16) -> InboundPolicy {
        let Some(server) = self.server_for(ns, workload, port) else {
            let protocol = self
                .workloads
                .get(&(ns.to_owned(), workload.to_owned()))
                .and_then(|w| w.reg.ports.iter().find(|p| p.port == port))
                .map_or(ProtocolHint::Unknown as i32, |p| p.protocol);
            return InboundPolicy {
                port: u32::from(port),
                protocol,
                server: String::new(),
                require_mtls: true,
                authorizations: vec![Authorization {
                    name: "default".into(),
                    any_authenticated: true,
                    ..Default::default()
                }],
                exported: self.exports_port(ns, workload, port),
            };
        };
        let server_name = &server.metadata.name;
        let authorizations = self
            .authorizations
            .iter()
            .filter(|((ans, _), ap)| {
                ans == ns
                    && ap.spec.target_ref.name == *server_name
                    && ap.spec.target_ref.kind == "Server"
            })
            .filter_map(|((ans, aname), ap)| {
                let mut authz = Authorization {
                    name: format!("{ans}/{aname}"),
                    ..Default::default()
                };
                for r in &ap.spec.required_authentication_refs {
                    let key = (
                        r.namespace.clone().unwrap_or_else(|| ans.clone()),
                        r.name.clone(),
                    );
                    // A policy naming a missing authentication grants nothing.
                    let authn = self.authentications.get(&key)?;
                    for id in &authn.spec.identities {
                        if id == "*" {
                            authz.any_authenticated = true;
                        } else if let Some(td) = id.strip_suffix("/*") {
                            authz
                                .trust_domains
                                .push(td.trim_start_matches("spiffe://").to_owned());
                        } else {
                            authz.identities.push(id.clone());
                        }
                    }
                }
                Some(authz)
            })
            .collect();
        InboundPolicy {
            port: u32::from(port),
            protocol: proxy_protocol_hint(server.spec.proxy_protocol.as_deref()) as i32,
            server: format!("{ns}/{server_name}"),
            require_mtls: true,
            authorizations,
            exported: self.exports_port(ns, workload, port),
        }
    }

    /// Whether `port` of the workload is the target port of an exported
    /// Service selecting it: the one fact that lets a linked cluster's
    /// caller in, at the gateway (which checks the Service) and here.
    fn exports_port(&self, ns: &str, workload: &str, port: u16) -> bool {
        let Some(w) = self.workloads.get(&(ns.to_owned(), workload.to_owned())) else {
            return false;
        };
        self.services
            .iter()
            .filter(|((sns, _), svc)| sns == ns && is_exported(svc))
            .any(|(_, svc)| {
                let selects = !svc.spec.selector.is_empty()
                    && svc
                        .spec
                        .selector
                        .iter()
                        .all(|(k, v)| w.reg.labels.get(k) == Some(v));
                selects
                    && svc
                        .spec
                        .ports
                        .iter()
                        .any(|p| p.target_port.unwrap_or(p.port) == port)
            })
    }

    /// Outbound policy: the HTTPRoutes attached to the authority's service port.
    pub fn outbound(&self, authority: &str) -> OutboundPolicy {
        // A Service, or a mirror of a linked cluster's (routes attach to
        // either by name).
        let found = self
            .service_port(authority)
            .map(|(auth, _, port)| (auth, port))
            .or_else(|e| self.mirror_port(authority).ok_or(e));
        let (auth, port) = match found {
            Ok(found) => found,
            Err(reason) => {
                return OutboundPolicy {
                    authority: authority.to_owned(),
                    no_such_service: reason,
                    ..Default::default()
                };
            }
        };
        let routes = self
            .routes
            .iter()
            .filter(|((rns, _), route)| {
                route.spec.parent_refs.iter().any(|p| {
                    let kind_ok = p.kind.as_deref().is_none_or(|k| k == "Service");
                    let ns = p.namespace.as_deref().unwrap_or(rns);
                    kind_ok
                        && p.name == auth.service
                        && ns == auth.namespace
                        && p.port.is_none_or(|pp| pp == auth.port)
                })
            })
            .map(|((rns, rname), route)| Route {
                name: format!("{rns}/{rname}"),
                rules: route.spec.rules.iter().map(|r| self.rule(rns, r)).collect(),
            })
            .collect();
        OutboundPolicy {
            authority: authority.to_owned(),
            protocol: app_protocol_hint(port.app_protocol.as_deref()) as i32,
            routes,
            no_such_service: String::new(),
        }
    }

    fn rule(&self, route_ns: &str, rule: &HttpRouteRule) -> RouteRule {
        // Durations were validated when the file was read.
        let ms = |d: &Option<String>| {
            d.as_deref()
                .and_then(|d| parse_duration(d).ok())
                .map_or(0, |d| d.as_millis() as u64)
        };
        RouteRule {
            matches: rule
                .matches
                .iter()
                .map(|m| RouteMatch {
                    path: m.path.as_ref().map(|p| PathMatch {
                        kind: match p.kind.as_deref() {
                            Some("Exact") => path_match::Kind::Exact as i32,
                            _ => path_match::Kind::Prefix as i32,
                        },
                        value: p.value.clone(),
                    }),
                    headers: m
                        .headers
                        .iter()
                        .map(|h| HeaderMatch {
                            name: h.name.to_ascii_lowercase(),
                            value: h.value.clone(),
                        })
                        .collect(),
                    method: m.method.clone().unwrap_or_default(),
                })
                .collect(),
            request_timeout_ms: rule.timeouts.as_ref().map_or(0, |t| ms(&t.request)),
            backend_request_timeout_ms: rule
                .timeouts
                .as_ref()
                .map_or(0, |t| ms(&t.backend_request)),
            retry: rule.retry.as_ref().map(|r| RetryPolicy {
                attempts: r.attempts.unwrap_or(1),
                codes: if r.codes.is_empty() {
                    DEFAULT_RETRY_CODES.to_vec()
                } else {
                    r.codes.iter().map(|c| u32::from(*c)).collect()
                },
                backoff_ms: if r.backoff.is_some() {
                    ms(&r.backoff)
                } else {
                    DEFAULT_RETRY_BACKOFF_MS
                },
            }),
            backends: rule
                .backend_refs
                .iter()
                .map(|b| WeightedBackend {
                    authority: format!(
                        "{}.{}.svc.{}:{}",
                        b.name,
                        b.namespace.as_deref().unwrap_or(route_ns),
                        self.cluster_domain,
                        b.port
                    ),
                    weight: b.weight,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        index::{Liveness, tests::reg},
        resources::parse::parse_file,
    };

    const POLICY: &str = r#"
apiVersion: policy.mesh.rs/v1alpha1
kind: Server
metadata: {name: api-http, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  port: http
  proxyProtocol: HTTP/1
---
apiVersion: policy.mesh.rs/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-from-web, namespace: shop}
spec:
  targetRef: {kind: Server, name: api-http}
  requiredAuthenticationRefs: [{kind: MeshTLSAuthentication, name: web}]
---
apiVersion: policy.mesh.rs/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: web, namespace: shop}
spec:
  identities: ["spiffe://west.mesh.local/ns/shop/sa/web", "spiffe://east.mesh.local/*"]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  ports: [{port: 80, targetPort: 8080, appProtocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-split, namespace: shop}
spec:
  parentRefs: [{name: api, kind: Service, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: X-Canary, value: "1"}]}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 2, codes: [502, 503]}
    backendRefs: [{name: api-v1, port: 80, weight: 90}, {name: api-v2, port: 80, weight: 10}]
"#;

    fn index() -> Index {
        index_from(POLICY)
    }

    /// An index of `yaml` with workload `shop/api-0` (labels app=api) registered.
    fn index_from(yaml: &str) -> Index {
        let mut index = Index::new("west", "cluster.local", Liveness::default());
        let res = parse_file(std::path::Path::new("t.yaml"), yaml).unwrap();
        index.set_resources(res.into_iter().map(|(_, r)| r).collect());
        let api = reg("shop", "api-0", "api", &[("app", "api")], "10.0.0.1");
        index.register(api, Instant::now()).unwrap();
        index
    }

    #[test]
    fn server_port_gets_its_authorizations() {
        let index = index();
        let p = index.inbound("shop", "api-0", 8080);
        assert_eq!(p.server, "shop/api-http");
        assert_eq!(p.protocol, ProtocolHint::Http1 as i32);
        assert_eq!(p.authorizations.len(), 1);
        let a = &p.authorizations[0];
        assert_eq!(a.name, "shop/api-from-web");
        assert_eq!(
            a.identities,
            vec!["spiffe://west.mesh.local/ns/shop/sa/web"]
        );
        assert_eq!(a.trust_domains, vec!["east.mesh.local"]);
        assert!(!a.any_authenticated);

        // Another port of the same workload falls back to the default.
        let p = index.inbound("shop", "api-0", 9090);
        assert_eq!(p.server, "");
        assert!(p.require_mtls && p.authorizations[0].any_authenticated);
    }

    #[test]
    fn server_without_policies_denies_all() {
        let text = POLICY.replace(
            "name: api-http}\n  requiredAuthenticationRefs",
            "name: other}\n  requiredAuthenticationRefs",
        );
        let index = index_from(&text);
        let p = index.inbound("shop", "api-0", 8080);
        assert_eq!(p.server, "shop/api-http");
        assert!(p.authorizations.is_empty());
    }

    #[test]
    fn a_route_attaches_to_a_mirror_of_a_linked_clusters_service() {
        let docs = [
            serde_json::json!({
                "apiVersion": "multicluster.mesh.rs/v1alpha1", "kind": "MirroredService",
                "metadata": { "name": "api-east", "namespace": "shop" },
                "spec": {
                    "link": "east", "remoteName": "api",
                    "ports": [{ "port": 8080, "appProtocol": "http" }],
                    "identities": ["spiffe://east.mesh.local/ns/shop/sa/api"],
                    "ready": true,
                },
            }),
            serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": { "name": "api-east-all", "namespace": "shop" },
                "spec": {
                    "parentRefs": [{ "name": "api-east", "kind": "Service", "port": 8080 }],
                    "rules": [{ "backendRefs": [{ "name": "api-east", "port": 8080 }] }],
                },
            }),
        ];
        let index = index_from(&serde_saphyr::to_string_multiple(&docs).unwrap());
        let p = index.outbound("api-east.shop.svc.cluster.local:8080");
        assert_eq!(p.no_such_service, "");
        assert_eq!(p.routes.len(), 1, "{p:?}");
        assert_eq!(p.routes[0].name, "shop/api-east-all");
        assert_eq!(p.protocol, ProtocolHint::Http1 as i32);
    }

    #[test]
    fn routes_carry_matches_timeouts_retries_and_weights() {
        let p = index().outbound("api.shop.svc.cluster.local:80");
        assert_eq!(p.no_such_service, "");
        assert_eq!(p.routes.len(), 1);
        let rule = &p.routes[0].rules[0];
        assert_eq!(rule.request_timeout_ms, 2000);
        assert_eq!(rule.backend_request_timeout_ms, 500);
        let retry = rule.retry.as_ref().unwrap();
        assert_eq!((retry.attempts, retry.codes.clone()), (2, vec![502, 503]));
        assert_eq!(rule.matches[0].headers[0].name, "x-canary");
        assert_eq!(rule.matches[0].path.as_ref().unwrap().value, "/v2");
        let weights: Vec<(String, u32)> = rule
            .backends
            .iter()
            .map(|b| (b.authority.clone(), b.weight))
            .collect();
        assert_eq!(
            weights,
            vec![
                ("api-v1.shop.svc.cluster.local:80".to_owned(), 90),
                ("api-v2.shop.svc.cluster.local:80".to_owned(), 10)
            ]
        );
        let missing = index().outbound("nope.shop.svc.cluster.local:80");
        assert_eq!(missing.no_such_service, "no Service nope in namespace shop");
    }
}
