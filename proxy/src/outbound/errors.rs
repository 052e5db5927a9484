//! The one place outbound failures become HTTP responses and metric
//! reasons: 502 (the endpoint failed), 503 (nothing to send to), 504 (too
//! slow).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use mesh_core::identity::SpiffeId;

use crate::wire::Body;

/// `e` and its whole chain of causes, `: `-separated (hyper's own
/// messages alone say only "client error (Connect)").
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Why an outbound request failed; says whether a retry could help.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no ready endpoint for {authority} within the fail-fast timeout")]
    NoEndpoints { authority: String },
    #[error("every endpoint of {authority} is failing and ejected; retry shortly")]
    AllEjected { authority: String },
    #[error("discovery for {authority} is unavailable and nothing is cached")]
    DiscoveryUnavailable { authority: String },
    #[error("endpoint {0} is meshed but has no proxy port; refusing to send in plaintext")]
    MeshedWithoutProxy(SpiffeId),
    #[error(
        "discovery said {authority} was meshed and no longer knows it; refusing plaintext until it says otherwise"
    )]
    NoLongerKnown { authority: String },
    #[error("route rule {route} has no backend with a weight above 0")]
    NoBackend { route: String },
    #[error(
        "this proxy already follows {max} destinations (MESH_PROXY_MAX_DESTINATIONS); {authority} is refused until some go idle"
    )]
    TooManyDestinations { authority: String, max: usize },
    #[error("connecting to the endpoint failed: {0}")]
    Connect(String),
    /// Nothing of the request was sent (the connection, its TLS handshake
    /// or the tunnel stream failed), so another endpoint may always take it.
    #[error("the endpoint could not be reached (nothing was sent): {0}")]
    Unreachable(String),
    /// Its connection went silent (a PING not answered): the endpoint is
    /// frozen or cut off, not merely slow.
    #[error("the endpoint stopped answering (its connection's PING timed out): {0}")]
    Unresponsive(String),
    #[error("the request is malformed")]
    BadRequest,
    #[error("too many requests in flight; retry later")]
    Overloaded,
    #[error("the balancer failed: {0}")]
    Balancer(String),
    #[error("the {what} timed out after {after:?}")]
    Timeout {
        what: &'static str,
        after: std::time::Duration,
    },
}

impl OutboundError {
    /// A failure to reach the endpoint, with its whole chain of causes
    /// (hyper's own message alone says only "client error (Connect)").
    pub fn connect(e: impl std::error::Error) -> Self {
        Self::Connect(with_causes(&e))
    }

    /// [`OutboundError::connect`] for a failure before any request byte
    /// was sent.
    pub fn unreachable(e: impl std::error::Error) -> Self {
        match Self::connect(e) {
            Self::Connect(message) => Self::Unreachable(message),
            other => other,
        }
    }

    /// A legacy client's error: [`Self::Unreachable`] when it came from
    /// the connector (nothing sent), else [`Self::Connect`].
    pub fn from_client(e: hyper_util::client::legacy::Error) -> Self {
        if e.is_connect() {
            return Self::unreachable(e);
        }
        let silent =
            std::iter::successors(std::error::Error::source(&e), |s| s.source()).any(|s| {
                s.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout)
            });
        match Self::connect(e) {
            Self::Connect(message) if silent => Self::Unresponsive(message),
            other => other,
        }
    }

    /// Status and metric reason for this failure.
    pub fn classify(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NoEndpoints { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_endpoints"),
            Self::DiscoveryUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "discovery_unavailable")
            }
            Self::AllEjected { .. } => (StatusCode::SERVICE_UNAVAILABLE, "all_ejected"),
            Self::NoLongerKnown { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_longer_known"),
            Self::MeshedWithoutProxy(_) => (StatusCode::BAD_GATEWAY, "meshed_without_proxy"),
            Self::TooManyDestinations { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_destinations")
            }
            Self::NoBackend { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "no_backend"),
            Self::Connect(_) => (StatusCode::BAD_GATEWAY, "connect"),
            Self::Unreachable(_) => (StatusCode::BAD_GATEWAY, "unreachable"),
            Self::Unresponsive(_) => (StatusCode::BAD_GATEWAY, "unresponsive"),
            Self::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::Balancer(_) => (StatusCode::BAD_GATEWAY, "balancer"),
            Self::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        }
    }

    /// Whether another attempt (maybe to another endpoint) could succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::Connect(_) | Self::Unreachable(_) | Self::Unresponsive(_) | Self::Balancer(_)
        )
    }

    /// The response the app gets.
    pub fn response(&self) -> Response<Body> {
        let (status, _) = self.classify();
        let mut resp = Response::new(
            Full::new(Bytes::from(format!("mesh: {self}\n")))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}
