//! CSR handling as the identity service will see it: arbitrary bytes go to
//! the CA, which must refuse them or issue exactly the authorized identity.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::{
    CertificateAuthority, RootCa, SpiffeId,
    cert::{CertInfo, now},
    svid::leaf_spiffe_id,
};

fn ca() -> &'static (CertificateAuthority, SpiffeId) {
    static CA: OnceLock<(CertificateAuthority, SpiffeId)> = OnceLock::new();
    CA.get_or_init(|| {
        let root = RootCa::generate(Duration::from_secs(3600 * 24 * 365), now()).unwrap();
        let ca = CertificateAuthority::generate(
            "fuzz.mesh.local".parse().unwrap(),
            &root,
            Duration::from_secs(3600 * 24 * 30),
            now(),
        )
        .unwrap();
        (ca, "spiffe://fuzz.mesh.local/ns/a/sa/b".parse().unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let (ca, id) = ca();
    if let Ok(svid) = ca.sign_csr(data, id, Duration::from_secs(3600)) {
        let info = CertInfo::parse(&svid.chain[0]).unwrap();
        assert_eq!(&leaf_spiffe_id(&info).unwrap(), id);
        assert!(!info.is_ca);
    }
});
