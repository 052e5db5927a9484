//! The inbound side's connections to the app (`inbound::app`). HTTP/1.1:
//! reused once a response has ended, never while a body is still coming,
//! never after the app closed them, bounded in number and idle time.
//! HTTP/2: one connection, shared.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_proxy::inbound::app::{self, AppError, Http1Pool, IDLE_TIMEOUT, MAX_IDLE};

/// What the app saw.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    closed: AtomicUsize,
}

/// Accepts connections on a new port, counting them; `serve` serves each.
async fn listen<F, Fut>(serve: F) -> (SocketAddr, Arc<Seen>)
where
    F: Fn(tokio::net::TcpStream, Arc<Seen>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            counts.accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(tcp, counts.clone()));
        }
    });
    (addr, seen)
}

/// An HTTP/1.1 app: `/` answers `ok`; `/slow` sends `a`, then `b` after
/// 500 ms; `/wait` answers after 100 ms. `keep_alive: false` closes each
/// connection after its response.
async fn app(keep_alive: bool) -> (SocketAddr, Arc<Seen>) {
    listen(move |tcp, seen| async move {
        let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
            let body: BoxBody<Bytes, Infallible> = match req.uri().path() {
                "/slow" => {
                    let (tx, rx) = tokio::sync::mpsc::channel(2);
                    tokio::spawn(async move {
                        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).await;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"b")))).await;
                    });
                    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
                }
                "/wait" => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    http_body_util::Full::new(Bytes::from_static(b"ok")).boxed()
                }
                _ => http_body_util::Full::new(Bytes::from_static(b"ok")).boxed(),
            };
            Ok::<_, Infallible>(Response::new(body))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(keep_alive)
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
        seen.closed.fetch_add(1, Ordering::SeqCst);
    })
    .await
}

fn get(path: &'static str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header(header::HOST, "api.shop:80")
        .body(Empty::new())
        .unwrap()
}

async fn body(pool: &Http1Pool<Empty<Bytes>>, path: &'static str) -> Bytes {
    let resp = pool.send(get(path)).await.expect("the app answers");
    resp.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn requests_one_after_another_share_one_connection() {
    let (addr, seen) = app(true).await;
    let pool = Http1Pool::new(addr);
    for _ in 0..20 {
        assert_eq!(body(&pool, "/").await, "ok");
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.idle(), 1);
}

/// An app that says nothing of closing (no `Connection: close`) and closes
/// each connection right after its response. Whether the pool learns of
/// the close as the response ends, as it takes the connection, or when
/// hyper gives the request back unsent, the next request goes on a new
/// connection rather than failing.
async fn closing_app() -> (SocketAddr, Arc<Seen>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    listen(|mut tcp, _| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tcp
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
    })
    .await
}

#[tokio::test]
async fn a_connection_the_app_closed_is_not_used_again() {
    let (addr, seen) = closing_app().await;
    let pool = Http1Pool::new(addr);
    for i in 0..50 {
        let resp = pool.send(get("/")).await;
        let resp = resp.unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 50);
}

#[tokio::test]
async fn a_slow_body_holds_up_no_other_request() {
    let (addr, seen) = app(true).await;
    let pool = Http1Pool::new(addr);
    let slow = pool.send(get("/slow")).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(body(&pool, "/").await, "ok");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "the second request waited {:?} for the first one's body",
        started.elapsed()
    );
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    // The slow body ends whole; then both connections are idle.
    assert_eq!(slow.into_body().collect().await.unwrap().to_bytes(), "ab");
    assert_eq!(pool.idle(), 2);
}

#[tokio::test]
async fn a_body_dropped_before_its_end_gives_no_connection_back() {
    let (addr, seen) = app(true).await;
    let pool = Http1Pool::new(addr);
    drop(pool.send(get("/slow")).await.unwrap());
    assert_eq!(pool.idle(), 0);
    assert_eq!(body(&pool, "/").await, "ok");
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    // hyper closes the connection whose response was cut short.
    tokio::time::timeout(Duration::from_secs(2), async {
        while seen.closed.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the cut connection is closed");
}

/// Many requests at once need as many connections; afterwards no more
/// than `MAX_IDLE` are kept, and the others are closed.
#[tokio::test]
async fn idle_connections_are_bounded() {
    let (addr, seen) = app(true).await;
    let pool = Http1Pool::new(addr);
    let many = MAX_IDLE + 36;
    let requests = (0..many).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { body(&pool, "/wait").await })
    });
    for answered in answers(requests).await {
        assert_eq!(answered, "ok");
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), many);
    assert_eq!(pool.idle(), MAX_IDLE);
    tokio::time::timeout(Duration::from_secs(5), async {
        while seen.closed.load(Ordering::SeqCst) < many - MAX_IDLE {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("connections past the limit are closed");
}

async fn answers(tasks: impl Iterator<Item = tokio::task::JoinHandle<Bytes>>) -> Vec<Bytes> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test]
async fn connections_idle_past_the_timeout_are_closed() {
    let (addr, seen) = app(true).await;
    let pool = Http1Pool::new(addr);
    assert_eq!(body(&pool, "/").await, "ok");
    assert_eq!(pool.idle(), 1);
    tokio::time::pause();
    for _ in 0..5 {
        tokio::time::advance(IDLE_TIMEOUT / 3).await;
    }
    tokio::time::resume();
    assert_eq!(pool.idle(), 0);
    tokio::time::timeout(Duration::from_secs(2), async {
        while seen.closed.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the idle connection is closed");
    // The next request dials again.
    assert_eq!(body(&pool, "/").await, "ok");
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_app_nobody_listens_on_is_named_in_the_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let pool = Http1Pool::<Empty<Bytes>>::new(addr);
    let err = pool.send(get("/")).await.unwrap_err();
    assert!(matches!(err, AppError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// An h2c app (prior knowledge, as gRPC servers are) answering after
/// 50 ms, so that requests overlap.
async fn h2c_app() -> (SocketAddr, Arc<Seen>) {
    listen(|tcp, _| async move {
        let svc = service_fn(|_req: Request<hyper::body::Incoming>| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let ok = http_body_util::Full::new(Bytes::from_static(b"ok"));
            Ok::<_, Infallible>(Response::new(ok))
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    })
    .await
}

#[tokio::test]
async fn http2_requests_to_the_app_share_one_connection() {
    let (addr, seen) = h2c_app().await;
    let app = app::http2(addr);
    let requests = (0..20).map(|_| {
        let app = app.clone();
        tokio::spawn(async move {
            let req = Request::get(format!("http://{addr}/"))
                .version(http::Version::HTTP_2)
                .body(mesh_proxy::wire::Body::default())
                .unwrap();
            let resp = app.send(req).await.expect("the app answers");
            resp.into_body().collect().await.unwrap().to_bytes()
        })
    });
    for answered in answers(requests).await {
        assert_eq!(answered, "ok");
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
}
