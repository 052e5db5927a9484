//! The proxy's configuration from `MESH_PROXY_*` variables, parsed once at
//! start with every error reported together. The binary hands in the
//! environment as a map; library code never reads it.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use mesh_core::identity::{SpiffeId, TrustDomain};

/// Where the proxy's first SVID comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// A join token in this file (from `mesh control token create`).
    TokenFile(PathBuf),
    /// An existing `leaf.crt` + `leaf.key` in this directory (renewed from then on).
    Credentials(PathBuf),
}

impl Bootstrap {
    /// From a component's flags: exactly one of a token file or a
    /// credentials directory.
    pub fn from_flags(
        token_file: Option<&PathBuf>,
        credentials_dir: Option<&PathBuf>,
    ) -> Result<Self, String> {
        match (token_file, credentials_dir) {
            (Some(token), None) => Ok(Self::TokenFile(token.clone())),
            (None, Some(dir)) => Ok(Self::Credentials(dir.clone())),
            _ => Err(
                "give --join-token-file (first start) or --credentials-dir (an existing SVID)"
                    .into(),
            ),
        }
    }
}

/// Who a `mesh-system` component is and where its control plane is: what
/// the gateway and the service mirror share with the proxy's join code.
#[derive(Clone, Debug)]
pub struct SystemComponent {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub service_account: &'static str,
    pub control_identity_addr: String,
    pub control_api_addr: String,
    /// Default: `spiffe://<td>/ns/mesh-system/sa/control`.
    pub control_identity: Option<SpiffeId>,
    pub trust_anchors: PathBuf,
    pub bootstrap: Bootstrap,
    /// Where it listens for mesh traffic (registered as its address).
    pub listen: SocketAddr,
    pub admin_addr: SocketAddr,
    /// `GET /metrics` only, on any address (for Prometheus).
    pub metrics_addr: Option<SocketAddr>,
}

impl SystemComponent {
    /// The settings the proxy's join, identity and renewal code need, for a
    /// component serving no app: `spiffe://<td>/ns/mesh-system/sa/<sa>`.
    pub fn config(self) -> Result<Config, String> {
        let id = |sa: &str| {
            SpiffeId::workload(&self.trust_domain, "mesh-system", sa).map_err(|e| e.to_string())
        };
        let control_identity = match self.control_identity {
            Some(id) => id,
            None => id("control")?,
        };
        let ip = self.listen.ip();
        Ok(Config {
            identity: id(self.service_account)?,
            cluster: self.cluster,
            trust_domain: self.trust_domain,
            namespace: "mesh-system".into(),
            service_account: self.service_account.into(),
            workload: self.service_account.into(),
            control_identity_addr: self.control_identity_addr,
            control_api_addr: self.control_api_addr,
            control_identity,
            trust_anchors: TrustAnchors::File(self.trust_anchors),
            bootstrap: self.bootstrap,
            inbound_addr: self.listen,
            outbound_addr: SocketAddr::new(ip, 0),
            admin_addr: self.admin_addr,
            app_ip: ip,
            app_ports: Vec::new(),
            workload_addresses: vec![ip],
            labels: BTreeMap::new(),
            inbound_fail_fast: Duration::from_secs(1),
            detect_timeout: Duration::from_secs(10),
            opaque_ports: Vec::new(),
            connect_timeout: CONNECT_TIMEOUT,
            header_read_timeout: Duration::from_secs(10),
            max_in_flight: 100_000,
            shutdown_grace: Duration::from_secs(30),
            worker_threads: 1,
            destinations: DestinationLimits::default(),
            via_gateway: None,
            metrics_addr: self.metrics_addr,
        })
    }
}

/// Bounds on the state the app's traffic creates in the proxy: every
/// distinct authority (or `ip:port`) it calls is a control-plane watch, a
/// task and a balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestinationLimits {
    /// A destination not called for this long is forgotten
    /// (`MESH_PROXY_DESTINATION_IDLE`, default 1 min, as Linkerd's
    /// discovery cache).
    pub idle: Duration,
    /// Destinations followed at once; a new one past this is refused with
    /// 503 (`MESH_PROXY_MAX_DESTINATIONS`, default 1000).
    pub max: usize,
}

impl Default for DestinationLimits {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            max: 1_000,
        }
    }
}

/// One application port the workload serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppPort {
    pub name: String,
    pub port: u16,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Cluster this workload runs in.
    pub cluster: String,
    pub trust_domain: TrustDomain,
    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`: who this proxy is.
    pub identity: SpiffeId,
    pub namespace: String,
    pub service_account: String,
    /// The workload (replica) name it registers as.
    pub workload: String,
    /// Control plane identity service (`host:port`).
    pub control_identity_addr: String,
    /// Control plane API (`host:port`).
    pub control_api_addr: String,
    /// The SPIFFE ID the control plane must present.
    pub control_identity: SpiffeId,
    /// Trust bundle of this trust domain (SPIFFE JSON or PEM).
    pub trust_anchors: TrustAnchors,
    pub bootstrap: Bootstrap,
    /// Meshed traffic from other proxies (mTLS).
    pub inbound_addr: SocketAddr,
    /// The app's outbound traffic (explicit or redirected).
    pub outbound_addr: SocketAddr,
    /// `/metrics`, `/ready`, `/live`; loopback only.
    pub admin_addr: SocketAddr,
    /// Where the app listens (its ports are `app_ports`).
    pub app_ip: IpAddr,
    pub app_ports: Vec<AppPort>,
    /// Addresses registered for discovery.
    pub workload_addresses: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// How long an inbound request waits for its port's policy before
    /// failing (closed).
    pub inbound_fail_fast: Duration,
    /// How long the outbound side waits for the app's first bytes before
    /// treating the connection as opaque TCP.
    pub detect_timeout: Duration,
    /// Destination ports whose traffic is opaque TCP without detection
    /// (server-speaks-first protocols: no wait for the detect timeout).
    pub opaque_ports: Vec<u16>,
    /// How long reaching a peer may take: TCP connect and TLS handshake to
    /// an endpoint's proxy or a gateway, and a tunnel stream's setup with
    /// its inner handshake (each on its own).
    pub connect_timeout: Duration,
    /// How long an HTTP/1 client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// Requests in flight per direction before new ones are shed with 503.
    pub max_in_flight: usize,
    /// How long shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
    /// Runtime threads: 1 (the default) runs everything on one thread,
    /// which costs the least CPU and memory per request.
    pub worker_threads: usize,
    /// Idle eviction and the cap on destinations followed.
    pub destinations: DestinationLimits,
    /// Set for a workload with no route to the cluster's workloads (a VM
    /// whose only route is to the cluster's gateway): the control plane,
    /// every endpoint and every caller are reached through the gateway.
    pub via_gateway: Option<GatewayRoute>,
    /// A metrics-only listener (`GET /metrics`, nothing else), which may
    /// be on the pod's address so Prometheus can scrape it; none by default.
    pub metrics_addr: Option<SocketAddr>,
}

/// The cluster's own gateway, as a workload behind it reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRoute {
    /// `host:port` of its tunnel listener.
    pub address: String,
    /// What it presents: `spiffe://<td>/ns/mesh-system/sa/gateway`.
    pub identity: SpiffeId,
}

const PREFIX: &str = "MESH_PROXY_";
/// A bundle given inline (`MESH_PROXY_TRUST_ANCHORS_BUNDLE`) is at most this
/// large.
const MAX_INLINE_BUNDLE: usize = 64 * 1024;

/// Where the trust domain's bundle comes from: a file, or the bundle
/// itself (how injected pods get it, in their spec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustAnchors {
    File(PathBuf),
    Inline(String),
}

impl TrustAnchors {
    pub fn load(
        &self,
        td: TrustDomain,
    ) -> Result<mesh_core::identity::TrustBundle, mesh_core::identity::files::FileError> {
        match self {
            Self::File(path) => mesh_core::identity::files::load_bundle(path, td),
            Self::Inline(text) => mesh_core::identity::TrustBundle::from_any(td, text.as_bytes())
                .map_err(|e| {
                    mesh_core::identity::files::FileError::invalid(
                        std::path::Path::new("MESH_PROXY_TRUST_ANCHORS_BUNDLE"),
                        e.to_string(),
                    )
                }),
        }
    }
}

/// How long reaching a peer may take by default (`MESH_PROXY_CONNECT_TIMEOUT`):
/// TCP connect and TLS handshake to an endpoint's proxy or a gateway, or a
/// tunnel stream's setup and its inner handshake, each on its own.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Parses the configuration from `vars` (the process environment).
pub fn parse(vars: &HashMap<String, String>) -> Result<Config, Vec<String>> {
    let mut errors = Vec::new();
    let get = |name: &str| {
        vars.get(&format!("{PREFIX}{name}"))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let mut required = |name: &str, what: &str| {
        get(name).unwrap_or_else(|| {
            errors.push(format!("{PREFIX}{name} is required ({what})"));
            String::new()
        })
    };
    let cluster = required("CLUSTER", "this cluster's name");
    let td_text = required("TRUST_DOMAIN", "e.g. west.mesh.local");
    let namespace = required("NAMESPACE", "the workload's namespace");
    let service_account = required("SERVICE_ACCOUNT", "the workload's service account");
    let workload = required("WORKLOAD", "this replica's name, e.g. web-0");
    let control_identity_addr =
        required("CONTROL_IDENTITY_ADDR", "control plane identity host:port");
    let control_api_addr = required("CONTROL_API_ADDR", "control plane API host:port");
    let trust_anchors = match (get("TRUST_ANCHORS"), get("TRUST_ANCHORS_BUNDLE")) {
        (Some(file), None) => Some(TrustAnchors::File(PathBuf::from(file))),
        (None, Some(text)) if text.len() <= MAX_INLINE_BUNDLE => Some(TrustAnchors::Inline(text)),
        (None, Some(text)) => {
            errors.push(format!(
                "{PREFIX}TRUST_ANCHORS_BUNDLE is {} bytes; at most {MAX_INLINE_BUNDLE}",
                text.len()
            ));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(format!(
                "{PREFIX}TRUST_ANCHORS (a file) and {PREFIX}TRUST_ANCHORS_BUNDLE (the bundle itself) are exclusive; give one"
            ));
            None
        }
        (None, None) => {
            errors.push(format!(
                "{PREFIX}TRUST_ANCHORS (the trust domain's bundle file) or {PREFIX}TRUST_ANCHORS_BUNDLE is required"
            ));
            None
        }
    };

    let trust_domain = TrustDomain::parse(&td_text);
    let identity = trust_domain
        .as_ref()
        .ok()
        .and_then(|td| SpiffeId::workload(td, &namespace, &service_account).ok());
    let trust_domain = match trust_domain {
        Ok(td) => Some(td),
        Err(e) => {
            if !td_text.is_empty() {
                errors.push(format!("{PREFIX}TRUST_DOMAIN {td_text:?}: {e}"));
            }
            None
        }
    };
    if identity.is_none()
        && trust_domain.is_some()
        && !namespace.is_empty()
        && !service_account.is_empty()
    {
        errors.push(format!(
            "{PREFIX}NAMESPACE/{PREFIX}SERVICE_ACCOUNT do not form a SPIFFE ID: {namespace:?}/{service_account:?}"
        ));
    }
    let control_identity = match get("CONTROL_IDENTITY") {
        Some(text) => SpiffeId::parse(&text)
            .map_err(|e| errors.push(format!("{PREFIX}CONTROL_IDENTITY: {e}")))
            .ok(),
        None => trust_domain
            .as_ref()
            .and_then(|td| SpiffeId::workload(td, "mesh-system", "control").ok()),
    };
    let bootstrap = match (get("JOIN_TOKEN_FILE"), get("CREDENTIALS_DIR")) {
        (Some(file), None) => Some(Bootstrap::TokenFile(file.into())),
        (None, Some(dir)) => Some(Bootstrap::Credentials(dir.into())),
        (Some(_), Some(_)) => {
            errors.push(format!(
                "set only one of {PREFIX}JOIN_TOKEN_FILE and {PREFIX}CREDENTIALS_DIR"
            ));
            None
        }
        (None, None) => {
            errors.push(format!(
                "{PREFIX}JOIN_TOKEN_FILE (first start) or {PREFIX}CREDENTIALS_DIR (existing leaf.crt/leaf.key) is required"
            ));
            None
        }
    };
    let mut addr = |name: &str, default: &str| {
        let text = get(name).unwrap_or_else(|| default.to_owned());
        text.parse::<SocketAddr>()
            .map_err(|e| errors.push(format!("{PREFIX}{name} {text:?}: {e}")))
            .ok()
    };
    let inbound_addr = addr("INBOUND_ADDR", "0.0.0.0:4143");
    let outbound_addr = addr("OUTBOUND_ADDR", "127.0.0.1:4140");
    let admin_addr = addr("ADMIN_ADDR", "127.0.0.1:4191");
    if let Some(a) = admin_addr.filter(|a| !a.ip().is_loopback()) {
        errors.push(format!(
            "{PREFIX}ADMIN_ADDR {a} is not loopback; admin endpoints bind to loopback only"
        ));
    }
    let metrics_addr = get("METRICS_ADDR").and_then(|text| {
        text.parse::<SocketAddr>()
            .map_err(|e| errors.push(format!("{PREFIX}METRICS_ADDR {text:?}: {e}")))
            .ok()
    });
    let app_ip = get("APP_IP")
        .unwrap_or_else(|| "127.0.0.1".into())
        .parse::<IpAddr>()
        .map_err(|e| errors.push(format!("{PREFIX}APP_IP: {e}")))
        .ok();
    let app_ports = parse_ports(&get("APP_PORTS").unwrap_or_default()).unwrap_or_else(|e| {
        errors.push(format!("{PREFIX}APP_PORTS: {e}"));
        Vec::new()
    });
    let workload_addresses = match get("WORKLOAD_ADDRESSES") {
        Some(list) => list
            .split(',')
            .map(|a| a.trim().parse::<IpAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| errors.push(format!("{PREFIX}WORKLOAD_ADDRESSES: {e}")))
            .unwrap_or_default(),
        None => inbound_addr
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .into_iter()
            .collect(),
    };
    if workload_addresses.is_empty() {
        errors.push(format!(
            "{PREFIX}WORKLOAD_ADDRESSES is required when {PREFIX}INBOUND_ADDR listens on all addresses"
        ));
    }
    let labels = parse_labels(&get("LABELS").unwrap_or_default()).unwrap_or_else(|e| {
        errors.push(format!("{PREFIX}LABELS: {e}"));
        BTreeMap::new()
    });
    let inbound_fail_fast = get("INBOUND_FAIL_FAST")
        .map(|t| {
            humantime::parse_duration(&t)
                .map_err(|e| errors.push(format!("{PREFIX}INBOUND_FAIL_FAST: {e}")))
        })
        .unwrap_or(Ok(Duration::from_secs(1)));

    let inbound_fail_fast = inbound_fail_fast.ok();
    let mut duration = |name: &str, default: u64| {
        get(name)
            .map(|t| {
                humantime::parse_duration(&t)
                    .map_err(|e| errors.push(format!("{PREFIX}{name}: {e}")))
            })
            .unwrap_or(Ok(Duration::from_secs(default)))
            .ok()
    };
    let header_read_timeout = duration("HEADER_READ_TIMEOUT", 10);
    let shutdown_grace = duration("SHUTDOWN_GRACE", 120);
    let connect_timeout = get("CONNECT_TIMEOUT")
        .map(|t| {
            humantime::parse_duration(&t)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    if t.is_zero() {
                        Err("must be more than zero".to_owned())
                    } else {
                        Ok(t)
                    }
                })
                .map_err(|e| errors.push(format!("{PREFIX}CONNECT_TIMEOUT: {e}")))
        })
        .unwrap_or(Ok(CONNECT_TIMEOUT))
        .ok();
    let worker_threads = get("WORKER_THREADS")
        .map(|v| v.parse::<usize>().ok().filter(|n| (1..=64).contains(n)))
        .unwrap_or(Some(1));
    if worker_threads.is_none() {
        errors.push(format!(
            "{PREFIX}WORKER_THREADS must be a number from 1 to 64"
        ));
    }
    let max_in_flight = get("MAX_IN_FLIGHT")
        .map(|v| v.parse::<usize>().ok().filter(|n| *n > 0))
        .unwrap_or(Some(100_000));
    if max_in_flight.is_none() {
        errors.push(format!("{PREFIX}MAX_IN_FLIGHT must be a positive number"));
    }
    let destination_idle = get("DESTINATION_IDLE")
        .map(|t| {
            humantime::parse_duration(&t)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    if t < Duration::from_secs(1) {
                        Err("must be at least 1s".to_owned())
                    } else {
                        Ok(t)
                    }
                })
                .map_err(|e| errors.push(format!("{PREFIX}DESTINATION_IDLE: {e}")))
        })
        .unwrap_or(Ok(DestinationLimits::default().idle))
        .ok();
    let max_destinations = get("MAX_DESTINATIONS")
        .map(|v| v.parse::<usize>().ok().filter(|n| *n > 0))
        .unwrap_or(Some(DestinationLimits::default().max));
    if max_destinations.is_none() {
        errors.push(format!(
            "{PREFIX}MAX_DESTINATIONS must be a positive number"
        ));
    }
    let detect_timeout = get("DETECT_TIMEOUT")
        .map(|t| {
            humantime::parse_duration(&t)
                .map_err(|e| errors.push(format!("{PREFIX}DETECT_TIMEOUT: {e}")))
        })
        .unwrap_or(Ok(Duration::from_secs(10)))
        .ok();
    let opaque_ports = get("OPAQUE_PORTS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u16>().ok().filter(|p| *p > 0))
        .collect::<Option<Vec<u16>>>()
        .unwrap_or_else(|| {
            errors.push(format!(
                "{PREFIX}OPAQUE_PORTS: write ports 1-65535, comma separated"
            ));
            Vec::new()
        });
    let via_gateway = match (get("VIA_GATEWAY"), trust_domain.as_ref()) {
        (Some(address), Some(td)) => match SpiffeId::workload(td, "mesh-system", "gateway") {
            Ok(identity) if address.contains(':') => Some(Some(GatewayRoute { address, identity })),
            _ => {
                errors.push(format!("{PREFIX}VIA_GATEWAY: give the gateway's host:port"));
                None
            }
        },
        _ => Some(None),
    };
    let built = (|| {
        Some(Config {
            cluster,
            trust_domain: trust_domain?,
            identity: identity?,
            namespace,
            service_account,
            workload,
            control_identity_addr,
            control_api_addr,
            control_identity: control_identity?,
            trust_anchors: trust_anchors?,
            bootstrap: bootstrap?,
            inbound_addr: inbound_addr?,
            outbound_addr: outbound_addr?,
            admin_addr: admin_addr?,
            app_ip: app_ip?,
            app_ports,
            workload_addresses,
            labels,
            inbound_fail_fast: inbound_fail_fast?,
            detect_timeout: detect_timeout?,
            opaque_ports,
            connect_timeout: connect_timeout?,
            header_read_timeout: header_read_timeout?,
            max_in_flight: max_in_flight?,
            shutdown_grace: shutdown_grace?,
            worker_threads: worker_threads?,
            destinations: DestinationLimits {
                idle: destination_idle?,
                max: max_destinations?,
            },
            via_gateway: via_gateway?,
            metrics_addr,
        })
    })();
    match built {
        Some(config) if errors.is_empty() => Ok(config),
        _ => Err(errors),
    }
}

/// `http=8080,grpc=9090` (or bare `8080`).
fn parse_ports(text: &str) -> Result<Vec<AppPort>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .enumerate()
        .map(|(i, item)| {
            let (name, port) = item.trim().split_once('=').unwrap_or(("", item.trim()));
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{item:?} is not NAME=PORT"))?;
            let name = if name.is_empty() {
                format!("port-{i}")
            } else {
                name.to_owned()
            };
            Ok(AppPort { name, port })
        })
        .collect()
}

/// `app=web,version=v1`.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("{l:?} is not KEY=VALUE"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_full_config_parses() {
        let c = parse(&vars(&[
            ("CLUSTER", "west"),
            ("TRUST_DOMAIN", "west.mesh.local"),
            ("NAMESPACE", "shop"),
            ("SERVICE_ACCOUNT", "api"),
            ("WORKLOAD", "api-0"),
            ("CONTROL_IDENTITY_ADDR", "127.0.0.1:8080"),
            ("CONTROL_API_ADDR", "127.0.0.1:8086"),
            ("TRUST_ANCHORS", "/ca/bundle.json"),
            ("JOIN_TOKEN_FILE", "/run/token"),
            ("INBOUND_ADDR", "127.0.0.5:4143"),
            ("APP_PORTS", "http=8080,9090"),
            ("LABELS", "app=api,version=v1"),
            ("CONNECT_TIMEOUT", "250ms"),
            ("OPAQUE_PORTS", "3306, 5432"),
        ]))
        .unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.opaque_ports, [3306, 5432]);
        assert_eq!(
            c.trust_anchors,
            TrustAnchors::File(PathBuf::from("/ca/bundle.json"))
        );
        assert_eq!(
            c.identity.as_str(),
            "spiffe://west.mesh.local/ns/shop/sa/api"
        );
        assert_eq!(
            c.control_identity.as_str(),
            "spiffe://west.mesh.local/ns/mesh-system/sa/control"
        );
        assert_eq!(
            c.workload_addresses,
            vec!["127.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            c.app_ports[1],
            AppPort {
                name: "port-1".into(),
                port: 9090
            }
        );
        assert_eq!(c.labels.get("version").map(String::as_str), Some("v1"));
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:4191");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errors = parse(&vars(&[
            ("TRUST_DOMAIN", "West"),
            ("ADMIN_ADDR", "0.0.0.0:4191"),
            ("APP_PORTS", "http=80x"),
            ("INBOUND_ADDR", "0.0.0.0:4143"),
            ("CONNECT_TIMEOUT", "0s"),
            ("OPAQUE_PORTS", "3306,0"),
            ("TRUST_ANCHORS", "/ca/bundle.json"),
            ("TRUST_ANCHORS_BUNDLE", "{}"),
        ]))
        .unwrap_err();
        let all = errors.join("\n");
        for want in [
            "MESH_PROXY_CLUSTER is required",
            "MESH_PROXY_NAMESPACE is required",
            "MESH_PROXY_TRUST_DOMAIN \"West\": trust domain must be lower case",
            "MESH_PROXY_JOIN_TOKEN_FILE (first start) or MESH_PROXY_CREDENTIALS_DIR",
            "MESH_PROXY_ADMIN_ADDR 0.0.0.0:4191 is not loopback",
            "MESH_PROXY_APP_PORTS: \"http=80x\" is not NAME=PORT",
            "MESH_PROXY_WORKLOAD_ADDRESSES is required",
            "MESH_PROXY_CONNECT_TIMEOUT: must be more than zero",
            "MESH_PROXY_OPAQUE_PORTS: write ports 1-65535",
            "MESH_PROXY_TRUST_ANCHORS (a file) and MESH_PROXY_TRUST_ANCHORS_BUNDLE (the bundle itself) are exclusive",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    /// The bundle given inline (what injected pods get) loads like the
    /// file; one that is not a bundle is refused naming the variable.
    #[test]
    fn an_inline_bundle_loads() {
        let td = TrustDomain::parse("west.mesh.local").unwrap();
        let root = mesh_core::identity::RootCa::generate(
            Duration::from_secs(3600),
            mesh_core::identity::cert::now(),
        )
        .unwrap();
        let pem = mesh_core::identity::cert::certs_to_pem(std::slice::from_ref(root.cert()));
        let inline = TrustAnchors::Inline(pem);
        assert_eq!(inline.load(td.clone()).unwrap().roots().len(), 1);
        let bad = TrustAnchors::Inline("not a bundle".into());
        let e = bad.load(td).unwrap_err().to_string();
        assert!(e.contains("MESH_PROXY_TRUST_ANCHORS_BUNDLE"), "{e}");
    }
}
