//! HTTP/1.1 protocol upgrades (WebSocket and any other `Upgrade`), which
//! cannot ride a multiplexed HTTP/2 connection: each takes an HTTP/1.1
//! connection of its own on every hop. Between proxies that connection is
//! mTLS with ALPN `http/1.1`, so the request is authorized and carries
//! `mesh-client-id` like any other. When the far side answers
//! `101 Switching Protocols`, both upgraded connections are spliced.

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::metrics::Metrics;

/// ALPN between proxies for a connection carrying one HTTP/1.1 upgrade.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Whether `req` asks to switch protocols (an HTTP/1.1 `Upgrade`).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Leaves only the hop-by-hop headers an upgrade needs: `Upgrade`, and
/// `Connection: upgrade`.
pub fn keep_upgrade_headers(headers: &mut HeaderMap, strip: impl FnOnce(&mut HeaderMap)) {
    let upgrade: Vec<HeaderValue> = headers.get_all(header::UPGRADE).iter().cloned().collect();
    strip(headers);
    for value in upgrade {
        headers.append(header::UPGRADE, value);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// What to count an upgraded connection as.
#[derive(Clone, Debug)]
pub struct Splice {
    pub metrics: Metrics,
    pub direction: &'static str,
    pub peer: String,
    pub tls: &'static str,
    /// When the spliced connection is closed whatever it carries (an
    /// inbound connection's maximum age); `None`: when either side ends.
    pub until: Option<tokio::time::Instant>,
}

/// Sends `req` on a new HTTP/1.1 connection over `io`. On `101`, the
/// connection that asked (`asked`) and the one answered are spliced in
/// the background; any other answer is returned as it is.
pub async fn send<S>(
    io: S,
    req: Request<Incoming>,
    asked: OnUpgrade,
    splice: Splice,
) -> Result<Response<Incoming>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection ended");
        }
    });
    let mut resp = sender.send_request(req).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let answered = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(asked, answered) {
                Ok((a, b)) => {
                    let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                    splice
                        .metrics
                        .splice_until(
                            &mut a,
                            &mut b,
                            (splice.direction, &splice.peer, splice.tls),
                            splice.until,
                        )
                        .await;
                }
                Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
            }
        });
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_needs_both_headers_on_http1() {
        let ws = || {
            Request::get("/")
                .header(header::CONNECTION, "keep-alive, Upgrade")
                .header(header::UPGRADE, "websocket")
        };
        assert!(is_upgrade(&ws().body(()).unwrap()));
        assert!(!is_upgrade(
            &Request::get("/")
                .header(header::UPGRADE, "websocket")
                .body(())
                .unwrap()
        ));
        assert!(!is_upgrade(
            &ws().version(Version::HTTP_2).body(()).unwrap()
        ));
    }

    #[test]
    fn only_the_upgrade_headers_survive() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("upgrade, x-hop"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("5"));
        keep_upgrade_headers(&mut h, |h| {
            h.remove("x-hop");
            h.remove("keep-alive");
            h.remove(header::CONNECTION);
            h.remove(header::UPGRADE);
        });
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(h.get("x-hop").is_none() && h.get("keep-alive").is_none());
    }
}
