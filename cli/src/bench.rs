//! `mesh bench`: measures the data plane on this machine, in one run.
//!
//! It starts a control plane and two proxies as real processes (this same
//! binary), an app (HTTP/1.1 and HTTP/2) and a load generator in this
//! process, then runs direct (client -> app) and meshed (client -> client
//! proxy -> mTLS -> server proxy -> app) rounds interleaved, for HTTP/1.1
//! and for HTTP/2 with prior knowledge (as gRPC), and prints medians and
//! ratios.
//! Proxy CPU time and memory come from `/proc`. The machine is shared and
//! noisy: compare the ratios of one run, not absolute times across runs.

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{client::conn, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_control::admin_socket::{self, AdminRequest};
use mesh_core::identity::{
    CertificateAuthority, RootCa,
    ca::{DEFAULT_ISSUER_TTL, DEFAULT_ROOT_TTL},
    cert::now,
    files,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Requests per latency round (one connection, sequential).
    #[arg(long, default_value_t = 2000)]
    pub(crate) requests: usize,
    /// Interleaved rounds of each kind (direct, meshed, direct, ...).
    #[arg(long, default_value_t = 5)]
    pub(crate) rounds: usize,
    /// Length of each throughput and handshake run.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent connections for the throughput runs.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Idle connections opened to measure memory per connection.
    #[arg(long, default_value_t = 500)]
    idle_connections: usize,
    /// Measure the gateway hop instead: in-cluster against cross-cluster
    /// (TCP and QUIC tunnels), reused and new connections.
    #[arg(long)]
    cross_cluster: bool,
}

/// Kills the processes it holds when dropped, so nothing outlives the bench.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn run(args: BenchArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
    if args.cross_cluster {
        return runtime
            .block_on(crate::bench_cross::cross_cluster(&args))
            .map(|()| ExitCode::SUCCESS);
    }
    let result = runtime.block_on(bench(&args, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| ExitCode::SUCCESS)
}

fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits for `GET /ready` on an admin port to answer 200.
async fn wait_ready(admin: SocketAddr, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let _ = s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").await;
            let mut out = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out).await;
            if out.contains(" 200 ") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            bail!(
                "{what} did not become ready; last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An app answering `ok` to everything, in HTTP/1.1 or HTTP/2 (prior
/// knowledge), as the client speaks.
async fn app() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The protocol the load generator speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    Http1,
    /// Prior knowledge, no TLS: what a gRPC client sends its proxy.
    Http2,
}

/// One keep-alive client connection.
enum Sender {
    Http1(conn::http1::SendRequest<Empty<Bytes>>),
    Http2(conn::http2::SendRequest<Empty<Bytes>>),
}

async fn connect(to: SocketAddr, proto: Proto) -> Result<Sender> {
    let tcp = TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    let io = TokioIo::new(tcp);
    Ok(match proto {
        Proto::Http1 => {
            let (send, conn) = conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Sender::Http1(send)
        }
        Proto::Http2 => {
            let (send, conn) = conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Sender::Http2(send)
        }
    })
}

async fn get(send: &mut Sender, uri: &str) -> Result<()> {
    let req = Request::get(uri).body(Empty::new())?;
    let resp = match send {
        Sender::Http1(send) => {
            send.ready().await?;
            send.send_request(req).await?
        }
        Sender::Http2(send) => {
            send.ready().await?;
            send.send_request(req).await?
        }
    };
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        bail!("{uri} answered {status}");
    }
    Ok(())
}

/// utime + stime of a process, in seconds (`/proc/<pid>/stat`, USER_HZ = 100).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Memory only this process holds, in KiB (private pages, from
/// `smaps_rollup`); RSS also counts code pages shared with other processes.
fn private_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("Private_Clean:")
                .or_else(|| l.strip_prefix("Private_Dirty:"))?;
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// Resident memory of a process in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6
}

/// Sequential requests on one connection; (p50, p99) in µs.
pub(crate) async fn latency(
    to: SocketAddr,
    proto: Proto,
    uri: &str,
    n: usize,
) -> Result<(f64, f64)> {
    let mut send = connect(to, proto).await?;
    for _ in 0..100 {
        get(&mut send, uri).await?;
    }
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        get(&mut send, uri).await?;
        took.push(start.elapsed());
    }
    took.sort();
    Ok((percentile(&took, 0.5), percentile(&took, 0.99)))
}

/// Requests completed in `run` by `conns` concurrent connections.
async fn throughput(
    to: SocketAddr,
    proto: Proto,
    uri: &str,
    conns: usize,
    run: Duration,
) -> Result<u64> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut send = connect(to, proto).await?;
        let (done, stop, uri) = (done.clone(), stop.clone(), uri.to_owned());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if get(&mut send, &uri).await.is_err() {
                    break;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    Ok(done.load(Ordering::Relaxed))
}

/// The proxy as a sidecar runs it: the `mesh-proxy` binary when it was
/// built next to this one (`cargo build --release -p mesh-proxy`), which is
/// smaller than `mesh` and so maps less code; `mesh proxy` otherwise.
fn proxy_command(exe: &Path) -> Command {
    let sidecar = exe.with_file_name("mesh-proxy");
    if sidecar.is_file() {
        Command::new(sidecar)
    } else {
        let mut cmd = Command::new(exe);
        cmd.arg("proxy");
        cmd
    }
}

struct Setup {
    _procs: Procs,
    client_pid: u32,
    server_pid: u32,
    app: SocketAddr,
    client_outbound: SocketAddr,
    server_inbound: SocketAddr,
    authority: String,
    bundle: PathBuf,
    plane_identity: SocketAddr,
    admin_socket: PathBuf,
}

async fn setup(dir: &Path) -> Result<Setup> {
    std::fs::create_dir_all(dir)?;
    let exe = std::env::current_exe().context("cannot find the mesh binary to start components")?;
    let ca_dir = dir.join("ca");
    let root = RootCa::generate(DEFAULT_ROOT_TTL, now())?;
    let ca = CertificateAuthority::generate(
        "bench.mesh.local".parse()?,
        &root,
        DEFAULT_ISSUER_TTL,
        now(),
    )?;
    files::write_ca_dir(&ca_dir, &root, &ca, true)?;
    let app = app().await?;
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    let service = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "app", "namespace": "bench" },
        "spec": {
            "selector": { "app": "app" },
            "ports": [{ "port": app.port(), "appProtocol": "http" }],
        },
    });
    std::fs::write(
        config.join("bench.yaml"),
        serde_saphyr::to_string(&service)?,
    )?;
    let (identity, api, admin) = (addr(free_port()?), addr(free_port()?), addr(free_port()?));
    let log = |name: &str| -> Result<std::fs::File> {
        Ok(std::fs::File::create(dir.join(format!("{name}.log")))?)
    };
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new(&exe)
            .args(["control", "--cluster", "bench"])
            .arg("--ca")
            .arg(&ca_dir)
            .arg("--config-dir")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args([
                "--identity-addr",
                &identity.to_string(),
                "--api-addr",
                &api.to_string(),
                "--admin-addr",
                &admin.to_string(),
            ])
            .env("MESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log("control")?)
            .spawn()?,
    );
    wait_ready(admin, "the control plane", &dir.join("control.log")).await?;
    let admin_socket = dir.join("data").join(admin_socket::SOCKET_FILE);

    let mut proxy = |sa: &str,
                     labels: &str,
                     app_ports: &str|
     -> Result<(u32, SocketAddr, SocketAddr, SocketAddr)> {
        let token = dir.join(format!("{sa}.token"));
        let (inbound, outbound, padmin) =
            (addr(free_port()?), addr(free_port()?), addr(free_port()?));
        let child = proxy_command(&exe)
            .envs([
                ("MESH_PROXY_CLUSTER", "bench"),
                ("MESH_PROXY_TRUST_DOMAIN", "bench.mesh.local"),
                ("MESH_PROXY_NAMESPACE", "bench"),
                ("MESH_PROXY_SERVICE_ACCOUNT", sa),
                ("MESH_PROXY_WORKLOAD", &format!("{sa}-0")),
                ("MESH_PROXY_CONTROL_IDENTITY_ADDR", &identity.to_string()),
                ("MESH_PROXY_CONTROL_API_ADDR", &api.to_string()),
                (
                    "MESH_PROXY_TRUST_ANCHORS",
                    &ca_dir.join("bundle.json").display().to_string(),
                ),
                ("MESH_PROXY_JOIN_TOKEN_FILE", &token.display().to_string()),
                ("MESH_PROXY_INBOUND_ADDR", &inbound.to_string()),
                ("MESH_PROXY_OUTBOUND_ADDR", &outbound.to_string()),
                ("MESH_PROXY_ADMIN_ADDR", &padmin.to_string()),
                ("MESH_PROXY_APP_PORTS", app_ports),
                ("MESH_PROXY_LABELS", labels),
                ("MESH_LOG", "warn"),
            ])
            .stdout(Stdio::null())
            .stderr(log(sa)?)
            .spawn()?;
        let pid = child.id();
        procs.0.push(child);
        Ok((pid, inbound, outbound, padmin))
    };
    for (sa, app) in [("server", "app"), ("client", "client")] {
        let req = AdminRequest::CreateToken {
            namespace: "bench".into(),
            service_account: sa.into(),
            ttl_seconds: 600,
            claims: Some(mesh_control::store::WorkloadClaims {
                workload: format!("{sa}-0"),
                labels: [("app".to_owned(), app.to_owned())].into(),
                addresses: vec![std::net::Ipv4Addr::LOCALHOST.into()],
                ports: Vec::new(),
            }),
        };
        let resp = admin_socket::request(&admin_socket, &req).await?;
        std::fs::write(
            dir.join(format!("{sa}.token")),
            resp.token.context("no token from the control plane")?,
        )?;
    }
    let (server_pid, server_inbound, _, server_admin) =
        proxy("server", "app=app", &format!("http={}", app.port()))?;
    let (client_pid, _, client_outbound, client_admin) = proxy("client", "app=client", "")?;
    wait_ready(server_admin, "the server proxy", &dir.join("server.log")).await?;
    wait_ready(client_admin, "the client proxy", &dir.join("client.log")).await?;
    let authority = format!("app.bench.svc.cluster.local:{}", app.port());
    // Wait until the meshed path works end to end.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = async {
            get(
                &mut connect(client_outbound, Proto::Http1).await?,
                &format!("http://{authority}/"),
            )
            .await
        }
        .await;
        match ok {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => bail!("the meshed path never worked: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(Setup {
        _procs: procs,
        client_pid,
        server_pid,
        app,
        client_outbound,
        server_inbound,
        authority,
        bundle: ca_dir.join("bundle.json"),
        plane_identity: identity,
        admin_socket,
    })
}

#[allow(clippy::print_stdout)]
async fn bench(args: &BenchArgs, dir: &Path) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build; run `cargo run --release -p mesh-cli -- bench` for real numbers"
        );
    }
    println!(
        "mesh bench: client -> client proxy -> mTLS (HTTP/2) -> server proxy -> app, against client -> app"
    );
    let s = setup(dir).await?;
    let sidecar = std::env::current_exe()?.with_file_name("mesh-proxy");
    println!(
        "proxies: {}",
        if sidecar.is_file() {
            sidecar.display().to_string()
        } else {
            "`mesh proxy` (build mesh-proxy next to mesh to measure the sidecar binary)".to_owned()
        }
    );
    let meshed_uri = format!("http://{}/", s.authority);
    let idle = (rss_kib(s.client_pid), rss_kib(s.server_pid));
    let idle_private = (private_kib(s.client_pid), private_kib(s.server_pid));
    for proto in [Proto::Http1, Proto::Http2] {
        http_rounds(args, &s, proto).await?;
    }

    // Memory: idle, then per idle keep-alive connection.
    let before = (rss_kib(s.client_pid), rss_kib(s.server_pid));
    let mut held = Vec::new();
    for _ in 0..args.idle_connections {
        let mut send = connect(s.client_outbound, Proto::Http1).await?;
        get(&mut send, &meshed_uri).await?;
        held.push(send);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = (rss_kib(s.client_pid), rss_kib(s.server_pid));
    println!("\nmemory:");
    println!(
        "  idle RSS: client proxy {:.1} MiB, server proxy {:.1} MiB (target <= 10 MiB); private {:.1} / {:.1} MiB",
        idle.0 / 1024.0,
        idle.1 / 1024.0,
        idle_private.0 / 1024.0,
        idle_private.1 / 1024.0
    );
    println!(
        "  per app connection to the client proxy: {:.1} KiB ({} keep-alive HTTP/1.1 connections; target <= 16 KiB)",
        (after.0 - before.0) / args.idle_connections as f64,
        args.idle_connections
    );
    drop(held);

    // New mTLS connections per second against the server proxy.
    let (handshakes, server_cpu) = handshake_rate(&s, args.duration).await?;
    println!(
        "\nnew mTLS connections: {:.0}/s from 4 clients; server proxy CPU {:.2} s -> {:.0} handshakes per core-second (target >= 2500)",
        handshakes as f64 / args.duration.as_secs_f64(),
        server_cpu,
        handshakes as f64 / server_cpu.max(1e-9)
    );
    Ok(())
}

/// Latency and throughput in `proto`, direct and meshed, interleaved.
#[allow(clippy::print_stdout)]
async fn http_rounds(args: &BenchArgs, s: &Setup, proto: Proto) -> Result<()> {
    let direct_uri = match proto {
        // HTTP/1.1 to the app: origin form. HTTP/2 names the authority.
        Proto::Http1 => "/".to_owned(),
        Proto::Http2 => format!("http://{}/", s.app),
    };
    let meshed_uri = format!("http://{}/", s.authority);
    let name = match proto {
        Proto::Http1 => "HTTP/1.1",
        Proto::Http2 => "HTTP/2 (prior knowledge, as gRPC)",
    };
    println!("\n== {name}");

    // Latency on one connection, interleaved rounds.
    let (mut d50, mut d99, mut m50, mut m99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let (p50, p99) = latency(s.app, proto, &direct_uri, args.requests).await?;
        d50.push(p50);
        d99.push(p99);
        let (p50, p99) = latency(s.client_outbound, proto, &meshed_uri, args.requests).await?;
        m50.push(p50);
        m99.push(p99);
    }
    let (d50, d99, m50, m99) = (median(d50), median(d99), median(m50), median(m99));
    println!(
        "latency, 1 connection, {} requests x {} rounds (medians):",
        args.requests, args.rounds
    );
    println!("  direct  p50 {d50:>8.0} µs   p99 {d99:>8.0} µs");
    println!("  meshed  p50 {m50:>8.0} µs   p99 {m99:>8.0} µs");
    println!(
        "  added p50 {:.0} µs (target <= 250 µs); p99 is shown, never a gate",
        m50 - d50
    );

    // Throughput at saturation, with proxy CPU from /proc.
    let (mut direct_rps, mut meshed_rps, mut client_us, mut server_us, mut per_core) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        let n = throughput(s.app, proto, &direct_uri, args.connections, args.duration).await?;
        direct_rps.push(n as f64 / args.duration.as_secs_f64());
        let (c0, s0) = (cpu_seconds(s.client_pid), cpu_seconds(s.server_pid));
        let n = throughput(
            s.client_outbound,
            proto,
            &meshed_uri,
            args.connections,
            args.duration,
        )
        .await?;
        let (c, sv) = (
            cpu_seconds(s.client_pid) - c0,
            cpu_seconds(s.server_pid) - s0,
        );
        meshed_rps.push(n as f64 / args.duration.as_secs_f64());
        client_us.push(c * 1e6 / n as f64);
        server_us.push(sv * 1e6 / n as f64);
        per_core.push(n as f64 / c.max(sv).max(1e-9));
    }
    let (dr, mr) = (median(direct_rps), median(meshed_rps));
    println!(
        "throughput, {} connections, {:?} x 2 rounds (medians):",
        args.connections, args.duration
    );
    println!(
        "  direct {dr:>9.0} req/s   meshed {mr:>9.0} req/s   ({:.2}x)",
        mr / dr
    );
    println!(
        "  CPU per request: client proxy {:.1} µs, server proxy {:.1} µs (target <= 45 µs each)",
        median(client_us),
        median(server_us)
    );
    println!(
        "  max req/s per proxy core (busier proxy): {:.0}",
        median(per_core)
    );
    Ok(())
}

/// An SVID for `id` from the control plane at `identity_addr` (which must
/// present `control`), with a join token from its admin socket.
pub(crate) async fn certify(
    admin: &Path,
    identity_addr: &str,
    bundles: mesh_core::identity::BundleStore,
    control: mesh_core::identity::SpiffeId,
    (namespace, service_account): (&str, &str),
) -> Result<mesh_core::identity::CredentialStore> {
    use mesh_core::{
        api::v1::{CertifyRequest, identity_client::IdentityClient},
        grpc,
        identity::{
            CredentialStore, Credentials, ExpectedIdentity, csr::new_key_and_csr,
            tls::client_config_without_cert,
        },
    };
    // An identity for a client of the bench, which registers nothing.
    let req = AdminRequest::CreateToken {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        ttl_seconds: 600,
        claims: None,
    };
    let answer = admin_socket::request(admin, &req).await?;
    let token = answer
        .token
        .with_context(|| format!("no join token: {}", answer.error.unwrap_or_default()))?;
    let tls = client_config_without_cert(bundles, ExpectedIdentity::Exact(control.clone()))?;
    let mut identity = IdentityClient::new(grpc::channel(identity_addr, tls)?);
    let (key, csr) = new_key_and_csr()?;
    let resp = identity
        .certify(CertifyRequest {
            identity: mesh_core::identity::SpiffeId::workload(
                &control.trust_domain(),
                namespace,
                service_account,
            )?
            .to_string(),
            csr,
            token,
            ttl_seconds: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(CredentialStore::new(Credentials::new(
        resp.chain.into_iter().map(Into::into).collect(),
        key,
    )?))
}

/// Full TLS 1.3 handshakes to the server proxy's inbound port, with a real
/// client SVID, from 4 concurrent tasks for `run`.
async fn handshake_rate(s: &Setup, run: Duration) -> Result<(u64, f64)> {
    use mesh_core::identity::{
        BundleStore, ExpectedIdentity, SpiffeId, TrustBundleSet, tls::client_config,
    };
    let td = "bench.mesh.local".parse()?;
    let bundle = files::load_bundle(&s.bundle, td)?;
    let bundles = BundleStore::new([bundle].into_iter().collect::<TrustBundleSet>());
    let control: SpiffeId = "spiffe://bench.mesh.local/ns/mesh-system/sa/control".parse()?;
    let creds = certify(
        &s.admin_socket,
        &s.plane_identity.to_string(),
        bundles.clone(),
        control,
        ("bench", "loadgen"),
    )
    .await?;
    let server: SpiffeId = "spiffe://bench.mesh.local/ns/bench/sa/server".parse()?;
    let mut config = client_config(creds, bundles, ExpectedIdentity::Exact(server))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_seconds(s.server_pid);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (connector, done, stop, to) = (
            connector.clone(),
            done.clone(),
            stop.clone(),
            s.server_inbound,
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(tcp) = TcpStream::connect(to).await else {
                    break;
                };
                let name = rustls::pki_types::ServerName::from(to.ip());
                if let Ok(mut tls) = connector.connect(name, tcp).await {
                    let _ = tls.shutdown().await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    Ok((
        done.load(Ordering::Relaxed),
        cpu_seconds(s.server_pid) - cpu0,
    ))
}
