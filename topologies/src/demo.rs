//! The demo workloads `mesh up` runs: a service that answers HTTP and gRPC
//! with who it is and which caller the mesh said called (optionally calling
//! further services first), and a load generator that reports its own
//! success and latency. Both reach other services through their proxy
//! (`HTTP_PROXY`), as any unmodified app would.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

pub mod pb {
    tonic::include_proto!("demo.v1");
}

use pb::{
    HelloReply, HelloRequest,
    demo_client::DemoClient,
    demo_server::{Demo, DemoServer},
};

#[derive(Debug, Subcommand)]
pub enum DemoCmd {
    /// Serve HTTP (and gRPC): answer with this cluster, workload and the caller's identity.
    Serve(ServeArgs),
    /// Send a steady rate of HTTP (and gRPC) requests and report success and latency.
    Load(LoadArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The cluster reported in answers.
    #[arg(long, env = "MESH_CLUSTER", default_value = "local")]
    pub cluster: String,
    /// The workload replica reported in answers.
    #[arg(long, env = "MESH_WORKLOAD", default_value = "demo")]
    pub workload: String,
    /// The address to listen on.
    #[arg(long, env = "MESH_WORKLOAD_IP", default_value = "127.0.0.1")]
    pub ip: IpAddr,
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Serve gRPC (`demo.v1.Demo`) on this port too.
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// Call these URLs (through HTTP_PROXY) for every request, and answer 502 when one fails.
    #[arg(long = "call")]
    pub calls: Vec<Uri>,
    /// The proxy to reach other services through (`http://host:port`).
    #[arg(long, env = "HTTP_PROXY")]
    pub http_proxy: Option<String>,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The URL to GET (an absolute `http://` URL; sent through HTTP_PROXY).
    #[arg(long)]
    pub target: Uri,
    /// A gRPC server to call `demo.v1.Demo/Hello` on (`http://host:port`).
    #[arg(long)]
    pub grpc_target: Option<Uri>,
    /// Requests per second, all kinds together.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// The share of requests that are gRPC (with --grpc-target), 0 to 1.
    #[arg(long, default_value_t = 0.25)]
    pub grpc_share: f64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Per-request timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How long to wait for the first success of each kind before counting.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Write the numbers here (JSON) every second.
    #[arg(long, env = "MESH_DEMO_STATS")]
    pub stats_file: Option<PathBuf>,
    /// The proxy to send through (`http://host:port`).
    #[arg(long, env = "HTTP_PROXY")]
    pub http_proxy: Option<String>,
    /// Stop after this long (default: run until stopped).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

pub fn run(cmd: DemoCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            DemoCmd::Serve(args) => serve(args).await,
            DemoCmd::Load(args) => load(args).await,
        }
    })
}

/// `http://host:port` of a proxy as a socket address.
fn proxy_addr(proxy: &str) -> Result<SocketAddr> {
    let uri: Uri = proxy
        .parse()
        .with_context(|| format!("HTTP_PROXY {proxy:?} is not a URL"))?;
    let host = uri
        .host()
        .with_context(|| format!("HTTP_PROXY {proxy:?} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    format!("{host}:{port}")
        .parse()
        .with_context(|| format!("HTTP_PROXY {proxy:?}: give an IP address and a port"))
}

/// A kept connection and where it goes.
type Idle = (SocketAddr, SendRequest<Full<Bytes>>);

/// HTTP/1.1 through a proxy (absolute-form requests), keeping connections
/// for reuse.
#[derive(Clone, Debug)]
pub struct ProxyClient {
    /// The proxy, or `None` to connect to each URL's host directly.
    proxy: Option<SocketAddr>,
    idle: Arc<Mutex<Vec<Idle>>>,
}

impl ProxyClient {
    pub fn new(proxy: Option<&str>) -> Result<Self> {
        Ok(ProxyClient {
            proxy: proxy.map(proxy_addr).transpose()?,
            idle: Default::default(),
        })
    }

    /// `GET url`: the status and body.
    pub async fn get(&self, url: &Uri, timeout: Duration) -> Result<(StatusCode, Bytes)> {
        tokio::time::timeout(timeout, self.get_inner(url))
            .await
            .unwrap_or_else(|_| bail!("timed out after {timeout:?}"))
    }

    async fn get_inner(&self, url: &Uri) -> Result<(StatusCode, Bytes)> {
        let authority = url
            .authority()
            .with_context(|| format!("{url} is not an absolute URL"))?
            .clone();
        let addr = match self.proxy {
            Some(proxy) => proxy,
            None => tokio::net::lookup_host(authority.as_str())
                .await?
                .next()
                .with_context(|| format!("{authority} does not resolve"))?,
        };
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.iter()
                .position(|(a, s)| *a == addr && !s.is_closed())
                .map(|i| idle.swap_remove(i).1)
        };
        let mut send = match reused {
            Some(send) => send,
            None => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connect {addr}"))?;
                tcp.set_nodelay(true)?;
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                send
            }
        };
        send.ready().await?;
        // Through a proxy the request names the whole URL (absolute form).
        let uri = if self.proxy.is_some() {
            url.clone()
        } else {
            url.path_and_query()
                .map_or("/", |p| p.as_str())
                .parse()
                .expect("a path is a URI")
        };
        let req = Request::get(uri)
            .header(http::header::HOST, authority.as_str())
            .body(Full::new(Bytes::new()))?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !send.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((addr, send));
        }
        Ok((status, body))
    }
}

/// A gRPC channel to `target` through the proxy (HTTP/2 prior knowledge,
/// the `:authority` naming the service), or directly without one.
fn grpc_channel(target: &Uri, proxy: Option<SocketAddr>) -> Result<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(target.to_string())?
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2));
    Ok(match proxy {
        Some(proxy) => {
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| async move {
                let tcp = TcpStream::connect(proxy).await?;
                tcp.set_nodelay(true)?;
                Ok::<_, std::io::Error>(TokioIo::new(tcp))
            }))
        }
        None => endpoint.connect_lazy(),
    })
}

/// What a demo service answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub cluster: String,
    pub workload: String,
    /// The caller's SPIFFE ID as the server's proxy verified it, or `-`.
    pub client_id: String,
    /// What the services it called answered, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug)]
struct Server {
    cluster: String,
    workload: String,
    calls: Vec<Uri>,
    client: ProxyClient,
}

impl Server {
    /// The answer to a caller `client_id`, after calling every upstream.
    async fn answer(&self, client_id: String) -> (StatusCode, Answer) {
        let mut answer = Answer {
            cluster: self.cluster.clone(),
            workload: self.workload.clone(),
            client_id,
            calls: Vec::new(),
            error: None,
        };
        // Every upstream at once; answers keep the order of `--call`.
        let mut set = tokio::task::JoinSet::new();
        for (i, url) in self.calls.iter().enumerate() {
            let (client, url) = (self.client.clone(), url.clone());
            set.spawn(async move {
                let result = match client.get(&url, Duration::from_secs(4)).await {
                    Ok((status, body)) if status.is_success() => Ok(serde_json::from_slice(&body)
                        .unwrap_or_else(|_| {
                            serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
                        })),
                    Ok((status, body)) => Err(format!(
                        "{url}: {status} {}",
                        String::from_utf8_lossy(&body).trim()
                    )),
                    Err(e) => Err(format!("{url}: {e:#}")),
                };
                (i, result)
            });
        }
        let mut results = set.join_all().await;
        results.sort_by_key(|(i, _)| *i);
        let mut status = StatusCode::OK;
        for (_, result) in results {
            match result {
                Ok(v) => answer.calls.push(v),
                Err(e) => {
                    status = StatusCode::BAD_GATEWAY;
                    answer.error = Some(e);
                }
            }
        }
        (status, answer)
    }
}

#[tonic::async_trait]
impl Demo for Server {
    async fn hello(
        &self,
        req: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        let client_id = req
            .metadata()
            .get("mesh-client-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        Ok(tonic::Response::new(HelloReply {
            cluster: self.cluster.clone(),
            workload: self.workload.clone(),
            client_id,
            message: req.into_inner().message,
        }))
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let server = Server {
        cluster: args.cluster,
        workload: args.workload,
        calls: args.calls,
        client: ProxyClient::new(args.http_proxy.as_deref())?,
    };
    let http_addr = SocketAddr::new(args.ip, args.http_port);
    let listener = TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("cannot listen on {http_addr}"))?;
    if let Some(port) = args.grpc_port {
        let addr = SocketAddr::new(args.ip, port);
        let grpc = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let svc = DemoServer::new(server.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
        tracing::info!(%addr, "serving gRPC");
    }
    tracing::info!(addr = %http_addr, calls = server.calls.len(), "serving HTTP");
    let server = Arc::new(server);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let server = server.clone();
                async move {
                    let client_id = req
                        .headers()
                        .get("mesh-client-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let (status, answer) = server.answer(client_id).await;
                    let body = serde_json::to_vec(&answer).unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .header(http::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .expect("a valid response"),
                    )
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// The numbers of one kind of request (`http` or `grpc`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KindStats {
    pub ok: u64,
    pub failed: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The last failure, for the live view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What the load generator reports (in `--stats-file`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadStats {
    pub target: String,
    /// Seconds since counting started (after warm-up).
    pub elapsed_s: f64,
    /// Whether warm-up is over (each kind succeeded once).
    pub counting: bool,
    pub http: KindStats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<KindStats>,
    /// The caller identity the last answer reported (end-to-end identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_answer: Option<serde_json::Value>,
}

impl LoadStats {
    pub fn ok(&self) -> u64 {
        self.http.ok + self.grpc.as_ref().map_or(0, |g| g.ok)
    }

    pub fn failed(&self) -> u64 {
        self.http.failed + self.grpc.as_ref().map_or(0, |g| g.failed)
    }
}

#[derive(Debug, Default)]
struct Recorder {
    ok: u64,
    failed: u64,
    /// Latencies in microseconds, at most [`MAX_SAMPLES`].
    samples: Vec<u32>,
    last_error: Option<String>,
}

const MAX_SAMPLES: usize = 1_000_000;

impl Recorder {
    fn record(&mut self, result: Result<Duration, String>) {
        match result {
            Ok(latency) => {
                self.ok += 1;
                if self.samples.len() < MAX_SAMPLES {
                    self.samples
                        .push(latency.as_micros().min(u32::MAX as u128) as u32);
                }
            }
            Err(e) => {
                self.failed += 1;
                self.last_error = Some(e);
            }
        }
    }

    fn stats(&self) -> KindStats {
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let q = |q: f64| {
            (!sorted.is_empty()).then(|| {
                let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
                sorted[i] as f64 / 1000.0
            })
        };
        KindStats {
            ok: self.ok,
            failed: self.failed,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            last_error: self.last_error.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Http,
    Grpc,
}

#[derive(Debug)]
struct Loader {
    target: Uri,
    timeout: Duration,
    client: ProxyClient,
    grpc: Option<DemoClient<tonic::transport::Channel>>,
}

impl Loader {
    /// One request: its latency, or why it failed; and the answer.
    async fn once(&self, kind: Kind) -> (Result<Duration, String>, Option<serde_json::Value>) {
        let start = Instant::now();
        match kind {
            Kind::Http => match self.client.get(&self.target, self.timeout).await {
                Ok((status, body)) if status.is_success() => {
                    (Ok(start.elapsed()), serde_json::from_slice(&body).ok())
                }
                Ok((status, body)) => (
                    Err(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&body)
                            .chars()
                            .take(300)
                            .collect::<String>()
                    )),
                    None,
                ),
                Err(e) => (Err(format!("{e:#}")), None),
            },
            Kind::Grpc => {
                let mut client = self.grpc.clone().expect("gRPC requests need --grpc-target");
                match client
                    .hello(HelloRequest {
                        message: "hello".into(),
                    })
                    .await
                {
                    Ok(reply) => {
                        let r = reply.into_inner();
                        (
                            Ok(start.elapsed()),
                            Some(serde_json::json!({
                                "cluster": r.cluster,
                                "workload": r.workload,
                                "client_id": r.client_id,
                            })),
                        )
                    }
                    Err(status) => (
                        Err(format!("gRPC {:?}: {}", status.code(), status.message())),
                        None,
                    ),
                }
            }
        }
    }
}

async fn load(args: LoadArgs) -> Result<()> {
    if !(args.rate > 0.0 && args.rate <= 100_000.0) {
        bail!("--rate {} must be above 0 and at most 100000", args.rate);
    }
    if !(0.0..=1.0).contains(&args.grpc_share) {
        bail!("--grpc-share {} must be between 0 and 1", args.grpc_share);
    }
    let proxy = args.http_proxy.as_deref().map(proxy_addr).transpose()?;
    let loader = Arc::new(Loader {
        target: args.target.clone(),
        timeout: args.timeout,
        client: ProxyClient::new(args.http_proxy.as_deref())?,
        grpc: args
            .grpc_target
            .as_ref()
            .map(|t| grpc_channel(t, proxy).map(DemoClient::new))
            .transpose()?,
    });
    let kinds: Vec<Kind> = if loader.grpc.is_some() {
        vec![Kind::Http, Kind::Grpc]
    } else {
        vec![Kind::Http]
    };
    let stats = Arc::new(Mutex::new(LoadStats {
        target: args.target.to_string(),
        grpc: loader.grpc.as_ref().map(|_| KindStats::default()),
        ..Default::default()
    }));
    let writer = args.stats_file.clone().map(|path| {
        let stats = stats.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let json =
                    serde_json::to_vec_pretty(&*stats.lock().unwrap_or_else(|p| p.into_inner()))
                        .unwrap_or_default();
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, json).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        })
    });

    // Warm-up: each kind must succeed once before anything is counted.
    let warmup_until = Instant::now() + args.warmup;
    for kind in &kinds {
        loop {
            let (result, answer) = loader.once(*kind).await;
            match result {
                Ok(_) => {
                    stats.lock().unwrap_or_else(|p| p.into_inner()).last_answer = answer;
                    break;
                }
                Err(e) if Instant::now() < warmup_until => {
                    tracing::info!(?kind, error = %e, "waiting for the first success");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => bail!(
                    "no {kind:?} request to {} succeeded within the warm-up of {:?}: {e}",
                    args.target,
                    args.warmup
                ),
            }
        }
    }
    tracing::info!(target = %args.target, rate = args.rate, "warm-up done; counting");

    let recorders: Arc<Mutex<[Recorder; 2]>> = Default::default();
    let started = Instant::now();
    let permits = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent: u64 = 0;
    let mut last_report = Instant::now();
    loop {
        tick.tick().await;
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        // A fixed pattern gives exactly the asked share of gRPC requests.
        let grpc_due =
            ((sent + 1) as f64 * args.grpc_share).floor() > (sent as f64 * args.grpc_share).floor();
        let kind = if loader.grpc.is_some() && grpc_due {
            Kind::Grpc
        } else {
            Kind::Http
        };
        sent += 1;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            recorders.lock().unwrap_or_else(|p| p.into_inner())[kind as usize]
                .record(Err(format!("over {} requests in flight", args.concurrency)));
            continue;
        };
        let (loader, recorders_, stats_) = (loader.clone(), recorders.clone(), stats.clone());
        tokio::spawn(async move {
            let (result, answer) = loader.once(kind).await;
            recorders_.lock().unwrap_or_else(|p| p.into_inner())[kind as usize].record(result);
            // HTTP answers show the whole chain of calls.
            if answer.is_some() && kind == Kind::Http {
                stats_.lock().unwrap_or_else(|p| p.into_inner()).last_answer = answer;
            }
            drop(permit);
        });
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            update(&stats, &recorders, started);
        }
    }
    // Let requests in flight finish, then report once more.
    let _ = permits.acquire_many(args.concurrency.max(1) as u32).await;
    update(&stats, &recorders, started);
    if let Some(writer) = writer {
        writer.abort();
    }
    if let Some(path) = &args.stats_file {
        let json = serde_json::to_vec_pretty(&*stats.lock().unwrap_or_else(|p| p.into_inner()))?;
        std::fs::write(path, json)?;
    }
    let s = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
    tracing::info!(ok = s.ok(), failed = s.failed(), "done");
    Ok(())
}

fn update(stats: &Mutex<LoadStats>, recorders: &Mutex<[Recorder; 2]>, started: Instant) {
    let r = recorders.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    s.counting = true;
    s.elapsed_s = started.elapsed().as_secs_f64();
    s.http = r[Kind::Http as usize].stats();
    if s.grpc.is_some() {
        s.grpc = Some(r[Kind::Grpc as usize].stats());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_recorded_latencies() {
        let mut r = Recorder::default();
        for ms in 1..=100 {
            r.record(Ok(Duration::from_millis(ms)));
        }
        r.record(Err("boom".into()));
        let s = r.stats();
        assert_eq!((s.ok, s.failed), (100, 1));
        assert_eq!(s.p50_ms, Some(50.0));
        assert_eq!(s.p99_ms, Some(99.0));
        assert_eq!(s.last_error.as_deref(), Some("boom"));
        assert_eq!(Recorder::default().stats().p50_ms, None);
    }

    #[test]
    fn proxy_addresses() {
        assert_eq!(
            proxy_addr("http://127.1.1.1:4140").unwrap(),
            "127.1.1.1:4140".parse().unwrap()
        );
        assert!(proxy_addr("http://localhost:4140").is_err());
    }

    async fn futures_ports() -> Vec<TcpListener> {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        held
    }

    /// A server that calls another: the answer nests the upstream's, and
    /// an upstream failure turns into 502 naming it.
    #[tokio::test]
    async fn a_server_calls_its_upstreams_and_reports_failures() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_port = upstream.local_addr().unwrap().port();
        drop(upstream);
        tokio::spawn(serve(ServeArgs {
            cluster: "east".into(),
            workload: "api-0".into(),
            ip: "127.0.0.1".parse().unwrap(),
            http_port: up_port,
            grpc_port: None,
            calls: vec![],
            http_proxy: None,
        }));
        // Three free ports: two fronts and one where nothing listens.
        let held: Vec<TcpListener> = futures_ports().await;
        let [front_port, broken_port, dead_port] =
            [0, 1, 2].map(|i| held[i].local_addr().unwrap().port());
        drop(held);
        for (port, calls) in [
            (front_port, vec![format!("http://127.0.0.1:{up_port}/")]),
            (broken_port, vec![format!("http://127.0.0.1:{dead_port}/")]),
        ] {
            tokio::spawn(serve(ServeArgs {
                cluster: "west".into(),
                workload: "web-0".into(),
                ip: "127.0.0.1".parse().unwrap(),
                http_port: port,
                grpc_port: None,
                calls: calls.iter().map(|c| c.parse().unwrap()).collect(),
                http_proxy: None,
            }));
        }
        let client = ProxyClient::new(None).unwrap();
        let url: Uri = format!("http://127.0.0.1:{front_port}/").parse().unwrap();
        let (status, body) = loop {
            if let Ok(answer) = client.get(&url, Duration::from_secs(2)).await {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status, StatusCode::OK);
        let answer: Answer = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (answer.cluster.as_str(), answer.workload.as_str()),
            ("west", "web-0")
        );
        assert_eq!(answer.calls[0]["workload"], "api-0");
        assert_eq!(answer.calls[0]["client_id"], "-", "no proxy set the header");

        let url: Uri = format!("http://127.0.0.1:{broken_port}/").parse().unwrap();
        let (status, body) = loop {
            if let Ok(answer) = client.get(&url, Duration::from_secs(5)).await {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        let answer: Answer = serde_json::from_slice(&body).unwrap();
        assert!(answer.error.unwrap().contains(&dead_port.to_string()));
    }
}
