//! VMs in a topology: each is the VM agent (`mesh vm run`) and its app. The
//! agent joins as an operator would join a VM: `mesh vm token create` with
//! the cluster's data directory, then `mesh vm join --no-systemd` with the
//! line it printed; both run before the agent's first start, and a
//! restarted agent keeps the identity it already has.
//!
//! With `network: namespaces` a VM is a namespace of its own (routed as a
//! pod, or only to the gateway when it is `behindGateway`), its resolver is
//! the agent's DNS, and its app, run with group [`netns::APP_GID`], is
//! captured by the agent's own rules (`--capture-group`), not by `mesh
//! proxy init`: as on a real VM, the app knows nothing of the mesh.

use super::*;
use crate::schema::Vm;

/// How a VM joins: what its token grants and where its files go.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmJoin {
    pub namespace: String,
    pub service_account: String,
    pub workload: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<u16>,
    /// The VM's address: its app, its proxy, what it registers.
    pub ip: IpAddr,
    /// `/etc/mesh/vm-agent.json` of this VM.
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub workload_api_socket: PathBuf,
    /// Set when it reaches the cluster only through its gateway.
    pub gateway: Option<SocketAddr>,
    /// Its namespace (`network: namespaces`).
    #[serde(default)]
    pub netns: Option<String>,
}

/// The VM's agent and app, and what the run records of it.
#[allow(clippy::too_many_arguments)]
pub(super) fn vm_components(
    mesh: &Path,
    cluster: &str,
    td: &str,
    info: &ClusterInfo,
    vm: &Vm,
    place: &Placement,
    dir: &Path,
    state: &Path,
) -> ([Component; 2], ReplicaInfo) {
    let w = vm.as_workload();
    let stats = dir.join(format!("stats/{}.json", vm.name));
    // The app is a replica's app; the proxy is the agent instead.
    let [_, app] = replica_components(
        mesh, cluster, td, info, &w, &vm.name, place, dir, &stats, state,
    );
    let ip = place.ip;
    let vm_dir = dir.join("vms").join(&vm.name);
    let config = vm_dir.join("etc/vm-agent.json");
    let run_args = vec![
        "vm".to_owned(),
        "run".to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
    ];
    let (program, args) = match &place.netns {
        Some(ns) => netns::wrap(ns, mesh, &run_args),
        None => (mesh.to_owned(), run_args),
    };
    let gateway = info.gateway.filter(|_| vm.behind_gateway);
    let agent = Component {
        vm_join: Some(VmJoin {
            namespace: w.namespace.clone(),
            service_account: w.service_account().to_owned(),
            workload: vm.name.clone(),
            labels: w.labels(),
            ports: vm.ports.iter().map(|p| p.port).collect(),
            ip,
            config: config.clone(),
            state_dir: vm_dir.join("state"),
            workload_api_socket: vm_dir.join("run/workload.sock"),
            gateway,
            netns: place.netns.clone(),
        }),
        netns: place.netns.clone(),
        exe: mesh.to_owned(),
        ..Component::new(
            format!("{cluster}/{}/agent", vm.name),
            cluster,
            Kind::Proxy,
            &program,
            args,
            Ready::Admin(SocketAddr::new(place.proxy_ip, 4191)),
            state
                .join("logs")
                .join(format!("{cluster}-{}-agent.log", vm.name)),
        )
    };
    let replica = ReplicaInfo {
        name: vm.name.clone(),
        workload: vm.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account().to_owned(),
        ip,
        proxy_admin: SocketAddr::new(place.proxy_ip, 4191),
        stats,
        netns: place.netns.clone(),
        vm: Some(match gateway {
            Some(g) => VmRoute::GatewayOnly(g.ip()),
            None => VmRoute::Default,
        }),
    };
    ([agent, app], replica)
}

impl Run {
    /// Joins the VM of component `c` unless it already has: the two
    /// commands an operator runs, their output in the agent's log.
    pub(super) async fn join_vm(&self, c: &Component, join: &VmJoin) -> Result<()> {
        if join.config.exists() {
            return Ok(());
        }
        let cluster = self.cluster(&c.cluster).expect("a planned cluster");
        let list = |items: Vec<String>| items.join(",");
        let mut create = Command::new(&self.opts.mesh_exe);
        create
            .args(["vm", "token", "create", "--namespace", &join.namespace])
            .args(["--service-account", &join.service_account])
            .args(["--workload", &join.workload])
            .args([
                "--labels",
                &list(
                    join.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect(),
                ),
            ])
            .args([
                "--ports",
                &list(join.ports.iter().map(u16::to_string).collect()),
            ])
            .args(["--identity-addr", &cluster.control_identity.to_string()])
            .args(["--api-addr", &cluster.control_api.to_string()])
            .arg("--data-dir")
            .arg(cluster.data_dir());
        if let Some(gateway) = join.gateway {
            create.args(["--gateway", &gateway.to_string()]);
        }
        let line = self.run_logged(c, &mut create).await?;
        let join_string = line
            .split_whitespace()
            .nth(2)
            .with_context(|| format!("{}: `mesh vm token create` printed {line:?}", c.name))?
            .to_owned();
        let ip = join.ip;
        let first_port = join.ports.first().copied().unwrap_or(0);
        let uid = std::fs::metadata("/proc/self").map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.uid()
        });
        // The join runs on the VM: in its namespace, when it has one.
        let mut enroll = match &join.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&self.opts.mesh_exe);
                cmd
            }
            None => Command::new(&self.opts.mesh_exe),
        };
        enroll
            .args(["vm", "join", &join_string, "--no-systemd"])
            .arg("--config")
            .arg(&join.config)
            .arg("--state-dir")
            .arg(&join.state_dir)
            .arg("--workload-api-socket")
            .arg(&join.workload_api_socket)
            .args(["--workload-api-uid", &uid.to_string()])
            .args(["--address", &ip.to_string(), "--app-ip", &ip.to_string()])
            .args(["--health-tcp", &SocketAddr::new(ip, first_port).to_string()])
            .args(["--health-period", "1s"]);
        if join.netns.is_some() {
            // A host of its own: the defaults, and the app's traffic
            // captured by its group.
            enroll.args(["--capture-group", &netns::APP_GID.to_string()]);
        } else {
            enroll
                .args(["--inbound-addr", &SocketAddr::new(ip, 4143).to_string()])
                .args(["--outbound-addr", &SocketAddr::new(ip, 4140).to_string()])
                .args(["--admin-addr", &SocketAddr::new(ip, 4191).to_string()])
                // Its own address, and a port that needs no privilege.
                .args(["--dns-addr", &SocketAddr::new(ip, 1053).to_string()]);
        }
        self.run_logged(c, &mut enroll).await?;
        Ok(())
    }

    /// Runs `cmd` to completion with its stderr in `c`'s log; its stdout.
    async fn run_logged(&self, c: &Component, cmd: &mut Command) -> Result<String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)
            .with_context(|| format!("cannot open {}", c.log.display()))?;
        let out = cmd
            .stdin(Stdio::null())
            .stderr(log)
            .output()
            .await
            .with_context(|| format!("{}: cannot run {}", c.name, self.opts.mesh_exe.display()))?;
        if !out.status.success() {
            bail!(
                "{}: joining the VM failed (see {})",
                c.name,
                c.log.display()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
