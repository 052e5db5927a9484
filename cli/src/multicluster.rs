//! `mesh multicluster ...`: the resources that link clusters.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use mesh_core::identity::{SpiffeId, TrustDomain, files};

#[derive(Debug, Subcommand)]
pub(crate) enum MulticlusterCmd {
    /// Print the Link resource for a target cluster (run with the target's CA
    /// or bundle); apply it to the source cluster's config directory.
    Link(LinkArgs),
    /// Print what to delete to unlink a cluster (the Link; its mirrors go
    /// with it).
    Unlink(UnlinkArgs),
    /// Per link, from the service mirror: alive, services mirrored, gateway
    /// probe latency (p50/p95/p99).
    Gateways(MirrorAdmin),
    /// Check every link (mirror state, bundle expiry, gateway reachability)
    /// and name the fix for each failure.
    Check(CheckArgs),
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
        MulticlusterCmd::Unlink(args) => unlink(&args, out),
        MulticlusterCmd::Gateways(args) => gateways(&args, out),
        MulticlusterCmd::Check(args) => check(&args, out),
    }
}

/// One link's state, from the service mirror's metrics.
#[derive(Debug, Default)]
struct LinkState {
    alive: bool,
    services: u64,
    /// (upper bound in seconds, cumulative count) per bucket.
    buckets: Vec<(f64, f64)>,
    count: f64,
}

impl LinkState {
    /// The bucket bound the `q` quantile falls under, in ms.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count == 0.0 {
            return None;
        }
        let want = q * self.count;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= want)
            .map(|(le, _)| le * 1000.0)
    }
}

/// Scrapes the mirror's `/metrics` into per-link state.
fn scrape(admin: std::net::SocketAddr) -> Result<std::collections::BTreeMap<String, LinkState>> {
    use std::io::Read;
    let mut tcp = std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(2))
        .with_context(|| {
            format!("cannot reach the service mirror's admin at {admin}; is mesh service-mirror running (--mirror-admin)?")
        })?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    Ok(parse_metrics(&text))
}

/// Per-link state from the mirror's metrics text.
fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, LinkState> {
    let mut links: std::collections::BTreeMap<String, LinkState> = Default::default();
    for line in text
        .lines()
        .filter(|l| l.starts_with("mesh_service_mirror_"))
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        let label = |name: &str| {
            let key = format!("{name}=\"");
            let start = series.find(&key)? + key.len();
            Some(series[start..].split('"').next()?.to_owned())
        };
        let Some(cluster) = label("cluster") else {
            continue;
        };
        let link = links.entry(cluster).or_default();
        if series.starts_with("mesh_service_mirror_link_alive") {
            link.alive = value >= 1.0;
        } else if series.starts_with("mesh_service_mirror_services_mirrored") {
            link.services = value as u64;
        } else if series.starts_with("mesh_service_mirror_probe_latency_seconds_bucket") {
            let le = label("le")
                .and_then(|l| l.parse().ok())
                .unwrap_or(f64::INFINITY);
            link.buckets.push((le, value));
        } else if series.starts_with("mesh_service_mirror_probe_latency_seconds_count") {
            link.count = value;
        }
    }
    for link in links.values_mut() {
        link.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    links
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
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("<={v:.1}ms"));
    for (cluster, link) in &links {
        writeln!(
            out,
            "{cluster:<16} {:<6} {:>9} {:>10} {:>10} {:>10}",
            if link.alive { "yes" } else { "no" },
            link.services,
            ms(link.quantile_ms(0.5)),
            ms(link.quantile_ms(0.95)),
            ms(link.quantile_ms(0.99)),
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

/// The Link resource for `args`.
fn link(args: &LinkArgs) -> Result<String> {
    let (td, bundle) = if args.ca.is_dir() {
        let ca = files::load_ca(&args.ca)
            .with_context(|| format!("--ca {}: not a CA directory", args.ca.display()))?;
        let td = ca.trust_domain().clone();
        if let Some(given) = &args.trust_domain
            && given != &td
        {
            bail!("--trust-domain {given} does not match the CA's trust domain {td}");
        }
        let bundle = files::load_bundle(&args.ca.join(files::BUNDLE), td.clone())?;
        (td, bundle)
    } else {
        let Some(td) = args.trust_domain.clone() else {
            bail!(
                "--ca {} is a bundle file: give --trust-domain too",
                args.ca.display()
            );
        };
        (td.clone(), files::load_bundle(&args.ca, td)?)
    };
    let json = bundle.to_spiffe_json()?.replace('\n', "");
    let gateway = SpiffeId::workload(&td, "mesh-system", "gateway")?;
    let gateways: Vec<String> = args
        .gateways
        .iter()
        .map(|g| {
            let has_port = g
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
            let addr = if has_port {
                g.clone()
            } else {
                format!("{g}:4143")
            };
            format!("\"{addr}\"")
        })
        .collect();
    let transport = match args.transport {
        Transport::Quic => "quic",
        Transport::Tcp => "tcp",
    };
    Ok(format!(
        "# Apply to the source cluster's config directory to link {cluster} ({td}).\n\
         apiVersion: multicluster.mesh.rs/v1alpha1\nkind: Link\nmetadata:\n  name: {cluster}\n  namespace: mesh-system\nspec:\n  clusterName: {cluster}\n  trustDomain: {td}\n  gatewayAddresses: [{gateways}]\n  gatewayIdentity: {gateway}\n  transport: {transport}\n  trustBundle: '{json}'\n",
        cluster = args.cluster_name,
        gateways = gateways.join(", "),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_state_and_probe_quantiles_from_the_mirrors_metrics() {
        let text = "mesh_service_mirror_link_alive{cluster=\"east\"} 1\n\
mesh_service_mirror_services_mirrored{cluster=\"east\"} 3\n\
mesh_service_mirror_probe_latency_seconds_bucket{cluster=\"east\",le=\"0.001\"} 50\n\
mesh_service_mirror_probe_latency_seconds_bucket{cluster=\"east\",le=\"0.005\"} 96\n\
mesh_service_mirror_probe_latency_seconds_bucket{cluster=\"east\",le=\"0.01\"} 100\n\
mesh_service_mirror_probe_latency_seconds_bucket{cluster=\"east\",le=\"+Inf\"} 100\n\
mesh_service_mirror_probe_latency_seconds_count{cluster=\"east\"} 100\n\
mesh_service_mirror_link_alive{cluster=\"north\"} 0\n";
        let links = parse_metrics(text);
        let east = &links["east"];
        assert!(east.alive);
        assert_eq!(east.services, 3);
        assert_eq!(east.quantile_ms(0.5), Some(1.0));
        assert_eq!(east.quantile_ms(0.95), Some(5.0));
        assert_eq!(east.quantile_ms(0.99), Some(10.0));
        assert!(!links["north"].alive);
        assert_eq!(links["north"].quantile_ms(0.5), None, "no probe yet");
    }
}
