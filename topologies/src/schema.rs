//! Topology files: clusters, their workloads and resources, and the links
//! between them. Every error names the file, the line and the field.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use mesh_core::identity::TrustDomain;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A topology file that could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {field}: {reason}", file.display())]
pub struct TopologyError {
    pub file: PathBuf,
    pub line: usize,
    /// Where in the document, e.g. `clusters[1].workloads[0].replicas`.
    pub field: String,
    pub reason: String,
}

/// Ports the runner gives every replica's proxy; apps may not take them.
pub const PROXY_PORTS: [u16; 3] = [4140, 4143, 4191];

/// Most replicas of one workload.
pub const MAX_REPLICAS: u32 = 50;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    /// Shown in the live view and the summary.
    pub name: String,
    pub clusters: Vec<Spanned<Cluster>>,
    #[serde(default)]
    pub links: Vec<Spanned<LinkDecl>>,
    /// How replicas are networked.
    #[serde(default)]
    pub network: Network,
}

/// How replicas are networked.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Each replica on a loopback address; apps use their proxy through
    /// `HTTP_PROXY` (explicit mode). Needs nothing.
    #[default]
    Loopback,
    /// Each replica in a network namespace of its own with its TCP
    /// redirected to its proxy (transparent mode). Needs root.
    Namespaces,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    pub trust_domain: String,
    /// Another cluster (listed before this one) whose root signs this
    /// cluster's issuer too. Trust domains stay separate.
    #[serde(default)]
    pub shared_root: Option<String>,
    #[serde(default)]
    pub workloads: Vec<Spanned<Workload>>,
    /// Resource YAML (Services, Servers, AuthorizationPolicies,
    /// MeshTLSAuthentications, HTTPRoutes), as in a control plane's config
    /// directory.
    #[serde(default)]
    pub resources: Option<Spanned<String>>,
    /// VMs: each an agent (`mesh vm run`, joined with `mesh vm token
    /// create` and `mesh vm join`) and its app.
    #[serde(default)]
    pub vms: Vec<Spanned<Vm>>,
}

/// A VM of a cluster: the VM agent, joined as a user would join it, and
/// the app it fronts. On loopback, like a replica, with its own address.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Vm {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Defaults to the VM's name.
    #[serde(default)]
    pub service_account: Option<String>,
    /// Defaults to `app: <name>`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The app's ports (at least one: the first is health-checked).
    pub ports: Vec<AppPort>,
    /// What the VM runs. `mesh` means this `mesh` binary.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Reach the cluster only through its gateway (the cluster must run
    /// one: another cluster links to it).
    #[serde(default)]
    pub behind_gateway: bool,
}

impl Vm {
    /// The workload the VM's app is, for the parts a replica's app shares.
    pub fn as_workload(&self) -> Workload {
        Workload {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            replicas: 1,
            labels: self.labels.clone(),
            ports: self.ports.clone(),
            command: self.command.clone(),
            env: self.env.clone(),
            traffic: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Defaults to the workload's name.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default = "one")]
    pub replicas: u32,
    /// Defaults to `app: <name>`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The app's ports, registered with the proxy.
    #[serde(default)]
    pub ports: Vec<AppPort>,
    /// What each replica runs. `mesh` means this `mesh` binary.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Started only once the rest of the mesh is ready (load generators).
    #[serde(default)]
    pub traffic: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppPort {
    pub name: String,
    pub port: u16,
}

/// `from` mirrors `to`'s exports; `to` trusts `from` in return.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinkDecl {
    pub from: String,
    pub to: String,
    #[serde(default = "default_transport")]
    pub transport: String,
}

fn default_namespace() -> String {
    "default".into()
}

fn one() -> u32 {
    1
}

fn default_transport() -> String {
    "tcp".into()
}

impl Workload {
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }

    /// The labels, or `app: <name>` when none are given.
    pub fn labels(&self) -> BTreeMap<String, String> {
        if self.labels.is_empty() {
            [("app".to_owned(), self.name.clone())].into()
        } else {
            self.labels.clone()
        }
    }
}

impl Topology {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            file: path.to_owned(),
            line: 0,
            field: "file".into(),
            reason: format!("cannot read it: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text`, read from `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Topology, TopologyError> {
        let topology: Topology = serde_saphyr::from_str(text).map_err(|e| TopologyError {
            file: file.to_owned(),
            line: e.location().map_or(0, |l| l.line() as usize),
            field: "yaml".into(),
            reason: first_line(&e.to_string()),
        })?;
        topology.validate(file)?;
        Ok(topology)
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters
            .iter()
            .map(|c| &c.value)
            .find(|c| c.name == name)
    }

    fn validate(&self, file: &Path) -> Result<(), TopologyError> {
        let fail = |line: u64, field: String, reason: String| TopologyError {
            file: file.to_owned(),
            line: line as usize,
            field,
            reason,
        };
        check_name(&self.name).map_err(|r| fail(1, "name".into(), r))?;
        if self.clusters.is_empty() {
            return Err(fail(
                1,
                "clusters".into(),
                "no clusters; list at least one".into(),
            ));
        }
        if self.clusters.len() > 200 {
            return Err(fail(
                1,
                "clusters".into(),
                "at most 200 clusters (each takes a 127.<n>.0.0/16 range)".into(),
            ));
        }
        let mut names = BTreeSet::new();
        let mut domains = BTreeSet::new();
        for (i, spanned) in self.clusters.iter().enumerate() {
            let c = &spanned.value;
            let line = spanned.referenced.line();
            let at = |f: &str| format!("clusters[{i}].{f}");
            check_name(&c.name).map_err(|r| fail(line, at("name"), r))?;
            if !names.insert(c.name.as_str()) {
                return Err(fail(
                    line,
                    at("name"),
                    format!("cluster {:?} is listed twice", c.name),
                ));
            }
            c.trust_domain
                .parse::<TrustDomain>()
                .map_err(|e| fail(line, at("trustDomain"), e.to_string()))?;
            if !domains.insert(c.trust_domain.as_str()) {
                return Err(fail(
                    line,
                    at("trustDomain"),
                    format!(
                        "trust domain {} is already another cluster's; each cluster has its own",
                        c.trust_domain
                    ),
                ));
            }
            if let Some(root) = &c.shared_root
                && !self.clusters[..i].iter().any(|o| &o.value.name == root)
            {
                return Err(fail(
                    line,
                    at("sharedRoot"),
                    format!("{root:?} is not a cluster listed before {:?}", c.name),
                ));
            }
            let linked_to = self.links.iter().any(|l| l.value.to == c.name);
            let mut workloads = BTreeSet::new();
            for (j, vm) in c.vms.iter().enumerate() {
                let line = vm.referenced.line();
                let vm = &vm.value;
                let at = |f: &str| format!("clusters[{i}].vms[{j}].{f}");
                let w = vm.as_workload();
                check_name(&w.name).map_err(|r| fail(line, at("name"), r))?;
                check_name(&w.namespace).map_err(|r| fail(line, at("namespace"), r))?;
                check_name(w.service_account()).map_err(|r| fail(line, at("serviceAccount"), r))?;
                if !workloads.insert(w.name.clone()) {
                    return Err(fail(
                        line,
                        at("name"),
                        format!("{:?} is listed twice in {}", w.name, c.name),
                    ));
                }
                if vm.ports.is_empty() {
                    return Err(fail(
                        line,
                        at("ports"),
                        "a VM needs at least one port (its first is health-checked)".into(),
                    ));
                }
                if vm.command.is_empty() {
                    return Err(fail(line, at("command"), "the command is empty".into()));
                }
                if vm.behind_gateway && !linked_to {
                    return Err(fail(
                        line,
                        at("behindGateway"),
                        format!(
                            "{} runs no gateway (no cluster links to it); link one to it, or drop behindGateway",
                            c.name
                        ),
                    ));
                }
            }
            for (j, w) in c.workloads.iter().enumerate() {
                let line = w.referenced.line();
                let w = &w.value;
                let at = |f: &str| format!("clusters[{i}].workloads[{j}].{f}");
                check_name(&w.name).map_err(|r| fail(line, at("name"), r))?;
                if !workloads.insert(w.name.clone()) {
                    return Err(fail(
                        line,
                        at("name"),
                        format!("workload {:?} is listed twice in {}", w.name, c.name),
                    ));
                }
                check_name(&w.namespace).map_err(|r| fail(line, at("namespace"), r))?;
                check_name(w.service_account()).map_err(|r| fail(line, at("serviceAccount"), r))?;
                if !(1..=MAX_REPLICAS).contains(&w.replicas) {
                    return Err(fail(
                        line,
                        at("replicas"),
                        format!("{} is not between 1 and {MAX_REPLICAS}", w.replicas),
                    ));
                }
                if w.command.is_empty() {
                    return Err(fail(
                        line,
                        at("command"),
                        "empty; give the program and its arguments, e.g. [mesh, demo, serve]"
                            .into(),
                    ));
                }
                let mut ports = BTreeSet::new();
                for p in &w.ports {
                    if p.port == 0 || PROXY_PORTS.contains(&p.port) {
                        return Err(fail(
                            line,
                            at("ports"),
                            format!(
                                "port {} is taken by the proxy or invalid; use another (not 0, 4140, 4143, 4191)",
                                p.port
                            ),
                        ));
                    }
                    if !ports.insert(p.port) {
                        return Err(fail(
                            line,
                            at("ports"),
                            format!("port {} is listed twice", p.port),
                        ));
                    }
                }
            }
            if let Some(resources) = &c.resources {
                // The span of a block scalar starts at its first line of text.
                let start = resources.referenced.line() as usize;
                let name = Path::new("resources");
                mesh_control::resources::parse::parse_file(name, &resources.value).map_err(
                    |e| TopologyError {
                        file: file.to_owned(),
                        line: start + e.line.saturating_sub(1),
                        field: at("resources"),
                        reason: e.reason,
                    },
                )?;
            }
        }
        let mut pairs = BTreeSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let line = link.referenced.line();
            let l = &link.value;
            let at = |f: &str| format!("links[{i}].{f}");
            for (field, name) in [("from", &l.from), ("to", &l.to)] {
                if !names.contains(name.as_str()) {
                    return Err(fail(
                        line,
                        at(field),
                        format!("{name:?} is not a cluster of this topology"),
                    ));
                }
            }
            if l.from == l.to {
                return Err(fail(
                    line,
                    at("to"),
                    "a cluster cannot link to itself".into(),
                ));
            }
            if !matches!(l.transport.as_str(), "tcp" | "quic") {
                return Err(fail(
                    line,
                    at("transport"),
                    format!("{:?} is not a transport; use tcp or quic", l.transport),
                ));
            }
            if !pairs.insert((l.from.as_str(), l.to.as_str())) {
                return Err(fail(
                    line,
                    at("to"),
                    format!("{} already links to {}", l.from, l.to),
                ));
            }
        }
        Ok(())
    }
}

/// A lowercase DNS label, as Kubernetes names are (the control plane's rule).
fn check_name(name: &str) -> Result<(), String> {
    mesh_control::resources::parse::check_name("name", name)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Topology, TopologyError> {
        Topology::parse(Path::new("t.yaml"), text)
    }

    const GOOD: &str = "name: t
clusters:
  - name: west
    trustDomain: west.mesh.local
    workloads:
      - name: web
        namespace: shop
        ports: [{name: http, port: 8080}]
        command: [mesh, demo, serve]
    resources: |
      apiVersion: v1
      kind: Service
      metadata: {name: web, namespace: shop}
      spec:
        selector: {app: web}
        ports: [{port: 8080}]
  - name: east
    trustDomain: east.mesh.local
    sharedRoot: west
links:
  - {from: west, to: east, transport: quic}
";

    #[test]
    fn a_good_topology_loads() {
        let t = parse(GOOD).unwrap();
        assert_eq!(t.clusters.len(), 2);
        let web = &t.clusters[0].value.workloads[0].value;
        assert_eq!(web.service_account(), "web");
        assert_eq!(web.labels()["app"], "web");
        assert_eq!(web.replicas, 1);
        assert_eq!(t.links[0].value.transport, "quic");
        assert_eq!(
            t.cluster("east").unwrap().shared_root.as_deref(),
            Some("west")
        );
    }

    #[track_caller]
    fn fails(text: &str, line: usize, field: &str, reason_has: &str) {
        let e = parse(text).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
        assert!(e.reason.contains(reason_has), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("t.yaml:{line}: {field}: ")),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        fails(
            &GOOD.replace("replicas", "x").replace(
                "namespace: shop\n        ports",
                "replicas: 0\n        ports",
            ),
            6,
            "clusters[0].workloads[0].replicas",
            "between 1 and 50",
        );
        fails(
            &GOOD.replace("transport: quic", "transport: udp"),
            21,
            "links[0].transport",
            "use tcp or quic",
        );
        fails(
            &GOOD.replace("to: east", "to: north"),
            21,
            "links[0].to",
            "not a cluster",
        );
        fails(
            &GOOD.replace("east.mesh.local", "west.mesh.local"),
            17,
            "clusters[1].trustDomain",
            "already another cluster's",
        );
        fails(
            &GOOD.replace(
                "port: 8080}]\n        command",
                "port: 4143}]\n        command",
            ),
            6,
            "clusters[0].workloads[0].ports",
            "taken by the proxy",
        );
        fails(
            &GOOD.replace("sharedRoot: west", "sharedRoot: north"),
            17,
            "clusters[1].sharedRoot",
            "not a cluster listed before",
        );
        fails(
            &GOOD.replace("command: [mesh, demo, serve]", "command: []"),
            6,
            "clusters[0].workloads[0].command",
            "empty",
        );
        // A resource error points into the block, at the bad line.
        fails(
            &GOOD.replace("kind: Service", "kind: Servise"),
            11,
            "clusters[0].resources",
            "unknown kind",
        );
        // Unknown fields are errors, with their line.
        let e = parse(&GOOD.replace("    sharedRoot: west", "    sharedroot: west")).unwrap_err();
        assert_eq!(e.line, 19, "{e}");
        assert!(e.reason.contains("sharedroot"), "{e}");
    }
}
