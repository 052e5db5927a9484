//! What viz shows, as rows: golden metrics per deployment, service and
//! route, the edges between workloads, and the links. Each is built from
//! this cluster's Prometheus by [`local`] queries; rows always carry the
//! cluster they were measured in, so answers of several clusters merge by
//! concatenation (edges by [`merge_edges`]).

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::prom::{PromError, Prometheus, Sample};

/// Golden metrics of one deployment (server side), service or route
/// (callers' side).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatRow {
    /// The cluster whose proxies measured it.
    pub cluster: String,
    pub namespace: String,
    /// The deployment, the service (`name.ns:port`) or the route.
    pub name: String,
    /// Routes: the service they belong to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// Services: the cluster whose endpoints answered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub served_in: String,
    /// Deployments: how many meshed proxies run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meshed: Option<u32>,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of non-5xx answers (none without requests).
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One edge: a caller workload and the workload that answered, each with
/// its cluster and verified SPIFFE ID.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    pub src: String,
    pub src_namespace: String,
    pub src_cluster: String,
    pub src_identity: String,
    pub dst: String,
    pub dst_namespace: String,
    pub dst_cluster: String,
    pub dst_identity: String,
    /// The service the caller named, when the caller's cluster is seen.
    #[serde(default)]
    pub service: String,
    pub rps: f64,
    pub success: Option<f64>,
    /// The cluster whose proxies measured it.
    pub cluster: String,
}

/// One cluster's edges, from both ends: what its proxies called
/// (`outbound`) and who called them (`inbound`, the caller known only by
/// its SPIFFE ID).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Edges {
    pub outbound: Vec<Edge>,
    pub inbound: Vec<Edge>,
}

/// A link as its cluster sees it: the service mirror's probes of the
/// other cluster's gateway, and the requests sent there.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkRow {
    pub cluster: String,
    /// The linked cluster.
    pub to: String,
    pub alive: Option<bool>,
    pub services: Option<u32>,
    /// Gateway hop latency as the mirror's probes measure it.
    pub probe_p50_ms: Option<f64>,
    pub probe_p99_ms: Option<f64>,
    pub probe_failures: f64,
    /// Requests this cluster's proxies sent to the linked cluster.
    pub rps: f64,
    pub success: Option<f64>,
    /// Failover events toward or back from it in the window, per service.
    #[serde(default)]
    pub failover: Vec<FailoverEvent>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverEvent {
    pub service: String,
    pub direction: String,
    pub reason: String,
    pub count: f64,
}

/// The kinds `stat` answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKind {
    Deploy,
    Svc,
    Route,
}

impl std::str::FromStr for StatKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deploy" | "deployment" | "deployments" => Ok(Self::Deploy),
            "svc" | "service" | "services" => Ok(Self::Svc),
            "route" | "routes" => Ok(Self::Route),
            other => Err(format!("unknown kind {other:?}; use deploy, svc or route")),
        }
    }
}

/// Where and over what window a view is asked.
#[derive(Clone, Copy, Debug)]
pub struct Local<'a> {
    pub prometheus: Prometheus,
    pub cluster: &'a str,
    pub window: Duration,
    pub timeout: Duration,
}

impl Local<'_> {
    fn w(&self) -> String {
        format!("{}s", self.window.as_secs().max(1))
    }

    async fn q(&self, promql: &str) -> Result<Vec<Sample>, PromError> {
        self.prometheus.query(promql, self.timeout).await
    }

    /// Golden metrics of every deployment (kind `deploy`), service or
    /// route of namespace `ns` (all when empty).
    pub async fn stat(&self, kind: StatKind, ns: &str) -> Result<Vec<StatRow>, PromError> {
        let w = self.w();
        let (by, counts, bucket) = match kind {
            StatKind::Deploy => (
                "mesh_namespace, mesh_deployment",
                format!("rate(mesh_proxy_inbound_requests_total[{w}])"),
                format!(
                    "rate(mesh_proxy_response_latency_seconds_bucket{{direction=\"inbound\"}}[{w}])"
                ),
            ),
            StatKind::Svc => (
                "authority, dst_cluster",
                format!("rate(mesh_proxy_outbound_requests_total[{w}])"),
                String::new(),
            ),
            StatKind::Route => (
                "authority, route",
                format!("rate(mesh_proxy_outbound_requests_total{{route!=\"\"}}[{w}])"),
                format!(
                    "rate(mesh_proxy_response_latency_seconds_bucket{{direction=\"outbound\",route!=\"\"}}[{w}])"
                ),
            ),
        };
        let requests = self
            .q(&format!("sum by ({by}, classification) ({counts})"))
            .await?;
        // Outbound latency is per service (target) and route, not per
        // answering cluster.
        let (lat_by, bucket) = match kind {
            StatKind::Deploy => (by.to_owned(), bucket),
            StatKind::Svc => (
                "target".to_owned(),
                format!(
                    "rate(mesh_proxy_response_latency_seconds_bucket{{direction=\"outbound\"}}[{w}])"
                ),
            ),
            StatKind::Route => ("target, route".to_owned(), bucket),
        };
        let mut quantiles = Vec::new();
        for q in [0.5, 0.99] {
            quantiles.push(
                self.q(&format!(
                    "histogram_quantile({q}, sum by ({lat_by}, le) ({bucket}))"
                ))
                .await?,
            );
        }
        let meshed = match kind {
            StatKind::Deploy => {
                self.q(&format!("count by ({by}) (mesh_proxy_identity_info)"))
                    .await?
            }
            _ => Vec::new(),
        };
        Ok(stat_rows(
            self.cluster,
            kind,
            ns,
            &requests,
            [&quantiles[0], &quantiles[1]],
            &meshed,
        ))
    }

    /// This cluster's edges, from both ends.
    pub async fn edges(&self, ns: &str) -> Result<Edges, PromError> {
        let w = self.w();
        let join = "* on (instance) group_left (identity) mesh_proxy_identity_info";
        let outbound = self
            .q(&format!(
                "sum by (mesh_namespace, mesh_deployment, identity, authority, dst_cluster, dst_identity, classification) \
                 (rate(mesh_proxy_outbound_requests_total{{tls=\"mtls\"}}[{w}]) {join})"
            ))
            .await?;
        let inbound = self
            .q(&format!(
                "sum by (mesh_namespace, mesh_deployment, identity, client_id, classification) \
                 (rate(mesh_proxy_inbound_requests_total[{w}]) {join})"
            ))
            .await?;
        Ok(edge_rows(self.cluster, ns, &outbound, &inbound))
    }

    /// The links this cluster's service mirror keeps, with the requests
    /// sent over each and failover events.
    pub async fn links(&self) -> Result<Vec<LinkRow>, PromError> {
        let w = self.w();
        let alive = self
            .q("max by (cluster) (mesh_service_mirror_link_alive)")
            .await?;
        let services = self
            .q("max by (cluster) (mesh_service_mirror_services_mirrored)")
            .await?;
        let mut probe = Vec::new();
        for q in [0.5, 0.99] {
            probe.push(
                self.q(&format!(
                    "histogram_quantile({q}, sum by (cluster, le) (rate(mesh_service_mirror_probe_latency_seconds_bucket[{w}])))"
                ))
                .await?,
            );
        }
        let failures = self
            .q(&format!(
                "sum by (cluster) (increase(mesh_service_mirror_probe_failures_total[{w}]))"
            ))
            .await?;
        let requests = self
            .q(&format!(
                "sum by (dst_cluster, classification) (rate(mesh_proxy_outbound_requests_total[{w}]))"
            ))
            .await?;
        let failover = self
            .q(&format!(
                "sum by (authority, direction, reason) (increase(mesh_proxy_failover_events_total[{w}])) > 0"
            ))
            .await?;
        Ok(link_rows(
            self.cluster,
            &alive,
            &services,
            [&probe[0], &probe[1]],
            &failures,
            &requests,
            &failover,
        ))
    }
}

/// The namespace of a service authority `name.ns.svc...:port`.
pub fn namespace_of_authority(authority: &str) -> &str {
    authority.split('.').nth(1).unwrap_or("")
}

/// `name.ns:port` for `name.ns.svc.cluster.local:port`.
pub fn short_service(authority: &str) -> String {
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, ""));
    let mut parts = host.split('.');
    match (parts.next(), parts.next()) {
        (Some(name), Some(ns)) if !port.is_empty() => format!("{name}.{ns}:{port}"),
        _ => authority.to_owned(),
    }
}

/// The namespace and service account of a workload SPIFFE ID, and its
/// trust domain.
pub fn parts_of_identity(id: &str) -> Option<(&str, &str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    match path.split('/').collect::<Vec<_>>()[..] {
        ["ns", ns, "sa", sa] => Some((td, ns, sa)),
        _ => None,
    }
}

#[derive(Default)]
struct Tally {
    ok: f64,
    failed: f64,
}

impl Tally {
    fn add(&mut self, s: &Sample) {
        if s.label("classification") == "failure" {
            self.failed += s.value;
        } else {
            self.ok += s.value;
        }
    }
    fn rps(&self) -> f64 {
        self.ok + self.failed
    }
    fn success(&self) -> Option<f64> {
        (self.rps() > 0.0).then(|| self.ok / self.rps())
    }
}

fn ms(v: Option<&f64>) -> Option<f64> {
    v.map(|s| s * 1000.0)
}

fn stat_rows(
    cluster: &str,
    kind: StatKind,
    ns: &str,
    requests: &[Sample],
    quantiles: [&[Sample]; 2],
    meshed: &[Sample],
) -> Vec<StatRow> {
    // (namespace, name, service or served_in) -> tally
    let key = |s: &Sample| -> (String, String, String) {
        match kind {
            StatKind::Deploy => (
                s.label("mesh_namespace").to_owned(),
                s.label("mesh_deployment").to_owned(),
                String::new(),
            ),
            StatKind::Svc => {
                let a = s.label("authority");
                (
                    namespace_of_authority(a).to_owned(),
                    short_service(a),
                    s.label("dst_cluster").to_owned(),
                )
            }
            StatKind::Route => {
                let a = s.label("authority").to_owned();
                (
                    namespace_of_authority(&a).to_owned(),
                    s.label("route").to_owned(),
                    short_service(&a),
                )
            }
        }
    };
    // Latency keys: deploy (ns, name); svc (service); route (service, route).
    let lat_key = |s: &Sample| -> (String, String) {
        match kind {
            StatKind::Deploy => (
                s.label("mesh_namespace").to_owned(),
                s.label("mesh_deployment").to_owned(),
            ),
            StatKind::Svc => (short_service(s.label("target")), String::new()),
            StatKind::Route => (
                short_service(s.label("target")),
                s.label("route").to_owned(),
            ),
        }
    };
    let mut tallies: BTreeMap<(String, String, String), Tally> = BTreeMap::new();
    for s in requests {
        tallies.entry(key(s)).or_default().add(s);
    }
    for s in meshed {
        tallies.entry(key(s)).or_default();
    }
    let lat: [BTreeMap<(String, String), f64>; 2] =
        quantiles.map(|q| q.iter().map(|s| (lat_key(s), s.value)).collect());
    let meshed: BTreeMap<(String, String), f64> =
        meshed.iter().map(|s| (lat_key(s), s.value)).collect();
    tallies
        .into_iter()
        .filter(|((n, name, _), _)| (ns.is_empty() || n == ns) && !name.is_empty())
        .map(|((namespace, name, extra), t)| {
            let lk = match kind {
                StatKind::Deploy => (namespace.clone(), name.clone()),
                StatKind::Svc => (name.clone(), String::new()),
                StatKind::Route => (extra.clone(), name.clone()),
            };
            StatRow {
                cluster: cluster.to_owned(),
                namespace,
                service: if kind == StatKind::Route {
                    extra.clone()
                } else {
                    String::new()
                },
                served_in: if kind == StatKind::Svc {
                    extra
                } else {
                    String::new()
                },
                meshed: (kind == StatKind::Deploy)
                    .then(|| meshed.get(&lk).copied().unwrap_or(0.0) as u32),
                rps: t.rps(),
                success: t.success(),
                p50_ms: ms(lat[0].get(&lk)),
                p99_ms: ms(lat[1].get(&lk)),
                name,
            }
        })
        .collect()
}

fn edge_rows(cluster: &str, ns: &str, outbound: &[Sample], inbound: &[Sample]) -> Edges {
    let mut out: BTreeMap<(String, String, String, String, String, String), Tally> =
        BTreeMap::new();
    for s in outbound {
        let key = (
            s.label("mesh_namespace").to_owned(),
            s.label("mesh_deployment").to_owned(),
            s.label("identity").to_owned(),
            s.label("authority").to_owned(),
            s.label("dst_cluster").to_owned(),
            s.label("dst_identity").to_owned(),
        );
        out.entry(key).or_default().add(s);
    }
    let mut inn: BTreeMap<(String, String, String, String), Tally> = BTreeMap::new();
    for s in inbound {
        let key = (
            s.label("mesh_namespace").to_owned(),
            s.label("mesh_deployment").to_owned(),
            s.label("identity").to_owned(),
            s.label("client_id").to_owned(),
        );
        inn.entry(key).or_default().add(s);
    }
    let wanted = |a: &str, b: &str| ns.is_empty() || a == ns || b == ns;
    let outbound = out
        .into_iter()
        .filter(|(k, _)| !k.5.is_empty())
        .map(
            |((src_ns, src, src_id, authority, dst_cluster, dst_id), t)| {
                let (_, dst_ns, dst_sa) = parts_of_identity(&dst_id).unwrap_or(("", "", ""));
                Edge {
                    src,
                    src_namespace: src_ns,
                    src_cluster: cluster.to_owned(),
                    src_identity: src_id,
                    dst: dst_sa.to_owned(),
                    dst_namespace: dst_ns.to_owned(),
                    dst_cluster,
                    dst_identity: dst_id.clone(),
                    service: short_service(&authority),
                    rps: t.rps(),
                    success: t.success(),
                    cluster: cluster.to_owned(),
                }
            },
        )
        .filter(|e| wanted(&e.src_namespace, &e.dst_namespace))
        .collect();
    let inbound = inn
        .into_iter()
        .filter(|(k, _)| k.3.starts_with("spiffe://"))
        .map(|((dst_ns, dst, dst_id, client), t)| {
            let (td, src_ns, src_sa) = parts_of_identity(&client).unwrap_or(("", "", ""));
            Edge {
                src: src_sa.to_owned(),
                src_namespace: src_ns.to_owned(),
                // Named by trust domain until a merge knows its cluster.
                src_cluster: td.to_owned(),
                src_identity: client.clone(),
                dst,
                dst_namespace: dst_ns,
                dst_cluster: cluster.to_owned(),
                dst_identity: dst_id,
                service: String::new(),
                rps: t.rps(),
                success: t.success(),
                cluster: cluster.to_owned(),
            }
        })
        .filter(|e| wanted(&e.src_namespace, &e.dst_namespace))
        .collect();
    Edges { outbound, inbound }
}

/// One list of edges from the edges of several clusters: a call seen at
/// both ends (the caller's outbound, the callee's inbound: same
/// identities, same answering cluster) is one edge, with the caller's
/// rate and the callee's deployment name; `clusters` maps trust domains
/// to cluster names for callers seen only from the callee's side.
pub fn merge_edges(answers: &[Edges], clusters: &BTreeMap<String, String>) -> Vec<Edge> {
    let key = |e: &Edge| {
        (
            e.src_identity.clone(),
            e.dst_identity.clone(),
            e.dst_cluster.clone(),
        )
    };
    let mut edges: BTreeMap<(String, String, String), Edge> = BTreeMap::new();
    for e in answers.iter().flat_map(|a| &a.outbound) {
        edges
            .entry(key(e))
            .and_modify(|known| known.rps += e.rps)
            .or_insert_with(|| e.clone());
    }
    for e in answers.iter().flat_map(|a| &a.inbound) {
        match edges.get_mut(&key(e)) {
            Some(known) => {
                known.dst.clone_from(&e.dst);
                known.dst_namespace.clone_from(&e.dst_namespace);
            }
            None => {
                let mut e = e.clone();
                if let Some(name) = clusters.get(&e.src_cluster) {
                    e.src_cluster.clone_from(name);
                }
                edges.insert(key(&e), e);
            }
        }
    }
    edges.into_values().collect()
}

fn link_rows(
    cluster: &str,
    alive: &[Sample],
    services: &[Sample],
    probe: [&[Sample]; 2],
    failures: &[Sample],
    requests: &[Sample],
    failover: &[Sample],
) -> Vec<LinkRow> {
    let by = |samples: &[Sample], label: &str| -> BTreeMap<String, f64> {
        samples
            .iter()
            .map(|s| (s.label(label).to_owned(), s.value))
            .collect()
    };
    let (alive, services) = (by(alive, "cluster"), by(services, "cluster"));
    let probe = probe.map(|p| by(p, "cluster"));
    let failures = by(failures, "cluster");
    let mut sent: BTreeMap<String, Tally> = BTreeMap::new();
    for s in requests {
        let to = s.label("dst_cluster");
        if !to.is_empty() && to != cluster {
            sent.entry(to.to_owned()).or_default().add(s);
        }
    }
    let events: Vec<FailoverEvent> = failover
        .iter()
        .map(|s| FailoverEvent {
            service: short_service(s.label("authority")),
            direction: s.label("direction").to_owned(),
            reason: s.label("reason").to_owned(),
            count: s.value.round(),
        })
        .collect();
    let mut peers: Vec<String> = alive.keys().chain(sent.keys()).cloned().collect();
    peers.sort();
    peers.dedup();
    peers
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|to| {
            let t = sent.remove(&to).unwrap_or_default();
            LinkRow {
                cluster: cluster.to_owned(),
                alive: alive.get(&to).map(|v| *v > 0.0),
                services: services.get(&to).map(|v| *v as u32),
                probe_p50_ms: ms(probe[0].get(&to)),
                probe_p99_ms: ms(probe[1].get(&to)),
                probe_failures: failures.get(&to).copied().unwrap_or(0.0),
                rps: t.rps(),
                success: t.success(),
                failover: events.clone(),
                to,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
        }
    }

    #[test]
    fn deployments_get_rates_success_latency_and_proxies() {
        let requests = [
            sample(
                &[
                    ("mesh_namespace", "shop"),
                    ("mesh_deployment", "web"),
                    ("classification", "success"),
                ],
                19.0,
            ),
            sample(
                &[
                    ("mesh_namespace", "shop"),
                    ("mesh_deployment", "web"),
                    ("classification", "failure"),
                ],
                1.0,
            ),
            sample(
                &[
                    ("mesh_namespace", "other"),
                    ("mesh_deployment", "x"),
                    ("classification", "success"),
                ],
                1.0,
            ),
        ];
        let p50 = [sample(
            &[("mesh_namespace", "shop"), ("mesh_deployment", "web")],
            0.002,
        )];
        let meshed = [
            sample(
                &[("mesh_namespace", "shop"), ("mesh_deployment", "web")],
                2.0,
            ),
            sample(
                &[("mesh_namespace", "shop"), ("mesh_deployment", "load")],
                1.0,
            ),
        ];
        let rows = stat_rows(
            "west",
            StatKind::Deploy,
            "shop",
            &requests,
            [&p50, &[]],
            &meshed,
        );
        assert_eq!(rows.len(), 2, "{rows:?}");
        let web = rows.iter().find(|r| r.name == "web").unwrap();
        assert_eq!(
            (web.rps, web.success, web.meshed),
            (20.0, Some(0.95), Some(2))
        );
        assert_eq!(web.p50_ms, Some(2.0));
        let load = rows.iter().find(|r| r.name == "load").unwrap();
        assert_eq!(
            (load.rps, load.success),
            (0.0, None),
            "a deployment with no requests is listed"
        );
    }

    #[test]
    fn an_edge_seen_from_both_clusters_is_one_edge_with_both_names() {
        let web = "spiffe://west.mesh.local/ns/shop/sa/web";
        let api = "spiffe://east.mesh.local/ns/shop/sa/api";
        let west = edge_rows(
            "west",
            "",
            &[sample(
                &[
                    ("mesh_namespace", "shop"),
                    ("mesh_deployment", "web"),
                    ("identity", web),
                    ("authority", "api-east.shop.svc.cluster.local:8080"),
                    ("dst_cluster", "east"),
                    ("dst_identity", api),
                    ("classification", "success"),
                ],
                20.0,
            )],
            &[],
        );
        let east = edge_rows(
            "east",
            "",
            &[],
            &[sample(
                &[
                    ("mesh_namespace", "shop"),
                    ("mesh_deployment", "api-v2"),
                    ("identity", api),
                    ("client_id", web),
                    ("classification", "success"),
                ],
                19.5,
            )],
        );
        let tds = BTreeMap::from([
            ("west.mesh.local".to_owned(), "west".to_owned()),
            ("east.mesh.local".to_owned(), "east".to_owned()),
        ]);
        let edges = merge_edges(&[west, east.clone()], &tds);
        assert_eq!(edges.len(), 1, "{edges:?}");
        let e = &edges[0];
        assert_eq!((e.src.as_str(), e.src_cluster.as_str()), ("web", "west"));
        assert_eq!((e.dst.as_str(), e.dst_cluster.as_str()), ("api-v2", "east"));
        assert_eq!(
            (e.src_identity.as_str(), e.dst_identity.as_str()),
            (web, api)
        );
        assert_eq!(e.rps, 20.0, "the caller's rate");
        // Seen only from east: the caller's cluster comes from its trust domain.
        let only_east = merge_edges(&[east], &tds);
        assert_eq!(only_east[0].src_cluster, "west");
    }

    #[test]
    fn links_list_each_peer_with_its_probe_and_traffic() {
        let rows = link_rows(
            "west",
            &[sample(&[("cluster", "east")], 1.0)],
            &[sample(&[("cluster", "east")], 2.0)],
            [&[sample(&[("cluster", "east")], 0.0005)], &[]],
            &[],
            &[
                sample(
                    &[("dst_cluster", "east"), ("classification", "success")],
                    3.0,
                ),
                sample(
                    &[("dst_cluster", "west"), ("classification", "success")],
                    9.0,
                ),
            ],
            &[],
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].to, "east");
        assert_eq!((rows[0].alive, rows[0].services), (Some(true), Some(2)));
        assert_eq!((rows[0].rps, rows[0].probe_p50_ms), (3.0, Some(0.5)));
    }

    #[test]
    fn identities_split_into_trust_domain_namespace_and_account() {
        assert_eq!(
            parts_of_identity("spiffe://east.mesh.local/ns/shop/sa/api"),
            Some(("east.mesh.local", "shop", "api"))
        );
        assert_eq!(parts_of_identity("spiffe://td/other"), None);
        assert_eq!(
            short_service("api.shop.svc.cluster.local:8080"),
            "api.shop:8080"
        );
    }
}
