//! What two Mesh proxies agree on between them, used by both directions:
//! the ALPN names, the mesh headers, the HTTP/2 limits, and the body type
//! requests are carried in. Its own module so that neither direction
//! imports the other.

use bytes::Bytes;
use http::HeaderName;
use http_body_util::combinators::BoxBody;

/// ALPN between proxies for HTTP (carried over HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN between proxies for opaque TCP: the client proxy then sends the
/// app port (2 bytes, big endian) and the connection carries raw bytes.
pub const ALPN_TCP: &[u8] = b"mesh-tcp/1";

// Names, not strings: a header inserted by a `&str` name is copied into a
// new allocation every time.
/// The header naming the app port a meshed request is for.
pub const DST_PORT: HeaderName = HeaderName::from_static("mesh-dst-port");
/// The header marking a request that was HTTP/1.1 before the client proxy.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("mesh-orig-proto");
/// The header carrying the verified caller identity to the app.
pub const CLIENT_ID: HeaderName = HeaderName::from_static("mesh-client-id");
/// Mesh-internal HTTP/2 concurrency (DESIGN.md section 6).
pub const MESH_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Header list limit (DESIGN.md section 6).
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A byte stream an HTTP/2 client connection runs on: mTLS to a
/// destination proxy (directly, or inside a gateway tunnel stream), or TCP
/// to the local app.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

/// A request or response body, whichever side it came from (hyper's, or
/// the HTTP/2 client's own: `h2_client`).
pub type Body = BoxBody<Bytes, BoxError>;

/// hyper's body as the proxy's own.
pub fn boxed(body: hyper::body::Incoming) -> Body {
    use http_body_util::BodyExt;
    body.map_err(Into::into).boxed()
}

/// Any error a body may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
