//! route: a request from another proxy, made ready for the app. Pure, so
//! it is unit-tested and fuzzed (`proxy/fuzz`, target `inbound_request`).
//!
//! What the caller sent is untrusted even though its identity is verified:
//! the mesh headers are taken off (whatever their count), `mesh-client-id`
//! is replaced by the verified identity, and the request is pointed at the
//! app whatever URI it carried.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, Uri, Version, header, request::Parts};
use mesh_core::identity::SpiffeId;

use crate::wire::{CLIENT_ID, DST_PORT, ORIG_PROTO};

/// Why a meshed request cannot be forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unroutable {
    /// No valid `mesh-dst-port` (1-65535).
    NoDstPort,
    /// The path cannot be part of a URI to the app.
    BadPath,
}

/// A connection's verified caller, with `mesh-client-id` as the app
/// receives it: made once per connection, shared by its requests.
#[derive(Clone, Debug)]
pub struct Caller {
    pub id: SpiffeId,
    header: HeaderValue,
}

impl Caller {
    pub fn new(id: SpiffeId) -> Self {
        let header =
            HeaderValue::from_str(id.as_str()).expect("SPIFFE IDs are valid header values");
        Self { id, header }
    }
}

/// Takes every `mesh-dst-port` off and returns the app port the first named.
pub fn dst_port(headers: &mut HeaderMap) -> Result<u16, Unroutable> {
    let first = headers.get(DST_PORT).cloned();
    headers.remove(DST_PORT);
    first
        .and_then(|v| v.to_str().ok()?.trim().parse::<u16>().ok())
        .filter(|p| *p > 0)
        .ok_or(Unroutable::NoDstPort)
}

/// Rewrites `parts` for the app at `app`: sets `mesh-client-id` to the
/// verified caller, points the URI at the app (origin form for HTTP/1.1,
/// which goes on a connection to the app; absolute for HTTP/2), and
/// restores HTTP/1.1 (with Host) when the caller's app spoke it:
/// `mesh-orig-proto` says so on HTTP/2 between proxies, and a request that
/// arrived as HTTP/1.x (a caller that is not a Mesh proxy, over ALPN
/// `http/1.1`) is HTTP/1.1 itself. Returns whether it did.
pub fn for_app(parts: &mut Parts, caller: &Caller, app: SocketAddr) -> Result<bool, Unroutable> {
    let was_http1 = parts.version <= Version::HTTP_11
        || parts
            .headers
            .get(ORIG_PROTO)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"HTTP/1.1"));
    parts.headers.remove(ORIG_PROTO);
    // Whatever the caller claimed, the app sees who was verified.
    parts.headers.insert(CLIENT_ID, caller.header.clone());
    let authority = parts.uri.authority().cloned();
    let path = parts
        .uri
        .path_and_query()
        .filter(|p| p.as_str().starts_with('/'))
        .cloned();
    if was_http1 {
        // Origin form, as HTTP/1.1 sends it; the connection is the app's.
        parts.uri = path.map_or_else(|| Uri::from_static("/"), Uri::from);
        parts.version = Version::HTTP_11;
        if !parts.headers.contains_key(header::HOST) {
            let host = authority
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or_else(|| {
                    HeaderValue::from_str(&app.to_string()).expect("an address is a valid Host")
                });
            parts.headers.insert(header::HOST, host);
        }
    } else {
        let path = path.as_ref().map_or("/", |p| p.as_str());
        parts.uri = format!("http://{app}{path}")
            .parse()
            .map_err(|_| Unroutable::BadPath)?;
        parts.version = Version::HTTP_2;
    }
    Ok(was_http1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_headers_are_taken_off_and_the_client_id_replaced() {
        let req = http::Request::get("http://api.shop.svc.cluster.local:80/x?y=1")
            .header(DST_PORT, "8080")
            .header(DST_PORT, "9999")
            .header(ORIG_PROTO, "HTTP/1.1")
            .header(CLIENT_ID, "spiffe://evil.example/ns/x/sa/admin")
            .header(CLIENT_ID, "second forgery")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        assert_eq!(dst_port(&mut parts.headers), Ok(8080));
        assert!(
            parts.headers.get(DST_PORT).is_none(),
            "every copy is removed"
        );
        let web = Caller::new("spiffe://west.mesh.local/ns/shop/sa/web".parse().unwrap());
        let http1 = for_app(&mut parts, &web, "127.0.0.5:8080".parse().unwrap()).unwrap();
        assert!(http1);
        let ids: Vec<_> = parts.headers.get_all(CLIENT_ID).iter().collect();
        assert_eq!(ids, vec![web.id.as_str()]);
        assert_eq!(parts.uri.to_string(), "/x?y=1", "origin form");
        assert_eq!(parts.headers[header::HOST], "api.shop.svc.cluster.local:80");
        assert_eq!(parts.version, Version::HTTP_11);
        assert!(parts.headers.get(ORIG_PROTO).is_none());
    }

    #[test]
    fn a_request_that_arrived_as_http1_goes_on_as_http1_without_the_header() {
        let req = http::Request::get("/x")
            .version(Version::HTTP_11)
            .header(header::HOST, "api.shop.svc.cluster.local:80")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        let web = Caller::new("spiffe://west.mesh.local/ns/shop/sa/web".parse().unwrap());
        assert!(for_app(&mut parts, &web, "127.0.0.5:8080".parse().unwrap()).unwrap());
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers[header::HOST], "api.shop.svc.cluster.local:80");
        // Between proxies (HTTP/2) without the header: HTTP/2, as before.
        let req = http::Request::get("http://api:80/x")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        assert!(!for_app(&mut parts, &web, "127.0.0.5:8080".parse().unwrap()).unwrap());
        assert_eq!(parts.version, Version::HTTP_2);
    }

    #[test]
    fn bad_ports_are_refused() {
        for bad in ["0", "65536", "x", ""] {
            let mut h = HeaderMap::new();
            h.insert(DST_PORT, HeaderValue::from_str(bad).unwrap());
            assert_eq!(dst_port(&mut h), Err(Unroutable::NoDstPort), "{bad:?}");
        }
        assert_eq!(dst_port(&mut HeaderMap::new()), Err(Unroutable::NoDstPort));
    }
}
