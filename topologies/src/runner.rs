//! The runner behind `mesh up`: turns a [`Topology`] into running processes
//! (per cluster a control plane, a gateway and a service mirror when it
//! takes part in a link, and every workload replica with its proxy), waits
//! until they are ready, restarts what dies, and stops them all.
//!
//! Cluster `n` (counting from the loopback base) lives on 127.<n>.0.0/16:
//! the control plane on .0.1, the gateway on .0.2, the service mirror's
//! admin on .0.3, and replicas from .1.1 on, each with its proxy on the
//! usual ports (4140, 4143, 4191) and its app's ports on the same address.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_control::{
    admin_socket::{self, AdminRequest},
    resources::{Resource, parse::parse_file},
};
use mesh_core::metrics_text;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::{
    netns,
    schema::{Network, Topology, Workload},
};

/// The run record in the state directory, read by `mesh status` and `mesh down`.
pub const RECORD: &str = "mesh-up.json";
/// Marks a directory as a `mesh up` state directory (safe to clear).
pub const MARKER: &str = ".mesh-up";

/// How a run is made.
#[derive(Clone, Debug)]
pub struct Options {
    /// CAs, configs, data, tokens and logs. Cleared at start when it holds
    /// an earlier run; refused when it holds anything else.
    pub state_dir: PathBuf,
    /// The `mesh` binary every component runs as.
    pub mesh_exe: PathBuf,
    /// The first cluster takes 127.<base>.0.0/16, the next <base+1>, ...
    pub loopback_base: u8,
    /// How long components get to become ready.
    pub ready_timeout: Duration,
    /// Print progress to stderr while starting.
    pub progress: bool,
}

/// What a component is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Control,
    Gateway,
    ServiceMirror,
    Proxy,
    App,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Control => "control",
            Kind::Gateway => "gateway",
            Kind::ServiceMirror => "service-mirror",
            Kind::Proxy => "proxy",
            Kind::App => "app",
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
    fn new(
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

/// Whether `pid` runs, and (when given) runs with `needle` on its command line
/// (a pid reused by another program does not count).
pub fn process_alive(pid: u32, needle: Option<&str>) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie has exited; it only waits for its parent.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    if zombie {
        return false;
    }
    needle.is_none_or(|n| String::from_utf8_lossy(&cmdline).contains(n))
}

/// Sends `signal` to `pid`'s process group (every component leads its own).
fn signal_group(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// How long to wait before restarting a component that exited, given
/// when it last started and the last delay: 1 s, doubling while it keeps
/// dying within 30 s of its start, up to 30 s.
fn restart_delay(last: Option<(Instant, Duration)>) -> Duration {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);
    match last {
        Some((started, delay)) if started.elapsed() < MAX => (delay * 2).clamp(FIRST, MAX),
        _ => FIRST,
    }
}

/// A running topology.
#[derive(Debug)]
pub struct Run {
    pub record: Arc<Mutex<RunRecord>>,
    children: Arc<Mutex<BTreeMap<String, Child>>>,
    opts: Options,
    supervisor: Option<tokio::task::JoinHandle<()>>,
}

/// Why a run did not start: which component, and the end of its log.
#[derive(Debug, thiserror::Error)]
#[error("{component} failed to start: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
pub struct StartError {
    pub component: String,
    pub reason: String,
    pub log: PathBuf,
    pub tail: String,
}

fn cluster_ip(base: u8, index: usize, third: u8, fourth: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, base + index as u8, third, fourth))
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Prepares `dir`: created when missing, cleared when it holds an earlier
/// run (refused while that run is up), refused when it holds anything else.
fn prepare_state_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !empty {
            if !dir.join(MARKER).exists() {
                bail!(
                    "state directory {} is not empty and was not made by `mesh up`; give another --state-dir",
                    dir.display()
                );
            }
            let old = RunRecord::load(dir).ok();
            if let Some(record) = &old
                && record.supervisor_alive()
            {
                bail!(
                    "a run of {} is still up in {} (pid {}); stop it with `mesh down --state-dir {}`",
                    record.topology,
                    dir.display(),
                    record.supervisor,
                    dir.display()
                );
            }
            // Namespaces and bridges a killed run left behind.
            if let Some(record) = &old {
                netns::teardown(&record.made);
            }
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        "made by mesh up; cleared by the next run\n",
    )?;
    Ok(())
}

/// The Services in `resources`: (name, namespace, exported).
fn services(resources: Option<&str>) -> Vec<(String, String, bool)> {
    let Some(text) = resources else {
        return Vec::new();
    };
    parse_file(Path::new("resources"), text)
        .map(|rs| {
            rs.into_iter()
                .filter_map(|(_, r)| match r {
                    Resource::Service(s) => Some((
                        s.metadata.name.clone(),
                        s.metadata.namespace.clone(),
                        s.metadata
                            .labels
                            .get("multicluster.mesh.rs/exported")
                            .is_some_and(|v| v == "true"),
                    )),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many Services `resources` exports.
fn exported_services(resources: Option<&str>) -> usize {
    services(resources).iter().filter(|s| s.2).count()
}

/// The service names a replica of `cluster` may call: its cluster's
/// Services and the mirrors of what the clusters it links to export.
fn service_names(topology: &Topology, cluster: &str) -> Vec<String> {
    let resources = |c: &str| {
        topology
            .cluster(c)
            .and_then(|c| c.resources.as_ref())
            .map(|r| r.value.clone())
    };
    let mut names: Vec<String> = services(resources(cluster).as_deref())
        .into_iter()
        .map(|(name, ns, _)| format!("{name}.{ns}.svc.cluster.local"))
        .collect();
    for l in topology.links.iter().filter(|l| l.value.from == cluster) {
        let to = &l.value.to;
        names.extend(
            services(resources(to).as_deref())
                .into_iter()
                .filter(|s| s.2)
                .map(|(name, ns, _)| format!("{name}-{to}.{ns}.svc.cluster.local")),
        );
    }
    names
}

impl Run {
    /// Lays the topology out, starts everything and waits until it is ready.
    /// On failure every process started is stopped again.
    pub async fn start(topology: &Topology, file: &Path, opts: Options) -> Result<Run> {
        prepare_state_dir(&opts.state_dir)?;
        if opts.loopback_base == 0 || opts.loopback_base as usize + topology.clusters.len() > 255 {
            bail!(
                "--loopback-base {} leaves no room for {} clusters in 127.0.0.0/8 (use 1 to {})",
                opts.loopback_base,
                topology.clusters.len(),
                255 - topology.clusters.len()
            );
        }
        if topology.network == Network::Namespaces {
            netns::check_host()?;
        }
        let record = lay_out(topology, file, &opts)?;
        let mut run = Run {
            record: Arc::new(Mutex::new(record)),
            children: Default::default(),
            opts,
            supervisor: None,
        };
        match run.bring_up(topology).await {
            Ok(()) => {
                run.supervise();
                Ok(run)
            }
            Err(e) => {
                run.stop().await;
                Err(e)
            }
        }
    }

    fn progress(&self, line: impl std::fmt::Display) {
        if self.opts.progress {
            eprintln!("{line}");
        }
    }

    fn save(&self) {
        let record = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Err(e) = record.save(&self.opts.state_dir) {
            tracing::warn!(error = %e, "cannot write the run record");
        }
    }

    async fn bring_up(&mut self, topology: &Topology) -> Result<()> {
        let started = Instant::now();
        let clusters = self.snapshot().clusters;
        // Certificate authorities, one per cluster (shared roots first:
        // the topology lists a shared root before its users).
        for (c, decl) in clusters.iter().zip(&topology.clusters) {
            let mut cmd = std::process::Command::new(&self.opts.mesh_exe);
            cmd.args([
                "identity",
                "ca",
                "create",
                "--trust-domain",
                &c.trust_domain,
            ])
            .arg("--out")
            .arg(c.ca_dir());
            if let Some(root) = &decl.value.shared_root {
                cmd.arg("--shared-root")
                    .arg(self.opts.state_dir.join(root).join("ca"));
            }
            let out = cmd
                .output()
                .with_context(|| format!("cannot run {}", self.opts.mesh_exe.display()))?;
            if !out.status.success() {
                bail!(
                    "{}: creating its CA failed: {}",
                    c.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        write_configs(topology, &clusters)?;
        if topology.network == Network::Namespaces {
            self.make_namespaces(topology, &clusters)?;
        }
        self.progress(format!(
            "mesh up: {} clusters, state in {}",
            clusters.len(),
            self.opts.state_dir.display()
        ));

        // Control planes first: everything else joins through them.
        let controls: Vec<String> = self.names(|c| c.kind == Kind::Control && !c.traffic);
        self.start_and_wait(&controls, started).await?;
        // Gateways before what tunnels to them: a tunnel client that finds
        // no QUIC listener yet keeps to TCP for a while.
        let gateways: Vec<String> = self.names(|c| c.kind == Kind::Gateway);
        self.start_and_wait(&gateways, started).await?;
        let rest: Vec<String> =
            self.names(|c| !matches!(c.kind, Kind::Control | Kind::Gateway) && !c.traffic);
        self.start_and_wait(&rest, started).await?;
        // Load starts once every link mirrors what the other side exports.
        self.wait_for_mirrors(started).await?;
        let traffic: Vec<String> = self.names(|c| c.traffic);
        self.start_and_wait(&traffic, started).await?;
        self.progress(format!(
            "mesh up: everything is ready after {:.1}s",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Bridges and one namespace per replica (`network: namespaces`).
    fn make_namespaces(&self, topology: &Topology, clusters: &[ClusterInfo]) -> Result<()> {
        let mut made = netns::Made::default();
        let result = (|| {
            for (i, c) in clusters.iter().enumerate() {
                let n = self.opts.loopback_base + i as u8;
                netns::make_bridge(n, &mut made)?;
                let names = service_names(topology, &c.name);
                for (k, r) in c.replicas.iter().enumerate() {
                    let pod = netns::Pod {
                        namespace: r.netns.clone().expect("namespaces mode"),
                        veth: format!("mv{n}-{k}"),
                        bridge: netns::bridge(n),
                        ip: r.ip,
                        gateway: netns::host_ip(n, 1),
                        names: names.clone(),
                    };
                    netns::make_pod(&pod, &self.opts.mesh_exe, &mut made)
                        .with_context(|| format!("{}/{}: network namespace", c.name, r.name))?;
                }
            }
            Ok(())
        })();
        self.record.lock().unwrap_or_else(|p| p.into_inner()).made = made;
        self.save();
        result
    }

    fn names(&self, keep: impl Fn(&Component) -> bool) -> Vec<String> {
        self.snapshot()
            .components
            .iter()
            .filter(|c| keep(c))
            .map(|c| c.name.clone())
            .collect()
    }

    /// A copy of the run record.
    pub fn snapshot(&self) -> RunRecord {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn cluster(&self, name: &str) -> Option<ClusterInfo> {
        self.snapshot()
            .clusters
            .into_iter()
            .find(|c| c.name == name)
    }

    pub fn component(&self, name: &str) -> Option<Component> {
        self.snapshot()
            .components
            .into_iter()
            .find(|c| c.name == name)
    }

    async fn start_and_wait(&self, names: &[String], started: Instant) -> Result<()> {
        for name in names {
            self.spawn(name).await?;
        }
        let deadline = Instant::now() + self.opts.ready_timeout;
        let mut waiting: Vec<String> = names.to_vec();
        let mut last_note = Instant::now();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for name in waiting {
                let c = self.component(&name).expect("a planned component");
                if let Some(status) = self.exited(&name) {
                    return Err(self.failed(&c, format!("exited ({status}) before it was ready")));
                }
                match check_ready(&c).await {
                    Ok(()) => self.progress(format!(
                        "  ready  {:<28} {:>5.1}s",
                        c.name,
                        started.elapsed().as_secs_f64()
                    )),
                    Err(why) if Instant::now() >= deadline => {
                        return Err(self.failed(
                            &c,
                            format!(
                                "not ready after {}: {why}",
                                humantime::format_duration(self.opts.ready_timeout)
                            ),
                        ));
                    }
                    Err(_) => still.push(name),
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                if last_note.elapsed() >= Duration::from_secs(3) {
                    last_note = Instant::now();
                    self.progress(format!("  waiting for {}", waiting.join(", ")));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    async fn wait_for_mirrors(&self, started: Instant) -> Result<()> {
        let deadline = Instant::now() + self.opts.ready_timeout;
        for c in self.snapshot().clusters {
            let Some(admin) = c.mirror_admin else {
                continue;
            };
            loop {
                let links = scrape(admin)
                    .map(|s| mesh_service_mirror::metrics::LinkStatus::read(&s))
                    .unwrap_or_default();
                let missing: Vec<String> = c
                    .mirrors
                    .iter()
                    .filter(|(other, want)| {
                        links
                            .get(*other)
                            .is_none_or(|l| !l.alive || (l.services as usize) < **want)
                    })
                    .map(|(other, want)| format!("{other} ({want} services)"))
                    .collect();
                if missing.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    let me = self
                        .component(&format!("{}/service-mirror", c.name))
                        .expect("a mirror");
                    return Err(self.failed(
                        &me,
                        format!("did not mirror {} in time", missing.join(", ")),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            self.progress(format!(
                "  ready  {:<28} {:>5.1}s",
                format!("{}/mirrors", c.name),
                started.elapsed().as_secs_f64()
            ));
        }
        // Control planes read the mirrors' files on their next poll.
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok(())
    }

    fn failed(&self, c: &Component, reason: String) -> anyhow::Error {
        StartError {
            component: c.name.clone(),
            reason,
            log: c.log.clone(),
            tail: tail(&c.log, 15),
        }
        .into()
    }

    /// The exit status of a child that has exited.
    fn exited(&self, name: &str) -> Option<std::process::ExitStatus> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children.get_mut(name)?.try_wait().ok().flatten()
    }

    /// Starts (or restarts) component `name`.
    async fn spawn(&self, name: &str) -> Result<()> {
        let c = self.component(name).expect("a planned component");
        if let Some(token) = &c.token {
            let cluster = self.cluster(&c.cluster).expect("a planned cluster");
            let answer = admin_socket::request(
                &cluster.data_dir().join(admin_socket::SOCKET_FILE),
                &AdminRequest::CreateToken {
                    namespace: token.namespace.clone(),
                    service_account: token.service_account.clone(),
                    ttl_seconds: 600,
                    claims: token.claims.clone(),
                },
            )
            .await
            .with_context(|| {
                format!(
                    "{name}: cannot reach {}/control for a join token",
                    c.cluster
                )
            })?;
            let Some(secret) = answer.token else {
                bail!(
                    "{name}: {}/control refused a join token: {}",
                    c.cluster,
                    answer.error.unwrap_or_default()
                );
            };
            mesh_core::identity::files::write_private(&token.file, secret.as_bytes())?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)
            .with_context(|| format!("cannot open {}", c.log.display()))?;
        let child = Command::new(&c.program)
            .args(&c.args)
            .envs(c.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: the runner stops it (and whatever it
            // started) in order, and a terminal's Ctrl-C reaches only us.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("{name}: cannot run {}", c.program.display()))?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), child);
        {
            let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(me) = record.components.iter_mut().find(|x| x.name == name) {
                me.pid = pid;
            }
        }
        self.save();
        Ok(())
    }

    /// Restarts components that exit while the run is up (1 s apart).
    fn supervise(&mut self) {
        let record = self.record.clone();
        let children = self.children.clone();
        let me = Run {
            record: record.clone(),
            children: children.clone(),
            opts: self.opts.clone(),
            supervisor: None,
        };
        self.supervisor = Some(tokio::spawn(async move {
            // Per component: when it was last started, and the last delay.
            let mut backoff: BTreeMap<String, (Instant, Duration)> = BTreeMap::new();
            let mut due: BTreeMap<String, Instant> = BTreeMap::new();
            let held = |name: &str| {
                record
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .components
                    .iter()
                    .any(|c| c.name == name && c.held)
            };
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let dead: Vec<(String, std::process::ExitStatus)> = {
                    let mut children = children.lock().unwrap_or_else(|p| p.into_inner());
                    let dead: Vec<_> = children
                        .iter_mut()
                        .filter_map(|(n, c)| Some((n.clone(), c.try_wait().ok().flatten()?)))
                        .collect();
                    for (name, _) in &dead {
                        children.remove(name);
                    }
                    dead
                };
                for (name, status) in dead {
                    if held(&name) {
                        continue;
                    }
                    let delay = restart_delay(backoff.get(&name).copied());
                    tracing::warn!(component = %name, %status, "exited; restarting in {delay:?}");
                    backoff
                        .entry(name.clone())
                        .and_modify(|b| b.1 = delay)
                        .or_insert((Instant::now(), delay));
                    due.insert(name, Instant::now() + delay);
                }
                let now = Instant::now();
                let ready: Vec<String> = due
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in ready {
                    due.remove(&name);
                    if held(&name) {
                        continue;
                    }
                    {
                        let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(c) = r.components.iter_mut().find(|c| c.name == name) {
                            c.restarts += 1;
                            c.pid = None;
                        }
                    }
                    if let Some(b) = backoff.get_mut(&name) {
                        b.0 = Instant::now();
                    }
                    if let Err(e) = me.spawn(&name).await {
                        tracing::warn!(component = %name, error = %format!("{e:#}"), "restart failed; trying again");
                        let delay = restart_delay(backoff.get(&name).copied());
                        due.insert(name, Instant::now() + delay);
                    }
                }
            }
        }));
    }

    /// Stops component `name` (SIGKILL, as a crash would); the run restarts it.
    pub fn kill(&self, name: &str) -> Result<()> {
        let pid = self
            .component(name)
            .and_then(|c| c.pid)
            .with_context(|| format!("no running component {name}"))?;
        signal_group(pid, rustix::process::Signal::KILL);
        Ok(())
    }

    /// Stops component `name` (SIGKILL, as a crash would) and keeps it
    /// stopped until [`Run::release`].
    pub fn hold(&self, name: &str) -> Result<()> {
        {
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            let c = r
                .components
                .iter_mut()
                .find(|c| c.name == name)
                .with_context(|| format!("no component {name}"))?;
            c.held = true;
        }
        self.kill(name)
    }

    /// Starts a component [`Run::hold`] stopped.
    pub async fn release(&self, name: &str) -> Result<()> {
        // Until the supervisor has reaped it, it still counts as running.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        {
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = r.components.iter_mut().find(|c| c.name == name) {
                c.held = false;
            }
        }
        self.spawn(name).await
    }

    /// Stops every process: traffic and apps first, then proxies, then
    /// gateways and mirrors, then control planes. Each gets SIGTERM and 5 s,
    /// then SIGKILL.
    pub async fn stop(&mut self) {
        if let Some(s) = self.supervisor.take() {
            s.abort();
        }
        let order: [&dyn Fn(&Component) -> bool; 4] = [
            &|c| c.kind == Kind::App,
            &|c| c.kind == Kind::Proxy,
            &|c| matches!(c.kind, Kind::Gateway | Kind::ServiceMirror),
            &|c| c.kind == Kind::Control,
        ];
        for group in order {
            let names = self.names(group);
            let mut children: Vec<(String, Child)> = {
                let mut all = self.children.lock().unwrap_or_else(|p| p.into_inner());
                names
                    .iter()
                    .filter_map(|n| Some((n.clone(), all.remove(n)?)))
                    .collect()
            };
            for (_, child) in &children {
                if let Some(pid) = child.id() {
                    signal_group(pid, rustix::process::Signal::TERM);
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            for (name, child) in &mut children {
                let pid = child.id();
                if tokio::time::timeout_at(deadline, child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(component = %name, "did not stop within 5s; killing it");
                    if let Some(pid) = pid {
                        signal_group(pid, rustix::process::Signal::KILL);
                    }
                    let _ = child.wait().await;
                }
                // Whatever it started in its group goes too.
                if let Some(pid) = pid {
                    signal_group(pid, rustix::process::Signal::KILL);
                }
            }
        }
        {
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            netns::teardown(&r.made);
            r.made = netns::Made::default();
            r.stopped = true;
        }
        self.save();
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(s) = self.supervisor.take() {
            s.abort();
        }
        // Children are killed on drop (kill_on_drop); their groups too.
        for child in self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if let Some(pid) = child.id() {
                signal_group(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Scrapes `/metrics` at `addr`.
pub fn scrape(addr: SocketAddr) -> std::io::Result<Vec<metrics_text::Sample>> {
    scrape_in(None, addr)
}

/// `GET path` on an admin address, inside network namespace `netns` when given.
pub fn fetch_admin(
    netns: Option<&str>,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
    match netns {
        Some(ns) => netns::fetch(ns, addr, path),
        None => metrics_text::fetch(addr, path, Duration::from_secs(2)),
    }
}

/// Scrapes `/metrics` at `addr`, inside `netns` when given.
pub fn scrape_in(
    netns: Option<&str>,
    addr: SocketAddr,
) -> std::io::Result<Vec<metrics_text::Sample>> {
    let (status, body) = fetch_admin(netns, addr, "/metrics")?;
    if status != 200 {
        return Err(std::io::Error::other(format!("{addr}/metrics: {status}")));
    }
    Ok(metrics_text::parse(&body))
}

async fn check_ready(c: &Component) -> Result<(), String> {
    let (ready, netns) = (c.ready.clone(), c.netns.clone());
    tokio::task::spawn_blocking(move || {
        let ns = netns.as_deref();
        match ready {
            Ready::Admin(addr) => match fetch_admin(ns, addr, "/ready") {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!("/ready answers {status}: {}", body.trim())),
                Err(e) => Err(format!("admin {addr}: {e}")),
            },
            Ready::Ports(addrs) => {
                let connects = |a: &SocketAddr| match ns {
                    Some(ns) => netns::connects(ns, *a),
                    None => std::net::TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok(),
                };
                match addrs.iter().find(|a| !connects(a)) {
                    Some(a) => Err(format!("{a} does not accept connections")),
                    None => Ok(()),
                }
            }
            Ready::Alive => Ok(()),
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Plans addresses, directories and the components of every cluster.
fn lay_out(topology: &Topology, file: &Path, opts: &Options) -> Result<RunRecord> {
    let base = opts.loopback_base;
    let mesh = opts.mesh_exe.clone();
    let state = &opts.state_dir;
    let mut clusters = Vec::new();
    let mut components = Vec::new();
    for (i, decl) in topology.clusters.iter().enumerate() {
        let c = &decl.value;
        let dir = state.join(&c.name);
        for sub in ["config", "data", "tokens", "stats"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let ip = |third, fourth| cluster_ip(base, i, third, fourth);
        let n = base + i as u8;
        let namespaces = topology.network == Network::Namespaces;
        // With namespaces, what replicas reach sits on the cluster's bridge;
        // admin endpoints stay on host loopback either way.
        let reachable = |fourth| {
            if namespaces {
                netns::host_ip(n, fourth)
            } else {
                ip(0, fourth)
            }
        };
        let linked_to = topology.links.iter().any(|l| l.value.to == c.name);
        let links_out: BTreeMap<String, usize> = topology
            .links
            .iter()
            .filter(|l| l.value.from == c.name)
            .map(|l| {
                let other = topology.cluster(&l.value.to).expect("validated");
                (
                    other.name.clone(),
                    exported_services(other.resources.as_ref().map(|r| r.value.as_str())),
                )
            })
            .collect();
        // A cluster others link to runs a gateway; one that links out runs
        // a service mirror.
        let mirrors = links_out.clone();
        let mut info = ClusterInfo {
            name: c.name.clone(),
            trust_domain: c.trust_domain.clone(),
            dir: dir.clone(),
            control_identity: SocketAddr::new(reachable(1), 8080),
            control_api: SocketAddr::new(reachable(1), 8086),
            control_admin: SocketAddr::new(ip(0, 1), 9990),
            gateway: linked_to.then(|| SocketAddr::new(reachable(2), 4143)),
            gateway_admin: linked_to.then(|| SocketAddr::new(ip(0, 2), 4191)),
            mirror_admin: (!mirrors.is_empty()).then(|| SocketAddr::new(ip(0, 3), 9991)),
            mirrors,
            replicas: Vec::new(),
        };
        let log = |what: &str| state.join("logs").join(format!("{}-{what}.log", c.name));
        let s = |v: &dyn std::fmt::Display| v.to_string();
        let anchors = dir.join("ca/bundle.json");
        // VMs whose only route is to the gateway are reached through it.
        let gateway_flag: Vec<String> = info
            .gateway
            .iter()
            .flat_map(|g| ["--gateway-addr".to_owned(), g.to_string()])
            .collect();
        components.push(Component::new(
            format!("{}/control", c.name),
            &c.name,
            Kind::Control,
            &mesh,
            [
                vec![
                    "control".into(),
                    "--cluster".into(),
                    c.name.clone(),
                    "--ca".into(),
                    s(&dir.join("ca").display()),
                    "--config-dir".into(),
                    s(&dir.join("config").display()),
                    "--data-dir".into(),
                    s(&dir.join("data").display()),
                    "--identity-addr".into(),
                    s(&info.control_identity),
                    "--api-addr".into(),
                    s(&info.control_api),
                    "--admin-addr".into(),
                    s(&info.control_admin),
                    "--poll-interval".into(),
                    "250ms".into(),
                ],
                gateway_flag,
            ]
            .concat(),
            Ready::Admin(info.control_admin),
            log("control"),
        ));
        let joins = |sa: &str| -> Vec<String> {
            vec![
                "--cluster".into(),
                c.name.clone(),
                "--trust-domain".into(),
                c.trust_domain.clone(),
                "--control-identity-addr".into(),
                s(&info.control_identity),
                "--control-api-addr".into(),
                s(&info.control_api),
                "--trust-anchors".into(),
                s(&anchors.display()),
                "--join-token-file".into(),
                s(&dir.join(format!("tokens/mesh-system-{sa}.token")).display()),
            ]
        };
        let system_token = |sa: &str| TokenFor {
            namespace: "mesh-system".into(),
            service_account: sa.into(),
            file: dir.join(format!("tokens/mesh-system-{sa}.token")),
            claims: None,
        };
        if let (Some(tunnel), Some(admin)) = (info.gateway, info.gateway_admin) {
            let mut args = vec!["gateway".to_owned()];
            args.extend(joins("gateway"));
            args.extend([
                "--tunnel-addr".into(),
                s(&tunnel),
                "--admin-addr".into(),
                s(&admin),
            ]);
            components.push(Component {
                token: Some(system_token("gateway")),
                ..Component::new(
                    format!("{}/gateway", c.name),
                    &c.name,
                    Kind::Gateway,
                    &mesh,
                    args,
                    Ready::Admin(admin),
                    log("gateway"),
                )
            });
        }
        if let Some(admin) = info.mirror_admin {
            let mut args = vec!["service-mirror".to_owned()];
            args.extend(joins("service-mirror"));
            args.extend([
                "--config-dir".into(),
                s(&dir.join("config").display()),
                "--admin-addr".into(),
                s(&admin),
            ]);
            components.push(Component {
                token: Some(system_token("service-mirror")),
                ..Component::new(
                    format!("{}/service-mirror", c.name),
                    &c.name,
                    Kind::ServiceMirror,
                    &mesh,
                    args,
                    Ready::Admin(admin),
                    log("service-mirror"),
                )
            });
        }
        let mut next = 0usize;
        for w in &c.workloads {
            let w = &w.value;
            for r in 0..w.replicas {
                let replica = format!("{}-{r}", w.name);
                let place = if namespaces {
                    Placement {
                        ip: netns::pod_ip(n, next),
                        netns: Some(format!("mesh{n}-{replica}")),
                        proxy_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    }
                } else {
                    let ip = ip(1 + (next / 250) as u8, (next % 250) as u8 + 1);
                    Placement {
                        ip,
                        netns: None,
                        proxy_ip: ip,
                    }
                };
                next += 1;
                let stats = dir.join(format!("stats/{replica}.json"));
                components.extend(replica_components(
                    &mesh,
                    &c.name,
                    &c.trust_domain,
                    &info,
                    w,
                    &replica,
                    &place,
                    &dir,
                    &stats,
                    state,
                ));
                info.replicas.push(ReplicaInfo {
                    name: replica,
                    workload: w.name.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account().to_owned(),
                    ip: place.ip,
                    proxy_admin: SocketAddr::new(place.proxy_ip, 4191),
                    stats,
                    netns: place.netns,
                });
            }
        }
        clusters.push(info);
    }
    Ok(RunRecord {
        topology: topology.name.clone(),
        file: file.to_owned(),
        supervisor: std::process::id(),
        started_at: time::OffsetDateTime::now_utc().unix_timestamp(),
        stopped: false,
        network: topology.network,
        made: netns::Made::default(),
        clusters,
        components,
    })
}

/// Where a replica runs.
#[derive(Clone, Debug)]
struct Placement {
    /// The app's (and the workload's registered) address.
    ip: IpAddr,
    netns: Option<String>,
    /// Where its proxy's outbound and admin listen: the replica's address,
    /// or its namespace's loopback.
    proxy_ip: IpAddr,
}

#[allow(clippy::too_many_arguments)]
fn replica_components(
    mesh: &Path,
    cluster: &str,
    td: &str,
    info: &ClusterInfo,
    w: &Workload,
    replica: &str,
    place: &Placement,
    dir: &Path,
    stats: &Path,
    state: &Path,
) -> [Component; 2] {
    let ip = place.ip;
    let token = dir.join(format!("tokens/{}-{replica}.token", w.namespace));
    let join = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let ports: BTreeMap<String, String> = w
        .ports
        .iter()
        .map(|p| (p.name.clone(), p.port.to_string()))
        .collect();
    let proxy_env: Vec<(String, String)> = [
        ("CLUSTER", cluster.to_owned()),
        ("TRUST_DOMAIN", td.to_owned()),
        ("NAMESPACE", w.namespace.clone()),
        ("SERVICE_ACCOUNT", w.service_account().to_owned()),
        ("WORKLOAD", replica.to_owned()),
        ("CONTROL_IDENTITY_ADDR", info.control_identity.to_string()),
        ("CONTROL_API_ADDR", info.control_api.to_string()),
        (
            "TRUST_ANCHORS",
            dir.join("ca/bundle.json").display().to_string(),
        ),
        ("JOIN_TOKEN_FILE", token.display().to_string()),
        ("INBOUND_ADDR", SocketAddr::new(ip, 4143).to_string()),
        (
            "OUTBOUND_ADDR",
            SocketAddr::new(place.proxy_ip, 4140).to_string(),
        ),
        (
            "ADMIN_ADDR",
            SocketAddr::new(place.proxy_ip, 4191).to_string(),
        ),
        ("APP_IP", ip.to_string()),
        ("APP_PORTS", join(&ports)),
        ("WORKLOAD_ADDRESSES", ip.to_string()),
        ("LABELS", join(&w.labels())),
        ("SHUTDOWN_GRACE", "2s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("MESH_PROXY_{k}"), v))
    .collect();
    let log = |what: &str| {
        state
            .join("logs")
            .join(format!("{cluster}-{replica}-{what}.log"))
    };
    let (program, args) = match w.command.split_first() {
        Some((first, rest)) if first == "mesh" => (mesh.to_owned(), rest.to_vec()),
        Some((first, rest)) => (PathBuf::from(first), rest.to_vec()),
        None => unreachable!("validated: commands are not empty"),
    };
    let mut app_env: Vec<(String, String)> = vec![
        ("MESH_CLUSTER".into(), cluster.to_owned()),
        ("MESH_WORKLOAD".into(), replica.to_owned()),
        ("MESH_WORKLOAD_IP".into(), ip.to_string()),
        ("MESH_DEMO_STATS".into(), stats.display().to_string()),
    ];
    // In a namespace the app knows nothing of its proxy: its TCP is
    // redirected. Otherwise it uses the proxy explicitly.
    if place.netns.is_none() {
        app_env.push(("HTTP_PROXY".into(), format!("http://{ip}:4140")));
    }
    app_env.extend(w.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let app_exe = program.clone();
    let (proxy_program, proxy_args, program, args) = match &place.netns {
        Some(ns) => {
            let (pp, pa) = netns::wrap(ns, mesh, &["proxy".to_owned()]);
            let (ap, aa) = netns::wrap_app(ns, &program, &args);
            (pp, pa, ap, aa)
        }
        None => (mesh.to_owned(), vec!["proxy".to_owned()], program, args),
    };
    [
        Component {
            env: proxy_env,
            token: Some(TokenFor {
                namespace: w.namespace.clone(),
                service_account: w.service_account().to_owned(),
                file: token.clone(),
                claims: Some(mesh_control::store::WorkloadClaims {
                    workload: replica.to_owned(),
                    labels: w.labels(),
                    addresses: vec![ip],
                    ports: Vec::new(),
                }),
            }),
            netns: place.netns.clone(),
            exe: mesh.to_owned(),
            ..Component::new(
                format!("{cluster}/{replica}/proxy"),
                cluster,
                Kind::Proxy,
                &proxy_program,
                proxy_args,
                Ready::Admin(SocketAddr::new(place.proxy_ip, 4191)),
                log("proxy"),
            )
        },
        Component {
            env: app_env,
            traffic: w.traffic,
            netns: place.netns.clone(),
            exe: app_exe,
            ..Component::new(
                format!("{cluster}/{replica}/app"),
                cluster,
                Kind::App,
                &program,
                args,
                if w.ports.is_empty() {
                    Ready::Alive
                } else {
                    Ready::Ports(
                        w.ports
                            .iter()
                            .map(|p| SocketAddr::new(ip, p.port))
                            .collect(),
                    )
                },
                log("app"),
            )
        },
    ]
}

/// Writes each cluster's resources and Links into its config directory.
fn write_configs(topology: &Topology, clusters: &[ClusterInfo]) -> Result<()> {
    let info = |name: &str| clusters.iter().find(|c| c.name == name).expect("validated");
    for (c, decl) in clusters.iter().zip(&topology.clusters) {
        if let Some(resources) = &decl.value.resources {
            std::fs::write(c.config_dir().join("resources.yaml"), &resources.value)?;
        }
    }
    // `from` mirrors `to` over the link's transport. `to` must admit
    // `from`'s callers: a Link back when one is declared, else a Link that
    // only admits the trust domain (`mesh multicluster allow`).
    let bundle_of = |c: &ClusterInfo| {
        mesh_core::identity::files::load_bundle(
            &c.ca_dir().join("bundle.json"),
            c.trust_domain.parse()?,
        )
        .map_err(anyhow::Error::from)
    };
    for l in &topology.links {
        let l = &l.value;
        let (from, to) = (info(&l.from), info(&l.to));
        let gateway = to.gateway.expect("a linked-to cluster runs a gateway");
        let yaml = mesh_control::resources::link_yaml(
            &to.name,
            &[gateway.to_string()],
            &l.transport,
            &bundle_of(to)?,
        )?;
        std::fs::write(
            from.config_dir().join(format!("link-{}.yaml", to.name)),
            yaml,
        )?;
        let back = topology
            .links
            .iter()
            .any(|b| b.value.from == l.to && b.value.to == l.from);
        if !back {
            let yaml =
                mesh_control::resources::link_yaml(&from.name, &[], "tcp", &bundle_of(from)?)?;
            std::fs::write(
                to.config_dir().join(format!("allow-{}.yaml", from.name)),
                yaml,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_while_a_component_keeps_dying() {
        assert_eq!(restart_delay(None), Duration::from_secs(1));
        let now = Instant::now();
        let d = |s| Duration::from_secs(s);
        assert_eq!(restart_delay(Some((now, d(1)))), d(2));
        assert_eq!(restart_delay(Some((now, d(16)))), d(30));
        assert_eq!(restart_delay(Some((now, d(30)))), d(30));
        // One that ran a while starts over.
        let long_ago = now - d(31);
        assert_eq!(restart_delay(Some((long_ago, d(30)))), d(1));
    }
}
