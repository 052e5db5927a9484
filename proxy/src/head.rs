//! Request heads detached from the buffer hyper read them into.
//!
//! hyper parses an HTTP/1.1 head without copying: every header value, and
//! the URI, is a slice of the connection's 8 KiB read buffer. Right after
//! it hands a request to the service, hyper reads on (to see the client
//! close while the request is in flight), and a read buffer that the head
//! still shares cannot be reused, so that read takes a new 8 KiB buffer:
//! one allocation per request, and two buffers per busy connection for as
//! long as the request is in flight. The outbound side therefore copies
//! the head as soon as it gets the request, before hyper reads again, with
//! all its values in one small buffer of their own.

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, Request, Uri, uri};

/// `req` with its headers and URI copied (see the module's text); its
/// method, version, extensions and body as they were.
pub fn detach<B>(req: Request<B>) -> Request<B> {
    let (mut parts, body) = req.into_parts();
    parts.headers = detached(&parts.headers);
    parts.uri = detached_uri(&parts.uri);
    Request::from_parts(parts, body)
}

/// The same URI, pointing into no buffer the original did.
pub fn detached_uri(original: &Uri) -> Uri {
    let mut parts = uri::Parts::default();
    // Each `try_from(&str)` copies; a part read valid stays valid.
    parts.scheme = original.scheme_str().and_then(|s| s.parse().ok());
    parts.authority = original
        .authority()
        .and_then(|a| uri::Authority::try_from(a.as_str()).ok());
    parts.path_and_query = original
        .path_and_query()
        .and_then(|p| uri::PathAndQuery::try_from(p.as_str()).ok());
    Uri::from_parts(parts).unwrap_or_else(|_| original.clone())
}

/// `headers` with the same names and values, in the same order, marked
/// sensitive where they were, sharing one new buffer rather than any
/// buffer the originals pointed into.
pub fn detached(headers: &HeaderMap) -> HeaderMap {
    let total = headers.values().map(HeaderValue::len).sum();
    let mut buf = BytesMut::with_capacity(total);
    for value in headers.values() {
        buf.extend_from_slice(value.as_bytes());
    }
    let mut buf = buf.freeze();
    // Room for the headers the proxy adds (`mesh-orig-proto`,
    // `mesh-dst-port`): growing the map would copy it.
    let mut out = HeaderMap::with_capacity(headers.len() + 2);
    for (name, value) in headers {
        let bytes = buf.split_to(value.len());
        // The bytes of a valid value are valid; the original is kept if
        // that ever changed.
        let mut copy = HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        out.append(name.clone(), copy);
    }
    out
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderMap, HeaderName, HeaderValue};

    /// A head as hyper leaves it: every value a slice of one read buffer.
    fn read(buffer: &Bytes) -> HeaderMap {
        let text = std::str::from_utf8(buffer).unwrap();
        let mut headers = HeaderMap::new();
        for line in text.split("\r\n").filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(": ").unwrap();
            let at = value.as_ptr() as usize - text.as_ptr() as usize;
            let value = buffer.slice(at..at + value.len());
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_maybe_shared(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn the_copy_is_equal_and_points_into_no_original_buffer() {
        let buffer = Bytes::from_static(
            b"host: app:80\r\nx-b3: 1\r\naccept: a\r\naccept: b\r\nauthorization: secret\r\n\r\n",
        );
        let mut original = read(&buffer);
        original
            .get_mut("authorization")
            .unwrap()
            .set_sensitive(true);
        let copy = super::detached(&original);
        assert_eq!(copy, original);
        let pairs = |h: &HeaderMap| -> Vec<(String, Vec<u8>)> {
            h.iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        // Same order, duplicates kept in theirs.
        assert_eq!(pairs(&copy), pairs(&original));
        assert!(copy["authorization"].is_sensitive());
        assert!(!copy["host"].is_sensitive());
        let inside = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        for value in copy.values() {
            assert!(
                !inside.contains(&(value.as_bytes().as_ptr() as usize)),
                "{value:?} still points into the read buffer"
            );
        }
    }

    /// A URI as hyper leaves it: a slice of the read buffer.
    fn uri_in(buffer: &Bytes, uri: &str) -> http::Uri {
        let at = buffer
            .windows(uri.len())
            .position(|w| w == uri.as_bytes())
            .unwrap();
        http::Uri::from_maybe_shared(buffer.slice(at..at + uri.len())).unwrap()
    }

    #[test]
    fn a_detached_request_keeps_its_head_and_points_into_no_original_buffer() {
        let buffer = Bytes::from_static(
            b"GET http://api.shop:8080/a/b?c=d HTTP/1.1\r\nGET /e?f HTTP/1.1\r\nCONNECT db:5432 HTTP/1.1\r\nhost: api.shop:8080\r\nx-b3: 1\r\n\r\n",
        );
        let inside = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        let points_inside = |s: &str| inside.contains(&(s.as_ptr() as usize));
        let fields = buffer.windows(5).position(|w| w == b"host:").unwrap();
        let headers = read(&buffer.slice(fields..));
        for uri in ["http://api.shop:8080/a/b?c=d", "/e?f", "db:5432"] {
            let original = uri_in(&buffer, uri);
            let mut req = http::Request::builder()
                .method("POST")
                .uri(original.clone())
                .body("body")
                .unwrap();
            *req.headers_mut() = headers.clone();
            req.extensions_mut().insert(7u8);
            let copy = super::detach(req);
            assert_eq!(copy.uri(), &original);
            assert_eq!(copy.uri().to_string(), uri);
            assert_eq!(copy.headers(), &headers);
            assert_eq!(copy.method(), "POST");
            assert_eq!(copy.extensions().get::<u8>(), Some(&7));
            assert_eq!(*copy.body(), "body");
            for part in [
                copy.uri().authority().map(http::uri::Authority::as_str),
                copy.uri()
                    .path_and_query()
                    .map(http::uri::PathAndQuery::as_str),
            ]
            .into_iter()
            .flatten()
            {
                assert!(
                    !points_inside(part),
                    "{part} still points into the read buffer"
                );
            }
            for value in copy.headers().values() {
                assert!(!points_inside(value.to_str().unwrap()), "{value:?}");
            }
        }
    }

    #[test]
    fn no_headers_need_no_buffer() {
        assert!(super::detached(&HeaderMap::new()).is_empty());
    }
}
