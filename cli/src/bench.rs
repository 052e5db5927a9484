//! `mesh bench`: measures the data plane on this machine, in one run.
//!
//! It starts a control plane and two proxies as real processes (this same
//! binary), an app (HTTP/1.1 and HTTP/2) and a load generator in this
//! process, then runs direct (client -> app) and meshed (client -> client
//! proxy -> mTLS -> server proxy -> app) rounds interleaved, for HTTP/1.1
//! and for HTTP/2 with prior knowledge (as gRPC), and prints medians and
//! ratios. With `--peer haproxy` an haproxy pair doing the same job runs
//! beside the Mesh pair, in the same rounds, and every figure gets the
//! ratio Mesh / haproxy.
//!
//! With two cores or more, the proxies run on one core and the load
//! generator and the app on another, so the figures do not wander with the
//! scheduler. Proxy CPU time and memory come from `/proc`. The machine is
//! shared and noisy: compare the ratios of one run, not absolute times
//! across runs.

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
    BundleStore, CertificateAuthority, CredentialStore, ExpectedIdentity, RootCa, SpiffeId,
    TrustBundleSet,
    ca::{DEFAULT_ISSUER_TTL, DEFAULT_ROOT_TTL},
    cert::now,
    csr::LeafKey,
    files,
    tls::client_config,
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
    /// Connections opened at once, then closed, to see that memory goes
    /// back down.
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Measure the gateway hop instead: in-cluster against cross-cluster
    /// (TCP and QUIC tunnels), reused and new connections.
    #[arg(long, conflicts_with = "peer")]
    cross_cluster: bool,
    /// Run another proxy pair beside Mesh's, with the same load in the same
    /// interleaved rounds, and print each figure with the ratio
    /// Mesh / peer. `haproxy` needs Debian's `haproxy` package.
    #[arg(long, value_enum)]
    peer: Option<Peer>,
    /// Do not pin the proxies and the load generator to separate cores.
    #[arg(long)]
    no_pin: bool,
    /// Run these parts only (repeat or separate with commas), for
    /// profiling one of them: `http1`, `http2`, `memory`, `connections`.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
}

/// The parts of a bench run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Part {
    Http1,
    Http2,
    Memory,
    Connections,
}

/// A proxy pair to compare Mesh's with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Peer {
    Haproxy,
}

/// Stops the processes it holds when dropped, so nothing outlives the
/// bench: SIGTERM first (a profiler the proxies run under writes its
/// profile then), SIGKILL for whatever is still there after 5 s.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        use rustix::process::{Pid, Signal, kill_process};
        for child in &self.0 {
            if let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
                let _ = kill_process(pid, Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in &mut self.0 {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn run(args: BenchArgs) -> Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
    if args.cross_cluster {
        let cores = if args.no_pin { None } else { choose_cores()? };
        // Every process the run starts inherits this thread's mask; the
        // proxies and gateways then move to their core.
        if let Some(cores) = cores {
            pin_this_thread(cores.load)?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime
            .block_on(crate::bench_cross::cross_cluster(&args, cores))
            .map(|()| ExitCode::SUCCESS);
    }
    // Before anything else, so the peer's absence costs no setup.
    let haproxy = match args.peer {
        Some(Peer::Haproxy) => Some(crate::bench_haproxy::find()?),
        None => None,
    };
    raise_open_files_limit();
    let cores = if args.no_pin { None } else { choose_cores()? };
    // The runtime's threads inherit this thread's mask: the load generator
    // and the app run on the load core.
    if let Some(cores) = cores {
        pin_this_thread(cores.load)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(bench(&args, &dir, cores, haproxy));
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| ExitCode::SUCCESS)
}

/// The cores the proxies and the load run on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cores {
    pub(crate) proxies: usize,
    pub(crate) load: usize,
}

/// The first two cores this process may run on, or `None` (with a word on
/// stderr) when it may run on one only.
fn choose_cores() -> Result<Option<Cores>> {
    use rustix::thread::{CpuSet, sched_getaffinity};
    let allowed = sched_getaffinity(None).context("cannot read this process's CPU affinity")?;
    let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect();
    match cpus[..] {
        [proxies, load, ..] => Ok(Some(Cores { proxies, load })),
        _ => {
            eprintln!(
                "note: one core available; the proxies and the load share it (figures wander more)"
            );
            Ok(None)
        }
    }
}

/// The mask of one CPU.
fn only(cpu: usize) -> rustix::thread::CpuSet {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    set
}

fn pin_this_thread(cpu: usize) -> Result<()> {
    rustix::thread::sched_setaffinity(None, &only(cpu))
        .with_context(|| format!("cannot pin the bench to CPU {cpu}"))
}

/// Moves every thread of the running process `pid` to `cpu`; threads it
/// starts later inherit the mask of the thread that starts them.
pub(crate) fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    let set = only(cpu);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot list the threads of process {pid}"))?;
    for task in tasks {
        let tid = task?.file_name();
        let Some(tid) = tid
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
        else {
            continue;
        };
        match rustix::thread::sched_setaffinity(Some(tid), &set) {
            // A thread that ended meanwhile has nothing to move.
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot pin process {pid} to CPU {cpu}"));
            }
        }
    }
    Ok(())
}

/// Starts `cmd` on `cpu`: a child inherits the CPU mask of the thread that
/// starts it, so this thread takes that mask for the spawn and then puts
/// its own back. The child runs on `cpu` from its first instruction, with
/// every thread it ever starts.
fn spawn_on(cmd: &mut Command, cpu: Option<usize>) -> Result<Child> {
    let Some(cpu) = cpu else {
        return Ok(cmd.spawn()?);
    };
    let own = rustix::thread::sched_getaffinity(None)?;
    pin_this_thread(cpu)?;
    let child = cmd.spawn();
    rustix::thread::sched_setaffinity(None, &own)?;
    Ok(child?)
}

/// One field of `/proc/<pid>/status` (`VmRSS`, `Cpus_allowed_list`, ...).
fn status_field(pid: u32, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let value = l.strip_prefix(name)?.strip_prefix(':')?;
        Some(value.trim().to_owned())
    })
}

/// The CPUs a process may run on, as the kernel lists them.
pub(crate) fn cpus_allowed(pid: u32) -> String {
    status_field(pid, "Cpus_allowed_list").unwrap_or_default()
}

/// The burst and idle-connection rounds hold over a thousand sockets: take
/// the hard limit on open files (the soft one is often 1024).
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

/// How many times the bench starts its processes when a port it found
/// free was taken before the process bound it.
const SETUP_TRIES: usize = 3;

/// [`setup`], again on other ports (and in a directory of its own) when a
/// process could not bind a port found free a moment before: another
/// process can take it in between ("Address already in use").
async fn setup_on_free_ports(dir: &Path, cores: Option<Cores>) -> Result<Setup> {
    let mut tries = 1;
    loop {
        let here = if tries == 1 {
            dir.to_owned()
        } else {
            dir.join(format!("try-{tries}"))
        };
        match setup(&here, cores).await {
            Err(e) if tries < SETUP_TRIES && port_was_taken(&e) => {
                eprintln!(
                    "note: a port the bench chose was taken meanwhile; starting again on others"
                );
                tries += 1;
            }
            started => return started,
        }
    }
}

/// Whether starting failed because a port was taken (the process's log,
/// which the error quotes, says so).
fn port_was_taken(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("Address already in use")
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
            bail!("{what} did not become ready; {}", log_tail(log));
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
    status_field(pid, "VmRSS")
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
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

/// Requests completed in `run` by `conns` concurrent connections, and the
/// RSS (KiB) of `sample` at the end of the run, while they still send.
async fn throughput(
    to: SocketAddr,
    proto: Proto,
    uri: &str,
    conns: usize,
    run: Duration,
    sample: Option<u32>,
) -> Result<(u64, f64)> {
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
    let rss = sample.map_or(0.0, rss_kib);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    Ok((done.load(Ordering::Relaxed), rss))
}

/// The proxy as a sidecar runs it: the `mesh-proxy` binary when it was
/// built next to this one (`image/pgo.sh`, or `cargo build --profile dist
/// -p mesh-proxy`), which is smaller than `mesh` and so maps less code;
/// `mesh proxy` otherwise.
///
/// `MESH_BENCH_PROXY_WRAPPER`, when set, is a command (split on spaces)
/// the proxies run under, for profiling: `valgrind --tool=callgrind`.
fn proxy_command(exe: &Path) -> Command {
    let sidecar = exe.with_file_name("mesh-proxy");
    let (program, first) = if sidecar.is_file() {
        (sidecar, None)
    } else {
        (exe.to_owned(), Some("proxy"))
    };
    let wrapper = std::env::var("MESH_BENCH_PROXY_WRAPPER").unwrap_or_default();
    let mut wrapper = wrapper.split_whitespace();
    let mut cmd = match wrapper.next() {
        Some(tool) => {
            let mut cmd = Command::new(tool);
            cmd.args(wrapper).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.args(first);
    cmd
}

struct Setup {
    procs: Procs,
    client_pid: u32,
    server_pid: u32,
    app: SocketAddr,
    client_outbound: SocketAddr,
    server_inbound: SocketAddr,
    authority: String,
    bundle: PathBuf,
    root: PathBuf,
    plane_identity: SocketAddr,
    admin_socket: PathBuf,
}

async fn setup(dir: &Path, cores: Option<Cores>) -> Result<Setup> {
    std::fs::create_dir_all(dir)?;
    let exe = std::env::current_exe().context("cannot find the mesh binary to start components")?;
    let ca_dir = dir.join("ca");
    let root = RootCa::generate(DEFAULT_ROOT_TTL, now())?;
    let ca =
        CertificateAuthority::generate(TRUST_DOMAIN.parse()?, &root, DEFAULT_ISSUER_TTL, now())?;
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
    procs.0.push(spawn_on(
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
            .stderr(log("control")?),
        cores.map(|c| c.load),
    )?);
    wait_ready(admin, "the control plane", &dir.join("control.log")).await?;
    let admin_socket = dir.join("data").join(admin_socket::SOCKET_FILE);

    let mut proxy = |sa: &str,
                     labels: &str,
                     app_ports: &str|
     -> Result<(u32, SocketAddr, SocketAddr, SocketAddr)> {
        let token = dir.join(format!("{sa}.token"));
        let (inbound, outbound, padmin) =
            (addr(free_port()?), addr(free_port()?), addr(free_port()?));
        let mut cmd = proxy_command(&exe);
        cmd.envs([
            ("MESH_PROXY_CLUSTER", "bench"),
            ("MESH_PROXY_TRUST_DOMAIN", TRUST_DOMAIN),
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
        .stderr(log(sa)?);
        let child = spawn_on(&mut cmd, cores.map(|c| c.proxies))?;
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
    wait_for_path(
        client_outbound,
        Proto::Http1,
        &format!("http://{authority}/"),
        &[
            (client_pid, dir.join("client.log")),
            (server_pid, dir.join("server.log")),
        ],
    )
    .await?;
    Ok(Setup {
        procs,
        client_pid,
        server_pid,
        app,
        client_outbound,
        server_inbound,
        authority,
        bundle: ca_dir.join("bundle.json"),
        root: ca_dir.join(files::ROOT_CERT),
        plane_identity: identity,
        admin_socket,
    })
}

/// A proxy pair under test: where the load enters it and its processes.
struct Pair {
    name: &'static str,
    client_pid: u32,
    server_pid: u32,
    /// Where plaintext HTTP/1.1 and HTTP/2 enter the client side.
    h1: SocketAddr,
    h2: SocketAddr,
    /// The server side's mTLS port for HTTP/2 callers, and who it must be.
    server_tls: SocketAddr,
    server_id: SpiffeId,
    /// The kind of key the pair's own clients and servers hold.
    leaf_key: LeafKey,
    /// RSS and private memory (KiB) of client and server once start-up
    /// settled ([`read_idle`]).
    idle_rss: (f64, f64),
    idle_private: (f64, f64),
}

impl Pair {
    fn entry(&self, proto: Proto) -> SocketAddr {
        match proto {
            Proto::Http1 => self.h1,
            Proto::Http2 => self.h2,
        }
    }

    fn pids(&self) -> (u32, u32) {
        (self.client_pid, self.server_pid)
    }
}

/// The bench's trust domain.
const TRUST_DOMAIN: &str = "bench.mesh.local";

fn bench_id(namespace: &str, service_account: &str) -> Result<SpiffeId> {
    Ok(SpiffeId::workload(
        &TRUST_DOMAIN.parse()?,
        namespace,
        service_account,
    )?)
}

impl Setup {
    fn bundles(&self) -> Result<BundleStore> {
        let bundle = files::load_bundle(&self.bundle, TRUST_DOMAIN.parse()?)?;
        Ok(BundleStore::new(
            [bundle].into_iter().collect::<TrustBundleSet>(),
        ))
    }

    /// An SVID for `bench/<service_account>` from the bench's control
    /// plane, on a key of `kind`.
    async fn svid(&self, service_account: &str, kind: LeafKey) -> Result<CredentialStore> {
        certify(
            &self.admin_socket,
            &self.plane_identity.to_string(),
            self.bundles()?,
            bench_id("mesh-system", "control")?,
            ("bench", service_account),
            kind,
        )
        .await
    }
}

fn mesh_pair(s: &Setup) -> Result<Pair> {
    Ok(Pair {
        name: "mesh",
        client_pid: s.client_pid,
        server_pid: s.server_pid,
        h1: s.client_outbound,
        h2: s.client_outbound,
        server_tls: s.server_inbound,
        server_id: bench_id("bench", "server")?,
        leaf_key: LeafKey::Ed25519,
        idle_rss: (0.0, 0.0),
        idle_private: (0.0, 0.0),
    })
}

/// How long every pair has been up when its idle memory is read: start-up
/// work is over by then (Mesh's proxy drops the pages of its start-up code
/// 2 s after ready, ARCHITECTURE.md "Code that ran only to start").
const IDLE_SETTLE: Duration = Duration::from_secs(3);

/// Reads each pair's idle memory, the same settling time after the last
/// pair answered for all of them.
async fn read_idle(pairs: &mut [Pair]) {
    tokio::time::sleep(IDLE_SETTLE).await;
    for pair in pairs {
        let (client, server) = pair.pids();
        pair.idle_rss = (rss_kib(client), rss_kib(server));
        pair.idle_private = (private_kib(client), private_kib(server));
    }
}

/// Starts the haproxy pair on the proxies' core, with SVIDs from the
/// bench's control plane, and waits until a request goes through it.
async fn haproxy_pair(
    haproxy: &Path,
    dir: &Path,
    s: &mut Setup,
    cores: Option<Cores>,
    args: &BenchArgs,
) -> Result<Pair> {
    // P-256: OpenSSL signs and verifies it faster than Ed25519, the key
    // Mesh's own workloads use (each pair gets its best).
    let mut creds = Vec::new();
    for sa in ["haproxy-client", "haproxy-server"] {
        creds.push(s.svid(sa, LeafKey::EcdsaP256).await?.current());
    }
    let ports = crate::bench_haproxy::Ports {
        client_h1: addr(free_port()?),
        client_h2: addr(free_port()?),
        server_h1: addr(free_port()?),
        server_h2: addr(free_port()?),
        app: s.app,
        max_connections: 4000.max(args.burst + args.idle_connections + args.connections + 100),
    };
    let (mut client, mut server) =
        crate::bench_haproxy::commands(haproxy, dir, &ports, &s.root, &creds[0], &creds[1])?;
    let mut started = Vec::new();
    for (side, cmd) in [("server", &mut server), ("client", &mut client)] {
        let log = dir.join(format!("haproxy-{side}.log"));
        let child = spawn_on(
            cmd.stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?),
            cores.map(|c| c.proxies),
        )?;
        started.push((child.id(), log));
        s.procs.0.push(child);
    }
    let (server_pid, client_pid) = (started[0].0, started[1].0);
    let uri = format!("http://{}/", s.authority);
    for (proto, to) in [
        (Proto::Http1, ports.client_h1),
        (Proto::Http2, ports.client_h2),
    ] {
        wait_for_path(to, proto, &uri, &started).await?;
    }
    Ok(Pair {
        name: "haproxy",
        client_pid,
        server_pid,
        h1: ports.client_h1,
        h2: ports.client_h2,
        server_tls: ports.server_h2,
        server_id: bench_id("bench", "haproxy-server")?,
        leaf_key: LeafKey::EcdsaP256,
        idle_rss: (0.0, 0.0),
        idle_private: (0.0, 0.0),
    })
}

/// Waits until a request to `to` is answered 2xx, for at most 15 s, or
/// until one of the processes on the path (`(pid, log)`) exits; the error
/// carries each one's last log lines.
async fn wait_for_path(
    to: SocketAddr,
    proto: Proto,
    uri: &str,
    path: &[(u32, PathBuf)],
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = async { get(&mut connect(to, proto).await?, uri).await }.await;
        let gone = || {
            path.iter()
                .any(|(pid, _)| !mesh_topologies::runner::process_alive(*pid, None))
        };
        match ok {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline || gone() => {
                let logs: Vec<String> = path.iter().map(|(_, log)| log_tail(log)).collect();
                bail!(
                    "no answer through {to} ({proto:?}): {e}\n{}",
                    logs.join("\n")
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The last lines of a component's log, named by its file.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let last = &lines[lines.len().saturating_sub(10)..];
    format!("last lines of {}:\n{}", log.display(), last.join("\n"))
}

/// One figure per pair, printed as a row with the ratio of the first pair
/// to the second.
struct Row {
    label: String,
    values: Vec<f64>,
    unit: &'static str,
    decimals: usize,
    target: &'static str,
    /// False for a difference, whose ratio means nothing near zero.
    ratio: bool,
}

impl Row {
    fn new(label: impl Into<String>, values: Vec<f64>, unit: &'static str) -> Self {
        Self {
            label: label.into(),
            values,
            unit,
            decimals: 0,
            target: "",
            ratio: true,
        }
    }

    /// Prints `-` in the ratio column.
    fn difference(mut self) -> Self {
        self.ratio = false;
        self
    }

    fn decimals(mut self, decimals: usize) -> Self {
        self.decimals = decimals;
        self
    }

    fn target(mut self, target: &'static str) -> Self {
        self.target = target;
        self
    }
}

#[allow(clippy::print_stdout)]
fn print_table(pairs: &[Pair], rows: &[Row]) {
    let width = rows.iter().map(|r| r.label.len()).max().unwrap_or(0) + 2;
    let mut head = format!("  {:width$}", "");
    for p in pairs {
        head.push_str(&format!("{:>14}", p.name));
    }
    if let [a, b] = pairs {
        head.push_str(&format!("{:>16}", format!("{}/{}", a.name, b.name)));
    }
    println!("{head}");
    for row in rows {
        let mut line = format!("  {:width$}", row.label);
        for v in &row.values {
            let cell = format!("{v:.prec$} {}", row.unit, prec = row.decimals);
            line.push_str(&format!("{cell:>14}"));
        }
        if let [a, b] = row.values[..] {
            let ratio = if row.ratio && b.abs() > f64::EPSILON {
                format!("{:.2}x", a / b)
            } else {
                "-".to_owned()
            };
            line.push_str(&format!("{ratio:>16}"));
        }
        if !row.target.is_empty() {
            line.push_str("   ");
            line.push_str(row.target);
        }
        println!("{}", line.trim_end());
    }
}

#[allow(clippy::print_stdout)]
async fn bench(
    args: &BenchArgs,
    dir: &Path,
    cores: Option<Cores>,
    haproxy: Option<PathBuf>,
) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build; build what ships with `image/pgo.sh` (or, without PGO, `cargo build --profile dist -p mesh-cli -p mesh-proxy`) and run `target/dist/mesh bench` for real numbers"
        );
    }
    println!(
        "mesh bench: client -> client proxy -> mTLS (HTTP/2) -> server proxy -> app, against client -> app"
    );
    let mut s = setup_on_free_ports(dir, cores).await?;
    let sidecar = std::env::current_exe()?.with_file_name("mesh-proxy");
    println!(
        "proxies: {}",
        if sidecar.is_file() {
            sidecar.display().to_string()
        } else {
            "`mesh proxy` (build mesh-proxy next to mesh to measure the sidecar binary)".to_owned()
        }
    );
    let mut pairs = vec![mesh_pair(&s)?];
    if let Some(haproxy) = haproxy {
        let pair = haproxy_pair(&haproxy, dir, &mut s, cores, args).await?;
        println!(
            "peer: {} (nbthread 1, mTLS with HTTP/2 between the pair, TLS 1.3, client certificates required; it checks the chain, not the SPIFFE ID)",
            haproxy_version(&haproxy)
        );
        pairs.push(pair);
    }
    read_idle(&mut pairs).await;
    match cores {
        Some(c) => println!(
            "pinned: proxies on CPU {} (the kernel says {}), load generator and app on CPU {}",
            c.proxies,
            cpus_allowed(s.client_pid),
            c.load
        ),
        None => println!("not pinned"),
    }
    let runs = |part| args.only.is_empty() || args.only.contains(&part);
    for (part, proto) in [(Part::Http1, Proto::Http1), (Part::Http2, Proto::Http2)] {
        if runs(part) {
            http_rounds(args, &s, &pairs, proto).await?;
        }
    }
    if runs(Part::Memory) {
        memory(args, &s, &pairs).await?;
    }
    if runs(Part::Connections) {
        new_connections(args, &s, &pairs).await?;
    }
    Ok(())
}

fn haproxy_version(haproxy: &Path) -> String {
    let out = Command::new(haproxy).arg("-v").output();
    out.ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let first = text.lines().next()?.to_owned();
            Some(
                first
                    .split(" - ")
                    .next()
                    .unwrap_or(&first)
                    .trim()
                    .to_owned(),
            )
        })
        .unwrap_or_else(|| "haproxy".to_owned())
}

/// Latency and throughput in `proto`, direct and through each pair,
/// interleaved.
#[allow(clippy::print_stdout)]
async fn http_rounds(args: &BenchArgs, s: &Setup, pairs: &[Pair], proto: Proto) -> Result<()> {
    let direct_uri = match proto {
        // HTTP/1.1 to the app: origin form. HTTP/2 names the authority.
        Proto::Http1 => "/".to_owned(),
        Proto::Http2 => format!("http://{}/", s.app),
    };
    let uri = format!("http://{}/", s.authority);
    let name = match proto {
        Proto::Http1 => "HTTP/1.1",
        Proto::Http2 => "HTTP/2 (prior knowledge, as gRPC)",
    };
    println!("\n== {name}");

    // Latency on one connection, interleaved rounds.
    let (mut d50, mut d99) = (Vec::new(), Vec::new());
    let mut p50 = vec![Vec::new(); pairs.len()];
    let mut p99 = vec![Vec::new(); pairs.len()];
    for _ in 0..args.rounds {
        let (a, b) = latency(s.app, proto, &direct_uri, args.requests).await?;
        d50.push(a);
        d99.push(b);
        for (i, pair) in pairs.iter().enumerate() {
            let (a, b) = latency(pair.entry(proto), proto, &uri, args.requests).await?;
            p50[i].push(a);
            p99[i].push(b);
        }
    }
    let (d50, d99) = (median(d50), median(d99));
    let p50: Vec<f64> = p50.into_iter().map(median).collect();
    let p99: Vec<f64> = p99.into_iter().map(median).collect();
    println!(
        "latency, 1 connection, {} requests x {} rounds (medians); direct p50 {d50:.0} µs, p99 {d99:.0} µs",
        args.requests, args.rounds
    );
    print_table(
        pairs,
        &[
            Row::new("p50", p50.clone(), "µs"),
            Row::new("p99 (shown, never a gate)", p99, "µs"),
            Row::new("added p50", p50.iter().map(|v| v - d50).collect(), "µs")
                .target("target <= 250 µs, <= 1.00x the peer"),
        ],
    );

    // Throughput at saturation, with proxy CPU from /proc.
    let mut direct_rps = Vec::new();
    let n = pairs.len();
    let (mut rps, mut client_us, mut server_us, mut per_core) = (
        vec![Vec::new(); n],
        vec![Vec::new(); n],
        vec![Vec::new(); n],
        vec![Vec::new(); n],
    );
    let secs = args.duration.as_secs_f64();
    for _ in 0..2 {
        let (done, _) = throughput(
            s.app,
            proto,
            &direct_uri,
            args.connections,
            args.duration,
            None,
        )
        .await?;
        direct_rps.push(done as f64 / secs);
        for (i, pair) in pairs.iter().enumerate() {
            let (c, sv) = pair.pids();
            let (c0, s0) = (cpu_seconds(c), cpu_seconds(sv));
            let (done, _) = throughput(
                pair.entry(proto),
                proto,
                &uri,
                args.connections,
                args.duration,
                None,
            )
            .await?;
            let (c, sv) = (cpu_seconds(c) - c0, cpu_seconds(sv) - s0);
            let done = done.max(1) as f64;
            rps[i].push(done / secs);
            client_us[i].push(c * 1e6 / done);
            server_us[i].push(sv * 1e6 / done);
            per_core[i].push(done / c.max(sv).max(1e-9));
        }
    }
    let medians = |v: Vec<Vec<f64>>| v.into_iter().map(median).collect::<Vec<f64>>();
    println!(
        "throughput, {} connections, {:?} x 2 rounds (medians); direct {:.0} req/s",
        args.connections,
        args.duration,
        median(direct_rps)
    );
    print_table(
        pairs,
        &[
            Row::new("req/s", medians(rps), ""),
            Row::new("CPU per request, client proxy", medians(client_us), "µs")
                .decimals(1)
                .target("target <= 1.10x the peer"),
            Row::new("CPU per request, server proxy", medians(server_us), "µs")
                .decimals(1)
                .target("target <= 1.10x the peer"),
            Row::new(
                "max req/s per proxy core (busier proxy)",
                medians(per_core),
                "",
            ),
        ],
    );
    Ok(())
}

/// Connections opened and closed before the memory phases count.
const WARM_UP_CONNECTIONS: usize = 16;

/// Memory: idle, per idle and per busy connection, and what stays after a
/// burst of connections closes. Connections go to each pair's client side,
/// which holds one upstream connection per app connection.
#[allow(clippy::print_stdout)]
async fn memory(args: &BenchArgs, s: &Setup, pairs: &[Pair]) -> Result<()> {
    let uri = format!("http://{}/", s.authority);
    let mib = |kib: f64| kib / 1024.0;
    let (mut idle_conn, mut busy_conn) = (Vec::new(), Vec::new());
    let (mut before, mut held, mut after) = (Vec::new(), Vec::new(), Vec::new());
    for pair in pairs {
        let pid = pair.client_pid;
        let n = args.idle_connections.max(1);
        // Each phase starts from what the proxy keeps once the last one's
        // connections closed: Mesh's proxy gives a burst back within a second
        // (ARCHITECTURE.md, "Memory after a burst"), so its next phase pays
        // for its pages afresh rather than reusing the last one's.
        let settle = Duration::from_millis(1500);
        // A few connections first, so that the code serving a connection is
        // resident before counting (Mesh's proxy dropped its start-up code's
        // pages): per connection is the connection's own memory.
        drop(open(pair.h1, &uri, WARM_UP_CONNECTIONS, 1).await?);
        tokio::time::sleep(settle).await;
        // Idle keep-alive connections, each after one request.
        let start = rss_kib(pid);
        // One after another, as connections arrive over time.
        let conns = open(pair.h1, &uri, n, 1).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        idle_conn.push((rss_kib(pid) - start) / n as f64);
        drop(conns);
        tokio::time::sleep(settle).await;
        // The same number sending requests back to back.
        let start = rss_kib(pid);
        let (_, during) = throughput(
            pair.h1,
            Proto::Http1,
            &uri,
            n,
            args.duration.min(Duration::from_secs(2)),
            Some(pid),
        )
        .await?;
        busy_conn.push((during - start) / n as f64);
        tokio::time::sleep(settle).await;
        // A burst, then nothing.
        let start = rss_kib(pid);
        let conns = open(pair.h1, &uri, args.burst.max(1), args.burst.max(1)).await?;
        let peak = rss_kib(pid);
        drop(conns);
        tokio::time::sleep(Duration::from_secs(2)).await;
        before.push(mib(start));
        held.push(mib(peak));
        after.push(mib(rss_kib(pid)));
    }
    println!("\n== memory (RSS; per connection: the client side's growth over the connections)");
    // What the client side still holds once every connection of the burst
    // has closed, over what it held just before the burst.
    let kept: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let idle = |label: &str, of: fn(&Pair) -> f64| {
        Row::new(label, pairs.iter().map(|p| mib(of(p))).collect(), "MiB").decimals(1)
    };
    print_table(
        pairs,
        &[
            idle("idle, client proxy", |p| p.idle_rss.0).target("target <= 10 MiB"),
            idle("idle, server proxy", |p| p.idle_rss.1).target("target <= 10 MiB"),
            idle("idle private, client proxy", |p| p.idle_private.0),
            idle("idle private, server proxy", |p| p.idle_private.1),
            Row::new(
                format!("per idle connection ({} held)", args.idle_connections),
                idle_conn,
                "KiB",
            )
            .decimals(1)
            .target("target <= 16 KiB"),
            Row::new(
                format!("per busy connection ({} sending)", args.idle_connections),
                busy_conn,
                "KiB",
            )
            .decimals(1)
            .target("target <= 16 KiB"),
            Row::new("before a burst", before, "MiB").decimals(1),
            Row::new(format!("{} connections open", args.burst), held, "MiB").decimals(1),
            Row::new("2 s after they closed", after, "MiB").decimals(1),
            Row::new("kept after the burst, over before it", kept, "MiB")
                .decimals(1)
                .difference()
                .target("target: back down"),
        ],
    );
    Ok(())
}

/// `n` keep-alive HTTP/1.1 connections to `to`, each after one answered
/// request, opened `at_once` at a time.
async fn open(to: SocketAddr, uri: &str, n: usize, at_once: usize) -> Result<Vec<Sender>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..at_once.clamp(1, n - out.len()) {
            let uri = uri.to_owned();
            tasks.spawn(async move {
                let mut send = connect(to, Proto::Http1).await?;
                get(&mut send, &uri).await?;
                Ok::<_, anyhow::Error>(send)
            });
        }
        while let Some(done) = tasks.join_next().await {
            out.push(done??);
        }
    }
    Ok(out)
}

/// New mTLS connections to each pair's server side, each carrying one
/// HTTP/2 request, from 4 concurrent clients with an SVID of their own.
#[allow(clippy::print_stdout)]
async fn new_connections(args: &BenchArgs, s: &Setup, pairs: &[Pair]) -> Result<()> {
    let bundles = s.bundles()?;
    let mut connectors = Vec::new();
    for pair in pairs {
        // The load generator's key is the kind the pair's own clients have.
        let creds = s.svid("loadgen", pair.leaf_key).await?;
        let mut config = client_config(
            creds,
            bundles.clone(),
            ExpectedIdentity::Exact(pair.server_id.clone()),
        )?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        connectors.push(tokio_rustls::TlsConnector::from(Arc::new(config)));
    }
    let n = pairs.len();
    let (mut rate, mut cpu_us) = (vec![Vec::new(); n], vec![Vec::new(); n]);
    let secs = args.duration.as_secs_f64();
    for _ in 0..2 {
        for (i, pair) in pairs.iter().enumerate() {
            let cpu0 = cpu_seconds(pair.server_pid);
            let done = handshakes(
                &connectors[i],
                pair.server_tls,
                &s.authority,
                s.app.port(),
                args.duration,
            )
            .await?;
            let cpu = cpu_seconds(pair.server_pid) - cpu0;
            rate[i].push(done as f64 / secs);
            cpu_us[i].push(cpu * 1e6 / done.max(1) as f64);
        }
    }
    let cpu_us: Vec<f64> = cpu_us.into_iter().map(median).collect();
    println!(
        "\n== new mTLS connections (full TLS 1.3 handshake with client certificate + one HTTP/2 request), 4 clients, {:?} x 2 rounds (medians)",
        args.duration
    );
    print_table(
        pairs,
        &[
            Row::new(
                "connections per second",
                rate.into_iter().map(median).collect(),
                "",
            ),
            Row::new("server CPU per connection", cpu_us.clone(), "µs"),
            Row::new(
                "connections per server core-second",
                cpu_us.iter().map(|us| 1e6 / us.max(1e-9)).collect(),
                "",
            )
            .target("target >= 2500"),
        ],
    );
    Ok(())
}

/// Connections completed in `run` by 4 concurrent clients, each a new TCP
/// connection, TLS handshake, HTTP/2 handshake and one request.
async fn handshakes(
    connector: &tokio_rustls::TlsConnector,
    to: SocketAddr,
    authority: &str,
    app_port: u16,
    run: Duration,
) -> Result<u64> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let uri = format!("http://{authority}/");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (connector, done, stop, uri) =
            (connector.clone(), done.clone(), stop.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            let (mut failed, mut first) = (0u64, None);
            while !stop.load(Ordering::Relaxed) {
                match one_connection(&connector, to, &uri, app_port).await {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed += 1;
                        first.get_or_insert(e);
                    }
                }
            }
            (failed, first)
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let (mut failed, mut first) = (0, None);
    for t in tasks {
        let (n, e) = t.await?;
        failed += n;
        first = first.or(e);
    }
    let done = done.load(Ordering::Relaxed);
    // A stray failure (a reset under load) is reported, not fatal; a run
    // where most connections fail measures nothing.
    if let Some(e) = first {
        eprintln!(
            "note: {failed} of {} new connections to {to} failed; the first: {e:#}",
            done + failed
        );
        if failed > done {
            bail!("most new connections to {to} failed: {e:#}");
        }
    }
    Ok(done)
}

async fn one_connection(
    connector: &tokio_rustls::TlsConnector,
    to: SocketAddr,
    uri: &str,
    app_port: u16,
) -> Result<()> {
    let tcp = TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    let tls = connector
        .connect(rustls::pki_types::ServerName::from(to.ip()), tcp)
        .await
        .with_context(|| format!("TLS to {to}"))?;
    let (mut send, conn) = conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    let conn = tokio::spawn(conn);
    let req = Request::get(uri)
        .header(mesh_proxy::wire::DST_PORT, app_port)
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        bail!("{to} answered {status} on a new connection");
    }
    drop(send);
    let _ = conn.await;
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
    kind: LeafKey,
) -> Result<mesh_core::identity::CredentialStore> {
    use mesh_core::{
        api::v1::{CertifyRequest, identity_client::IdentityClient},
        grpc,
        identity::{
            CredentialStore, Credentials, ExpectedIdentity, csr::new_key_and_csr_of,
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
    let (key, csr) = new_key_and_csr_of(kind)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A port taken between the bench's choice and the bind is recognised
    /// from what the process says (here the OS's own error, as the control
    /// plane's and the proxies' logs quote it); other failures are not.
    #[test]
    fn a_taken_port_is_told_apart_from_other_failures() {
        let held = StdListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap();
        let e = StdListener::bind(taken).unwrap_err();
        let failed = anyhow::anyhow!("cannot listen on {taken}: {e}")
            .context("the control plane did not become ready");
        assert!(port_was_taken(&failed), "{failed:#}");
        let other = anyhow::anyhow!("the control plane did not become ready; it exited");
        assert!(!port_was_taken(&other));
    }
}
