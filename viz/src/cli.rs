//! `mesh viz ...`: run viz, or ask one for a table (or JSON).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::{
    VizArgs,
    federate::{Answer, Unreachable},
    tap::{TapEvent, TopRow},
    views::{Edge, LinkRow, StatRow},
};

#[derive(Debug, clap::Subcommand)]
pub enum VizCommand {
    /// Run viz for one cluster, beside its Prometheus (what `mesh up` and
    /// a cluster's install run).
    Serve(Box<VizArgs>),
    /// Golden metrics (requests per second, success, p50, p99) per
    /// deployment (`deploy`: server side), service (`svc`: callers' side)
    /// or HTTPRoute rule (`route`), with the cluster that measured them.
    Stat(StatArgs),
    /// Golden metrics per HTTPRoute rule (`stat route`).
    Routes(Ask),
    /// Who calls whom: each edge with both workloads, their clusters and
    /// their verified SPIFFE IDs.
    Edges(Ask),
    /// Each link: gateway hop latency (the mirror's probes), errors,
    /// requests sent over it and failover events.
    Links(Ask),
    /// Live requests, as the proxies carry them.
    Tap(TapArgs),
    /// The most-called paths right now (from a short tap).
    Top(TopArgs),
    /// Print the Prometheus scrape configuration for a Kubernetes cluster
    /// (pod discovery of proxies' metrics-only port, the gateway, the
    /// mirror and the control plane).
    Install(crate::install::InstallArgs),
}

/// Which viz to ask and how to print.
#[derive(Clone, Debug, clap::Args)]
pub struct Ask {
    /// Only this namespace.
    #[arg(short = 'n', long, default_value = "")]
    pub namespace: String,
    /// Only this cluster (this viz's own, or a linked one).
    #[arg(long, default_value = "")]
    pub cluster: String,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table")]
    pub output: Output,
    /// The rate window [default: viz's, 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub window: Option<Duration>,
    /// The viz to ask, host:port [default: the first cluster's viz of the
    /// `mesh up` run in --state-dir].
    #[arg(long, env = "MESH_VIZ_URL")]
    pub viz: Option<String>,
    /// With `mesh up`: its state directory [default: `mesh up`'s,
    /// `~/.local/state/mesh/up`].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// With `mesh up`: ask this cluster's viz [default: the first].
    #[arg(long = "from")]
    pub from: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct StatArgs {
    /// `deploy`, `svc` or `route`.
    #[arg(default_value = "deploy")]
    pub kind: String,
    #[command(flatten)]
    pub ask: Ask,
}

#[derive(Clone, Debug, clap::Args)]
pub struct TapArgs {
    /// Stop after this many requests [default: run until Ctrl-C].
    #[arg(long)]
    pub count: Option<usize>,
    /// Stop after this long [default: run until Ctrl-C].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub ask: Ask,
}

#[derive(Clone, Debug, clap::Args)]
pub struct TopArgs {
    /// How long to watch.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub watch: Duration,
    #[command(flatten)]
    pub ask: Ask,
}

/// Runs `cmd`; `resolve` finds the viz address a query goes to.
pub fn run(cmd: VizCommand, resolve: impl Fn(&Ask) -> anyhow::Result<SocketAddr>) -> ExitCode {
    if let VizCommand::Serve(args) = cmd {
        return mesh_core::shutdown::run_component(crate::Viz::start(*args), crate::Viz::shutdown);
    }
    let result = ask(cmd, resolve);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ask(
    cmd: VizCommand,
    resolve: impl Fn(&Ask) -> anyhow::Result<SocketAddr>,
) -> anyhow::Result<()> {
    match cmd {
        VizCommand::Serve(_) => unreachable!("served above"),
        VizCommand::Install(args) => crate::install::print(&args),
        VizCommand::Stat(a) => query(
            &a.ask,
            resolve(&a.ask)?,
            "stat",
            &[("kind", a.kind.clone())],
        )
        .and_then(|body| show::<Vec<StatRow>>(&a.ask, &body, |rows| stat_table(&a.kind, rows))),
        VizCommand::Routes(a) => query(&a, resolve(&a)?, "routes", &[])
            .and_then(|body| show::<Vec<StatRow>>(&a, &body, |rows| stat_table("route", rows))),
        VizCommand::Edges(a) => query(&a, resolve(&a)?, "edges", &[])
            .and_then(|body| show::<Vec<Edge>>(&a, &body, edge_table)),
        VizCommand::Links(a) => query(&a, resolve(&a)?, "links", &[])
            .and_then(|body| show::<Vec<LinkRow>>(&a, &body, link_table)),
        VizCommand::Top(a) => {
            let ms = a.watch.as_millis().clamp(100, 10_000).to_string();
            query(
                &a.ask,
                resolve(&a.ask)?,
                "top",
                &[("ms", ms), ("max", "1000".into())],
            )
            .and_then(|body| show::<Vec<TopRow>>(&a.ask, &body, top_table))
        }
        VizCommand::Tap(a) => tap(&a, resolve(&a.ask)?),
    }
}

/// The one runtime the CLI's queries run on (a tap asks every second).
fn runtime() -> anyhow::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = mesh_core::shutdown::runtime_with(1)?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// `GET /api/v1/<view>` on the viz at `addr`; the body of a 200.
fn query(
    ask: &Ask,
    addr: SocketAddr,
    view: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<Vec<u8>> {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in [("namespace", &ask.namespace), ("cluster", &ask.cluster)] {
        if !v.is_empty() {
            q.append_pair(k, v);
        }
    }
    if let Some(w) = ask.window {
        q.append_pair("window", &w.as_secs().max(1).to_string());
    }
    for (k, v) in extra {
        q.append_pair(k, v);
    }
    let uri = format!("http://{addr}/api/v1/{view}?{}", q.finish());
    let (status, body) = runtime()?
        .block_on(crate::http::get(
            addr,
            &uri,
            Instant::now() + Duration::from_secs(15),
            64 << 20,
        ))
        .map_err(|e| {
            anyhow::anyhow!("viz at {addr}: {e}; is it running (`mesh up` prints its address)?")
        })?;
    if !status.is_success() {
        let why: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        anyhow::bail!(
            "viz at {addr} refused the query ({status}): {}",
            why["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(body.to_vec())
}

fn show<T: DeserializeOwned>(
    ask: &Ask,
    body: &[u8],
    table: impl FnOnce(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    if ask.output == Output::Json {
        outln!("{}", String::from_utf8_lossy(body));
        return Ok(());
    }
    let answer: Answer<T> = serde_json::from_slice(body)?;
    for line in table(&answer.rows) {
        outln!("{line}");
    }
    print_unreachable(&answer.unreachable);
    Ok(())
}

fn print_unreachable(unreachable: &[Unreachable]) {
    for u in unreachable {
        outln!("UNREACHABLE {}: {}", u.cluster, u.error);
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1}%", v * 100.0))
}

fn millis(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}ms"))
}

fn stat_table(kind: &str, rows: &Vec<StatRow>) -> Vec<String> {
    let mut out = vec![match kind {
        "svc" | "service" | "services" => format!(
            "{:<9}{:<34}{:<9}{:>9}{:>9}{:>10}{:>10}",
            "CLUSTER", "SERVICE", "IN", "RPS", "SUCCESS", "P50", "P99"
        ),
        "route" | "routes" => format!(
            "{:<9}{:<30}{:<30}{:>9}{:>9}{:>10}{:>10}",
            "CLUSTER", "ROUTE", "SERVICE", "RPS", "SUCCESS", "P50", "P99"
        ),
        _ => format!(
            "{:<9}{:<12}{:<24}{:>7}{:>9}{:>9}{:>10}{:>10}",
            "CLUSTER", "NAMESPACE", "DEPLOYMENT", "MESHED", "RPS", "SUCCESS", "P50", "P99"
        ),
    }];
    for r in rows {
        let common = (
            format!("{:.1}", r.rps),
            pct(r.success),
            millis(r.p50_ms),
            millis(r.p99_ms),
        );
        out.push(match kind {
            "svc" | "service" | "services" => format!(
                "{:<9}{:<34}{:<9}{:>9}{:>9}{:>10}{:>10}",
                r.cluster, r.name, r.served_in, common.0, common.1, common.2, common.3
            ),
            "route" | "routes" => format!(
                "{:<9}{:<30}{:<30}{:>9}{:>9}{:>10}{:>10}",
                r.cluster, r.name, r.service, common.0, common.1, common.2, common.3
            ),
            _ => format!(
                "{:<9}{:<12}{:<24}{:>7}{:>9}{:>9}{:>10}{:>10}",
                r.cluster,
                r.namespace,
                r.name,
                r.meshed.unwrap_or(0),
                common.0,
                common.1,
                common.2,
                common.3
            ),
        });
    }
    out
}

fn edge_table(rows: &Vec<Edge>) -> Vec<String> {
    let mut out = vec![format!(
        "{:<36}{:<22}{:>8}{:>9}  {}",
        "EDGE", "SERVICE", "RPS", "SUCCESS", "IDENTITIES"
    )];
    for e in rows {
        out.push(format!(
            "{:<36}{:<22}{:>8}{:>9}  {} -> {}",
            format!(
                "{} ({}) -> {} ({})",
                e.src, e.src_cluster, e.dst, e.dst_cluster
            ),
            if e.service.is_empty() {
                "-"
            } else {
                &e.service
            },
            format!("{:.1}", e.rps),
            pct(e.success),
            e.src_identity,
            e.dst_identity
        ));
    }
    out
}

fn link_table(rows: &Vec<LinkRow>) -> Vec<String> {
    let mut out = vec![format!(
        "{:<10}{:<10}{:<7}{:>9}{:>11}{:>11}{:>11}{:>9}{:>9}  {}",
        "FROM",
        "TO",
        "ALIVE",
        "SERVICES",
        "HOP P50",
        "HOP P99",
        "PROBE ERR",
        "RPS",
        "SUCCESS",
        "FAILOVER"
    )];
    for l in rows {
        let failover = l
            .failover
            .iter()
            .map(|f| format!("{} {} {} x{}", f.service, f.direction, f.reason, f.count))
            .collect::<Vec<_>>()
            .join(", ");
        out.push(format!(
            "{:<10}{:<10}{:<7}{:>9}{:>11}{:>11}{:>11}{:>9}{:>9}  {}",
            l.cluster,
            l.to,
            l.alive.map_or("-", |a| if a { "yes" } else { "no" }),
            l.services.map_or_else(|| "-".into(), |s| s.to_string()),
            millis(l.probe_p50_ms),
            millis(l.probe_p99_ms),
            format!("{:.0}", l.probe_failures),
            format!("{:.1}", l.rps),
            pct(l.success),
            if failover.is_empty() {
                "-".into()
            } else {
                failover
            }
        ));
    }
    out
}

fn top_table(rows: &Vec<TopRow>) -> Vec<String> {
    let mut out = vec![format!(
        "{:<9}{:<20}{:<9}{:<30}{:<7}{:<24}{:>6}{:>6}{:>10}",
        "CLUSTER", "DEPLOYMENT", "DIR", "TARGET", "METHOD", "PATH", "COUNT", "5XX", "MAX"
    )];
    for r in rows {
        out.push(format!(
            "{:<9}{:<20}{:<9}{:<30}{:<7}{:<24}{:>6}{:>6}{:>10}",
            r.cluster,
            format!("{}/{}", r.namespace, r.deployment),
            r.direction,
            r.target,
            r.method,
            r.path,
            r.count,
            r.failures,
            format!("{:.1}ms", r.max_latency_us as f64 / 1000.0)
        ));
    }
    out
}

fn tap_line(e: &TapEvent) -> String {
    let (peer, what) = if e.direction == "inbound" {
        (e.client_id.as_str(), format!(":{}", e.port.unwrap_or(0)))
    } else {
        (e.tls.as_str(), e.authority.clone())
    };
    format!(
        "{} {}/{} ({}) {} {} {}{} -> {} {:.1}ms {}",
        e.direction,
        e.namespace,
        e.pod,
        e.cluster,
        e.method,
        what,
        e.path,
        "",
        e.status,
        e.latency_us as f64 / 1000.0,
        peer
    )
}

fn tap(a: &TapArgs, addr: SocketAddr) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut seen = 0usize;
    let mut named = std::collections::BTreeSet::new();
    loop {
        if a.duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        let body = query(
            &a.ask,
            addr,
            "tap",
            &[("ms", "1000".into()), ("max", "1000".into())],
        )?;
        let answer: Answer<Vec<TapEvent>> = serde_json::from_slice(&body)?;
        for u in &answer.unreachable {
            if named.insert(u.cluster.clone()) {
                eprintln!("UNREACHABLE {}: {}", u.cluster, u.error);
            }
        }
        for e in &answer.rows {
            if a.ask.output == Output::Json {
                outln!("{}", serde_json::to_string(e)?);
            } else {
                outln!("{}", tap_line(e));
            }
            seen += 1;
            if a.count.is_some_and(|c| seen >= c) {
                return Ok(());
            }
        }
    }
}
