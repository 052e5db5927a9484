//! The inbound request rewrite on arbitrary requests from a verified peer:
//! fuzzed method, URI and headers (forged mesh headers included). Whatever
//! comes in, what goes to the app carries exactly the verified client id,
//! no mesh header, and a URI for the app (origin form over HTTP/1.1,
//! absolute and pointing at the app over HTTP/2).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::SpiffeId;
use mesh_proxy::{
    inbound::rewrite::{Caller, dst_port, for_app},
    wire::{CLIENT_ID, DST_PORT, ORIG_PROTO},
};

fuzz_target!(|data: &[u8]| {
    // Fields separated by NUL: method, URI, then header name/value pairs.
    let mut fields = data.split(|b| *b == 0);
    let method = fields.next().unwrap_or_default();
    let uri = fields.next().unwrap_or_default();
    let mut builder = http::Request::builder().method(method).uri(uri);
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        builder = builder.header(name, value);
    }
    let Ok(req) = builder.body(()) else { return };
    let (mut parts, ()) = req.into_parts();
    let port = dst_port(&mut parts.headers);
    assert!(parts.headers.get(DST_PORT).is_none());
    let Ok(port) = port else { return };
    let client = Caller::new(
        "spiffe://west.mesh.local/ns/shop/sa/web"
            .parse::<SpiffeId>()
            .unwrap(),
    );
    let app = std::net::SocketAddr::from(([127, 0, 0, 5], port));
    if let Ok(http1) = for_app(&mut parts, &client, app) {
        let ids: Vec<_> = parts.headers.get_all(CLIENT_ID).iter().collect();
        assert_eq!(ids, vec![client.id.as_str()], "exactly the verified client id");
        assert!(parts.headers.get(ORIG_PROTO).is_none());
        if http1 {
            // Origin form, on a connection to the app, with a Host.
            assert!(parts.uri.authority().is_none());
            assert!(parts.headers.contains_key(http::header::HOST));
        } else {
            let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
            assert_eq!(authority, Some(app.to_string()));
        }
        assert!(parts.uri.path().starts_with('/'));
    }
});
