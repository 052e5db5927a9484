//! `mesh control` (and the `mesh-control` binary): flags and `MESH_CONTROL_*`
//! environment variables, parsed once, every error reported together.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Subcommand};

use crate::{
    ControlPlane,
    admin_socket::{self, AdminRequest},
    config::Config,
    index::Liveness,
    store::LocalStore,
};

/// Run the control plane, or manage a running one.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ControlArgs {
    #[command(subcommand)]
    pub command: Option<ControlCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum ControlCommand {
    /// Join tokens for workloads that are not on Kubernetes.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use join token bound to a namespace and service account.
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// Namespace of the workload that will join.
    #[arg(long = "ns")]
    namespace: String,
    /// Service account of the workload that will join.
    #[arg(long = "sa")]
    service_account: String,
    /// How long the token may be used.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The workload (replica) name it is for. Its identity may then
    /// register this workload only, with exactly `--labels` and (when given)
    /// only `--addresses`. Without it the identity may register nothing
    /// (what a gateway or a service mirror needs).
    #[arg(long)]
    workload: Option<String>,
    /// The workload's labels, `app=web,version=v1` (with --workload).
    #[arg(long, requires = "workload", value_parser = parse_labels, default_value = "")]
    labels: std::collections::BTreeMap<String, String>,
    /// Addresses it may register, `10.0.0.5,10.0.0.6` (with --workload);
    /// without: any address no other workload holds.
    #[arg(long, requires = "workload", value_delimiter = ',')]
    addresses: Vec<std::net::IpAddr>,
    /// Application ports it may register, `5432,8080` (with --workload);
    /// without: any.
    #[arg(long, requires = "workload", value_delimiter = ',')]
    ports: Vec<u16>,
    /// The control plane's data directory: its admin socket is used when it
    /// runs, otherwise the database is opened directly.
    #[arg(long, env = "MESH_CONTROL_DATA_DIR", conflicts_with = "admin_socket")]
    data_dir: Option<PathBuf>,
    /// A running control plane's admin socket.
    #[arg(long, env = "MESH_CONTROL_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Local,
    Kube,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// This cluster's name.
    #[arg(long, env = "MESH_CONTROL_CLUSTER")]
    cluster: Option<String>,
    /// DNS suffix of service names.
    #[arg(
        long,
        env = "MESH_CONTROL_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    cluster_domain: String,
    /// CA directory (from `mesh identity ca create`).
    #[arg(long, env = "MESH_CONTROL_CA", conflicts_with = "ca_secret")]
    ca: Option<PathBuf>,
    /// With `--store kube`: the Secret `NAMESPACE/NAME` holding the issuer
    /// (root.crt, issuer.crt, issuer.key, bundle.json; `mesh install --ca`
    /// creates mesh-system/mesh-issuer), reloaded when it changes.
    #[arg(long, env = "MESH_CONTROL_CA_SECRET")]
    ca_secret: Option<String>,
    /// With `--store kube`: this replica's name in the writer Lease
    /// [default: the host name and process id].
    #[arg(long, env = "MESH_CONTROL_POD_NAME")]
    pod_name: Option<String>,
    /// With `--store kube`: serve the sidecar injection webhook (HTTPS,
    /// `POST /inject`) here; `mesh install` sets 0.0.0.0:8443.
    #[arg(long, env = "MESH_CONTROL_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,
    /// Lifetime of the webhook's serving certificate, issued by this
    /// control plane and renewed at half life without a restart.
    #[arg(long, env = "MESH_CONTROL_WEBHOOK_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    webhook_cert_ttl: Duration,
    /// Where resources and workloads come from: `local` (a watched
    /// directory of YAML, registrations in an embedded database) or `kube`
    /// (the API server: Services, EndpointSlices, Pods and Mesh CRDs).
    #[arg(long, env = "MESH_CONTROL_STORE", value_enum, default_value = "local")]
    store: StoreKind,
    /// With `--store kube`: the kubeconfig [default: KUBECONFIG,
    /// ~/.kube/config, or the in-cluster service account].
    #[arg(long, env = "MESH_CONTROL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Directory of resource YAML files (watched; `--store local`).
    #[arg(long, env = "MESH_CONTROL_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Directory for the state database and admin socket.
    #[arg(long, env = "MESH_CONTROL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Identity service (Certify) listen address.
    #[arg(
        long,
        env = "MESH_CONTROL_IDENTITY_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    identity_addr: SocketAddr,
    /// Discovery/Policy/Registry listen address (mTLS).
    #[arg(long, env = "MESH_CONTROL_API_ADDR", default_value = "0.0.0.0:8086")]
    api_addr: SocketAddr,
    /// Admin HTTP (/metrics, /ready, /live); loopback only.
    #[arg(
        long,
        env = "MESH_CONTROL_ADMIN_ADDR",
        default_value = "127.0.0.1:9990"
    )]
    admin_addr: SocketAddr,
    /// A metrics-only listener (`GET /metrics`, nothing else) Prometheus
    /// can scrape from outside the pod; none by default.
    #[arg(long, env = "MESH_CONTROL_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Admin socket path [default: DATA_DIR/admin.sock].
    #[arg(long, env = "MESH_CONTROL_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// Expected interval between workload heartbeats.
    #[arg(long, env = "MESH_CONTROL_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Missed heartbeats before a workload is not ready.
    #[arg(long, env = "MESH_CONTROL_HEARTBEAT_MISSES", default_value_t = 3)]
    heartbeat_misses: u32,
    /// Time without heartbeats before a registration is removed.
    #[arg(long, env = "MESH_CONTROL_REMOVAL_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    removal_grace: Duration,
    /// How often the config directory and issuer files are checked.
    #[arg(long, env = "MESH_CONTROL_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Default and maximum SVID lifetime.
    #[arg(long, env = "MESH_CONTROL_LEAF_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    leaf_ttl: Duration,
    /// Certify requests one identity may burst.
    #[arg(long, env = "MESH_CONTROL_CERTIFY_BURST", default_value_t = 100)]
    certify_burst: u32,
    /// Certify requests per second one identity may sustain.
    #[arg(long, env = "MESH_CONTROL_CERTIFY_RATE", default_value_t = 10.0)]
    certify_rate: f64,
    /// Registered workloads one namespace may hold; more are refused.
    #[arg(long, env = "MESH_CONTROL_MAX_WORKLOADS_PER_NAMESPACE", default_value_t = crate::index::MAX_WORKLOADS_PER_NAMESPACE)]
    max_workloads_per_namespace: usize,
    /// This cluster's gateway as its own workloads reach it (`host:port`,
    /// repeat for several): VMs whose only route is to the gateway are
    /// reached through it.
    #[arg(
        long = "gateway-addr",
        env = "MESH_CONTROL_GATEWAY_ADDR",
        value_delimiter = ','
    )]
    gateway_addresses: Vec<String>,
}

impl RunArgs {
    /// The typed config, or every problem at once.
    pub fn into_config(self) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let mut need = |v: Option<PathBuf>, flag: &str| {
            if v.is_none() {
                errors.push(format!("{flag} is required"));
            }
            v.unwrap_or_default()
        };
        let mut store_errors: Vec<String> = Vec::new();
        let ca_secret = match &self.ca_secret {
            None => None,
            Some(text) => match crate::k8s::issuer::parse_ref(text) {
                Ok(r) => Some(r),
                Err(e) => {
                    store_errors.push(e);
                    None
                }
            },
        };
        let ca_dir = if self.ca_secret.is_some() {
            // Written from the Secret under the data directory.
            self.data_dir.clone().unwrap_or_default().join("issuer")
        } else {
            need(
                self.ca,
                "--ca (MESH_CONTROL_CA) or, with --store kube, --ca-secret",
            )
        };
        let kube = self.store == StoreKind::Kube;
        let config_dir = if kube {
            if self.config_dir.is_some() {
                store_errors.push("--config-dir is for --store local; with --store kube resources come from the API server".into());
            }
            PathBuf::new()
        } else {
            need(self.config_dir, "--config-dir (MESH_CONTROL_CONFIG_DIR)")
        };
        let data_dir = need(self.data_dir, "--data-dir (MESH_CONTROL_DATA_DIR)");
        if !kube && self.kubeconfig.is_some() {
            store_errors.push("--kubeconfig is for --store kube".into());
        }
        if !kube && ca_secret.is_some() {
            store_errors.push("--ca-secret is for --store kube".into());
        }
        if !kube && self.webhook_addr.is_some() {
            store_errors.push("--webhook-addr is for --store kube".into());
        }
        if self.webhook_cert_ttl < Duration::from_secs(10) {
            store_errors.push("--webhook-cert-ttl must be at least 10s".into());
        }
        errors.extend(store_errors);
        let cluster = self.cluster.unwrap_or_default();
        if let Err(e) = crate::resources::parse::check_name("--cluster", &cluster) {
            errors.push(e);
        }
        if !self.admin_addr.ip().is_loopback() {
            errors.push(format!(
                "--admin-addr {} is not loopback; admin endpoints bind to loopback only",
                self.admin_addr
            ));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_misses == 0 {
            errors
                .push("--heartbeat-interval and --heartbeat-misses must be more than zero".into());
        }
        if self.poll_interval.is_zero() || self.leaf_ttl < Duration::from_secs(60) {
            errors.push("--poll-interval must be more than zero and --leaf-ttl at least 1m".into());
        }
        if self.certify_rate.is_nan() || self.certify_rate <= 0.0 || self.certify_burst == 0 {
            errors.push("--certify-rate and --certify-burst must be more than zero".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let admin_socket = self
            .admin_socket
            .unwrap_or_else(|| data_dir.join(admin_socket::SOCKET_FILE));
        Ok(Config {
            cluster,
            cluster_domain: self.cluster_domain,
            ca_dir,
            config_dir,
            data_dir,
            identity_addr: self.identity_addr,
            api_addr: self.api_addr,
            admin_addr: self.admin_addr,
            metrics_addr: self.metrics_addr,
            admin_socket,
            liveness: Liveness {
                heartbeat_interval: self.heartbeat_interval,
                misses: self.heartbeat_misses,
                grace: self.removal_grace,
            },
            poll_interval: self.poll_interval,
            leaf_ttl: self.leaf_ttl,
            certify_burst: self.certify_burst,
            certify_rate: self.certify_rate,
            max_workloads_per_namespace: self.max_workloads_per_namespace,
            gateway_addresses: self.gateway_addresses,
            kube: kube.then_some(crate::config::KubeSettings {
                kubeconfig: self.kubeconfig,
                ca_secret,
                webhook_addr: self.webhook_addr,
                webhook_cert_ttl: self.webhook_cert_ttl,
                replica: self.pod_name.unwrap_or_else(|| {
                    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .map(|h| h.trim().to_owned())
                        .unwrap_or_else(|_| "control".into());
                    format!("{host}-{}", std::process::id())
                }),
            }),
        })
    }
}

/// Runs `mesh control ...` to completion.
pub fn run(args: ControlArgs) -> ExitCode {
    let runtime = match mesh_core::shutdown::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        Some(ControlCommand::Token(TokenCommand::Create(t))) => runtime.block_on(token_create(t)),
        None => match args.run.into_config() {
            Ok(config) => runtime.block_on(serve(config)),
            Err(errors) => Err(anyhow::anyhow!(
                "invalid configuration:\n  {}",
                errors.join("\n  ")
            )),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let plane = ControlPlane::start(config).await?;
    mesh_core::shutdown::signal().await;
    tracing::info!("shutting down");
    plane.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

/// `k=v,k2=v2` (empty: no labels).
pub fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| format!("{kv:?} is not KEY=VALUE"))
        })
        .collect()
}

/// Asks a running control plane (its admin socket) for a join token.
pub async fn request_token(
    socket: &std::path::Path,
    namespace: String,
    service_account: String,
    ttl: Duration,
    claims: Option<crate::store::WorkloadClaims>,
) -> anyhow::Result<admin_socket::AdminResponse> {
    let req = AdminRequest::CreateToken {
        namespace,
        service_account,
        ttl_seconds: ttl.as_secs(),
        claims,
    };
    let resp = admin_socket::request(socket, &req).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the control plane at {}: {e}; is it running?",
            socket.display()
        )
    })?;
    if let Some(err) = resp.error {
        anyhow::bail!("{err}");
    }
    Ok(resp)
}

async fn token_create(args: TokenCreateArgs) -> anyhow::Result<()> {
    let who = format!("ns/{}/sa/{}", args.namespace, args.service_account);
    let claims = args
        .workload
        .clone()
        .map(|workload| crate::store::WorkloadClaims {
            workload,
            labels: args.labels.clone(),
            addresses: args.addresses.clone(),
            ports: args.ports.clone(),
        });
    let socket = match (&args.admin_socket, &args.data_dir) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(dir)) => Some(dir.join(admin_socket::SOCKET_FILE)).filter(|p| p.exists()),
        (None, None) => anyhow::bail!("pass --data-dir DIR or --admin-socket PATH"),
    };
    let (token, expires_at) = match socket {
        Some(path) => {
            let resp = request_token(
                &path,
                args.namespace,
                args.service_account,
                args.ttl,
                claims,
            )
            .await?;
            (
                resp.token.unwrap_or_default(),
                resp.expires_at.unwrap_or_default(),
            )
        }
        None => {
            // No control plane running: write to its database directly.
            let dir = args.data_dir.unwrap_or_default();
            let store = LocalStore::open(&dir)?;
            let now = mesh_core::identity::cert::now().unix_timestamp();
            let (token, record) = admin_socket::create_token(
                &store,
                &args.namespace,
                &args.service_account,
                args.ttl,
                now,
                claims,
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            (token, record.expires_at)
        }
    };
    let expires = time::OffsetDateTime::from_unix_timestamp(expires_at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| expires_at.to_string());
    eprintln!("join token for {who}, single use, valid until {expires}:");
    #[allow(clippy::print_stdout)]
    {
        println!("{token}");
    }
    Ok(())
}
