//! The Workload API's Unix socket: each connection's peer uid
//! (SO_PEERCRED), and a relay that makes gRPC C-core clients work.
//!
//! gRPC C-core (Python's `grpcio`, Ruby, PHP, C++; so py-spiffe) sends the
//! percent-encoded socket path as `:authority` over a Unix socket
//! (grpc/grpc#38142). That is not a valid authority, and the h2 server under
//! tonic resets such streams with PROTOCOL_ERROR (hyperium/h2#487, still
//! open). Go clients send `localhost`. So every connection goes through a
//! frame relay: h2's own codec reads the client's frames and writes them
//! to the server over an in-memory pipe, replacing `:authority` with
//! `localhost` in request headers; everything else passes unchanged, flow
//! control included (WINDOW_UPDATE frames pass through). The relay only
//! rewrites that one header: the uid check stays in the handler.

use std::{future::poll_fn, io, pin::Pin, task::Poll};

use h2::{
    Codec,
    frame::{Frame, Pseudo},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The HPACK table size the relay's own decoders allow (the default).
const TABLE_SIZE: u32 = 4096;
/// Concurrent connections to the socket; more wait in the backlog.
const MAX_CONNECTIONS: usize = 256;

/// The uid of the process at the other end of the socket, if it could be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerUid(pub Option<u32>);

/// One accepted connection, as the gRPC server sees it.
#[derive(Debug)]
pub struct PeerStream {
    inner: DuplexStream,
    uid: Option<u32>,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerUid;

    fn connect_info(&self) -> PeerUid {
        PeerUid(self.uid)
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts connections, reads each peer's uid, and hands the server a
/// relayed stream for each.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API: accept failed");
                    continue;
                }
            };
            let uid = stream.peer_cred().ok().map(|c| c.uid());
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                if let Err(e) = relay(stream, ours).await {
                    tracing::debug!(error = %e, "Workload API connection ended");
                }
                drop(permit);
            });
            if tx
                .send(Ok(PeerStream { inner: theirs, uid }))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Copies frames both ways until either side closes.
async fn relay(mut client: UnixStream, mut server: DuplexStream) -> Result<(), String> {
    let mut preface = [0u8; 24];
    client
        .read_exact(&mut preface)
        .await
        .map_err(|e| e.to_string())?;
    if &preface != PREFACE {
        return Err("not an HTTP/2 client".into());
    }
    server.write_all(PREFACE).await.map_err(|e| e.to_string())?;
    let mut down: Codec<UnixStream, bytes::Bytes> = Codec::new(client);
    let mut up: Codec<DuplexStream, bytes::Bytes> = Codec::new(server);
    loop {
        tokio::select! {
            frame = poll_fn(|cx| Pin::new(&mut down).poll_next(cx)) => {
                let Some(frame) = frame.transpose().map_err(|e| e.to_string())? else {
                    return Ok(());
                };
                let frame = from_client(frame, &mut down, &mut up);
                send(&mut up, frame).await?;
            }
            frame = poll_fn(|cx| Pin::new(&mut up).poll_next(cx)) => {
                let Some(frame) = frame.transpose().map_err(|e| e.to_string())? else {
                    return Ok(());
                };
                let frame = from_server(frame, &mut down, &mut up);
                send(&mut down, frame).await?;
            }
        }
    }
}

/// Rewrites `:authority` and keeps the relay's codecs in step with the
/// client's settings.
fn from_client<A, B>(
    frame: Frame,
    down: &mut Codec<A, bytes::Bytes>,
    up: &mut Codec<B, bytes::Bytes>,
) -> Frame {
    match frame {
        Frame::Headers(mut headers) => {
            let pseudo = headers.pseudo_mut();
            if pseudo.authority.is_some() {
                let fresh = Pseudo::request(
                    http::Method::POST,
                    http::Uri::from_static("http://localhost/"),
                    None,
                );
                pseudo.authority = fresh.authority;
            }
            Frame::Headers(headers)
        }
        Frame::Settings(mut settings) if !settings.is_ack() => {
            // What the client can decode bounds what we encode toward it;
            // what we can decode bounds what the server may encode.
            if let Some(size) = settings.header_table_size() {
                down.set_send_header_table_size(size as usize);
                settings.set_header_table_size(Some(size.min(TABLE_SIZE)));
            }
            if let Some(size) = settings.max_frame_size() {
                down.set_max_send_frame_size(size as usize);
                up.set_max_recv_frame_size(size as usize);
            }
            Frame::Settings(settings)
        }
        other => other,
    }
}

fn from_server<A, B>(
    frame: Frame,
    down: &mut Codec<A, bytes::Bytes>,
    up: &mut Codec<B, bytes::Bytes>,
) -> Frame {
    match frame {
        Frame::Settings(mut settings) if !settings.is_ack() => {
            if let Some(size) = settings.header_table_size() {
                up.set_send_header_table_size(size as usize);
                settings.set_header_table_size(Some(size.min(TABLE_SIZE)));
            }
            if let Some(size) = settings.max_frame_size() {
                up.set_max_send_frame_size(size as usize);
                down.set_max_recv_frame_size(size as usize);
            }
            Frame::Settings(settings)
        }
        other => other,
    }
}

async fn send<T: AsyncWrite + Unpin>(
    codec: &mut Codec<T, bytes::Bytes>,
    frame: Frame,
) -> Result<(), String> {
    poll_fn(|cx| codec.poll_ready(cx))
        .await
        .map_err(|e| e.to_string())?;
    codec.buffer(frame).map_err(|e| format!("{e:?}"))?;
    poll_fn(|cx| codec.flush(cx))
        .await
        .map_err(|e| e.to_string())
}
