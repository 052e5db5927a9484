//! Answers for several clusters: this cluster's own, plus those of linked
//! clusters' viz, asked through this cluster's sidecar (so over the mesh:
//! the mirror `viz-<cluster>.mesh-system`, the gateway tunnel, mTLS, and
//! the peer's policy admitting this viz's identity). A peer that does not
//! answer in time is named, never waited for.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{task::JoinSet, time::Instant};

/// The port viz serves on (its API and dashboard).
pub const VIZ_PORT: u16 = 8084;

/// Largest answer read from a peer.
pub const MAX_PEER_ANSWER: usize = 4 << 20;

/// Most rows (or events) taken from one peer.
pub const MAX_PEER_ROWS: usize = 10_000;

/// A cluster that answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub name: String,
    pub trust_domain: String,
}

/// A cluster that did not, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreachable {
    pub cluster: String,
    pub error: String,
}

/// Every viz answer: the clusters it covers, the ones it could not reach,
/// and the rows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer<T> {
    pub clusters: Vec<ClusterMeta>,
    #[serde(default)]
    pub unreachable: Vec<Unreachable>,
    pub rows: T,
}

impl<T> Answer<T> {
    /// The same answer with its rows turned into other rows.
    pub fn map_rows<U>(self, f: impl FnOnce(T) -> U) -> Answer<U> {
        Answer {
            clusters: self.clusters,
            unreachable: self.unreachable,
            rows: f(self.rows),
        }
    }
}

/// Rows that say which cluster measured them, so a peer cannot answer for
/// another cluster.
pub trait Rows: Serialize + DeserializeOwned + Default + Send + 'static {
    /// The clusters named by the rows, and how many rows there are.
    fn clusters(&self) -> Vec<&str>;
    fn count(&self) -> usize;
}

macro_rules! rows_of {
    ($t:ty) => {
        impl Rows for Vec<$t> {
            fn clusters(&self) -> Vec<&str> {
                self.iter().map(|r| r.cluster.as_str()).collect()
            }
            fn count(&self) -> usize {
                self.len()
            }
        }
    };
}
rows_of!(crate::views::StatRow);
rows_of!(crate::views::LinkRow);
rows_of!(crate::tap::TapEvent);
rows_of!(crate::tap::TopRow);

impl Rows for crate::views::Edges {
    fn clusters(&self) -> Vec<&str> {
        self.outbound
            .iter()
            .chain(&self.inbound)
            .map(|e| e.cluster.as_str())
            .collect()
    }
    fn count(&self) -> usize {
        self.outbound.len() + self.inbound.len()
    }
}

/// How this viz reaches its peers: through its sidecar's outbound port.
#[derive(Clone, Copy, Debug)]
pub struct Peers {
    pub proxy: Option<SocketAddr>,
    pub timeout: Duration,
}

impl Peers {
    /// Asks each of `clusters` for `path_and_query` (with `scope=local`) at
    /// once; every answer by the deadline, each checked.
    /// `extra` is how long the query itself runs at the peer (a tap's
    /// window), on top of the timeout.
    pub async fn ask<T: Rows>(
        &self,
        clusters: &[String],
        path_and_query: &str,
        extra: Duration,
    ) -> Vec<Result<Answer<T>, Unreachable>> {
        let mut tasks = JoinSet::new();
        let deadline = Instant::now() + self.timeout + extra;
        for (i, cluster) in clusters.iter().enumerate() {
            let (cluster, proxy) = (cluster.clone(), self.proxy);
            let uri = format!(
                "http://viz-{cluster}.mesh-system.svc.cluster.local:{VIZ_PORT}{path_and_query}"
            );
            tasks.spawn(async move {
                let answer = match proxy {
                    None => Err("this viz has no sidecar to reach linked clusters through (set --proxy or HTTP_PROXY)".to_owned()),
                    Some(proxy) => ask_one::<T>(proxy, &uri, &cluster, deadline).await,
                };
                (
                    i,
                    answer.map_err(|error| Unreachable {
                        cluster: cluster.clone(),
                        error,
                    }),
                )
            });
        }
        let mut answers: Vec<Option<Result<Answer<T>, Unreachable>>> =
            (0..clusters.len()).map(|_| None).collect();
        while let Some(done) = tasks.join_next().await {
            if let Ok((i, answer)) = done {
                answers[i] = Some(answer);
            }
        }
        answers
            .into_iter()
            .zip(clusters)
            .map(|(a, cluster)| {
                a.unwrap_or_else(|| {
                    Err(Unreachable {
                        cluster: cluster.clone(),
                        error: "the query task failed".into(),
                    })
                })
            })
            .collect()
    }
}

async fn ask_one<T: Rows>(
    proxy: SocketAddr,
    uri: &str,
    cluster: &str,
    deadline: Instant,
) -> Result<Answer<T>, String> {
    let (status, body) = crate::http::get(proxy, uri, deadline, MAX_PEER_ANSWER)
        .await
        .map_err(|e| format!("no answer through the mesh: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "answered {status} through the mesh: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
        ));
    }
    let answer: Answer<T> = serde_json::from_slice(&body)
        .map_err(|e| format!("answered something that is not a viz answer: {e}"))?;
    check(answer, cluster)
}

/// A peer's answer is only about itself: one cluster, its own name, on
/// every row, and within the row cap.
pub fn check<T: Rows>(answer: Answer<T>, cluster: &str) -> Result<Answer<T>, String> {
    match answer.clusters.as_slice() {
        [one] if one.name == cluster => {}
        _ => {
            return Err(format!(
                "answered for {:?}, not only for itself; refused",
                answer.clusters.iter().map(|c| &c.name).collect::<Vec<_>>()
            ));
        }
    }
    if answer.rows.count() > MAX_PEER_ROWS {
        return Err(format!(
            "answered {} rows, more than {MAX_PEER_ROWS}; refused",
            answer.rows.count()
        ));
    }
    if let Some(other) = answer.rows.clusters().into_iter().find(|c| *c != cluster) {
        return Err(format!(
            "answered rows of cluster {other:?}, not its own; refused"
        ));
    }
    Ok(Answer {
        unreachable: Vec::new(),
        ..answer
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::StatRow;

    fn answer(cluster: &str, row_cluster: &str) -> Answer<Vec<StatRow>> {
        Answer {
            clusters: vec![ClusterMeta {
                name: cluster.into(),
                trust_domain: format!("{cluster}.mesh.local"),
            }],
            unreachable: vec![Unreachable {
                cluster: "made-up".into(),
                error: "x".into(),
            }],
            rows: vec![StatRow {
                cluster: row_cluster.into(),
                ..StatRow::default()
            }],
        }
    }

    #[test]
    fn a_peer_answers_only_for_itself() {
        let ok = check(answer("east", "east"), "east").unwrap();
        assert!(
            ok.unreachable.is_empty(),
            "a peer's own list is not repeated"
        );
        let e = check(answer("east", "west"), "east").unwrap_err();
        assert!(e.contains("rows of cluster \"west\""), "{e}");
        let e = check(answer("west", "west"), "east").unwrap_err();
        assert!(e.contains("not only for itself"), "{e}");
        let mut many = answer("east", "east");
        many.rows = vec![
            StatRow {
                cluster: "east".into(),
                ..StatRow::default()
            };
            MAX_PEER_ROWS + 1
        ];
        assert!(check(many, "east").unwrap_err().contains("more than"));
    }
}
