//! Live requests: the `/tap` streams of this cluster's proxies, for a short
//! window, each event named with its cluster and workload; and `top`, the
//! most-called paths among them.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{sync::Mutex, task::JoinSet, time::Instant};

use crate::prom::{PromError, Prometheus};

/// Longest line read from a proxy's `/tap`.
const MAX_LINE: usize = 8 << 10;

/// One request a proxy carried.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TapEvent {
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub deployment: String,
    #[serde(default)]
    pub pod: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// Outbound: the service called.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub authority: String,
    /// Inbound: the app port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Inbound: the verified caller.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub latency_us: u64,
}

/// The most-called path of a workload in a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TopRow {
    pub cluster: String,
    pub namespace: String,
    pub deployment: String,
    pub direction: String,
    /// The service (outbound) or app port (inbound).
    pub target: String,
    pub method: String,
    pub path: String,
    pub count: u64,
    pub failures: u64,
    pub max_latency_us: u64,
}

/// A proxy to tap: its admin address and who it is.
#[derive(Clone, Debug)]
struct Target {
    addr: SocketAddr,
    namespace: String,
    deployment: String,
    pod: String,
}

/// What a short tap of this cluster saw, and which proxies could not be
/// tapped.
#[derive(Debug, Default)]
pub struct Tapped {
    pub events: Vec<TapEvent>,
    pub errors: Vec<String>,
}

/// Taps every proxy Prometheus scrapes on its admin address for `window`,
/// keeping at most `max` events (of namespace `ns` when not empty).
pub async fn tap(
    prometheus: Prometheus,
    cluster: &str,
    ns: &str,
    window: Duration,
    max: usize,
) -> Result<Tapped, PromError> {
    let targets: Vec<Target> = prometheus
        .query("mesh_proxy_identity_info", Duration::from_secs(2))
        .await?
        .iter()
        .filter_map(|s| {
            Some(Target {
                addr: s.label("instance").parse().ok()?,
                namespace: s.label("mesh_namespace").to_owned(),
                deployment: s.label("mesh_deployment").to_owned(),
                pod: s.label("mesh_pod").to_owned(),
            })
        })
        .filter(|t| ns.is_empty() || t.namespace == ns)
        .collect();
    let until = Instant::now() + window;
    let seen = Arc::new(Mutex::new(Tapped::default()));
    let mut tasks = JoinSet::new();
    for t in targets {
        let (seen, cluster) = (seen.clone(), cluster.to_owned());
        tasks.spawn(async move {
            let mut events = Vec::new();
            let uri = format!("http://{}/tap", t.addr);
            let read = crate::http::lines_until(t.addr, &uri, until, MAX_LINE, |line| {
                if let Ok(mut e) = serde_json::from_slice::<TapEvent>(line) {
                    e.cluster.clone_from(&cluster);
                    e.namespace.clone_from(&t.namespace);
                    e.deployment.clone_from(&t.deployment);
                    e.pod.clone_from(&t.pod);
                    events.push(e);
                }
                events.len() < max
            })
            .await;
            let mut seen = seen.lock().await;
            if let Err(e) = read {
                seen.errors.push(format!("{} ({}): {e}", t.pod, t.addr));
            }
            seen.events.extend(events);
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut tapped = std::mem::take(&mut *seen.lock().await);
    tapped.events.truncate(max);
    Ok(tapped)
}

/// The paths called most in `events`, most first.
pub fn top(events: &[TapEvent], limit: usize) -> Vec<TopRow> {
    // Keyed by (cluster, namespace, deployment, direction, target,
    // method, path).
    let mut rows: BTreeMap<[String; 7], TopRow> = BTreeMap::new();
    for e in events {
        let target = if e.direction == "inbound" {
            e.port.map(|p| p.to_string()).unwrap_or_default()
        } else {
            crate::views::short_service(&e.authority)
        };
        let row = rows
            .entry([
                e.cluster.clone(),
                e.namespace.clone(),
                e.deployment.clone(),
                e.direction.clone(),
                target.clone(),
                e.method.clone(),
                e.path.clone(),
            ])
            .or_insert_with(|| TopRow {
                cluster: e.cluster.clone(),
                namespace: e.namespace.clone(),
                deployment: e.deployment.clone(),
                direction: e.direction.clone(),
                target,
                method: e.method.clone(),
                path: e.path.clone(),
                ..TopRow::default()
            });
        row.count += 1;
        row.failures += u64::from(e.status >= 500);
        row.max_latency_us = row.max_latency_us.max(e.latency_us);
    }
    let mut rows: Vec<TopRow> = rows.into_values().collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then(a.path.cmp(&b.path)));
    rows.truncate(limit);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_counts_paths_per_workload_most_first() {
        let e = |path: &str, status| TapEvent {
            cluster: "west".into(),
            deployment: "web".into(),
            direction: "outbound".into(),
            authority: "api:80".into(),
            method: "GET".into(),
            path: path.into(),
            status,
            latency_us: 10,
            ..TapEvent::default()
        };
        let rows = top(&[e("/a", 200), e("/b", 200), e("/b", 503)], 10);
        assert_eq!(rows[0].path, "/b");
        assert_eq!((rows[0].count, rows[0].failures), (2, 1));
        assert_eq!(rows[1].path, "/a");
    }

    #[test]
    fn a_proxy_tap_line_reads_as_an_event() {
        let line = br#"{"direction":"inbound","port":8080,"client_id":"spiffe://w/ns/a/sa/b","method":"GET","path":"/","status":200,"latency_us":42}"#;
        let e: TapEvent = serde_json::from_slice(line).unwrap();
        assert_eq!((e.port, e.status, e.latency_us), (Some(8080), 200, 42));
    }
}
