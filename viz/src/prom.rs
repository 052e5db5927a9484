//! Asking this cluster's Prometheus: instant queries over its HTTP API
//! (`/api/v1/query`), answers read into typed samples.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::Deserialize;
use tokio::time::Instant;

use crate::http::{self, HttpError};

/// Largest Prometheus answer read (a cluster's whole view fits easily).
const MAX_ANSWER: usize = 16 << 20;

/// Why Prometheus gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("Prometheus at {addr}: {source}; is it running (`mesh up` starts one per cluster)?")]
    Http {
        addr: SocketAddr,
        #[source]
        source: HttpError,
    },
    #[error("Prometheus at {addr} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("Prometheus at {addr} answered something that is not a query result: {0}", .source)]
    Decode {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
}

/// One series of an instant vector: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, or `""`.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// A Prometheus server's query API.
#[derive(Clone, Copy, Debug)]
pub struct Prometheus {
    pub addr: SocketAddr,
}

#[derive(Deserialize)]
struct Answer {
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

impl Prometheus {
    /// The instant vector `promql` evaluates to now.
    pub async fn query(&self, promql: &str, timeout: Duration) -> Result<Vec<Sample>, PromError> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let addr = self.addr;
        let (status, body) = http::get(
            addr,
            &format!("http://{addr}/api/v1/query?{query}"),
            Instant::now() + timeout,
            MAX_ANSWER,
        )
        .await
        .map_err(|source| PromError::Http { addr, source })?;
        if !status.is_success() {
            return Err(PromError::Status {
                addr,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
            });
        }
        decode(&body).map_err(|source| PromError::Decode { addr, source })
    }
}

/// The samples of a `/api/v1/query` answer of type `vector`. `NaN` values
/// (a quantile over no requests) are dropped.
pub fn decode(body: &[u8]) -> Result<Vec<Sample>, serde_json::Error> {
    let answer: Answer = serde_json::from_slice(body)?;
    Ok(answer
        .data
        .result
        .into_iter()
        .filter_map(|s| {
            let value: f64 = s.value.1.parse().ok()?;
            value.is_finite().then_some(Sample {
                labels: s.metric,
                value,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vector_answer_becomes_samples_without_nan() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"authority":"api:80"},"value":[1700000000.1,"2.5"]},
            {"metric":{"authority":"web:80"},"value":[1700000000.1,"NaN"]}]}}"#;
        let samples = decode(body).unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].label("authority"), "api:80");
        assert_eq!(samples[0].value, 2.5);
    }

    #[test]
    fn an_error_answer_is_an_error() {
        assert!(decode(br#"{"status":"error","error":"bad query"}"#).is_err());
    }
}
