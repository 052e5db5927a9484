//! SPIFFE ID and trust domain parsing: never panics, and whatever parses
//! prints back to exactly the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
        assert!(id.trust_domain_str().len() <= 255);
    }
    if let Ok(td) = TrustDomain::parse(s) {
        assert_eq!(TrustDomain::parse(td.as_str()).unwrap(), td);
    }
});
