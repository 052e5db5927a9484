//! Trust bundle parsing (SPIFFE JSON and PEM): never panics, and an accepted
//! bundle survives a write-read round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::{TrustBundle, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let td: TrustDomain = "fuzz.mesh.local".parse().unwrap();
    if let Ok(bundle) = TrustBundle::from_any(td.clone(), data) {
        let json = bundle.to_spiffe_json().expect("an accepted bundle can be written");
        let back = TrustBundle::from_spiffe_json(td, json.as_bytes()).expect("and read back");
        assert_eq!(back.roots(), bundle.roots());
    }
});
