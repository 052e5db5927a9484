//! Three clusters linked over QUIC, run as real processes: alone in its
//! test binary, so its QUIC handshakes do not compete with other topologies
//! starting at the same time.

use std::time::Duration;

use mesh_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clusters_over_quic() {
    let s = start(&topology_text("three-clusters.yaml"), 100).await;
    let record = s.run.snapshot();
    assert!(
        eventually(Duration::from_secs(30), || {
            load_stats(&record, "west", "load-0").ok() >= 20
                && load_stats(&record, "east", "audit-0").ok() >= 5
        })
        .await,
        "{:?} {:?}",
        load_stats(&record, "west", "load-0"),
        load_stats(&record, "east", "audit-0")
    );
    let load = load_stats(&record, "west", "load-0");
    assert_eq!(load.failed(), 0, "{load:?}");
    let answer = load.last_answer.unwrap();
    assert_eq!(answer["calls"][0]["cluster"], "east");
    assert_eq!(answer["calls"][1]["cluster"], "north");
    assert_eq!(answer["calls"][1]["client_id"], WEB);
    let audit = load_stats(&record, "east", "audit-0");
    assert_eq!(
        audit.last_answer.unwrap()["client_id"],
        "spiffe://east.mesh.local/ns/shop/sa/audit",
        "north saw east's caller (shared root, separate trust domains)"
    );
    for (cluster, from) in [
        ("east", "west.mesh.local"),
        ("north", "west.mesh.local"),
        ("north", "east.mesh.local"),
    ] {
        let gateway = s.run.cluster(cluster).unwrap().gateway_admin.unwrap();
        let quic = sum(&metrics(gateway), "mesh_gateway_streams_total", |s| {
            s.label("transport") == "quic" && s.label("peer_trust_domain") == from
        });
        assert!(
            quic >= 1.0,
            "{cluster}'s gateway saw no QUIC stream from {from}"
        );
    }
    // North admits east's callers through an allow-only Link, and east's
    // service mirror (exports and probes) rides QUIC like its proxies. On a
    // loaded machine a QUIC handshake can take longer than the 1 s fallback:
    // that one stream then goes over TCP and stays there (as designed), so
    // at most one TCP stream is allowed, and QUIC must carry the rest.
    let north_gateway = metrics(s.run.cluster("north").unwrap().gateway_admin.unwrap());
    let from_east = |transport: &str| {
        sum(&north_gateway, "mesh_gateway_streams_total", |s| {
            s.label("transport") == transport && s.label("peer_trust_domain") == "east.mesh.local"
        })
    };
    let streams = || {
        north_gateway
            .iter()
            .filter(|s| s.name.starts_with("mesh_gateway_streams"))
            .collect::<Vec<_>>()
    };
    assert!(
        from_east("quic") + from_east("tcp") >= 2.0 && from_east("quic") >= 1.0,
        "east's mirror and audit did not use QUIC: {:?}",
        streams()
    );
    assert!(
        from_east("tcp") <= 1.0,
        "east fell back to TCP more than once: {:?}",
        streams()
    );
    // Only clusters others link to run a gateway; only those that link out
    // run a mirror.
    assert!(s.run.cluster("west").unwrap().gateway.is_none());
    assert!(s.run.cluster("north").unwrap().mirror_admin.is_none());
}
