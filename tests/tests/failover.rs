//! Failover across clusters, end to end: `topologies/failover.yaml` (api in
//! west, east and north; a FailoverPolicy local -> east -> north on west's
//! `api`) with real processes, and a steady load whose every request is
//! timestamped. For each fault the test prints the time from the fault to
//! the first success on the next tier and the failed requests, and asserts
//! the time is at most a second: (a) every west api replica killed, (b)
//! east's gateway killed, (c) east's gateway black-holed (a relay that
//! stops forwarding), (d) east's whole cluster stopped. The route retries
//! idempotent requests, so (a), (b) and (d) lose none. Then failback (once
//! each way, within the documented bound) and the proportional spill with
//! half of west's replicas failing.
#![allow(clippy::print_stdout)] // the measured figures go to the test log

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_tests::{replica, start, sum, topology_text};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Requests per second of the test's load.
const RATE: u64 = 100;
/// What the policy's failback delay is (failover.yaml), and the longest a
/// recovered endpoint or tunnel takes to be seen (TIER_MAX_EJECTION 2 s,
/// redial 0.5 s, the mirror's probe 1 s): the documented failback bound.
const FAILBACK_BOUND: Duration = Duration::from_secs(3 + 3);

/// One request of the load: when it was sent and answered, and by whom.
#[derive(Clone, Debug)]
struct Sample {
    sent: Instant,
    done: Instant,
    /// The answering cluster; `None` when it failed.
    cluster: Option<String>,
    error: String,
}

/// A steady load through web's proxy to `api`, every request recorded.
struct Load {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
}

impl Load {
    fn start(proxy: SocketAddr) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !st.load(Ordering::Relaxed) {
                tick.tick().await;
                let s = s.clone();
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let answer = tokio::time::timeout(Duration::from_secs(5), get_api(proxy)).await;
                    let (cluster, error) = match answer {
                        Ok(Ok(cluster)) => (Some(cluster), String::new()),
                        Ok(Err(e)) => (None, e),
                        Err(_) => (None, "timed out after 5s".into()),
                    };
                    s.lock().unwrap().push(Sample {
                        sent,
                        done: Instant::now(),
                        cluster,
                        error,
                    });
                });
            }
        });
        Self { samples, stop }
    }

    fn since(&self, t: Instant) -> Vec<Sample> {
        let mut all: Vec<Sample> = self
            .samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.done >= t)
            .cloned()
            .collect();
        all.sort_by_key(|s| s.done);
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `GET http://api.shop.svc.cluster.local:8080/` through `proxy`: the
/// answering cluster, or why not.
async fn get_api(proxy: SocketAddr) -> Result<String, String> {
    let mut tcp = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(
        b"GET http://api.shop.svc.cluster.local:8080/ HTTP/1.1\r\nHost: api.shop.svc.cluster.local:8080\r\nConnection: close\r\n\r\n",
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_owned() + " " + body.trim());
    }
    let json: serde_json::Value =
        serde_json::from_str(body.trim()).map_err(|e| format!("{e}: {body}"))?;
    json["cluster"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no cluster in {body}"))
}

/// A TCP relay in front of east's gateway that can stop forwarding
/// without closing anything: packets vanish, as on a black-holed link.
struct Relay {
    addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let hole = blackhole.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let hole = hole.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, hole.clone()), pump(sr, cw, hole));
                });
            }
        });
        Self { addr, blackhole }
    }
}

/// Copies `from` to `to` until either closes; while the hole is open what
/// is read is dropped.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if hole.load(Ordering::Relaxed) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// What happened after a fault at `t`: the time to the first success from
/// `next`, and the failures.
fn measure(load: &Load, t: Instant, next: &str, what: &str) -> (Duration, usize) {
    let samples = load.since(t);
    let first = samples
        .iter()
        .find(|s| s.cluster.as_deref() == Some(next))
        .map(|s| s.done.duration_since(t));
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.cluster.is_none()).collect();
    let took = first.unwrap_or_else(|| {
        panic!(
            "{what}: no answer from {next} after the fault; last answers: {:?}",
            samples.iter().rev().take(5).collect::<Vec<_>>()
        )
    });
    let slowest = samples
        .iter()
        .map(|s| s.done.duration_since(s.sent))
        .max()
        .unwrap_or_default();
    println!(
        "{what}: first success on {next} {:.0} ms after the fault; {} failed of {} ({:?}); slowest request {:.0} ms",
        took.as_secs_f64() * 1000.0,
        failed.len(),
        samples.len(),
        failed
            .iter()
            .map(|s| s.error.as_str())
            .take(3)
            .collect::<Vec<_>>(),
        slowest.as_secs_f64() * 1000.0
    );
    (took, failed.len())
}

/// Waits until every answer in the last half second came from `cluster`.
async fn settled_on(load: &Load, cluster: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let recent = load.since(Instant::now() - Duration::from_millis(500));
        if recent.len() >= (RATE / 4) as usize
            && recent.iter().all(|s| s.cluster.as_deref() == Some(cluster))
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "traffic did not settle on {cluster} within {within:?}: {:?}",
            recent.iter().rev().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How often the answering cluster changed from one to the other between
/// `from` and now.
fn switches(load: &Load, from: Instant, a: &str, b: &str) -> (usize, usize) {
    let mut last: Option<&str> = None;
    let (mut ab, mut ba) = (0, 0);
    let samples = load.since(from);
    for s in &samples {
        let Some(c) = s.cluster.as_deref() else {
            continue;
        };
        if c != a && c != b {
            continue;
        }
        match (last, c) {
            (Some(x), y) if x == a && y == b => ab += 1,
            (Some(x), y) if x == b && y == a => ba += 1,
            _ => {}
        }
        last = Some(c);
    }
    (ab, ba)
}

/// Tier `tier`'s healthy share of `api` as web's proxy sees it.
fn tier_share(admin: SocketAddr, tier: u32) -> Option<f64> {
    mesh_tests::metrics(admin)
        .iter()
        .find(|s| {
            s.name == "mesh_proxy_failover_healthy_share"
                && s.label("authority") == "api.shop.svc.cluster.local:8080"
                && s.label("tier") == tier.to_string()
        })
        .map(|s| s.value)
}

/// The proxy's failover and failback events so far (its tier decisions).
fn tier_changes(admin: SocketAddr) -> (f64, f64) {
    let m = mesh_tests::metrics(admin);
    let count = |direction: &str| {
        sum(&m, "mesh_proxy_failover_events_total", |s| {
            s.label("direction") == direction
        })
    };
    (count("failover"), count("failback"))
}

/// The tier changes web's proxy logged, for a failure's message.
fn tier_log(s: &mesh_tests::Started) -> String {
    let log = s.run.component("west/web-0/proxy").unwrap().log;
    std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("failover") || l.contains("failback") || l.contains("tunnel"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn hold(s: &mesh_tests::Started, names: &[&str]) {
    for name in names {
        s.run.hold(name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

async fn release(s: &mesh_tests::Started, names: &[&str]) {
    for name in names {
        s.run
            .release(name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

const WEST_API: [&str; 4] = [
    "west/api-0/proxy",
    "west/api-0/app",
    "west/api-1/proxy",
    "west/api-1/app",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_moves_to_the_next_tier_in_under_a_second_and_comes_back_once() {
    let s = start(&topology_text("failover.yaml"), 150).await;
    let record = s.run.snapshot();
    let west = record.clusters.iter().find(|c| c.name == "west").unwrap();
    let east = record.clusters.iter().find(|c| c.name == "east").unwrap();
    // West reaches east's gateway through a relay the test can black-hole.
    let relay = Relay::start(east.gateway.unwrap()).await;
    let link = west.config_dir().join("link-east.yaml");
    let yaml = std::fs::read_to_string(&link).unwrap();
    let gw = east.gateway.unwrap().to_string();
    assert!(yaml.contains(&gw), "{yaml}");
    std::fs::write(&link, yaml.replace(&gw, &relay.addr.to_string())).unwrap();

    let web = replica(&record, "west", "web-0");
    let load = Load::start(SocketAddr::new(web.ip, 4140));
    settled_on(&load, "west", Duration::from_secs(20)).await;
    // The link through the relay is in use before the faults start: one
    // failover to east and back while the relay carries it.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // (a) every local replica killed.
    let t = Instant::now();
    hold(&s, &WEST_API);
    settled_on(&load, "east", Duration::from_secs(5)).await;
    let (a, a_failed) = measure(&load, t, "east", "(a) west's api killed");

    // (b) east's gateway killed: the connection is refused.
    let t = Instant::now();
    hold(&s, &["east/gateway"]);
    settled_on(&load, "north", Duration::from_secs(5)).await;
    let (b, b_failed) = measure(&load, t, "north", "(b) east's gateway killed");

    // Failback: east's gateway returns; traffic goes back to east once.
    let t = Instant::now();
    let before = tier_changes(web.proxy_admin);
    release(&s, &["east/gateway"]).await;
    let back = settled_on(&load, "east", FAILBACK_BOUND + Duration::from_secs(2)).await;
    println!(
        "failback to east {:.1} s after its gateway returned",
        back.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (failovers, failbacks) = tier_changes(web.proxy_admin);
    let answers = switches(&load, t, "north", "east");
    println!(
        "answers switching north->east, east->north: {answers:?} (requests in flight overlap)"
    );
    assert_eq!(
        (failovers - before.0, failbacks - before.1),
        (0.0, 1.0),
        "one failback to east, and no flapping back\n{}",
        tier_log(&s)
    );

    // (c) east's gateway black-holed: nothing refused, nothing answered.
    let t = Instant::now();
    relay.blackhole.store(true, Ordering::Relaxed);
    settled_on(&load, "north", Duration::from_secs(5)).await;
    let (c, c_failed) = measure(&load, t, "north", "(c) east's gateway black-holed");
    relay.blackhole.store(false, Ordering::Relaxed);
    settled_on(&load, "east", FAILBACK_BOUND + Duration::from_secs(3)).await;

    // (d) east's whole cluster stopped.
    let east_all: Vec<String> = record
        .components
        .iter()
        .filter(|c| c.cluster == "east")
        .map(|c| c.name.clone())
        .collect();
    let east_all: Vec<&str> = east_all.iter().map(String::as_str).collect();
    let t = Instant::now();
    hold(&s, &east_all);
    settled_on(&load, "north", Duration::from_secs(5)).await;
    let (d, d_failed) = measure(&load, t, "north", "(d) east's cluster stopped");

    // Failback to west: its replicas return; traffic goes back once.
    let t = Instant::now();
    let before = tier_changes(web.proxy_admin);
    release(&s, &WEST_API).await;
    let back = settled_on(&load, "west", FAILBACK_BOUND + Duration::from_secs(15)).await;
    println!(
        "failback to west {:.1} s after its api was started again",
        back.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (failovers, failbacks) = tier_changes(web.proxy_admin);
    let answers = switches(&load, t, "north", "west");
    println!(
        "answers switching north->west, west->north: {answers:?} (requests in flight overlap)"
    );
    assert_eq!(
        (failovers - before.0, failbacks - before.1),
        (0.0, 1.0),
        "one failback to west, and no flapping back\n{}",
        tier_log(&s)
    );

    // Proportional spill: east back, then half of west's replicas failing
    // (api-0's app gone, its proxy answering 502). West's healthy share is
    // 0.5, below the threshold 0.7: west keeps 0.5 / 0.7 = 71.4 % of the
    // requests and east takes the remaining 28.6 %.
    // The control plane first: the others join through it.
    release(&s, &["east/control"]).await;
    assert!(
        mesh_tests::eventually(Duration::from_secs(20), || mesh_tests::get(
            east.control_admin,
            "/ready"
        )
        .0 == 200)
        .await,
        "east's control plane is back"
    );
    let rest: Vec<&str> = east_all
        .iter()
        .copied()
        .filter(|c| *c != "east/control")
        .collect();
    release(&s, &rest).await;
    // The spill is measured once web's proxy sees east whole again and
    // west at half (a restarted cluster takes its mirror's probe and the
    // failback delay to count).
    assert!(
        mesh_tests::eventually(Duration::from_secs(30), || tier_share(web.proxy_admin, 1)
            == Some(1.0))
        .await,
        "east never counted as healthy again"
    );
    hold(&s, &["west/api-0/app"]);
    assert!(
        mesh_tests::eventually(Duration::from_secs(15), || tier_share(web.proxy_admin, 0)
            == Some(0.5))
        .await,
        "west never counted as half healthy"
    );
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let window = load.since(t);
    let count = |c: &str| {
        window
            .iter()
            .filter(|s| s.cluster.as_deref() == Some(c))
            .count()
    };
    let (w, e, n) = (count("west"), count("east"), count("north"));
    let east_share = e as f64 / (w + e + n).max(1) as f64;
    let expected = 1.0 - 0.5 / 0.7;
    println!(
        "spill with half of west failing: west {w}, east {e}, north {n}: east takes {:.1} % (expected {:.1} % +- 5)",
        east_share * 100.0,
        expected * 100.0
    );
    assert!(
        (east_share - expected).abs() <= 0.05,
        "east took {east_share:.3}, expected {expected:.3}"
    );
    release(&s, &["west/api-0/app"]).await;

    // The proxy saw it as the metrics say.
    let m = mesh_tests::metrics(web.proxy_admin);
    let events = |direction: &str, reason: &str| {
        sum(&m, "mesh_proxy_failover_events_total", |s| {
            s.label("direction") == direction && s.label("reason") == reason
        })
    };
    println!(
        "failover events: unhealthy {:.0} tunnel_down {:.0} no_endpoints {:.0}; failback {:.0}",
        // (+ 0.0: a sum of nothing is -0.0.)
        events("failover", "unhealthy") + 0.0,
        events("failover", "tunnel_down") + 0.0,
        events("failover", "no_endpoints") + 0.0,
        events("failback", "recovered") + 0.0,
    );
    assert!(events("failover", "tunnel_down") >= 1.0);
    assert!(events("failback", "recovered") >= 3.0);
    assert_eq!(
        sum(&m, "mesh_proxy_failover_tier", |s| s.label("authority")
            == "api.shop.svc.cluster.local:8080"),
        0.0,
        "back on tier 0"
    );

    println!(
        "| fault | to the next tier | failed requests |\n|---|---|---|\n| (a) local replicas killed | {:.0} ms | {a_failed} |\n| (b) gateway killed | {:.0} ms | {b_failed} |\n| (c) gateway black-holed | {:.0} ms | {c_failed} |\n| (d) cluster stopped | {:.0} ms | {d_failed} |",
        a.as_secs_f64() * 1000.0,
        b.as_secs_f64() * 1000.0,
        c.as_secs_f64() * 1000.0,
        d.as_secs_f64() * 1000.0,
    );
    for (what, took) in [("a", a), ("b", b), ("c", c), ("d", d)] {
        assert!(
            took <= Duration::from_secs(1),
            "({what}) took {took:?} to reach the next tier"
        );
    }
    assert_eq!(
        (a_failed, b_failed, d_failed),
        (0, 0, 0),
        "with the route's retries, no idempotent request fails"
    );
    drop(load);
    drop(s);
}
