//! One meshed endpoint's HTTP/2 connection (`H2Endpoint`): requests share
//! one connection, a dial under way is waited for rather than repeated,
//! and a connection the peer closed is replaced.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::identity::{CredentialStore, ExpectedIdentity, tls::server_config};
use mesh_proxy::outbound::endpoint::{Dialer, EndpointService};
use support::*;
use tower::{Service, ServiceExt};

/// An mTLS HTTP/2 server as `api`, admitting `web`. It counts the
/// connections it accepts and closes each (GOAWAY) after `per_connection`
/// requests.
async fn peer(w: &World, per_connection: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let creds = CredentialStore::new(w.join("api").await);
    let mut tls =
        server_config(creds, w.bundles.clone(), ExpectedIdentity::Exact(id("web"))).unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let served = Arc::new(AtomicUsize::new(0));
                let (enough_tx, enough) = tokio::sync::watch::channel(false);
                let svc = service_fn(move |req: Request<Incoming>| {
                    let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                    if n >= per_connection {
                        let _ = enough_tx.send(true);
                    }
                    async move {
                        // Slow enough for requests to overlap.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        // The request's body, back.
                        let body = req.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(Response::new(Full::new(body)))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc);
                let mut conn = std::pin::pin!(conn);
                let mut enough = enough;
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = enough.wait_for(|e| *e) => {}
                }
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            });
        }
    });
    (addr, accepted)
}

fn get() -> Request<mesh_proxy::wire::Body> {
    Request::get("http://api.shop:80/")
        .body(Empty::new().map_err(|never| match never {}).boxed())
        .unwrap()
}

async fn endpoint(w: &World, peer: SocketAddr) -> EndpointService {
    endpoint_at(w, peer.port()).await
}

async fn endpoint_at(w: &World, proxy_port: u16) -> EndpointService {
    let web = CredentialStore::new(w.join("web").await);
    let dialer = Dialer::new(web, w.bundles.clone(), Duration::from_secs(5));
    EndpointService::reach(
        SocketAddr::from(([127, 0, 0, 1], 8080)),
        Ok(Some(id("api"))),
        proxy_port,
        None,
        &dialer,
    )
}

/// Twenty requests sent at once to an endpoint not yet connected make
/// one connection: the first dials, the others wait for it.
#[tokio::test]
async fn requests_at_once_share_one_connection() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let (addr, accepted) = peer(&w, usize::MAX).await;
    let svc = endpoint(&w, addr).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        calls.spawn(svc.clone().oneshot(get()));
    }
    while let Some(resp) = calls.join_next().await {
        assert_eq!(resp.unwrap().unwrap().status(), 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A connection the peer closes (GOAWAY after two requests, as a proxy
/// at its maximum connection age does) is replaced: every request is
/// answered, on as many connections as that takes.
#[tokio::test]
async fn a_connection_the_peer_closed_is_replaced() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let (addr, accepted) = peer(&w, 2).await;
    let mut svc = endpoint(&w, addr).await;
    for i in 0..6 {
        let resp = svc.ready().await.unwrap().call(get()).await;
        assert_eq!(resp.unwrap().status(), 200, "request {i}");
        // Let the GOAWAY arrive before the next request.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// Nobody listening: the request fails as unreachable (nothing was sent),
/// which lets another endpoint or tier take it.
#[tokio::test]
async fn an_endpoint_nobody_listens_on_is_unreachable() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let svc = endpoint(&w, addr).await;
    let e = svc.oneshot(get()).await.unwrap_err();
    assert!(
        matches!(
            e,
            mesh_proxy::outbound::errors::OutboundError::Unreachable(_)
        ),
        "{e}"
    );
}

/// Bodies larger than HTTP/2's flow-control windows (2 MiB per stream)
/// cross both ways whole: the request's is sent as the peer's window
/// allows, the response's window is given back as it is read.
#[tokio::test]
async fn bodies_larger_than_the_windows_cross_whole() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let (addr, _) = peer(&w, usize::MAX).await;
    let svc = endpoint(&w, addr).await;
    let sent: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let req = Request::post("http://api.shop:80/echo")
        .body(
            Full::new(Bytes::from(sent.clone()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let resp = svc.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the echoed body differs");
}

/// A relay that carries bytes both ways until frozen, then drops them
/// while keeping the connection open: an endpoint that went silent
/// (frozen, or cut off without a reset).
async fn freezable(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let flag = frozen.clone();
    tokio::spawn(async move {
        loop {
            let (inbound, _) = listener.accept().await.unwrap();
            let outbound = tokio::net::TcpStream::connect(to).await.unwrap();
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            tokio::spawn(carry(ir, ow, flag.clone()));
            tokio::spawn(carry(or, iw, flag.clone()));
        }
    });
    (addr, frozen)
}

/// Copies `from` to `to`, dropping what it reads while `frozen`.
async fn carry(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A request on a connection that goes silent fails within a second as
/// unresponsive (its PING went unanswered), instead of waiting forever,
/// and the next request gets a new connection.
#[tokio::test]
async fn a_connection_that_goes_silent_fails_its_requests_as_unresponsive() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    let (addr, accepted) = peer(&w, usize::MAX).await;
    let (relay, frozen) = freezable(addr).await;
    let mut svc = endpoint_at(&w, relay.port()).await;
    let resp = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(resp.status(), 200);
    frozen.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(
        Duration::from_secs(5),
        svc.ready().await.unwrap().call(get()),
    )
    .await
    .expect("a request on a silent connection must not wait forever")
    .unwrap_err();
    assert!(
        matches!(
            e,
            mesh_proxy::outbound::errors::OutboundError::Unresponsive(_)
        ),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    frozen.store(false, Ordering::SeqCst);
    let resp = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
