//! Laying a topology out: per-cluster addresses, directories, the
//! components with their flags and environment, and the config files.

use super::*;

pub(super) fn cluster_ip(base: u8, index: usize, third: u8, fourth: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, base + index as u8, third, fourth))
}

/// The Services in `resources`: (name, namespace, exported).
pub(super) fn services(resources: Option<&str>) -> Vec<(String, String, bool)> {
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
pub(super) fn exported_services(resources: Option<&str>) -> usize {
    services(resources).iter().filter(|s| s.2).count()
}

/// The service names a replica of `cluster` may call: its cluster's
/// Services and the mirrors of what the clusters it links to export.
pub(super) fn service_names(topology: &Topology, cluster: &str) -> Vec<String> {
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

/// Plans addresses, directories and the components of every cluster.
pub(super) fn lay_out(topology: &Topology, file: &Path, opts: &Options) -> Result<RunRecord> {
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
        // Viz needs Prometheus to reach every admin endpoint: loopback only.
        let prometheus_exe = opts.prometheus.as_ref().filter(|_| !namespaces);
        let links_out: BTreeMap<String, usize> = topology
            .links
            .iter()
            .filter(|l| l.value.from == c.name)
            .map(|l| {
                let other = topology.cluster(&l.value.to).expect("validated");
                (
                    other.name.clone(),
                    exported_services(other.resources.as_ref().map(|r| r.value.as_str()))
                        + usize::from(prometheus_exe.is_some()),
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
            prometheus: None,
            viz: None,
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
                let place = placement(
                    namespaces,
                    n,
                    next,
                    &replica,
                    ip(1 + (next / 250) as u8, (next % 250) as u8 + 1),
                );
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
                info.replicas.push(replica_info(w, replica, place, stats));
            }
        }
        for vm in &c.vms {
            // A VM is a host of its own: its namespace (with the agent's
            // capture, not `mesh proxy init`), or a loopback address.
            let place = placement(
                namespaces,
                n,
                next,
                &vm.value.name,
                ip(1 + (next / 250) as u8, (next % 250) as u8 + 1),
            );
            next += 1;
            let (parts, replica) = vm_components(
                &mesh,
                &c.name,
                &c.trust_domain,
                &info,
                &vm.value,
                &place,
                &dir,
                state,
            );
            components.extend(parts);
            info.replicas.push(replica);
        }
        if let Some(exe) = prometheus_exe {
            // Viz: a workload of the cluster with its sidecar, so linked
            // clusters' viz reach it through the mesh.
            let place = placement(
                false,
                n,
                next,
                "viz-0",
                ip(1 + (next / 250) as u8, (next % 250) as u8 + 1),
            );
            let prometheus = SocketAddr::new(ip(0, 4), 9090);
            let w = viz_workload(c, prometheus, place.ip);
            let stats = dir.join("stats/viz-0.json");
            components.extend(replica_components(
                &mesh,
                &c.name,
                &c.trust_domain,
                &info,
                &w,
                "viz-0",
                &place,
                &dir,
                &stats,
                state,
            ));
            info.viz = Some(SocketAddr::new(place.ip, mesh_viz::federate::VIZ_PORT));
            info.replicas
                .push(replica_info(&w, "viz-0".into(), place, stats));
            info.prometheus = Some(prometheus);
            let pdir = dir.join("prometheus");
            components.push(Component::new(
                format!("{}/prometheus", c.name),
                &c.name,
                Kind::Prometheus,
                exe,
                vec![
                    format!("--config.file={}", pdir.join("prometheus.yml").display()),
                    format!("--storage.tsdb.path={}", pdir.join("data").display()),
                    format!("--web.listen-address={prometheus}"),
                    "--storage.tsdb.retention.time=1d".into(),
                    "--log.level=warn".into(),
                ],
                Ready::Ports(vec![prometheus]),
                log("prometheus"),
            ));
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

/// What the run records of replica `name` of workload `w`.
fn replica_info(w: &Workload, name: String, place: Placement, stats: PathBuf) -> ReplicaInfo {
    ReplicaInfo {
        name,
        workload: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account().to_owned(),
        ip: place.ip,
        proxy_admin: SocketAddr::new(place.proxy_ip, 4191),
        stats,
        netns: place.netns,
        vm: None,
    }
}

/// Where the `next`th replica (or VM) `name` of cluster `n` runs: a
/// namespace of its own with `network: namespaces`, else `loopback`.
fn placement(namespaces: bool, n: u8, next: usize, name: &str, loopback: IpAddr) -> Placement {
    if namespaces {
        Placement {
            ip: netns::pod_ip(n, next),
            netns: Some(format!("mesh{n}-{name}")),
            proxy_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    } else {
        Placement {
            ip: loopback,
            netns: None,
            proxy_ip: loopback,
        }
    }
}

/// Where a replica runs.
#[derive(Clone, Debug)]
pub(super) struct Placement {
    /// The app's (and the workload's registered) address.
    pub(super) ip: IpAddr,
    pub(super) netns: Option<String>,
    /// Where its proxy's outbound and admin listen: the replica's address,
    /// or its namespace's loopback.
    pub(super) proxy_ip: IpAddr,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn replica_components(
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

/// The viz workload of cluster `c`: `mesh viz serve` on `ip`.
fn viz_workload(c: &crate::schema::Cluster, prometheus: SocketAddr, ip: IpAddr) -> Workload {
    let port = mesh_viz::federate::VIZ_PORT;
    Workload {
        name: "viz".into(),
        namespace: "mesh-system".into(),
        service_account: None,
        replicas: 1,
        labels: BTreeMap::new(),
        ports: vec![crate::schema::AppPort {
            name: "http".into(),
            port,
        }],
        command: [
            "mesh",
            "viz",
            "serve",
            "--cluster",
            &c.name,
            "--trust-domain",
            &c.trust_domain,
            "--prometheus",
            &prometheus.to_string(),
            "--addr",
            &SocketAddr::new(ip, port).to_string(),
            "--admin-addr",
            &SocketAddr::new(ip, 9994).to_string(),
        ]
        .map(str::to_owned)
        .to_vec(),
        env: BTreeMap::new(),
        traffic: false,
    }
}

/// Writes each cluster's resources and Links into its config directory,
/// and, where viz runs, its resources and Prometheus' configuration.
pub(super) fn write_configs(topology: &Topology, clusters: &[ClusterInfo]) -> Result<()> {
    let info = |name: &str| clusters.iter().find(|c| c.name == name).expect("validated");
    for (c, decl) in clusters.iter().zip(&topology.clusters) {
        if let Some(resources) = &decl.value.resources {
            std::fs::write(c.config_dir().join("resources.yaml"), &resources.value)?;
        }
        if c.viz.is_some() {
            // Linked clusters' viz (those linking to this one) may ask it.
            let callers: Vec<&str> = topology
                .links
                .iter()
                .filter(|l| l.value.to == c.name)
                .map(|l| info(&l.value.from).trust_domain.as_str())
                .collect();
            for (file, doc) in super::viz::resources(&callers) {
                std::fs::write(c.config_dir().join(file), serde_saphyr::to_string(&doc)?)?;
            }
            let dir = c.dir.join("prometheus");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("prometheus.yml"),
                serde_saphyr::to_string(&super::viz::prometheus_config(c))?,
            )?;
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
