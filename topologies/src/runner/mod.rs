//! The runner behind `mesh up`: turns a [`Topology`] into running processes
//! (per cluster a control plane, a gateway and a service mirror when it
//! takes part in a link, and every workload replica with its proxy), waits
//! until they are ready, restarts what dies, and stops them all.
//!
//! Cluster `n` (counting from the loopback base) lives on 127.<n>.0.0/16:
//! the control plane on .0.1, the gateway on .0.2, the service mirror's
//! admin on .0.3, and replicas from .1.1 on, each with its proxy on the
//! usual ports (4140, 4143, 4191) and its app's ports on the same address.
//!
//! The parts: [`record`] (what a run is and records), [`layout`] (addresses,
//! directories and components from the topology), [`processes`] (start,
//! supervise, stop), [`readiness`] (when a component counts as ready),
//! [`vms`] (VM agents).

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

mod layout;
mod processes;
mod readiness;
mod record;
mod viz;
mod vms;

use layout::*;
pub use processes::process_alive;
pub use readiness::{fetch_admin, scrape, scrape_in};
pub use record::{ClusterInfo, Component, Kind, Ready, ReplicaInfo, RunRecord, TokenFor, VmRoute};
use vms::*;

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
    /// The `prometheus` binary: when set, each cluster runs a Prometheus
    /// and a viz (loopback topologies only).
    pub prometheus: Option<PathBuf>,
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
                    match r.vm {
                        Some(route) => netns::make_vm(&pod, route, &mut made),
                        None => netns::make_pod(&pod, &self.opts.mesh_exe, &mut made),
                    }
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
}
