//! What the mesh sees while a topology runs: per cluster and destination
//! service the request rate, success rate, p50/p99 latency and share of
//! mTLS (from the callers' proxies), per link alive and probe latency (from
//! the service mirrors), and what the load generators report.

use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use mesh_core::metrics_text::{Histogram, Sample};
use mesh_service_mirror::metrics::LinkStatus;

use mesh_viz::{
    federate::{Answer, Unreachable},
    views::{Edge, StatRow},
};

use crate::{
    demo::LoadStats,
    runner::{RunRecord, scrape, scrape_in},
};

/// One look at every proxy and mirror of a run.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    /// Per cluster, every sample of its proxies together.
    pub proxies: BTreeMap<String, Vec<Sample>>,
    /// Per cluster, its mirror's links.
    pub links: BTreeMap<String, BTreeMap<String, LinkStatus>>,
    /// Per `<cluster>/<replica>`, what its load generator reports.
    pub loads: BTreeMap<String, LoadStats>,
    /// What viz says of every cluster, when the run has viz.
    pub viz: Option<VizView>,
}

/// viz's answers for the whole run: golden metrics per workload (server
/// side) and the edges, each cluster's own or through a linked one's viz.
#[derive(Clone, Debug, Default)]
pub struct VizView {
    pub workloads: Answer<Vec<StatRow>>,
    pub edges: Answer<Vec<Edge>>,
}

impl VizView {
    /// Asks each cluster's viz that no earlier answer covered (one viz
    /// answers for the clusters it links to, through the mesh).
    pub fn take(record: &RunRecord) -> Option<VizView> {
        let mut view = VizView::default();
        let mut asked = false;
        for c in &record.clusters {
            let Some(viz) = c.viz else { continue };
            if view.workloads.clusters.iter().any(|m| m.name == c.name) {
                continue;
            }
            asked = true;
            let workloads: Option<Answer<Vec<StatRow>>> = ask_viz(viz, "/api/v1/stat?kind=deploy");
            let edges: Option<Answer<Vec<Edge>>> = ask_viz(viz, "/api/v1/edges");
            let (Some(w), Some(e)) = (workloads, edges) else {
                view.workloads.unreachable.push(Unreachable {
                    cluster: c.name.clone(),
                    error: format!("its viz at {viz} does not answer"),
                });
                continue;
            };
            view.workloads.clusters.extend(w.clusters);
            view.workloads.rows.extend(w.rows);
            view.workloads.unreachable.extend(w.unreachable);
            view.edges.rows.extend(e.rows);
        }
        let answered: Vec<String> = view
            .workloads
            .clusters
            .iter()
            .map(|c| c.name.clone())
            .collect();
        view.workloads
            .unreachable
            .retain(|u| !answered.contains(&u.cluster));
        view.edges.rows.sort_by(|a, b| {
            (&a.src_cluster, &a.src, &a.dst).cmp(&(&b.src_cluster, &b.src, &b.dst))
        });
        view.edges.rows.dedup();
        asked.then_some(view)
    }
}

fn ask_viz<T: serde::de::DeserializeOwned>(viz: std::net::SocketAddr, path: &str) -> Option<T> {
    let (status, body) =
        mesh_core::metrics_text::fetch(viz, path, std::time::Duration::from_secs(3)).ok()?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// A destination a FailoverPolicy steers, as one cluster's callers see it.
#[derive(Clone, Debug, PartialEq)]
pub struct FailoverRow {
    pub cluster: String,
    pub service: String,
    /// The best tier taking traffic (-1: none).
    pub tier: i64,
    /// Each tier: its clusters, healthy share, load.
    pub tiers: Vec<(String, f64, f64)>,
}

/// One row: requests from one cluster to one destination.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub cluster: String,
    /// The destination authority, e.g. `api-east.shop.svc.cluster.local:8080`.
    pub service: String,
    /// The cluster discovery placed it in (`-` when not meshed).
    pub dst_cluster: String,
    pub requests: f64,
    pub success: f64,
    pub mtls: f64,
    pub latency: Histogram,
}

impl Row {
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.success / self.requests)
    }
    pub fn mtls_share(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.mtls / self.requests)
    }
    /// Whether it crossed to another cluster.
    pub fn cross_cluster(&self) -> bool {
        self.dst_cluster != "-" && self.dst_cluster != self.cluster
    }
}

impl Snapshot {
    /// Scrapes every proxy, mirror and load generator of `record` (blocking).
    pub fn take(record: &RunRecord) -> Snapshot {
        let mut snap = Snapshot {
            at: Instant::now(),
            proxies: BTreeMap::new(),
            links: BTreeMap::new(),
            loads: BTreeMap::new(),
            viz: VizView::take(record),
        };
        for c in &record.clusters {
            let mut samples = Vec::new();
            for r in &c.replicas {
                if let Ok(s) = scrape_in(r.netns.as_deref(), r.proxy_admin) {
                    samples.extend(s);
                }
                if let Ok(text) = std::fs::read(&r.stats)
                    && let Ok(stats) = serde_json::from_slice::<LoadStats>(&text)
                {
                    snap.loads.insert(format!("{}/{}", c.name, r.name), stats);
                }
            }
            snap.proxies.insert(c.name.clone(), samples);
            if let Some(admin) = c.mirror_admin {
                let links = scrape(admin)
                    .map(|s| LinkStatus::read(&s))
                    .unwrap_or_default();
                snap.links.insert(c.name.clone(), links);
            }
        }
        snap
    }

    /// Totals since the components started.
    pub fn rows(&self) -> Vec<Row> {
        // One row per destination cluster: traffic a FailoverPolicy moves
        // shows as a row that drains and one that fills.
        let mut rows: BTreeMap<(String, String, String), Row> = BTreeMap::new();
        for (cluster, samples) in &self.proxies {
            for s in samples
                .iter()
                .filter(|s| s.name == "mesh_proxy_outbound_requests_total")
            {
                let authority = s.label("authority").to_owned();
                let dst = match s.label("dst_cluster") {
                    "" => "-".to_owned(),
                    dst => dst.to_owned(),
                };
                let row = rows
                    .entry((cluster.clone(), authority.clone(), dst.clone()))
                    .or_insert_with(|| Row {
                        cluster: cluster.clone(),
                        service: authority.clone(),
                        dst_cluster: dst,
                        ..Default::default()
                    });
                row.requests += s.value;
                if s.label("classification") == "success" {
                    row.success += s.value;
                }
                if s.label("tls") == "mtls" {
                    row.mtls += s.value;
                }
            }
        }
        // Latency is kept per destination service, not per cluster.
        for ((cluster, authority, _), row) in rows.iter_mut() {
            row.latency = Histogram::collect(
                &self.proxies[cluster],
                "mesh_proxy_response_latency_seconds",
                |s| s.label("direction") == "outbound" && s.label("target") == authority,
            );
        }
        rows.into_values().collect()
    }

    /// Per calling cluster and destination a FailoverPolicy steers: the
    /// tier in use and each tier's healthy share and load, as its callers'
    /// proxies see them (the first proxy that reports one).
    pub fn failover(&self) -> Vec<FailoverRow> {
        let mut out: BTreeMap<(String, String), FailoverRow> = BTreeMap::new();
        for (cluster, samples) in &self.proxies {
            for s in samples
                .iter()
                .filter(|s| s.name == "mesh_proxy_failover_tier")
            {
                let authority = s.label("authority").to_owned();
                out.entry((cluster.clone(), authority.clone()))
                    .or_insert_with(|| {
                        let tier = |name: &str| {
                            let mut v: Vec<(u32, String, f64)> = samples
                                .iter()
                                .filter(|t| t.name == name && t.label("authority") == authority)
                                .filter_map(|t| {
                                    Some((
                                        t.label("tier").parse().ok()?,
                                        t.label("clusters").to_owned(),
                                        t.value,
                                    ))
                                })
                                .collect();
                            v.sort_by_key(|(i, _, _)| *i);
                            v.dedup_by_key(|(i, _, _)| *i);
                            v
                        };
                        let shares = tier("mesh_proxy_failover_healthy_share");
                        let loads = tier("mesh_proxy_failover_load");
                        FailoverRow {
                            cluster: cluster.clone(),
                            service: authority.clone(),
                            tier: s.value as i64,
                            tiers: shares
                                .into_iter()
                                .map(|(i, name, share)| {
                                    let load = loads
                                        .iter()
                                        .find(|(j, _, _)| *j == i)
                                        .map_or(0.0, |(_, _, l)| *l);
                                    (name, share, load)
                                })
                                .collect(),
                        }
                    });
            }
        }
        out.into_values().collect()
    }

    /// What happened between `earlier` and this snapshot.
    pub fn rows_since(&self, earlier: &Snapshot) -> Vec<Row> {
        let before = earlier.rows();
        self.rows()
            .into_iter()
            .map(|row| {
                let Some(b) = before.iter().find(|b| {
                    b.cluster == row.cluster
                        && b.service == row.service
                        && b.dst_cluster == row.dst_cluster
                }) else {
                    return row;
                };
                Row {
                    requests: (row.requests - b.requests).max(0.0),
                    success: (row.success - b.success).max(0.0),
                    mtls: (row.mtls - b.mtls).max(0.0),
                    latency: row.latency.since(&b.latency),
                    ..row
                }
            })
            .collect()
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.is_infinite() => ">10s".into(),
        Some(v) => format!("<={}ms", trim(v * 1000.0)),
    }
}

fn trim(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// `api-east.shop.svc.cluster.local:8080` as `api-east.shop:8080`.
fn short(authority: &str) -> String {
    match authority.split_once(".svc.") {
        Some((svc, rest)) => match rest.rsplit_once(':') {
            Some((_, port)) => format!("{svc}:{port}"),
            None => svc.to_owned(),
        },
        None => authority.to_owned(),
    }
}

/// The table of `rows`; `seconds` turns counts into rates when given.
fn table(out: &mut String, rows: &[Row], seconds: Option<f64>) {
    let _ = writeln!(
        out,
        "{:<10} {:<30} {:<8} {:>9} {:>8} {:>10} {:>10} {:>7}",
        "CLUSTER",
        "SERVICE",
        "IN",
        if seconds.is_some() { "RPS" } else { "REQUESTS" },
        "SUCCESS",
        "P50",
        "P99",
        "MTLS"
    );
    for r in rows {
        let count = match seconds {
            Some(s) if s > 0.0 => format!("{:.1}", r.requests / s),
            _ => format!("{:.0}", r.requests),
        };
        let _ = writeln!(
            out,
            "{:<10} {:<30} {:<8} {:>9} {:>8} {:>10} {:>10} {:>7}",
            r.cluster,
            short(&r.service),
            r.dst_cluster,
            count,
            pct(r.success_rate()),
            ms(r.latency.quantile(0.5)),
            ms(r.latency.quantile(0.99)),
            pct(r.mtls_share()),
        );
    }
}

/// Which tier each steered service is on.
fn failover(out: &mut String, snap: &Snapshot) {
    let rows = snap.failover();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n{:<10} {:<30} {:<12} TIERS (healthy share, load)",
        "FAILOVER", "SERVICE", "ON"
    );
    for r in rows {
        let on = usize::try_from(r.tier)
            .ok()
            .and_then(|i| r.tiers.get(i))
            .map_or("none".to_owned(), |(name, _, _)| name.clone());
        let tiers: Vec<String> = r
            .tiers
            .iter()
            .map(|(name, share, load)| format!("{name} {} {}", pct(Some(*share)), pct(Some(*load))))
            .collect();
        let _ = writeln!(
            out,
            "{:<10} {:<30} {:<12} {}",
            r.cluster,
            short(&r.service),
            on,
            tiers.join(" | ")
        );
    }
}

fn links_and_loads(out: &mut String, snap: &Snapshot) {
    let links: Vec<(&String, &String, &LinkStatus)> = snap
        .links
        .iter()
        .flat_map(|(c, ls)| ls.iter().map(move |(o, l)| (c, o, l)))
        .collect();
    if !links.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<10} {:<10} {:<6} {:>9} {:>10} {:>10}",
            "LINK FROM", "TO", "ALIVE", "SERVICES", "PROBE P50", "P99"
        );
        for (from, to, l) in links {
            let _ = writeln!(
                out,
                "{:<10} {:<10} {:<6} {:>9} {:>10} {:>10}",
                from,
                to,
                if l.alive { "yes" } else { "NO" },
                l.services,
                ms(l.probe_latency.quantile(0.5)),
                ms(l.probe_latency.quantile(0.99)),
            );
        }
    }
    for (name, load) in &snap.loads {
        let total = load.ok() + load.failed();
        let rate = (total > 0).then(|| load.ok() as f64 / total as f64);
        let _ = write!(
            out,
            "\nload {name} -> {}: {} ok, {} failed ({}), http p50 {} p99 {}",
            load.target,
            load.ok(),
            load.failed(),
            pct(rate),
            load.http
                .p50_ms
                .map_or("-".into(), |v| format!("{}ms", trim(v))),
            load.http
                .p99_ms
                .map_or("-".into(), |v| format!("{}ms", trim(v))),
        );
        if let Some(g) = &load.grpc {
            let _ = write!(out, "; grpc {} ok, {} failed", g.ok, g.failed);
        }
        if let Some(answer) = &load.last_answer {
            let _ = write!(out, "\n  last answer: {answer}");
        }
        if let Some(e) = load
            .http
            .last_error
            .as_ref()
            .or(load.grpc.as_ref().and_then(|g| g.last_error.as_ref()))
        {
            let _ = write!(out, "\n  last error: {e}");
        }
        out.push('\n');
    }
}

/// The live view: the last interval's rates.
pub fn live(record: &RunRecord, now: &Snapshot, before: &Snapshot, elapsed: f64) -> String {
    let mut out = String::new();
    let seconds = now.at.duration_since(before.at).as_secs_f64();
    let _ = writeln!(
        out,
        "mesh up: {} ({} clusters), up {elapsed:.0}s; last {seconds:.1}s as the callers' proxies saw it (Ctrl-C stops)",
        record.topology,
        record.clusters.len()
    );
    table(&mut out, &now.rows_since(before), Some(seconds));
    failover(&mut out, now);
    links_and_loads(&mut out, now);
    viz(&mut out, now);
    out
}

/// What viz says of every cluster: each workload's golden metrics (its
/// own proxies', server side) and who calls whom.
fn viz(out: &mut String, snap: &Snapshot) {
    let Some(v) = &snap.viz else { return };
    let _ = writeln!(
        out,
        "
WORKLOAD (viz, last 30s)           CLUSTER    MESHED    RPS   SUCCESS        P50        P99"
    );
    for r in &v.workloads.rows {
        let _ = writeln!(
            out,
            "{:<35}{:<11}{:>6}{:>7.1}{:>10}{:>11}{:>11}",
            format!("{}/{}", r.namespace, r.name),
            r.cluster,
            r.meshed.unwrap_or(0),
            r.rps,
            pct(r.success),
            r.p50_ms
                .map_or_else(|| "-".to_owned(), |m| format!("{m:.1}ms")),
            r.p99_ms
                .map_or_else(|| "-".to_owned(), |m| format!("{m:.1}ms")),
        );
    }
    for e in v
        .edges
        .rows
        .iter()
        .filter(|e| e.src_cluster != e.dst_cluster)
    {
        let _ = writeln!(
            out,
            "edge {} ({}) -> {} ({}): {:.1} rps, {} -> {}",
            e.src, e.src_cluster, e.dst, e.dst_cluster, e.rps, e.src_identity, e.dst_identity
        );
    }
    for u in &v.workloads.unreachable {
        let _ = writeln!(out, "viz: cluster {} unreachable: {}", u.cluster, u.error);
    }
}

/// The summary: totals over the whole run.
pub fn summary(record: &RunRecord, snap: &Snapshot, elapsed: f64) -> String {
    let mut out = String::new();
    let rows = snap.rows();
    let _ = writeln!(
        out,
        "mesh up: {} after {elapsed:.0}s; totals as the callers' proxies saw them",
        record.topology
    );
    table(&mut out, &rows, None);
    let cross: Vec<&Row> = rows.iter().filter(|r| r.cross_cluster()).collect();
    let requests: f64 = cross.iter().map(|r| r.requests).sum();
    let success: f64 = cross.iter().map(|r| r.success).sum();
    let mtls: f64 = cross.iter().map(|r| r.mtls).sum();
    if requests > 0.0 {
        let _ = writeln!(
            out,
            "\ncross-cluster: {requests:.0} requests, {} succeeded, {} over mTLS",
            pct(Some(success / requests)),
            pct(Some(mtls / requests)),
        );
    } else {
        let _ = writeln!(out, "\ncross-cluster: no requests");
    }
    failover(&mut out, snap);
    links_and_loads(&mut out, snap);
    viz(&mut out, snap);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            proxies: [("west".to_owned(), mesh_core::metrics_text::parse(text))].into(),
            links: BTreeMap::new(),
            loads: BTreeMap::new(),
            viz: None,
        }
    }

    #[test]
    fn the_viz_section_shows_every_clusters_workloads_and_cross_cluster_edges() {
        let mut s = snap("");
        let row = |cluster: &str, name: &str, rps| StatRow {
            cluster: cluster.into(),
            namespace: "shop".into(),
            name: name.into(),
            meshed: Some(1),
            rps,
            success: Some(1.0),
            ..StatRow::default()
        };
        let edge = |src: &str, sc: &str, dst: &str, dc: &str| Edge {
            src: src.into(),
            src_cluster: sc.into(),
            dst: dst.into(),
            dst_cluster: dc.into(),
            src_identity: format!("spiffe://{sc}.mesh.local/ns/shop/sa/{src}"),
            dst_identity: format!("spiffe://{dc}.mesh.local/ns/shop/sa/{dst}"),
            rps: 15.0,
            ..Edge::default()
        };
        s.viz = Some(VizView {
            workloads: Answer {
                clusters: Vec::new(),
                unreachable: vec![Unreachable {
                    cluster: "north".into(),
                    error: "no answer".into(),
                }],
                rows: vec![row("west", "web", 15.0), row("east", "api", 15.0)],
            },
            edges: Answer {
                rows: vec![
                    edge("web", "west", "api", "east"),
                    edge("load", "west", "web", "west"),
                ],
                ..Answer::default()
            },
        });
        let mut out = String::new();
        viz(&mut out, &s);
        assert!(
            out.contains("shop/api                           east"),
            "{out}"
        );
        assert!(out.contains("edge web (west) -> api (east): 15.0 rps, spiffe://west.mesh.local/ns/shop/sa/web -> spiffe://east.mesh.local/ns/shop/sa/api"), "{out}");
        assert!(
            !out.contains("edge load"),
            "only cross-cluster edges: {out}"
        );
        assert!(
            out.contains("viz: cluster north unreachable: no answer"),
            "{out}"
        );
    }

    #[test]
    fn rows_add_up_proxies_and_split_success_and_mtls() {
        let a = "mesh_proxy_outbound_requests_total{authority=\"api-east.shop.svc.cluster.local:8080\",dst_cluster=\"east\",status_code=\"200\",classification=\"success\",tls=\"mtls\"} 90\n\
mesh_proxy_outbound_requests_total{authority=\"api-east.shop.svc.cluster.local:8080\",dst_cluster=\"east\",status_code=\"503\",classification=\"failure\",tls=\"mtls\"} 10\n\
mesh_proxy_outbound_requests_total{authority=\"example.com:80\",dst_cluster=\"\",status_code=\"200\",classification=\"success\",tls=\"none\"} 5\n\
mesh_proxy_response_latency_seconds_bucket{direction=\"outbound\",target=\"api-east.shop.svc.cluster.local:8080\",classification=\"success\",le=\"0.001\"} 50\n\
mesh_proxy_response_latency_seconds_bucket{direction=\"outbound\",target=\"api-east.shop.svc.cluster.local:8080\",classification=\"success\",le=\"0.01\"} 90\n\
mesh_proxy_response_latency_seconds_bucket{direction=\"outbound\",target=\"api-east.shop.svc.cluster.local:8080\",classification=\"success\",le=\"+Inf\"} 90\n";
        let rows = snap(a).rows();
        assert_eq!(rows.len(), 2);
        let api = &rows[0];
        assert_eq!(api.service, "api-east.shop.svc.cluster.local:8080");
        assert!(api.cross_cluster());
        assert_eq!(api.success_rate(), Some(0.9));
        assert_eq!(api.mtls_share(), Some(1.0));
        assert_eq!(api.latency.quantile(0.5), Some(0.001));
        let plain = &rows[1];
        assert!(!plain.cross_cluster());
        assert_eq!(plain.mtls_share(), Some(0.0));

        let later = snap(&a.replace("} 90\n", "} 190\n"));
        let delta = later.rows_since(&snap(a));
        assert_eq!(delta[0].requests, 100.0);
        assert_eq!(delta[0].success_rate(), Some(1.0));
        assert_eq!(short(&delta[0].service), "api-east.shop:8080");
    }

    #[test]
    fn the_tier_each_steered_service_is_on() {
        let text = "mesh_proxy_failover_tier{authority=\"api.shop.svc.cluster.local:8080\"} 1\n\
mesh_proxy_failover_healthy_share{authority=\"api.shop.svc.cluster.local:8080\",tier=\"0\",clusters=\"local\"} 0\n\
mesh_proxy_failover_healthy_share{authority=\"api.shop.svc.cluster.local:8080\",tier=\"1\",clusters=\"east\"} 1\n\
mesh_proxy_failover_load{authority=\"api.shop.svc.cluster.local:8080\",tier=\"0\",clusters=\"local\"} 0\n\
mesh_proxy_failover_load{authority=\"api.shop.svc.cluster.local:8080\",tier=\"1\",clusters=\"east\"} 1\n";
        let rows = snap(text).failover();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].tier, 1);
        assert_eq!(
            rows[0].tiers,
            vec![
                ("local".to_owned(), 0.0, 0.0),
                ("east".to_owned(), 1.0, 1.0)
            ]
        );
        let mut out = String::new();
        failover(&mut out, &snap(text));
        assert!(out.contains("api.shop:8080"), "{out}");
        assert!(
            out.contains("east         local 0.0% 0.0% | east 100.0% 100.0%"),
            "{out}"
        );
    }
}
