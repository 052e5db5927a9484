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
    /// The tunnel transport to prefer. Tunnels run over TCP until the QUIC
    /// tunnel lands, whatever this says.
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
    }
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
