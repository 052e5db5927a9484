//! h2_client: requests on an endpoint's one HTTP/2 connection, through the
//! h2 crate directly: a meshed endpoint's proxy on the outbound side, the
//! app (when its callers spoke HTTP/2) on the inbound side.
//!
//! hyper's HTTP/2 client hands each request to a connection task over a
//! channel, spawns a task per request to wait for the response, and sends
//! the response back over a oneshot: three hand-offs and a task of 2.5 KiB
//! per request. Here the request's own task opens the stream and waits for
//! its response; only the connection's driver is a task of its own.
//!
//! What hyper did for us and this module now does:
//! - the response body gives back its flow-control window as it is read;
//! - a request body is sent as the peer's window allows (a task of its
//!   own, so that it may outlive the response, as gRPC streams do);
//! - while requests are open, the connection is PINGed, and one that does
//!   not answer in time is closed: its requests fail as unresponsive.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, header::CONTENT_LENGTH};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};

use crate::{
    outbound::errors::OutboundError,
    wire::{Body, Stream},
};

/// HTTP/2 settings, as hyper's client had them.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// How an [`H2Endpoint`] makes a new stream to its endpoint.
pub trait Dial: std::fmt::Debug + Send + Sync + 'static {
    fn dial(&self) -> impl Future<Output = std::io::Result<Box<dyn Stream>>> + Send;
}

/// The one HTTP/2 connection to an endpoint (a meshed endpoint's proxy, or
/// the app on the inbound side), shared by every request to it: dialled on
/// first use and again once it has closed (a GOAWAY, the peer's maximum
/// connection age, a PING left unanswered). Requests wait for a dial under
/// way rather than each making a connection.
///
/// It replaces hyper-util's pooled client, whose per-request pool checkout
/// (a lock, a hash of the scheme and authority, boxed futures) bought
/// nothing for one HTTP/2 connection per endpoint.
pub struct H2Endpoint<D> {
    connector: D,
    /// Keep-alive PINGs (while requests are on it): `None` for no PINGs.
    keep_alive: Option<(Duration, Duration)>,
    shared: Arc<H2Shared>,
}

#[derive(Default)]
struct H2Shared {
    /// The connection, once dialled.
    current: std::sync::Mutex<Option<Connection>>,
    /// Held while dialling: one dial at a time.
    dialing: tokio::sync::Mutex<()>,
    /// When the last dial failed, and why: requests that were waiting
    /// for that dial share its failure instead of each dialling in turn.
    failed: std::sync::Mutex<Option<(tokio::time::Instant, String)>>,
}

impl<D: Clone> Clone for H2Endpoint<D> {
    fn clone(&self) -> Self {
        Self {
            connector: self.connector.clone(),
            keep_alive: self.keep_alive,
            shared: self.shared.clone(),
        }
    }
}

impl<D: std::fmt::Debug> std::fmt::Debug for H2Endpoint<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Endpoint")
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl<D: Dial> H2Endpoint<D> {
    pub fn new(connector: D, keep_alive: Option<(Duration, Duration)>) -> Self {
        Self {
            connector,
            keep_alive,
            shared: Arc::default(),
        }
    }

    /// The open connection, if there is one.
    fn open(&self) -> Option<Connection> {
        let current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        current.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// The open connection's sender, dialling one when there is none.
    /// The dial is boxed: it is rare, and its future (a TLS handshake, an
    /// HTTP/2 one) would otherwise make every request's future as large.
    async fn sender(&self) -> Result<Connection, OutboundError> {
        match self.open() {
            Some(sender) => Ok(sender),
            None => Box::pin(self.dial_once()).await,
        }
    }

    /// Dials unless another request's dial made a connection meanwhile.
    async fn dial_once(&self) -> Result<Connection, OutboundError> {
        let asked = tokio::time::Instant::now();
        let _dialing = self.shared.dialing.lock().await;
        if let Some(sender) = self.open() {
            return Ok(sender);
        }
        if let Some((at, why)) = &*self.shared.failed.lock().unwrap_or_else(|p| p.into_inner())
            && *at >= asked
        {
            return Err(OutboundError::Unreachable(why.clone()));
        }
        match self.dial().await {
            Ok(sender) => {
                *self
                    .shared
                    .current
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
                Ok(sender)
            }
            Err(e) => {
                if let OutboundError::Unreachable(why) = &e {
                    *self.shared.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((tokio::time::Instant::now(), why.clone()));
                }
                Err(e)
            }
        }
    }

    /// A new connection: the connector's stream (mTLS, for a meshed
    /// endpoint), then the HTTP/2 handshake, its driver spawned.
    async fn dial(&self) -> Result<Connection, OutboundError> {
        let io = self
            .connector
            .dial()
            .await
            .map_err(OutboundError::unreachable)?;
        Connection::handshake(io, self.keep_alive)
            .await
            .map_err(OutboundError::unreachable)
    }

    /// Sends `req` on the connection. A request the connection took no
    /// part of (it was closing) is sent again on a new connection, once.
    ///
    /// Not an `async fn`: an async fn or block keeps a slot for each value
    /// it was given beside the inner future that holds it too (its
    /// argument, a future it awaits), and a request's future lives as long
    /// as the request, in every busy connection's memory. With a
    /// connection open (the common case) the inner future is made here and
    /// combinators wrap it in place; dialling and the second try are boxed.
    pub fn send(
        self,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, OutboundError>> + Send + 'static {
        use futures_util::future::{Either, FutureExt, ready};
        match self.open() {
            Some(conn) => Either::Left(conn.send(req).then(move |sent| match sent {
                Ok(resp) => Either::Left(ready(Ok(resp))),
                Err(SendError::Failed(e)) => Either::Left(ready(Err(e))),
                Err(SendError::NotSent(req, _)) => {
                    Either::Right(Box::pin(async move { self.send_again(*req).await }))
                }
            })),
            None => Either::Right(Box::pin(async move { self.dial_and_send(req).await })),
        }
    }

    /// [`Self::send`] with no connection open: dialled first.
    async fn dial_and_send(&self, req: Request<Body>) -> Result<Response<Body>, OutboundError> {
        let conn = self.sender().await?;
        match conn.send(req).await {
            Ok(resp) => Ok(resp),
            Err(SendError::NotSent(req, _)) => Box::pin(self.send_again(*req)).await,
            Err(SendError::Failed(e)) => Err(e),
        }
    }

    /// [`Self::send`]'s second try, boxed: it is rare.
    async fn send_again(&self, req: Request<Body>) -> Result<Response<Body>, OutboundError> {
        let conn = self.sender().await?;
        conn.send(req).await.map_err(|e| match e {
            SendError::NotSent(_, e) | SendError::Failed(e) => e,
        })
    }
}

/// One HTTP/2 connection to an endpoint.
#[derive(Clone, Debug)]
pub struct Connection {
    send: h2::client::SendRequest<Bytes>,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Requests whose response (head or body) is not done: PINGs are sent
    /// only while there are some.
    open: AtomicUsize,
    /// The driver has ended: no request may start on it.
    closed: AtomicBool,
    /// It ended because a PING went unanswered.
    silent: AtomicBool,
}

/// Counts one open request for as long as it lives.
#[derive(Debug)]
struct Open(Arc<State>);

impl Open {
    fn new(state: &Arc<State>) -> Self {
        state.open.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection {
    /// The HTTP/2 handshake on `io` (mTLS done), its driver spawned. With
    /// `keep_alive` (every, timeout), a PING goes out every `every` while
    /// requests are open, and the connection closes when one is not
    /// answered within `timeout`.
    pub async fn handshake(
        io: Box<dyn Stream>,
        keep_alive: Option<(Duration, Duration)>,
    ) -> Result<Self, h2::Error> {
        let (send, mut conn) = h2::client::Builder::new()
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(crate::wire::MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .max_frame_size(MAX_FRAME)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let state = Arc::new(State::default());
        let pings = keep_alive.and_then(|k| Some((conn.ping_pong()?, k)));
        let driver = state.clone();
        tokio::spawn(async move {
            let result = match pings {
                None => conn.await,
                Some((pinger, (every, timeout))) => tokio::select! {
                    result = &mut conn => result,
                    () = keep_pinging(pinger, every, timeout, &driver) => {
                        driver.silent.store(true, Ordering::Relaxed);
                        tracing::debug!("a meshed endpoint's connection did not answer a PING; closing it");
                        Ok(())
                    }
                },
            };
            driver.closed.store(true, Ordering::Relaxed);
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection to a meshed endpoint closed");
            }
        });
        Ok(Self { send, state })
    }

    /// Whether it can take no more requests.
    pub fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Relaxed)
    }

    /// Sends `req` and waits for its response head. A connection that can
    /// open no more streams (closed, or told to go away) gives the request
    /// back untouched, and is not used again. Takes the handle by value
    /// (the caller's clone), since opening a stream consumes one.
    ///
    /// Not an `async fn`, for the reason [`H2Endpoint::send`] gives: the
    /// request is split here, and its parts are held once, by the block.
    pub fn send(
        self,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + 'static {
        let (head, body) = req.into_parts();
        let Self { send, state } = self;
        async move {
            let open = Open::new(&state);
            let mut send = match send.ready().await {
                Ok(send) => send,
                Err(e) => {
                    state.closed.store(true, Ordering::Relaxed);
                    return Err(SendError::NotSent(
                        Box::new(Request::from_parts(head, body)),
                        OutboundError::unreachable(e),
                    ));
                }
            };
            let end = body.is_end_stream();
            let (response, stream) = send
                .send_request(Request::from_parts(head, ()), end)
                .map_err(|e| SendError::Failed(OutboundError::unreachable(e)))?;
            if !end {
                tokio::spawn(send_body(body, stream));
            }
            let response = response
                .await
                .map_err(|e| SendError::Failed(state.failed(e)))?;
            let (answer, recv) = response.into_parts();
            let length = content_length(&answer.headers);
            let body = RecvBody {
                recv,
                length,
                trailers_next: false,
                open,
            };
            Ok(Response::from_parts(answer, body.boxed()))
        }
    }
}

impl State {
    /// A failure once the request was sent: unresponsive when the
    /// connection was closed for an unanswered PING.
    fn failed(&self, e: h2::Error) -> OutboundError {
        if self.silent.load(Ordering::Relaxed) {
            return OutboundError::Unresponsive(e.to_string());
        }
        OutboundError::connect(e)
    }
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// The connection could open no stream: the request, untouched.
    NotSent(Box<Request<Body>>, OutboundError),
    /// Sent, or failed while being sent.
    Failed(OutboundError),
}

/// PINGs every `every` while requests are open; returns when one is not
/// answered within `timeout`.
async fn keep_pinging(mut pinger: h2::PingPong, every: Duration, timeout: Duration, state: &State) {
    loop {
        tokio::time::sleep(every).await;
        if state.open.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match tokio::time::timeout(timeout, pinger.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection failed: the driver sees it too.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// A request's body, sent as the peer's flow-control window allows; the
/// stream is reset when the body fails or the peer resets it.
async fn send_body(body: Body, mut stream: h2::SendStream<Bytes>) {
    let mut body = std::pin::pin!(body);
    loop {
        let frame = std::future::poll_fn(|cx| {
            if let Poll::Ready(reason) = stream.poll_reset(cx) {
                return Poll::Ready(Err(reason.ok()));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match frame {
            // The peer reset the stream: nothing more to send.
            Err(_) => return,
            Ok(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "request body failed; resetting its stream");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
                continue;
            }
        };
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(room)) => {
                    let chunk = data.split_to(room.min(data.len()));
                    if stream.send_data(chunk, false).is_err() {
                        return;
                    }
                }
                // The stream or the connection is gone.
                None | Some(Err(_)) => return,
            }
        }
    }
}

/// The `content-length` of a response, when it has exactly one valid one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.parse().ok()
}

/// A response body from the peer: gives the flow-control window back as it
/// is read, and keeps its request counted as open until it ends.
struct RecvBody {
    recv: h2::RecvStream,
    /// What `content-length` says is left, when it said.
    length: Option<u64>,
    trailers_next: bool,
    /// Its request, counted open until the body ends.
    open: Open,
}

impl RecvBody {
    fn error(&self, e: h2::Error) -> Box<dyn std::error::Error + Send + Sync> {
        if self.open.0.silent.load(Ordering::Relaxed) {
            return Box::new(OutboundError::Unresponsive(e.to_string()));
        }
        Box::new(e)
    }
}

impl hyper::body::Body for RecvBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if !self.trailers_next {
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let n = data.len();
                    let _ = self.recv.flow_control().release_capacity(n);
                    if let Some(left) = self.length.as_mut() {
                        *left = left.saturating_sub(n as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(self.error(e)))),
                Poll::Ready(None) => self.trailers_next = true,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(self.error(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}
