//! Issuer files are reloaded when they change on disk: a broken change is
//! refused loudly and the old issuer keeps signing; a good one takes over
//! without a restart.

mod support;

use std::time::{Duration, Instant};

use mesh_core::identity::{
    CertificateAuthority,
    ca::DEFAULT_ISSUER_TTL,
    cert::{CertInfo, now},
    files,
};
use support::*;

async fn wait_for(tp: &TestPlane, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = tp.metrics().await;
        if sample(&m, series) >= want {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached {want}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn broken_issuer_is_refused_and_a_new_one_takes_over() {
    let tp = TestPlane::start().await;
    let ca_dir = tp.dir.path().join("ca");
    let before = tp.join("shop", "web").await;
    let old_issuer = before.chain()[1].clone();

    // A broken key: refused, counted, and Certify still works.
    std::fs::write(
        ca_dir.join("issuer.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    wait_for(&tp, "mesh_control_issuer_reload_failures_total", 1.0).await;
    let still = tp.join("shop", "web").await;
    assert_eq!(still.chain()[1], old_issuer, "the old issuer keeps signing");

    // A new issuer under the same root: picked up without a restart.
    let root = files::load_root(&ca_dir).unwrap();
    let next =
        CertificateAuthority::generate(TD.parse().unwrap(), &root, DEFAULT_ISSUER_TTL, now())
            .unwrap();
    files::write_ca_dir(&ca_dir, &root, &next, true).unwrap();
    let m = wait_for(&tp, "mesh_control_issuer_reloads_total", 1.0).await;
    let expiry = sample(&m, "mesh_control_issuer_expiry_timestamp_seconds");
    assert_eq!(expiry as i64, next.issuer_info().not_after.unix_timestamp());
    let after = tp.join("shop", "web").await;
    assert_eq!(
        after.chain()[1],
        next.chain()[0],
        "new SVIDs come from the new issuer"
    );
    assert_ne!(
        CertInfo::parse(&after.chain()[1]).unwrap().serial,
        CertInfo::parse(&old_issuer).unwrap().serial
    );
}
