//! forward: the connections to the app, kept per declared app port (the
//! ports are fixed, so each port's are made once at start).
//!
//! HTTP/2 (callers that spoke it: gRPC) goes on one connection per port,
//! an [`H2Endpoint`] over plain TCP, as the outbound side reaches a meshed
//! endpoint.
//!
//! HTTP/1.1 goes on keep-alive connections kept by the proxy itself on
//! hyper's connection API. It replaces hyper-util's pooled client, whose per-request checkout (a
//! lock around a map keyed by scheme and authority, a hash of both, boxed
//! futures, a spawned task to see each connection back) was a sixth of
//! the server proxy's user time for a map that only ever held one app
//! address per port. Here each app port has its own list of idle
//! connections:
//!
//! - a request takes the most recently used idle connection, or dials one;
//! - a connection goes back to the list once the app's response has ended,
//!   so a slow body never holds up another request;
//! - a connection the app closed while idle never gets a request: a request
//!   it did not take (hyper hands it back) goes on the next one;
//! - at most [`MAX_IDLE`] are kept per port, none idle past [`IDLE_TIMEOUT`].

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Instant};

use crate::{
    h2_client::{Dial, H2Endpoint},
    wire::{Body, BoxError, Stream},
};

/// Idle connections kept per app port; more are closed when they end.
pub const MAX_IDLE: usize = 64;
/// How long a connection may stay idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the TCP connect to the app may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the app did not answer.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot connect to the app at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the app's HTTP/1.1 connection failed: {0}")]
    Http(#[from] hyper::Error),
}

/// TCP to the app, for its HTTP/2 connection.
#[derive(Clone, Copy, Debug)]
pub struct AppDial(pub SocketAddr);

impl Dial for AppDial {
    async fn dial(&self) -> std::io::Result<Box<dyn Stream>> {
        let tcp = connect(self.0).await.map_err(std::io::Error::other)?;
        Ok(Box::new(tcp))
    }
}

/// HTTP/2 to the app on `addr`: one connection, without keep-alive PINGs
/// (the app is on this host).
pub fn http2(addr: SocketAddr) -> H2Endpoint<AppDial> {
    H2Endpoint::new(AppDial(addr), None)
}

/// A TCP connection to the app, with Nagle off: a body that follows its
/// head must not wait for a delayed ACK.
async fn connect(addr: SocketAddr) -> Result<TcpStream, AppError> {
    let connect = |source| AppError::Connect { addr, source };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(connected) => connected.map_err(connect)?,
        Err(_) => {
            let after = format!("no answer after {CONNECT_TIMEOUT:?}");
            return Err(connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                after,
            )));
        }
    };
    tcp.set_nodelay(true).map_err(connect)?;
    Ok(tcp)
}

/// Keep-alive HTTP/1.1 connections to one app address.
pub struct Http1Pool<B> {
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    addr: SocketAddr,
    idle: Mutex<Idle<B>>,
}

struct Idle<B> {
    /// Oldest first: a request takes the last.
    list: Vec<(SendRequest<B>, Instant)>,
    /// Whether a task is closing connections idle past [`IDLE_TIMEOUT`].
    reaping: bool,
}

impl<B> Clone for Http1Pool<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<B> std::fmt::Debug for Http1Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl<B> Http1Pool<B>
where
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            shared: Arc::new(Shared {
                addr,
                idle: Mutex::new(Idle {
                    list: Vec::new(),
                    reaping: false,
                }),
            }),
        }
    }

    /// Sends `req` (origin form, with its Host header) to the app. Its
    /// response body gives the connection back when it ends.
    ///
    /// Not an `async fn`, which would hold `req` twice (its argument and
    /// the local it is moved into) for as long as the request is in flight.
    #[allow(clippy::manual_async_fn)]
    pub fn send(
        &self,
        mut req: Request<B>,
    ) -> impl Future<Output = Result<Response<Body>, AppError>> + '_ {
        async move {
            while let Some(mut sender) = self.shared.take() {
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(self.returning(resp, sender)),
                    // The app closed it before the request was written: the
                    // request goes on another connection.
                    Err(mut e) => match e.take_message() {
                        Some(back) => req = back,
                        None => return Err(e.into_error().into()),
                    },
                }
            }
            // Boxed: rare, and its future would make every request's larger.
            let mut sender = Box::pin(self.dial()).await?;
            match sender.try_send_request(req).await {
                Ok(resp) => Ok(self.returning(resp, sender)),
                Err(e) => Err(e.into_error().into()),
            }
        }
    }

    async fn dial(&self) -> Result<SendRequest<B>, AppError> {
        let addr = self.shared.addr;
        let tcp = connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "app connection ended");
            }
        });
        Ok(sender)
    }

    fn returning(&self, resp: Response<Incoming>, sender: SendRequest<B>) -> Response<Body> {
        let shared = self.shared.clone();
        resp.map(|body| {
            http_body_util::BodyExt::boxed(Returning {
                body,
                back: Some((sender, shared)),
            })
        })
    }

    /// Idle connections now, for tests and metrics.
    pub fn idle(&self) -> usize {
        self.shared.lock().list.len()
    }
}

impl<B: Send + 'static> Shared<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle<B>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection that can take a request.
    fn take(&self) -> Option<SendRequest<B>> {
        let mut idle = self.lock();
        while let Some((sender, _)) = idle.list.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// A connection whose response ended, back to the list. hyper may
    /// not have finished the exchange yet (the end of a body can be seen
    /// before its connection's task has run): then a task waits for it.
    fn give_back(self: &Arc<Self>, mut sender: SendRequest<B>) {
        if sender.is_ready() {
            return self.keep(sender);
        }
        if sender.is_closed() {
            return;
        }
        let shared = Arc::downgrade(self);
        tokio::spawn(async move {
            let ready = tokio::time::timeout(CONNECT_TIMEOUT, sender.ready()).await;
            if let (Ok(Ok(())), Some(shared)) = (ready, shared.upgrade()) {
                shared.keep(sender);
            }
        });
    }

    fn keep(self: &Arc<Self>, sender: SendRequest<B>) {
        let mut idle = self.lock();
        if idle.list.len() >= MAX_IDLE {
            return;
        }
        idle.list.push((sender, Instant::now()));
        if !idle.reaping {
            idle.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }
}

/// Closes connections idle past [`IDLE_TIMEOUT`]; ends once none is idle
/// (the next one kept starts it again).
async fn reap<B: Send + 'static>(shared: Weak<Shared<B>>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 3).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut idle = shared.lock();
        let now = Instant::now();
        idle.list
            .retain(|(sender, since)| !sender.is_closed() && now - *since < IDLE_TIMEOUT);
        if idle.list.is_empty() {
            idle.reaping = false;
            return;
        }
    }
}

/// The app's response body, holding its connection until it ends.
struct Returning<B: Send + 'static> {
    body: Incoming,
    back: Option<(SendRequest<B>, Arc<Shared<B>>)>,
}

impl<B: Send + 'static> Returning<B> {
    fn give_back(&mut self) {
        if let Some((sender, shared)) = self.back.take() {
            shared.give_back(sender);
        }
    }
}

impl<B: Send + 'static> HttpBody for Returning<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            Some(Ok(_)) if !self.body.is_end_stream() => {}
            Some(Ok(_)) | None => self.give_back(),
            // A connection whose response failed is not used again.
            Some(Err(_)) => self.back = None,
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: Send + 'static> Drop for Returning<B> {
    fn drop(&mut self) {
        // An empty body is never polled; a body dropped before its end
        // leaves its connection mid-response, and hyper closes it.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}
