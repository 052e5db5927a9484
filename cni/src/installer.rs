//! `mesh-cni install`: what the DaemonSet of `mesh install-cni` runs on
//! each node. It copies this binary into the node's CNI bin directory,
//! writes a kubeconfig for it (the DaemonSet's service account, file mode
//! 0600), and chains a `mesh-cni` entry last in the first network
//! configuration of the node (a lone `.conf` becomes a `.conflist`). Then it
//! checks every 10 s, since network plugins rewrite their files, and on
//! SIGTERM takes its entry out again.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};

/// The kubeconfig file the installer writes next to the configuration.
pub const KUBECONFIG_FILE: &str = "mesh-cni.kubeconfig";
const MAX_CONF: u64 = 1 << 20;
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, Parser)]
#[command(name = "mesh-cni install", about = "Install mesh-cni on this node")]
struct Args {
    /// The node's CNI binary directory, as mounted here.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The node's CNI configuration directory, as mounted here.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The same directory as the container runtime sees it on the node
    /// (where the entry says the kubeconfig is).
    #[arg(long, default_value = "/etc/cni/net.d")]
    host_conf_dir: PathBuf,
    /// Copy this kubeconfig instead of building one from the pod's service
    /// account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Install (or with --remove, remove) once and exit.
    #[arg(long)]
    once: bool,
    /// Take the mesh-cni entry out of the configuration.
    #[arg(long)]
    remove: bool,
}

/// Runs the installer with `args` (`install` first).
pub fn main(args: &[String]) -> ExitCode {
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let report = |r: Result<String>| match r {
        Ok(what) => {
            eprintln!("mesh-cni: {what}");
            true
        }
        Err(e) => {
            eprintln!("mesh-cni: error: {e:#}");
            false
        }
    };
    if args.remove {
        return exit(report(remove(&args.conf_dir)));
    }
    if args.once {
        return exit(report(install(&args)));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-cni: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            eprintln!("mesh-cni: error: cannot handle SIGTERM");
            return ExitCode::FAILURE;
        };
        let mut last = String::new();
        loop {
            match install(&args) {
                Ok(what) if what != last => {
                    eprintln!("mesh-cni: {what}");
                    last = what;
                }
                Ok(_) => {}
                Err(e) => eprintln!("mesh-cni: not installed yet: {e:#}; retrying in 10 s"),
            }
            tokio::select! {
                _ = term.recv() => break,
                () = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
        exit(report(remove(&args.conf_dir)))
    })
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn install(args: &Args) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let target = args.bin_dir.join("mesh-cni");
    let mine = std::fs::read(&exe).with_context(|| format!("cannot read {}", exe.display()))?;
    if std::fs::read(&target).ok().as_deref() != Some(&mine[..]) {
        write_atomic(&target, &mine, 0o755)?;
    }
    let kubeconfig = match &args.kubeconfig {
        Some(file) => {
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
        }
        None => in_cluster_kubeconfig()?,
    };
    let kube_path = args.conf_dir.join(KUBECONFIG_FILE);
    if std::fs::read(&kube_path).ok().as_deref() != Some(&kubeconfig[..]) {
        write_atomic(&kube_path, &kubeconfig, 0o600)?;
    }
    let entry = json!({
        "type": "mesh-cni",
        "kubeconfig": args.host_conf_dir.join(KUBECONFIG_FILE),
    });
    let (path, mut list) = primary_config(&args.conf_dir)?;
    let plugins = list["plugins"]
        .as_array_mut()
        .context("the configuration has no plugins list")?;
    let at = plugins.iter().position(|p| p["type"] == "mesh-cni");
    let changed = match at {
        Some(i) if plugins[i] == entry => false,
        Some(i) => {
            plugins[i] = entry;
            true
        }
        None => {
            plugins.push(entry);
            true
        }
    };
    let target = path.with_extension("conflist");
    if changed || target != path {
        let text = serde_json::to_vec_pretty(&list)?;
        write_atomic(&target, &text, 0o644)?;
        if target != path {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(format!("chained in {}", target.display()))
}

fn remove(conf_dir: &Path) -> Result<String> {
    let (path, mut list) = primary_config(conf_dir)?;
    let Some(plugins) = list["plugins"].as_array_mut() else {
        return Ok("nothing to remove".into());
    };
    let before = plugins.len();
    plugins.retain(|p| p["type"] != "mesh-cni");
    if plugins.len() == before {
        return Ok(format!("no mesh-cni entry in {}", path.display()));
    }
    write_atomic(&path, &serde_json::to_vec_pretty(&list)?, 0o644)?;
    Ok(format!("removed from {}", path.display()))
}

/// The first configuration (by name, as the runtime picks it), as a
/// conflist.
fn primary_config(dir: &Path) -> Result<(PathBuf, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    files.sort();
    let Some(path) = files.into_iter().next() else {
        bail!(
            "no CNI configuration in {} yet (the cluster's network plugin writes it)",
            dir.display()
        );
    };
    if std::fs::metadata(&path)?.len() > MAX_CONF {
        bail!("{} is larger than 1 MiB", path.display());
    }
    let text = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let conf: Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    if conf["plugins"].is_array() {
        return Ok((path, conf));
    }
    if !conf["type"].is_string() {
        bail!("{} is neither a plugin nor a plugin list", path.display());
    }
    let list = json!({
        "cniVersion": conf["cniVersion"],
        "name": conf["name"],
        "plugins": [conf],
    });
    Ok((path, list))
}

fn in_cluster_kubeconfig() -> Result<Vec<u8>> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .context("not in a pod (no KUBERNETES_SERVICE_HOST); give --kubeconfig")?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let token = std::fs::read_to_string(Path::new(SA_DIR).join("token"))
        .context("cannot read the service account token")?;
    let ca = std::fs::read(Path::new(SA_DIR).join("ca.crt")).context("cannot read ca.crt")?;
    use base64::Engine;
    let server = if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    };
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{ "name": "local", "cluster": {
            "server": server,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca),
        } }],
        "users": [{ "name": "mesh-cni", "user": { "token": token.trim() } }],
        "contexts": [{ "name": "mesh-cni", "context": { "cluster": "local", "user": "mesh-cni" } }],
        "current-context": "mesh-cni",
    });
    Ok(serde_json::to_vec_pretty(&config)?)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("mesh-cni-tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
