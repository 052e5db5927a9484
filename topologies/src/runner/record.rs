//! What a run is made of and records in `mesh-up.json`: components, clusters,
//! replicas.

use super::*;

/// What a component is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Control,
    Gateway,
    ServiceMirror,
    Proxy,
    App,
    /// The cluster's Prometheus (scraping every admin endpoint for viz).
    Prometheus,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Control => "control",
            Kind::Gateway => "gateway",
            Kind::ServiceMirror => "service-mirror",
            Kind::Proxy => "proxy",
            Kind::App => "app",
            Kind::Prometheus => "prometheus",
        })
    }
}

/// How the runner knows a component is ready.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ready {
    /// `GET /ready` on this admin address answers 200.
    Admin(SocketAddr),
    /// Every address accepts TCP connections.
    Ports(Vec<SocketAddr>),
    /// Still running a moment after start.
    Alive,
}

/// One process the run keeps going.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Component {
    /// `<cluster>/<component>`, e.g. `west/gateway` or `west/web-0/proxy`.
    pub name: String,
    pub cluster: String,
    pub kind: Kind,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A fresh join token is written here before each start.
    pub token: Option<TokenFor>,
    /// A VM agent joins (once) before its first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_join: Option<super::vms::VmJoin>,
    pub ready: Ready,
    pub log: PathBuf,
    /// Started after the rest is ready (load generators).
    pub traffic: bool,
    pub pid: Option<u32>,
    pub restarts: u32,
    /// Stopped on purpose ([`Run::hold`]): not restarted.
    #[serde(default)]
    pub held: bool,
    /// The network namespace it runs in (`network: namespaces`).
    #[serde(default)]
    pub netns: Option<String>,
    /// What the process ends up running (`program` may be `ip netns exec`
    /// and `setpriv`, which exec it): how its pid is told from a reused one.
    #[serde(default)]
    pub exe: PathBuf,
}

impl Component {
    /// A component not started yet, running `program` itself: no join
    /// token, no environment of its own, no namespace, not traffic.
    pub(super) fn new(
        name: String,
        cluster: &str,
        kind: Kind,
        program: &Path,
        args: Vec<String>,
        ready: Ready,
        log: PathBuf,
    ) -> Self {
        Self {
            name,
            cluster: cluster.to_owned(),
            kind,
            program: program.to_owned(),
            args,
            env: Vec::new(),
            token: None,
            vm_join: None,
            ready,
            log,
            traffic: false,
            pid: None,
            restarts: 0,
            held: false,
            netns: None,
            exe: program.to_owned(),
        }
    }

    /// Whether its last process still runs.
    pub fn alive(&self) -> bool {
        let exe = if self.exe.as_os_str().is_empty() {
            &self.program
        } else {
            &self.exe
        };
        self.pid
            .is_some_and(|pid| process_alive(pid, Some(&exe.to_string_lossy())))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenFor {
    pub namespace: String,
    pub service_account: String,
    pub file: PathBuf,
    /// The workload it is for: name, labels and address (a replica's
    /// proxy); `None` for system components, which register nothing.
    #[serde(default)]
    pub claims: Option<mesh_control::store::WorkloadClaims>,
}

/// One cluster's addresses and directories.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub trust_domain: String,
    pub dir: PathBuf,
    pub control_identity: SocketAddr,
    pub control_api: SocketAddr,
    pub control_admin: SocketAddr,
    /// Set when another cluster links to this one.
    pub gateway: Option<SocketAddr>,
    pub gateway_admin: Option<SocketAddr>,
    /// Set when this cluster links to another.
    pub mirror_admin: Option<SocketAddr>,
    /// Linked clusters this one mirrors, with how many services each exports.
    pub mirrors: BTreeMap<String, usize>,
    pub replicas: Vec<ReplicaInfo>,
    /// The cluster's Prometheus, when viz runs.
    #[serde(default)]
    pub prometheus: Option<SocketAddr>,
    /// Its viz (API and dashboard), when viz runs.
    #[serde(default)]
    pub viz: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// `<workload>-<i>`.
    pub name: String,
    pub workload: String,
    pub namespace: String,
    pub service_account: String,
    pub ip: IpAddr,
    pub proxy_admin: SocketAddr,
    /// Where a load generator writes its numbers.
    pub stats: PathBuf,
    /// Its network namespace (`network: namespaces`); its proxy's admin
    /// listens on that namespace's loopback.
    #[serde(default)]
    pub netns: Option<String>,
    /// Set for a VM: how its namespace is routed.
    #[serde(default)]
    pub vm: Option<VmRoute>,
}

/// A VM's route out of its namespace (`network: namespaces`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRoute {
    /// Through the cluster's host address, as a pod.
    Default,
    /// To the cluster's gateway only.
    GatewayOnly(IpAddr),
}

impl ClusterInfo {
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }
}

/// What `mesh status` and `mesh down` read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub topology: String,
    pub file: PathBuf,
    /// The process supervising the run (`mesh up`).
    pub supervisor: u32,
    pub started_at: i64,
    pub stopped: bool,
    #[serde(default)]
    pub network: Network,
    /// Bridges and namespaces made for `network: namespaces`.
    #[serde(default)]
    pub made: netns::Made,
    pub clusters: Vec<ClusterInfo>,
    pub components: Vec<Component>,
}

impl RunRecord {
    pub fn load(state_dir: &Path) -> Result<RunRecord> {
        let path = state_dir.join(RECORD);
        let text = std::fs::read(&path).with_context(|| {
            format!(
                "no run in {} (no {RECORD}); start one with `mesh up FILE`",
                state_dir.display()
            )
        })?;
        serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a run record", path.display()))
    }

    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let path = state_dir.join(RECORD);
        let tmp = state_dir.join(format!("{RECORD}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Whether the supervising `mesh up` is still running.
    pub fn supervisor_alive(&self) -> bool {
        !self.stopped && process_alive(self.supervisor, None)
    }
}
