//! Request heads detached from the buffer hyper read them into.
//!
//! hyper parses an HTTP/1.1 head without copying: every header value is a
//! slice of the connection's 8 KiB read buffer. While a request is in
//! flight hyper reads ahead on its connection (to see the client close),
//! and a read buffer that header values still share cannot be reused, so
//! that read takes a new 8 KiB buffer: for every request, and for as long
//! as it is in flight, each busy connection holds two. The outbound side
//! keeps a request's head for the whole request (to send it again), so it
//! keeps a copy instead, with all its values in one small buffer of their
//! own.

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue};

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
    let mut out = HeaderMap::with_capacity(headers.len());
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

    #[test]
    fn no_headers_need_no_buffer() {
        assert!(super::detached(&HeaderMap::new()).is_empty());
    }
}
