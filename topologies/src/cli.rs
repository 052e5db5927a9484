//! `mesh up`, `mesh down` and `mesh status`.

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{
    runner::{self, Options, Run, RunRecord, process_alive},
    schema::Topology,
    view::{self, Snapshot},
};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The topology file, e.g. topologies/demo.yaml.
    pub file: PathBuf,
    /// Stop after this long (e.g. 30s, 5m) and print the summary; default: until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// CAs, configs, data, join tokens and one log per component.
    #[arg(long, default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
    /// Cluster n gets 127.<base+n>.0.0/16 (the first cluster 127.<base>.0.0/16).
    #[arg(long, default_value_t = 1)]
    pub loopback_base: u8,
    /// How long each component gets to become ready.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// Start in the background and return once everything is ready.
    #[arg(long)]
    pub detach: bool,
    /// How often the live view refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub refresh: Duration,
    /// Do not run Prometheus and viz (run by default when `prometheus` is
    /// installed).
    #[arg(long)]
    pub no_viz: bool,
}

/// The `prometheus` binary on `PATH`.
pub fn find_prometheus() -> Option<PathBuf> {
    find_on_path("prometheus")
}

/// The first `name` in a directory of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[derive(Debug, Args)]
pub struct StateArgs {
    /// The state directory `mesh up` used.
    #[arg(long, default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
}

/// `$XDG_STATE_HOME/mesh/up`, or `~/.local/state/mesh/up`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("mesh/up");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/mesh/up"),
        None => std::env::temp_dir().join("mesh-up"),
    }
}

/// `mesh up`.
pub fn up(args: UpArgs) -> Result<ExitCode> {
    let topology = Topology::load(&args.file)?;
    let mesh_exe = std::env::current_exe().context("cannot find the mesh binary")?;
    if args.detach {
        return detach(&args, &mesh_exe);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let prometheus = if args.no_viz {
            None
        } else {
            let found = find_prometheus();
            if found.is_none() {
                eprintln!(
                    "mesh up: Prometheus is not installed, so no viz or dashboard this run \
                     (on Debian or Ubuntu: apt-get install prometheus)"
                );
            } else if topology.network == crate::schema::Network::Namespaces {
                eprintln!(
                    "mesh up: viz runs with `network: loopback` topologies only; none this run"
                );
            }
            found
        };
        let opts = Options {
            state_dir: args.state_dir.clone(),
            mesh_exe,
            loopback_base: args.loopback_base,
            ready_timeout: args.ready_timeout,
            progress: true,
            prometheus,
        };
        let started = Instant::now();
        let mut run = match Run::start(&topology, &args.file, opts).await {
            Ok(run) => run,
            Err(e) => {
                eprintln!("error: {e:#}");
                eprintln!("Every process this run started has been stopped.");
                return Ok(ExitCode::FAILURE);
            }
        };
        eprintln!("{}", map(&run.snapshot()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let until = args.duration.map(|d| tokio::time::Instant::now() + d);
        let tty = std::io::stdout().is_terminal();
        let record = run.snapshot();
        let mut before = snapshot(&record).await;
        let mut tick = tokio::time::interval(args.refresh);
        tick.tick().await;
        loop {
            let stop_at = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = stop_at => break,
            }
            let record = run.snapshot();
            let now = snapshot(&record).await;
            let mut text = view::live(&record, &now, &before, started.elapsed().as_secs_f64());
            let restarted: Vec<String> = record
                .components
                .iter()
                .filter(|c| c.restarts > 0)
                .map(|c| format!("{} ({}x)", c.name, c.restarts))
                .collect();
            if !restarted.is_empty() {
                text.push_str(&format!("\nrestarted: {}\n", restarted.join(", ")));
            }
            let mut out = std::io::stdout().lock();
            if tty {
                // Redraw in place.
                let _ = write!(out, "\x1b[H\x1b[2J");
            } else {
                let _ = writeln!(out, "----");
            }
            let _ = write!(out, "{text}");
            let _ = out.flush();
            before = now;
        }
        let record = run.snapshot();
        let last = snapshot(&record).await;
        eprintln!("mesh up: stopping every process");
        run.stop().await;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "\n{}",
            view::summary(&record, &last, started.elapsed().as_secs_f64())
        );
        let _ = writeln!(out, "Logs: {}", args.state_dir.join("logs").display());
        Ok(ExitCode::SUCCESS)
    })
}

async fn snapshot(record: &RunRecord) -> Snapshot {
    let record = record.clone();
    tokio::task::spawn_blocking(move || Snapshot::take(&record))
        .await
        .expect("scraping does not panic")
}

/// Where everything listens, printed once everything is ready.
fn map(record: &RunRecord) -> String {
    let mut out = String::from("\n");
    for c in &record.clusters {
        out.push_str(&format!(
            "{} ({}): control {} (admin {})",
            c.name, c.trust_domain, c.control_api, c.control_admin
        ));
        if let Some(gw) = c.gateway {
            out.push_str(&format!(", gateway {gw}"));
        }
        out.push('\n');
        if let (Some(viz), Some(prom)) = (c.viz, c.prometheus) {
            out.push_str(&format!(
                "  dashboard      http://{viz}/   (viz; Prometheus http://{prom}/)\n"
            ));
        }
        for r in &c.replicas {
            out.push_str(&format!(
                "  {:<14} {:<16} spiffe://{}/ns/{}/sa/{}\n",
                r.name, r.ip, c.trust_domain, r.namespace, r.service_account
            ));
        }
    }
    out
}

/// Starts `mesh up` again in the background and waits until it is ready.
fn detach(args: &UpArgs, mesh_exe: &Path) -> Result<ExitCode> {
    if let Ok(record) = RunRecord::load(&args.state_dir)
        && record.supervisor_alive()
    {
        bail!(
            "a run of {} is still up in {} (pid {}); stop it with `mesh down`",
            record.topology,
            args.state_dir.display(),
            record.supervisor
        );
    }
    let log_path = args.state_dir.with_file_name(format!(
        "{}.log",
        args.state_dir
            .file_name()
            .map_or("mesh-up".into(), |n| n.to_string_lossy().into_owned())
    ));
    if let Some(parent) = log_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    // The same command line, without --detach.
    let mut cmd = std::process::Command::new(mesh_exe);
    cmd.args(std::env::args_os().skip(1).filter(|a| a != "--detach"));
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    eprintln!(
        "mesh up: starting in the background (pid {}); progress in {}",
        child.id(),
        log_path.display()
    );
    let deadline = Instant::now() + args.ready_timeout * 4;
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("everything is ready") {
            eprintln!(
                "mesh up: ready. `mesh status` shows it, `mesh down` stops it (state in {}).",
                args.state_dir.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(status) = child.try_wait()? {
            eprintln!("{text}");
            bail!("mesh up exited ({status}) before it was ready");
        }
        if Instant::now() > deadline {
            bail!("mesh up is not ready yet; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `mesh status`.
pub fn status(args: StateArgs, out: &mut impl Write) -> Result<ExitCode> {
    let record = RunRecord::load(&args.state_dir)?;
    let up = record.supervisor_alive();
    writeln!(
        out,
        "{}: {} ({}), supervised by pid {}{}",
        record.topology,
        if up { "up" } else { "not running" },
        record.file.display(),
        record.supervisor,
        if record.stopped { ", stopped" } else { "" }
    )?;
    writeln!(
        out,
        "{:<34} {:<14} {:>8} {:<8} {:>8}",
        "COMPONENT", "KIND", "PID", "STATE", "RESTARTS"
    )?;
    for c in &record.components {
        let state = if !c.alive() {
            "down".to_owned()
        } else {
            match &c.ready {
                runner::Ready::Admin(addr) => {
                    match runner::fetch_admin(c.netns.as_deref(), *addr, "/ready") {
                        Ok((200, _)) => "ready".into(),
                        _ => "not-ready".into(),
                    }
                }
                _ => "running".into(),
            }
        };
        writeln!(
            out,
            "{:<34} {:<14} {:>8} {:<8} {:>8}",
            c.name,
            c.kind.to_string(),
            c.pid.map_or("-".into(), |p| p.to_string()),
            state,
            c.restarts
        )?;
    }
    if up {
        let snap = Snapshot::take(&record);
        let elapsed = time::OffsetDateTime::now_utc().unix_timestamp() - record.started_at;
        writeln!(out, "\n{}", view::summary(&record, &snap, elapsed as f64))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `mesh down`: stops the supervising `mesh up`, then anything left.
pub fn down(args: StateArgs, out: &mut impl Write) -> Result<ExitCode> {
    let record = RunRecord::load(&args.state_dir)?;
    if record.supervisor_alive() {
        writeln!(
            out,
            "stopping {} (mesh up, pid {})",
            record.topology, record.supervisor
        )?;
        if let Some(pid) = rustix::process::Pid::from_raw(record.supervisor as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while process_alive(record.supervisor, None) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Whatever is left (the supervisor was killed, or did not finish).
    let mut killed = 0;
    for c in &record.components {
        if c.alive()
            && let Some(p) = c
                .pid
                .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
        {
            let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
            killed += 1;
        }
    }
    if killed > 0 {
        writeln!(out, "killed {killed} processes left behind")?;
    }
    let mut record = RunRecord::load(&args.state_dir)?;
    crate::netns::teardown(&record.made);
    record.made = Default::default();
    record.stopped = true;
    record.save(&args.state_dir)?;
    writeln!(out, "{} is down", record.topology)?;
    Ok(ExitCode::SUCCESS)
}
