//! `HoldFirstFlush` under a real HTTP/2 server (hyper): the server's
//! SETTINGS leave with its acknowledgement of the client's in one write,
//! and a client that sends nothing still gets the server's SETTINGS.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::hold::HoldFirstFlush;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream, ReadBuf};

/// Records every write that reaches the connection.
struct Recording {
    io: DuplexStream,
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsyncRead for Recording {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Recording {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let n = std::task::ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.writes.lock().unwrap().push(buf[..n].to_vec());
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// (type, flags) of each whole HTTP/2 frame in `bytes`.
fn frames(mut bytes: &[u8]) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        out.push((bytes[3], bytes[4]));
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    out
}

const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;

/// An HTTP/2 server on `io`, answering every request with "ok".
fn serve(io: Recording) {
    let svc = service_fn(|_req: Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    tokio::spawn(
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(HoldFirstFlush::new(io)), svc),
    );
}

#[tokio::test]
async fn the_server_settings_leave_with_their_acknowledgement_in_one_write() {
    let (client, server) = tokio::io::duplex(64 * 1024);
    // The client's preface and request are there before the server reads,
    // as they are when they come with the client's TLS Finished.
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = tokio::spawn(async move {
        let resp = send
            .send_request(
                Request::get("http://app/")
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let writes = Arc::new(Mutex::new(Vec::new()));
    serve(Recording {
        io: server,
        writes: writes.clone(),
    });
    let body = tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(&body[..], b"ok");
    let writes = writes.lock().unwrap().clone();
    let first = frames(&writes[0]);
    assert_eq!(
        first[0],
        (SETTINGS, 0),
        "the server's preface first: {first:?}"
    );
    assert!(
        first.contains(&(SETTINGS, ACK)),
        "the acknowledgement of the client's SETTINGS is in the same write: {first:?} (then {:?})",
        writes[1..].iter().map(|w| frames(w)).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_client_that_sends_nothing_still_gets_the_server_settings() {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    serve(Recording {
        io: server,
        writes: Arc::default(),
    });
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut head))
        .await
        .expect("the server's SETTINGS arrive although the client is silent")
        .unwrap();
    assert_eq!((head[3], head[4]), (SETTINGS, 0));
}
