//! `mesh multicluster ...`: the resources that link clusters.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use mesh_core::identity::{TrustDomain, files};
use mesh_core::metrics_text;
use mesh_service_mirror::metrics::LinkStatus;

#[derive(Debug, Subcommand)]
pub(crate) enum MulticlusterCmd {
    /// Print the Link resource for a target cluster (run with the target's CA
    /// or bundle); apply it to the source cluster's config directory.
    Link(LinkArgs),
    /// Print the Link that only admits another cluster's trust domain (run
    /// with that cluster's CA or bundle); apply it to the target cluster so
    /// its gateway and control plane accept the other cluster's callers.
    Allow(AllowArgs),
    /// Print what to delete to unlink a cluster (the Link; its mirrors go
    /// with it).
    Unlink(UnlinkArgs),
    /// Per link, from the service mirror: alive, services mirrored, gateway
    /// probe latency (p50/p95/p99).
    Gateways(MirrorAdmin),
    /// Check every link (mirror state, bundle expiry, gateway reachability)
    /// and name the fix for each failure.
    Check(CheckArgs),
    /// Per service a FailoverPolicy steers, as one caller's proxy sees it:
    /// the tier in use, each tier's healthy share and load, and the
    /// failover and failback events so far.
    Failover(FailoverArgs),
}

#[derive(Debug, Args)]
pub(crate) struct FailoverArgs {
    /// The calling proxy's admin address (its `/metrics`).
    #[arg(long, default_value = "127.0.0.1:4191")]
    proxy_admin: std::net::SocketAddr,
    /// `text` or `json`.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct MirrorAdmin {
    /// The service mirror's admin address.
    #[arg(long, default_value = "127.0.0.1:9991")]
    mirror_admin: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    mirror: MirrorAdmin,
    /// The source cluster's config directory (its Links are checked).
    #[arg(long)]
    config_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Transport {
    Quic,
    Tcp,
}

#[derive(Debug, Args)]
pub(crate) struct LinkArgs {
    /// The target cluster's name (mirrors are named <svc>-<cluster>).
    #[arg(long)]
    cluster_name: String,
    /// The target's gateway, host[:port] (port 4143 by default); repeat for several.
    #[arg(long = "gateway", required = true)]
    gateways: Vec<String>,
    /// The target's CA directory (bundle.json and issuer.crt), or its bundle
    /// file (then --trust-domain is needed).
    #[arg(long)]
    ca: PathBuf,
    /// The target's trust domain (read from the CA directory when given one).
    #[arg(long)]
    trust_domain: Option<TrustDomain>,
    /// The tunnel transport proxies prefer (QUIC falls back to TCP when it
    /// does not open within a second).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
}

#[derive(Debug, Args)]
pub(crate) struct AllowArgs {
    /// The calling cluster's name.
    #[arg(long)]
    cluster_name: String,
    /// The calling cluster's CA directory, or its bundle file (then
    /// --trust-domain is needed).
    #[arg(long)]
    ca: PathBuf,
    /// The calling cluster's trust domain (read from the CA directory when
    /// given one).
    #[arg(long)]
    trust_domain: Option<TrustDomain>,
}

#[derive(Debug, Args)]
pub(crate) struct UnlinkArgs {
    /// The linked cluster's name.
    #[arg(long)]
    cluster_name: String,
    /// The source cluster's config directory, to name the files to delete.
    #[arg(long)]
    config_dir: Option<PathBuf>,
}

pub(crate) fn run(cmd: MulticlusterCmd, out: &mut impl Write) -> Result<ExitCode> {
    match cmd {
        MulticlusterCmd::Link(args) => {
            out.write_all(link(&args)?.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        MulticlusterCmd::Allow(args) => {
            let (td, bundle) = load_bundle(&args.ca, args.trust_domain.as_ref())?;
            let yaml = mesh_control::resources::link_yaml(&args.cluster_name, &[], "tcp", &bundle)?;
            write!(
                out,
                "# Apply to this cluster's config directory to admit callers of {} ({td}).\n\
                 # Nothing is mirrored through it; `mesh multicluster link` on their side does that.\n{yaml}",
                args.cluster_name
            )?;
            Ok(ExitCode::SUCCESS)
        }
        MulticlusterCmd::Unlink(args) => unlink(&args, out),
        MulticlusterCmd::Gateways(args) => gateways(&args, out),
        MulticlusterCmd::Check(args) => check(&args, out),
        MulticlusterCmd::Failover(args) => failover(&args, out),
    }
}

fn failover(args: &FailoverArgs, out: &mut impl Write) -> Result<ExitCode> {
    let (_, text) = metrics_text::fetch(
        args.proxy_admin,
        "/metrics",
        std::time::Duration::from_secs(5),
    )
    .with_context(|| {
        format!(
            "cannot reach the proxy's admin at {}; give the calling proxy's --proxy-admin",
            args.proxy_admin
        )
    })?;
    let samples = metrics_text::parse(&text);
    let snap = mesh_topologies::view::Snapshot {
        at: std::time::Instant::now(),
        proxies: [(String::new(), samples.clone())].into(),
        links: Default::default(),
        loads: Default::default(),
        viz: None,
    };
    let rows = snap.failover();
    let events = |service: &str| {
        let mut by: std::collections::BTreeMap<String, f64> = Default::default();
        for s in samples.iter().filter(|s| {
            s.name == "mesh_proxy_failover_events_total" && s.label("authority") == service
        }) {
            *by.entry(format!("{} {}", s.label("direction"), s.label("reason")))
                .or_default() += s.value;
        }
        by
    };
    if args.output == Output::Json {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "service": r.service,
                    "tier": r.tier,
                    "tiers": r.tiers.iter().enumerate().map(|(i, (clusters, share, load))| serde_json::json!({
                        "tier": i, "clusters": clusters, "healthy_share": share, "load": load,
                    })).collect::<Vec<_>>(),
                    "events": events(&r.service),
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut *out, &json)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        writeln!(
            out,
            "This proxy has called no service a FailoverPolicy steers (yet): a policy shows here once its service is called through {}.",
            args.proxy_admin
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<36} {:<10} {:>4} {:<14} {:>8} {:>8}",
        "SERVICE", "ON", "TIER", "CLUSTERS", "HEALTHY", "LOAD"
    )?;
    for r in &rows {
        let on = usize::try_from(r.tier)
            .ok()
            .and_then(|i| r.tiers.get(i))
            .map_or("none", |(name, _, _)| name.as_str());
        for (i, (clusters, share, load)) in r.tiers.iter().enumerate() {
            let (service, on) = if i == 0 {
                (r.service.as_str(), on)
            } else {
                ("", "")
            };
            writeln!(
                out,
                "{service:<36} {on:<10} {i:>4} {clusters:<14} {:>7.1}% {:>7.1}%",
                share * 100.0,
                load * 100.0
            )?;
        }
        let events: Vec<String> = events(&r.service)
            .into_iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect();
        writeln!(
            out,
            "{:<36} events: {}",
            "",
            if events.is_empty() {
                "none".to_owned()
            } else {
                events.join(", ")
            }
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Scrapes the mirror's `/metrics` into per-link state.
fn scrape(admin: std::net::SocketAddr) -> Result<std::collections::BTreeMap<String, LinkStatus>> {
    let (_, text) = metrics_text::fetch(admin, "/metrics", std::time::Duration::from_secs(5))
        .with_context(|| {
            format!("cannot reach the service mirror's admin at {admin}; is mesh service-mirror running (--mirror-admin)?")
        })?;
    Ok(LinkStatus::read(&metrics_text::parse(&text)))
}

fn gateways(args: &MirrorAdmin, out: &mut impl Write) -> Result<ExitCode> {
    let links = scrape(args.mirror_admin)?;
    if links.is_empty() {
        writeln!(out, "No links: the service mirror mirrors nothing yet.")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<16} {:<6} {:>9} {:>10} {:>10} {:>10}",
        "CLUSTER", "ALIVE", "SERVICES", "PROBE p50", "p95", "p99"
    )?;
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("<={:.1}ms", v * 1000.0));
    for (cluster, link) in &links {
        writeln!(
            out,
            "{cluster:<16} {:<6} {:>9} {:>10} {:>10} {:>10}",
            if link.alive { "yes" } else { "no" },
            link.services,
            ms(link.probe_latency.quantile(0.5)),
            ms(link.probe_latency.quantile(0.95)),
            ms(link.probe_latency.quantile(0.99)),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn check(args: &CheckArgs, out: &mut impl Write) -> Result<ExitCode> {
    let mut failed = 0;
    let mut links = Vec::new();
    for entry in std::fs::read_dir(&args.config_dir)
        .with_context(|| format!("--config-dir {}", args.config_dir.display()))?
    {
        let path = entry?.path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if let Ok(docs) = mesh_control::resources::parse::parse_file(&path, &text) {
            for (_, res) in docs {
                if let mesh_control::resources::Resource::Link(link) = res {
                    links.push(link.spec);
                }
            }
        }
    }
    if links.is_empty() {
        writeln!(
            out,
            "No Link in {}; nothing to check.",
            args.config_dir.display()
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let states = scrape(args.mirror.mirror_admin);
    for link in &links {
        let name = &link.cluster_name;
        writeln!(out, "link {name} ({})", link.trust_domain)?;
        // Bundle expiry.
        match mesh_control::resources::parse::link_bundle(link) {
            Ok(bundle) => {
                let now = mesh_core::identity::cert::now();
                for root in bundle.roots() {
                    if let Ok(info) = mesh_core::identity::cert::CertInfo::parse(root) {
                        let left = info.not_after - now;
                        if left.is_negative() {
                            failed += 1;
                            writeln!(
                                out,
                                "  FAIL bundle: a root expired; re-run mesh multicluster link with {name}'s current CA"
                            )?;
                        } else if left < time::Duration::days(30) {
                            writeln!(
                                out,
                                "  WARN bundle: a root expires in {} days; rotate {name}'s root and re-link",
                                left.whole_days()
                            )?;
                        } else {
                            writeln!(
                                out,
                                "  ok   bundle: root valid for {} more days",
                                left.whole_days()
                            )?;
                        }
                    }
                }
            }
            Err(e) => {
                failed += 1;
                writeln!(out, "  FAIL bundle: {e}")?;
            }
        }
        // Gateway reachability (TCP).
        for addr in &link.gateway_addresses {
            use std::net::ToSocketAddrs;
            let reached = addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| {
                    std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2))
                        .is_ok()
                });
            if reached {
                writeln!(out, "  ok   gateway {addr} accepts connections")?;
            } else {
                failed += 1;
                writeln!(
                    out,
                    "  FAIL gateway {addr} is unreachable; check the address in the Link and that {name}'s gateway runs and is reachable from here"
                )?;
            }
        }
        // The mirror's view.
        match &states {
            Ok(states) => match states.get(name) {
                Some(state) if state.alive => writeln!(
                    out,
                    "  ok   mirror: gateway alive, {} services mirrored",
                    state.services
                )?,
                Some(_) => {
                    failed += 1;
                    writeln!(
                        out,
                        "  FAIL mirror: the gateway does not answer probes; check that {name} links back to this cluster (mesh multicluster link run against this cluster, applied there)"
                    )?;
                }
                None => {
                    failed += 1;
                    writeln!(
                        out,
                        "  FAIL mirror: no state for {name}; the service mirror has not picked the Link up (is it running with this --config-dir?)"
                    )?;
                }
            },
            Err(e) => {
                failed += 1;
                writeln!(out, "  FAIL mirror: {e:#}")?;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The trust domain and bundle of a CA directory, or of a bundle file
/// with `--trust-domain`.
fn load_bundle(
    ca: &std::path::Path,
    trust_domain: Option<&TrustDomain>,
) -> Result<(TrustDomain, mesh_core::identity::TrustBundle)> {
    if ca.is_dir() {
        let loaded = files::load_ca(ca)
            .with_context(|| format!("--ca {}: not a CA directory", ca.display()))?;
        let td = loaded.trust_domain().clone();
        if let Some(given) = trust_domain
            && given != &td
        {
            bail!("--trust-domain {given} does not match the CA's trust domain {td}");
        }
        let bundle = files::load_bundle(&ca.join(files::BUNDLE), td.clone())?;
        Ok((td, bundle))
    } else {
        let Some(td) = trust_domain.cloned() else {
            bail!(
                "--ca {} is a bundle file: give --trust-domain too",
                ca.display()
            );
        };
        Ok((td.clone(), files::load_bundle(ca, td)?))
    }
}

/// The Link resource for `args`.
fn link(args: &LinkArgs) -> Result<String> {
    let (td, bundle) = load_bundle(&args.ca, args.trust_domain.as_ref())?;
    let gateways: Vec<String> = args
        .gateways
        .iter()
        .map(|g| {
            let has_port = g
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
            if has_port {
                g.clone()
            } else {
                format!("{g}:4143")
            }
        })
        .collect();
    let transport = match args.transport {
        Transport::Quic => "quic",
        Transport::Tcp => "tcp",
    };
    let yaml =
        mesh_control::resources::link_yaml(&args.cluster_name, &gateways, transport, &bundle)?;
    Ok(format!(
        "# Apply to the source cluster's config directory to link {} ({td}).\n{yaml}",
        args.cluster_name
    ))
}

fn unlink(args: &UnlinkArgs, out: &mut impl Write) -> Result<ExitCode> {
    let cluster = &args.cluster_name;
    let Some(dir) = &args.config_dir else {
        writeln!(
            out,
            "Delete the Link whose spec.clusterName is {cluster} from the source cluster's configuration.\n\
             The service mirror then removes every mirror it made for {cluster}."
        )?;
        return Ok(ExitCode::SUCCESS);
    };
    let mut found = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("--config-dir {}", dir.display()))?
    {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let links_it = text.contains("kind: Link")
            && text
                .lines()
                .any(|l| l.trim() == format!("clusterName: {cluster}"));
        if links_it {
            found.push(path);
        }
    }
    if found.is_empty() {
        writeln!(out, "No Link to {cluster} in {}.", dir.display())?;
        return Ok(ExitCode::FAILURE);
    }
    writeln!(out, "Delete these files to unlink {cluster}:")?;
    for path in &found {
        writeln!(out, "  rm {}", path.display())?;
    }
    writeln!(
        out,
        "The service mirror then removes {} itself.",
        dir.join(format!("mirror-{cluster}.yaml")).display()
    )?;
    Ok(ExitCode::SUCCESS)
}
