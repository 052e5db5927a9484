//! viz's HTTP server: the JSON API (`/api/v1/...`) and the dashboard.
//! Every parameter is checked before use (names by Kubernetes rules,
//! windows and counts bounded; unknown parameters refused), and nothing a
//! caller sends reaches a PromQL string: filtering happens on the rows.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::{
    federate::{Answer, ClusterMeta, Peers, Rows, Unreachable},
    prom::Prometheus,
    tap,
    views::{self, Edges, Local, StatKind},
};

/// Longest query string accepted.
const MAX_QUERY: usize = 2048;

/// What the server knows: who it is and where to ask.
#[derive(Debug)]
pub struct State {
    pub me: ClusterMeta,
    pub prometheus: Prometheus,
    pub peers: Peers,
    pub window: Duration,
    pub metrics: VizMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViewLabels {
    pub view: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

/// viz's own metrics, prefixed `mesh_viz_`.
#[derive(Clone, Debug)]
pub struct VizMetrics {
    pub registry: Arc<Registry>,
    pub requests: Family<ViewLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub unreachable: Family<ClusterLabels, Counter>,
}

impl VizMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh_viz");
        let r = &mut registry;
        use mesh_core::admin::registered;
        let requests = registered(
            r,
            "requests",
            "API requests answered, by view",
            Family::default(),
        );
        let refused = registered(
            r,
            "refused",
            "API requests refused, by reason",
            Family::default(),
        );
        let unreachable = registered(
            r,
            "unreachable",
            "Queries a cluster (this one's Prometheus, or a linked cluster's viz) did not answer in time",
            Family::default(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            refused,
            unreachable,
        }
    }
}

impl Default for VizMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A request refused: the status, the reason label and the message.
#[derive(Debug)]
pub struct Refused(StatusCode, &'static str, String);

/// The parameters of an API request, checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params {
    pub namespace: String,
    pub cluster: String,
    pub local: bool,
    pub window: Option<Duration>,
    pub kind: Option<StatKind>,
    pub ms: u64,
    pub max: usize,
}

/// A Kubernetes-style name: lowercase letters, digits and `-`, at most 63.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Reads `query` (the part after `?`) strictly.
pub fn parse_params(query: &str) -> Result<Params, Refused> {
    let bad = |what: String| Refused(StatusCode::BAD_REQUEST, "bad_parameter", what);
    if query.len() > MAX_QUERY {
        return Err(bad(format!("the query string is over {MAX_QUERY} bytes")));
    }
    let mut p = Params {
        ms: 1000,
        max: 200,
        ..Params::default()
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "namespace" | "cluster" => {
                if !v.is_empty() && !is_name(&v) {
                    return Err(bad(format!(
                        "{k} {v:?} is not a name (lowercase letters, digits and '-', at most 63)"
                    )));
                }
                if k == "namespace" {
                    p.namespace = v.into_owned();
                } else {
                    p.cluster = v.into_owned();
                }
            }
            "scope" => match &*v {
                "local" => p.local = true,
                "all" => p.local = false,
                _ => return Err(bad(format!("scope {v:?}: use local or all"))),
            },
            "window" => {
                let secs: u64 = v
                    .parse()
                    .ok()
                    .filter(|s| (1..=3600).contains(s))
                    .ok_or_else(|| bad(format!("window {v:?}: seconds from 1 to 3600")))?;
                p.window = Some(Duration::from_secs(secs));
            }
            "kind" => p.kind = Some(v.parse().map_err(|e: String| bad(format!("kind: {e}")))?),
            "ms" => {
                p.ms = v
                    .parse()
                    .ok()
                    .filter(|ms| (100..=10_000).contains(ms))
                    .ok_or_else(|| bad(format!("ms {v:?}: milliseconds from 100 to 10000")))?;
            }
            "max" => {
                p.max = v
                    .parse()
                    .ok()
                    .filter(|m| (1..=1000).contains(m))
                    .ok_or_else(|| bad(format!("max {v:?}: from 1 to 1000")))?;
            }
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?}; known: namespace, cluster, scope, window, kind, ms, max"
                )));
            }
        }
    }
    Ok(p)
}

impl Params {
    /// The same parameters for a peer, asked for its own rows only.
    fn for_peer(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("scope", "local");
        if !self.namespace.is_empty() {
            q.append_pair("namespace", &self.namespace);
        }
        if let Some(w) = self.window {
            q.append_pair("window", &w.as_secs().to_string());
        }
        if let Some(kind) = self.kind {
            q.append_pair(
                "kind",
                match kind {
                    StatKind::Deploy => "deploy",
                    StatKind::Svc => "svc",
                    StatKind::Route => "route",
                },
            );
        }
        q.append_pair("ms", &self.ms.to_string());
        q.append_pair("max", &self.max.to_string());
        q.finish()
    }
}

/// Serves the API and dashboard on `listener` until dropped.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    mesh_core::admin::serve_http(listener, move |req| {
        let state = state.clone();
        async move { handle(&state, req).await }
    })
    .await;
}

const INDEX: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return refuse(
            state,
            Refused(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                "viz only answers GET".into(),
            ),
        );
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match path.as_str() {
        "/" | "/index.html" => return asset(INDEX, "text/html; charset=utf-8"),
        "/app.js" => return asset(APP_JS, "text/javascript; charset=utf-8"),
        "/app.css" => return asset(APP_CSS, "text/css; charset=utf-8"),
        "/ready" | "/live" => return asset("ok\n", "text/plain; charset=utf-8"),
        _ => {}
    }
    let Some(view) = path.strip_prefix("/api/v1/") else {
        return refuse(
            state,
            Refused(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "nothing at {path}; the API is under /api/v1/ (stat, routes, edges, links, tap, top)"
                ),
            ),
        );
    };
    let params = match parse_params(&query) {
        Ok(p) => p,
        Err(r) => return refuse(state, r),
    };
    let view: &'static str = match view {
        "stat" => "stat",
        "routes" => "routes",
        "edges" => "edges",
        "links" => "links",
        "tap" => "tap",
        "top" => "top",
        "clusters" => "clusters",
        other => {
            return refuse(
                state,
                Refused(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!(
                        "unknown view {other:?}; use stat, routes, edges, links, tap, top or clusters"
                    ),
                ),
            );
        }
    };
    state
        .metrics
        .requests
        .get_or_create(&ViewLabels { view })
        .inc();
    match view {
        "stat" | "routes" => {
            let mut p = params;
            if view == "routes" {
                p.kind = Some(StatKind::Route);
            }
            let kind = p.kind.unwrap_or(StatKind::Deploy);
            json(
                &federated(state, &p, "stat", |l, p| async move {
                    l.stat(kind, &p.namespace).await.map_err(|e| e.to_string())
                })
                .await,
            )
        }
        "links" => json(
            &federated(state, &params, "links", |l, _| async move {
                l.links().await.map_err(|e| e.to_string())
            })
            .await,
        ),
        "edges" => {
            let answer: Answer<Edges> = federated(state, &params, "edges", |l, p| async move {
                l.edges(&p.namespace).await.map_err(|e| e.to_string())
            })
            .await;
            if params.local {
                return json(&answer);
            }
            let tds: BTreeMap<String, String> = answer
                .clusters
                .iter()
                .map(|c| (c.trust_domain.clone(), c.name.clone()))
                .collect();
            json(&answer.map_rows(|rows| views::merge_edges(&[rows], &tds)))
        }
        "tap" | "top" => {
            let answer = federated(state, &params, "tap", |l, p| async move {
                let tapped = tap::tap(
                    l.prometheus,
                    l.cluster,
                    &p.namespace,
                    Duration::from_millis(p.ms),
                    p.max,
                )
                .await
                .map_err(|e| e.to_string())?;
                for e in &tapped.errors {
                    tracing::debug!("tap: {e}");
                }
                Ok(tapped.events)
            })
            .await;
            if view == "tap" {
                return json(&answer);
            }
            json(&answer.map_rows(|rows| tap::top(&rows, 50)))
        }
        _ => {
            let peers = linked_clusters(state).await.unwrap_or_default();
            json(&serde_json::json!({"cluster": state.me, "linked": peers}))
        }
    }
}

/// The clusters this one's service mirror links to (its Prometheus knows).
async fn linked_clusters(state: &State) -> Result<Vec<String>, String> {
    let samples = state
        .prometheus
        .query(
            "max by (cluster) (mesh_service_mirror_link_alive)",
            Duration::from_secs(1),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut peers: Vec<String> = samples
        .iter()
        .map(|s| s.label("cluster").to_owned())
        .filter(|c| is_name(c) && *c != state.me.name)
        .collect();
    peers.sort();
    peers.dedup();
    Ok(peers)
}

/// This cluster's rows (unless `cluster` names another) and, unless asked
/// for `scope=local`, those of every linked cluster's viz. Rows merge by
/// concatenation; edges keep both ends for [`views::merge_edges`].
async fn federated<'s, T, F, Fut>(
    state: &'s State,
    params: &'s Params,
    path: &str,
    local: F,
) -> Answer<T>
where
    T: Rows + Merge,
    F: FnOnce(Local<'s>, &'s Params) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let me = &state.me.name;
    let here = Local {
        prometheus: state.prometheus,
        cluster: me,
        window: params.window.unwrap_or(state.window),
        timeout: state.peers.timeout,
    };
    let want_local = params.cluster.is_empty() || params.cluster == *me;
    let mut peers = Vec::new();
    let mut unreachable = Vec::new();
    if !params.local {
        match linked_clusters(state).await {
            Ok(p) => peers = p,
            Err(error) => unreachable.push(Unreachable {
                cluster: me.clone(),
                error: format!("cannot list linked clusters: {error}"),
            }),
        }
        if !params.cluster.is_empty() {
            peers.retain(|p| *p == params.cluster);
            if peers.is_empty() && !want_local {
                unreachable.push(Unreachable {
                    cluster: params.cluster.clone(),
                    error: format!("not a cluster {me} links to"),
                });
            }
        }
    }
    let path_and_query = format!("/api/v1/{path}?{}", params.for_peer());
    let (mine, theirs) = tokio::join!(
        async {
            if want_local {
                Some(local(here, params).await)
            } else {
                None
            }
        },
        state.peers.ask::<T>(
            &peers,
            &path_and_query,
            if path == "tap" {
                Duration::from_millis(params.ms)
            } else {
                Duration::ZERO
            }
        )
    );
    let mut answer = Answer {
        clusters: Vec::new(),
        unreachable,
        rows: T::default(),
    };
    match mine {
        Some(Ok(rows)) => {
            answer.clusters.push(state.me.clone());
            answer.rows.merge(rows);
        }
        Some(Err(error)) => answer.unreachable.push(Unreachable {
            cluster: me.clone(),
            error,
        }),
        None => {}
    }
    for peer in theirs {
        match peer {
            Ok(a) => {
                answer.clusters.extend(a.clusters);
                answer.rows.merge(a.rows);
            }
            Err(u) => answer.unreachable.push(u),
        }
    }
    for u in &answer.unreachable {
        state
            .metrics
            .unreachable
            .get_or_create(&ClusterLabels {
                cluster: u.cluster.clone(),
            })
            .inc();
    }
    answer
}

/// Rows of several clusters into one.
pub trait Merge {
    fn merge(&mut self, other: Self);
}

impl<T> Merge for Vec<T> {
    fn merge(&mut self, other: Self) {
        self.extend(other);
    }
}

impl Merge for Edges {
    fn merge(&mut self, other: Self) {
        self.outbound.extend(other.outbound);
        self.inbound.extend(other.inbound);
    }
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

fn refuse(state: &State, Refused(status, reason, message): Refused) -> Response<Full<Bytes>> {
    state
        .metrics
        .refused
        .get_or_create(&ReasonLabels { reason })
        .inc();
    let mut resp = json(&serde_json::json!({ "error": message }));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_checked_before_use() {
        let p = parse_params("namespace=shop&cluster=east&window=60&kind=svc&scope=local").unwrap();
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.cluster, "east");
        assert_eq!(p.window, Some(Duration::from_secs(60)));
        assert_eq!(p.kind, Some(StatKind::Svc));
        assert!(p.local);
        // What an attacker would try to smuggle into a query.
        for bad in [
            "namespace=shop%22%7D%20or%20vector(1)",
            "namespace=Shop",
            "cluster=..%2F..",
            "window=0",
            "window=99999",
            "ms=50",
            "max=100000",
            "kind=secrets",
            "scope=everything",
            "promql=up",
        ] {
            let Err(Refused(status, reason, message)) = parse_params(bad) else {
                panic!("{bad} was accepted");
            };
            assert_eq!(
                (status, reason),
                (StatusCode::BAD_REQUEST, "bad_parameter"),
                "{bad}"
            );
            assert!(!message.is_empty());
        }
        assert!(parse_params(&"a".repeat(MAX_QUERY + 1)).is_err());
    }

    #[test]
    fn a_peer_is_asked_for_its_own_rows_with_the_same_filters() {
        let p = parse_params("namespace=shop&kind=route&window=10").unwrap();
        let q = p.for_peer();
        assert!(
            q.starts_with("scope=local&namespace=shop&window=10&kind=route"),
            "{q}"
        );
        assert_eq!(parse_params(&q).unwrap().namespace, "shop");
    }
}
