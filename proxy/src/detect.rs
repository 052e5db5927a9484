//! detect: what the app speaks, from the first bytes of a connection.
//!
//! Pure and cheap: it looks at most at [`PEEK`] bytes and never consumes
//! them. A protocol where the server speaks first (no bytes from the client
//! before the detect timeout) is opaque TCP.

/// How many bytes detection looks at.
pub const PEEK: usize = 64;

/// The client's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x request line.
    Http1,
    /// HTTP/2 with prior knowledge (gRPC too): the connection preface.
    Http2,
    /// A TLS ClientHello: the app does its own TLS; carried as opaque bytes.
    Tls,
    /// Anything else.
    Opaque,
}

/// What more bytes could tell: `None` while `bytes` is a prefix of some
/// protocol's signature and more may arrive.
pub fn detect(bytes: &[u8]) -> Option<Protocol> {
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    if bytes.is_empty() {
        return None;
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // TLS handshake record, version 3.x.
    if bytes[0] == 0x16 {
        return match bytes.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    // An HTTP/1 request line starts with a method token and a space.
    let token = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match bytes.get(token) {
        Some(b' ') if (3..=7).contains(&token) => Some(Protocol::Http1),
        None if token == bytes.len() && token < 8 && bytes.len() < PEEK => None,
        _ => Some(Protocol::Opaque),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_by_its_first_bytes() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            detect(b"CONNECT api:80 HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(
            detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Some(Protocol::Http2)
        );
        assert_eq!(detect(&[0x16, 0x03, 0x01, 0x02, 0x00]), Some(Protocol::Tls));
        assert_eq!(
            detect(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Some(Protocol::Opaque),
            "postgres startup"
        );
        assert_eq!(detect(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        assert_eq!(
            detect(b"get / HTTP/1.1"),
            Some(Protocol::Opaque),
            "methods are upper case"
        );
    }

    #[test]
    fn prefixes_wait_for_more() {
        for partial in [&b""[..], b"G", b"GE", b"GET", b"PRI * HT", &[0x16]] {
            assert_eq!(detect(partial), None, "{partial:?}");
        }
        assert_eq!(
            detect(b"PRI * HTTP/1.1"),
            Some(Protocol::Http1),
            "not the h2 preface: a method-shaped line"
        );
    }
}
