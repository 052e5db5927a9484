//! `mesh install` and `mesh uninstall`: manifests for `kubectl apply -f -`.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use clap::Args;
use mesh_control::k8s::{
    crds,
    install::{self, IssuerFiles, Values},
};
use mesh_core::identity::files;

#[derive(Debug, Args)]
pub(crate) struct InstallArgs {
    /// Print the CustomResourceDefinitions only (apply them first).
    #[arg(long)]
    crds: bool,
    /// The CA directory (`mesh identity ca create`) whose issuer the control
    /// plane signs with; it goes into the `mesh-system/mesh-issuer` Secret.
    /// The root key never leaves the directory. Without it, create that
    /// Secret yourself.
    #[arg(long, conflicts_with = "crds")]
    ca: Option<PathBuf>,
    /// High availability: 3 replicas, a PodDisruptionBudget and one
    /// replica per node.
    #[arg(long, conflicts_with = "crds")]
    ha: bool,
    /// The CNI plugin (`mesh install-cni`) sets up interception: injected
    /// pods get no privileged `mesh-init` container.
    #[arg(long, conflicts_with = "crds")]
    cni_enabled: bool,
    /// A setting, KEY=VALUE (repeatable): cluster, trustDomain, image,
    /// imagePullPolicy, replicas, logLevel, resources.{requests,limits}.{cpu,memory},
    /// cniEnabled, webhookFailurePolicy, proxy.{image,logLevel,cpuRequest,
    /// cpuLimit,memoryRequest,memoryLimit,uid,await,nativeSidecar,shutdownGrace}.
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "crds")]
    sets: Vec<String>,
    /// A YAML file of settings (repeatable; later files and --set win).
    #[arg(long = "values", value_name = "FILE", conflicts_with = "crds")]
    values: Vec<PathBuf>,
}

pub(crate) fn install(args: InstallArgs, out: &mut impl Write) -> Result<ExitCode> {
    if args.crds {
        out.write_all(crds::crds_yaml()?.as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut files_read = Vec::new();
    for path in &args.values {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --values {}", path.display()))?;
        files_read.push((path.display().to_string(), text));
    }
    let mut sets = args.sets.clone();
    if args.cni_enabled {
        sets.insert(0, "cniEnabled=true".into());
    }
    let issuer = match &args.ca {
        Some(dir) => {
            let ca = files::load_ca(dir)?;
            let td = ca.trust_domain().to_string();
            // The trust domain is the CA's; a different --set is a mistake.
            let asked = Values::build(&files_read, &sets, args.ha)?;
            if asked.trust_domain != td && asked.trust_domain != Values::default().trust_domain {
                bail!(
                    "trustDomain {} differs from the CA's {td} in {}; drop the setting or use that CA",
                    asked.trust_domain,
                    dir.display()
                );
            }
            sets.push(format!("trustDomain={td}"));
            let read = |name: &str| {
                std::fs::read_to_string(dir.join(name))
                    .with_context(|| format!("cannot read {}", dir.join(name).display()))
            };
            Some(IssuerFiles {
                root_crt: read(files::ROOT_CERT)?,
                issuer_crt: read(files::ISSUER_CERT)?,
                issuer_key: read(files::ISSUER_KEY)?,
                bundle_json: read(files::BUNDLE)?,
            })
        }
        None => {
            eprintln!(
                "note: no --ca; create Secret {}/{} (root.crt, issuer.crt, issuer.key, bundle.json) before the control plane starts",
                install::NAMESPACE,
                install::ISSUER_SECRET
            );
            None
        }
    };
    let values = Values::build(&files_read, &sets, args.ha)?;
    out.write_all(install::install_yaml(&values, issuer.as_ref())?.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn uninstall(out: &mut impl Write) -> Result<ExitCode> {
    eprintln!(
        "note: `kubectl delete -f -` of this removes the control plane, the CRDs and with them every Mesh resource"
    );
    out.write_all(install::uninstall_yaml()?.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(crate) struct InstallCniArgs {
    /// The image holding /usr/bin/mesh-cni (the Mesh image).
    #[arg(long, default_value_t = Values::default().image)]
    image: String,
    #[arg(long, default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    image_pull_policy: String,
    /// The nodes' CNI binary directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: String,
    /// The nodes' CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: String,
}

pub(crate) fn install_cni(args: InstallCniArgs, out: &mut impl Write) -> Result<ExitCode> {
    if args.image.is_empty() || args.image.chars().any(char::is_whitespace) {
        bail!("--image {:?} is not an image reference", args.image);
    }
    for dir in [&args.cni_bin_dir, &args.cni_conf_dir] {
        if !dir.starts_with('/') {
            bail!("{dir:?} is not an absolute path");
        }
    }
    let values = mesh_control::k8s::cni::CniValues {
        image: args.image,
        image_pull_policy: args.image_pull_policy,
        bin_dir: args.cni_bin_dir,
        conf_dir: args.cni_conf_dir,
    };
    eprintln!(
        "note: then install the control plane with `mesh install --cni-enabled` so injected pods get no mesh-init container"
    );
    let docs = mesh_control::k8s::cni::objects(&values);
    out.write_all(mesh_control::k8s::manifest::yaml(&docs)?.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
