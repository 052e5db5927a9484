//! The one HTTP client viz needs: a GET over HTTP/1.1 to a known address,
//! with a deadline and a cap on the answer's size. Prometheus, the proxies'
//! `/tap` and linked clusters' viz (through this cluster's sidecar, in
//! absolute form) are all asked this way.

use std::{net::SocketAddr, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Instant};

/// Why a GET gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Protocol(#[from] hyper::Error),
    #[error("the answer is over {0} bytes")]
    TooLarge(usize),
    #[error("bad request URI {0:?}")]
    Uri(String),
}

/// `GET uri` on `addr` (the server, or an HTTP proxy when `uri` is in
/// absolute form for another host). The whole answer, at most `limit`
/// bytes, by `deadline`.
pub async fn get(
    addr: SocketAddr,
    uri: &str,
    deadline: Instant,
    limit: usize,
) -> Result<(StatusCode, Bytes), HttpError> {
    let wait = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout_at(deadline, async {
        let mut body = send(addr, uri).await?;
        let status = body.status();
        let mut out = BytesMut::new();
        while let Some(frame) = body.body_mut().frame().await {
            if let Ok(data) = frame?.into_data() {
                if out.len() + data.len() > limit {
                    return Err(HttpError::TooLarge(limit));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok((status, out.freeze()))
    })
    .await
    .map_err(|_| HttpError::Timeout(wait))?
}

/// `GET uri` on `addr`, handing each line of the answer to `line` until
/// `until` (a stream such as `/tap` never ends by itself). Lines over
/// `max_line` bytes are dropped.
pub async fn lines_until(
    addr: SocketAddr,
    uri: &str,
    until: Instant,
    max_line: usize,
    mut line: impl FnMut(&[u8]) -> bool,
) -> Result<(), HttpError> {
    let run = async {
        let mut resp = send(addr, uri).await?;
        let mut pending = BytesMut::new();
        while let Some(frame) = resp.body_mut().frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let one = pending.split_to(end + 1);
                if one.len() <= max_line && !line(&one[..end]) {
                    return Ok(());
                }
            }
            if pending.len() > max_line {
                pending.clear();
            }
        }
        Ok(())
    };
    match tokio::time::timeout_at(until, run).await {
        Ok(done) => done,
        Err(_) => Ok(()),
    }
}

async fn send(
    addr: SocketAddr,
    uri: &str,
) -> Result<http::Response<hyper::body::Incoming>, HttpError> {
    let parsed: Uri = uri.parse().map_err(|_| HttpError::Uri(uri.to_owned()))?;
    let host = parsed
        .authority()
        .map_or_else(|| addr.to_string(), |a| a.to_string());
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(parsed)
        .header(header::HOST, host)
        .body(Empty::<Bytes>::new())
        .map_err(|_| HttpError::Uri(uri.to_owned()))?;
    Ok(sender.send_request(req).await?)
}
