//! `mesh bench --cross-cluster`: what the gateway hop costs, in one run.
//!
//! A topology of three clusters runs as real processes (the runner behind
//! `mesh up`): west holds a client's proxy and an in-cluster `api`; east
//! and north each export an `api`, linked from west over a TCP and a QUIC
//! tunnel. Per request on a reused connection, the client proxy's path to
//! west's `api` (in-cluster: client proxy -> server proxy) is compared with
//! its path to `api-east` and `api-north` (client proxy -> gateway -> server
//! proxy). Per new connection, this process opens a fresh mTLS connection
//! to west's `api` proxy, or a fresh tunnel and its inner mTLS session, and
//! sends one request. Rounds are interleaved and medians printed.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::identity::{
    BundleStore, CredentialStore, ExpectedIdentity, SpiffeId, TrustBundleSet, files,
    tls::client_config,
};
use mesh_proxy::outbound::tunnel::Gateways;
use mesh_topologies::{
    Options, Run, RunRecord, Topology,
    runner::{ClusterInfo, Kind},
};
use tokio::net::TcpStream;

use crate::bench::{
    BenchArgs, Cores, Proto, certify, cpus_allowed, latency, median, percentile, pin_process,
};

/// West: a client's proxy and an in-cluster `api`; east and north: an
/// exported `api` each, linked from west over TCP and over QUIC.
fn topology() -> String {
    use serde_json::{Value, json};
    let workload = |name: &str, port: u16| {
        json!({
            "name": name,
            "namespace": "bench",
            "ports": [{ "name": "http", "port": port }],
            "command": ["mesh", "demo", "serve", "--http-port", port.to_string()],
        })
    };
    let cluster = |name: &str, exported: bool, mut workloads: Vec<Value>| {
        let mut metadata = json!({ "name": "api", "namespace": "bench" });
        if exported {
            metadata["labels"] = json!({ "multicluster.mesh.rs/exported": "true" });
        }
        let service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata,
            "spec": { "selector": { "app": "api" }, "ports": [{ "port": 8080, "appProtocol": "http" }] },
        });
        workloads.insert(0, workload("api", 8080));
        json!({
            "name": name,
            "trustDomain": format!("{name}.bench.local"),
            "workloads": workloads,
            // The control plane's resource YAML, itself serialized.
            "resources": serde_saphyr::to_string(&service).expect("a JSON value serializes"),
        })
    };
    let topology = json!({
        "name": "bench-cross",
        "clusters": [
            cluster("west", false, vec![workload("client", 9000)]),
            cluster("east", true, Vec::new()),
            cluster("north", true, Vec::new()),
        ],
        "links": [
            { "from": "west", "to": "east", "transport": "tcp" },
            { "from": "west", "to": "north", "transport": "quic" },
        ],
    });
    serde_saphyr::to_string(&topology).expect("a JSON value serializes")
}

/// The three paths compared.
const PATHS: [(&str, &str); 3] = [
    ("in-cluster", "api"),
    ("via gateway, TCP", "api-east"),
    ("via gateway, QUIC", "api-north"),
];

/// A loopback base whose three /16s have nothing on the control ports.
fn free_base() -> Result<u8> {
    (200..=250)
        .find(|b: &u8| {
            (0..3).all(|i| {
                std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, b + i, 0, 1), 8086))
                    .is_ok()
            })
        })
        .context("no free loopback range in 127.200-252.0.0/16")
}

fn cluster<'a>(record: &'a RunRecord, name: &str) -> Result<&'a ClusterInfo> {
    record
        .clusters
        .iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no cluster {name}"))
}

/// One request on a new HTTP/2 connection over `io` (a meshed stream).
async fn one_request<I>(io: I) -> Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) = conn::http2::handshake(TokioExecutor::new(), io).await?;
    tokio::spawn(conn);
    let req = Request::get("http://api.bench.svc.cluster.local:8080/")
        .header(mesh_proxy::wire::DST_PORT, "8080")
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        bail!("answered {status}");
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
pub(crate) async fn cross_cluster(args: &BenchArgs, cores: Option<Cores>) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build; build what ships with `image/pgo.sh` (or, without PGO, `cargo build --profile dist -p mesh-cli -p mesh-proxy`) and run `target/dist/mesh bench --cross-cluster` for real numbers"
        );
    }
    println!(
        "mesh bench --cross-cluster: client proxy -> server proxy (in-cluster) against client proxy -> gateway -> server proxy (TCP and QUIC tunnels)"
    );
    let state = tempfile_dir()?;
    let result = run_and_measure(args, &state, cores).await;
    let _ = std::fs::remove_dir_all(&state);
    result
}

/// Starts the topology under `state`, measures, and stops it.
async fn run_and_measure(
    args: &BenchArgs,
    state: &std::path::Path,
    cores: Option<Cores>,
) -> Result<()> {
    let file = state.join("bench-cross.yaml");
    let text = topology();
    std::fs::write(&file, &text)?;
    let topology = Topology::parse(&file, &text)?;
    let mut run = Run::start(
        &topology,
        &file,
        Options {
            state_dir: state.join("state"),
            mesh_exe: std::env::current_exe()?,
            loopback_base: free_base()?,
            ready_timeout: Duration::from_secs(60),
            progress: false,
            prometheus: None,
        },
    )
    .await?;
    let record = run.snapshot();
    let result = async {
        pin(&record, cores)?;
        measure(args, &record).await
    }
    .await;
    run.stop().await;
    result
}

/// Moves the run's proxies and gateways to the proxies' core; the rest
/// (control planes, apps, this load generator) started on the load core.
#[allow(clippy::print_stdout)]
fn pin(record: &RunRecord, cores: Option<Cores>) -> Result<()> {
    let Some(cores) = cores else {
        println!("not pinned");
        return Ok(());
    };
    let data_plane = record
        .components
        .iter()
        .filter(|c| matches!(c.kind, Kind::Proxy | Kind::Gateway));
    let mut pinned = Vec::new();
    for component in data_plane {
        let pid = component
            .pid
            .with_context(|| format!("{} is not running", component.name))?;
        pin_process(pid, cores.proxies)?;
        pinned.push(pid);
    }
    // What the kernel now says, distinct values only: one, the core, when
    // every one of them moved.
    let says: BTreeSet<String> = pinned.iter().map(|&pid| cpus_allowed(pid)).collect();
    let says: Vec<String> = says.into_iter().collect();
    println!(
        "pinned: proxies and gateways on CPU {} (the kernel says {} for all {}), the load generator, apps and control planes on CPU {}",
        cores.proxies,
        says.join(" / "),
        pinned.len(),
        cores.load
    );
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("mesh-bench-cross-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[allow(clippy::print_stdout)]
async fn measure(args: &BenchArgs, record: &RunRecord) -> Result<()> {
    let west = cluster(record, "west")?;
    let client = west
        .replicas
        .iter()
        .find(|r| r.workload == "client")
        .context("no client")?;
    let outbound = SocketAddr::new(client.ip, 4140);

    // Per request, on one reused connection through the client proxy.
    let uri = |svc: &str| format!("http://{svc}.bench.svc.cluster.local:8080/");
    for (_, svc) in PATHS {
        // Warm every path (discovery, pools, tunnels) before measuring.
        latency(outbound, Proto::Http1, &uri(svc), 200).await?;
    }
    let mut p50s: [Vec<f64>; 3] = Default::default();
    let mut p99s: [Vec<f64>; 3] = Default::default();
    for _ in 0..args.rounds {
        for (i, (_, svc)) in PATHS.iter().enumerate() {
            let (p50, p99) = latency(outbound, Proto::Http1, &uri(svc), args.requests).await?;
            p50s[i].push(p50);
            p99s[i].push(p99);
        }
    }
    println!(
        "\nper request, reused connections (HTTP/1.1 from the app, 1 connection, {} requests x {} rounds, medians):",
        args.requests, args.rounds
    );
    let rows: Vec<(f64, f64)> = (0..PATHS.len())
        .map(|i| (median(p50s[i].clone()), median(p99s[i].clone())))
        .collect();
    print_rows(&rows, " (target: added p50 <= 150 µs)");

    // Per new connection, from this process with a west identity.
    let bundle_of = |c: &ClusterInfo| -> Result<_> {
        Ok(files::load_bundle(
            &c.ca_dir().join("bundle.json"),
            c.trust_domain.parse()?,
        )?)
    };
    let (east, north) = (cluster(record, "east")?, cluster(record, "north")?);
    let bundles = BundleStore::new(
        [bundle_of(west)?, bundle_of(east)?, bundle_of(north)?]
            .into_iter()
            .collect::<TrustBundleSet>(),
    );
    let creds = certify(
        &west
            .data_dir()
            .join(mesh_control::admin_socket::SOCKET_FILE),
        &west.control_identity.to_string(),
        bundles.clone(),
        "spiffe://west.bench.local/ns/mesh-system/sa/control".parse()?,
        ("bench", "loadgen"),
        mesh_core::identity::csr::LeafKey::Ed25519,
    )
    .await?;
    let api_west = west
        .replicas
        .iter()
        .find(|r| r.workload == "api")
        .context("no api")?;
    let n = (args.requests / 10).max(50);
    let mut took: [Vec<Duration>; 3] = Default::default();
    for _ in 0..n {
        for (i, sample) in took.iter_mut().enumerate() {
            let start = Instant::now();
            match i {
                0 => new_direct(api_west.ip, &creds, &bundles).await?,
                1 => new_tunnel(east, false, &creds, &bundles).await?,
                _ => new_tunnel(north, true, &creds, &bundles).await?,
            }
            sample.push(start.elapsed());
        }
    }
    println!(
        "\nper new connection (a fresh mTLS connection, or a fresh tunnel and its inner mTLS, then one HTTP/2 request; {n} each):"
    );
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        (percentile(v, 0.5), percentile(v, 0.99))
    };
    let rows: Vec<(f64, f64)> = took.iter_mut().map(stats).collect();
    print_rows(&rows, "");
    println!(
        "\nThe machine is shared and noisy: compare within this run. p99 is printed, never a gate."
    );
    Ok(())
}

/// A new mTLS connection to west's `api` proxy, and one request.
async fn new_direct(
    ip: std::net::IpAddr,
    creds: &CredentialStore,
    bundles: &BundleStore,
) -> Result<()> {
    let api: SpiffeId = "spiffe://west.bench.local/ns/bench/sa/api".parse()?;
    let mut tls = client_config(creds.clone(), bundles.clone(), ExpectedIdentity::Exact(api))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect((ip, 4143)).await?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(rustls::pki_types::ServerName::from(ip), tcp)
        .await?;
    one_request(TokioIo::new(stream)).await
}

/// One line per path (p50, p99 in µs), each after the first with what it
/// adds to the first; `note` ends those lines.
#[allow(clippy::print_stdout)]
fn print_rows(rows: &[(f64, f64)], note: &str) {
    let (base50, base99) = rows[0];
    for (i, ((name, _), (p50, p99))) in PATHS.iter().zip(rows).enumerate() {
        if i == 0 {
            println!("  {name:<18} p50 {p50:>7.0} µs   p99 {p99:>7.0} µs");
        } else {
            println!(
                "  {name:<18} p50 {p50:>7.0} µs   p99 {p99:>7.0} µs   added p50 {:>5.0} µs, p99 {:>5.0} µs{note}",
                p50 - base50,
                p99 - base99
            );
        }
    }
}

/// A new tunnel to `c`'s gateway, the inner mTLS to its `api`, and one request.
async fn new_tunnel(
    c: &ClusterInfo,
    quic: bool,
    creds: &CredentialStore,
    bundles: &BundleStore,
) -> Result<()> {
    let gateway = c.gateway.context("no gateway")?;
    let td = &c.trust_domain;
    let api: SpiffeId = format!("spiffe://{td}/ns/bench/sa/api").parse()?;
    let tunnel = Gateways::default()
        .connector(
            &gateway.to_string(),
            format!("spiffe://{td}/ns/mesh-system/sa/gateway").parse()?,
            "api.bench.svc.cluster.local:8080",
            ExpectedIdentity::AnyOf(BTreeSet::from([api])),
            quic,
            creds,
            bundles,
        )
        .map_err(anyhow::Error::msg)?;
    one_request(tunnel.connect().await?).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bench_topology_is_valid() {
        let text = super::topology();
        let t = mesh_topologies::Topology::parse(std::path::Path::new("bench.yaml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(t.clusters.len(), 3);
        assert_eq!(t.clusters[0].value.workloads.len(), 2);
    }
}
