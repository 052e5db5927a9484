//! A Certify flood from one identity does not slow another identity's
//! Certify: the flooder is cut off by its own rate limit before any CSR
//! work, so the other identity's latency stays close to its baseline
//! measured in the same run (median gated, p95 and p99 printed).

// The measured numbers are printed on purpose (`--nocapture`).
#![allow(clippy::print_stdout)]

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_core::{api::v1::CertifyRequest, identity::csr::new_key_and_csr};
use support::*;
use tonic::Code;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure(
    tp: &TestPlane,
    creds: &mesh_core::identity::Credentials,
    n: usize,
) -> Vec<Duration> {
    let mut client = tp.identity_as(creds);
    let id = creds.id().to_string();
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let (_, csr) = new_key_and_csr().unwrap();
        let start = Instant::now();
        client
            .certify(CertifyRequest {
                identity: id.clone(),
                csr,
                token: String::new(),
                ttl_seconds: 0,
                ..Default::default()
            })
            .await
            .expect("the victim's renewals all succeed");
        took.push(start.elapsed());
    }
    took.sort();
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_from_one_identity_does_not_slow_another() {
    let tp = TestPlane::start().await;
    let flooder = tp.join("shop", "flood").await;
    let victim = tp.join("shop", "victim").await;
    const N: usize = 40;

    let baseline = measure(&tp, &victim, N).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = tp.identity_as(&flooder);
    let (_, csr) = new_key_and_csr().unwrap();
    let mut flood = Vec::new();
    for _ in 0..16 {
        let (mut client, stop, ok, limited, csr) = (
            client.clone(),
            stop.clone(),
            ok.clone(),
            limited.clone(),
            csr.clone(),
        );
        let id = flooder.id().to_string();
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = CertifyRequest {
                    identity: id.clone(),
                    csr: csr.clone(),
                    token: String::new(),
                    ttl_seconds: 0,
                    ..Default::default()
                };
                match client.certify(req).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        limited.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => panic!("flood request failed unexpectedly: {e}"),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = measure(&tp, &victim, N).await;
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }

    let (b50, b99) = (percentile(&baseline, 0.5), percentile(&baseline, 0.99));
    let (d50, d99) = (percentile(&during, 0.5), percentile(&during, 0.99));
    let (ok, limited) = (ok.load(Ordering::Relaxed), limited.load(Ordering::Relaxed));
    println!(
        "victim Certify: baseline p50 {b50:?} p99 {b99:?}; during flood p50 {d50:?} p99 {d99:?} ({:.1}x p99); flood: {ok} issued, {limited} rate-limited",
        d99.as_secs_f64() / b99.as_secs_f64()
    );
    assert!(
        limited > ok,
        "the flooder must be mostly rate limited ({ok} issued, {limited} limited)"
    );
    assert!(
        ok <= 100 + 10 * 10,
        "the flooder got at most its burst plus refill ({ok})"
    );
    // The machine is shared and noisy: with 40 samples p99 is the single
    // slowest call and p95 the second slowest, so one scheduling hiccup
    // decides them (a CI run saw p95 go from 4 to 91 ms with the limit in
    // place). Gate on the median: measured on this machine, a rate-limited
    // flood doubles it (2.2-2.9 -> 5.0-5.8 ms) and the same flood without a
    // limit multiplies it by 8-10 (2.1-2.6 -> 19-21 ms). p95/p99 are printed.
    let d95 = percentile(&during, 0.95);
    assert!(
        d50 <= b50 * 4,
        "victim p50 went from {b50:?} to {d50:?} under a flood from another identity (p95 {d95:?}, p99 {b99:?} -> {d99:?})"
    );
}
