//! `mesh viz`: which viz a query goes to. `--viz host:port` names one;
//! otherwise the `mesh up` run in `--state-dir` says where each cluster's
//! viz listens (`--from` picks the cluster, the first by default).

use std::net::SocketAddr;

use anyhow::{Context, bail};
use mesh_viz::cli::Ask;

pub(crate) fn resolve(ask: &Ask) -> anyhow::Result<SocketAddr> {
    if let Some(viz) = &ask.viz {
        let addr = viz
            .strip_prefix("http://")
            .unwrap_or(viz)
            .trim_end_matches('/');
        return addr
            .parse()
            .with_context(|| format!("--viz {viz:?} is not host:port (e.g. 127.1.1.5:8084)"));
    }
    let state_dir = ask
        .state_dir
        .clone()
        .unwrap_or_else(mesh_topologies::cli::default_state_dir);
    let record = mesh_topologies::runner::RunRecord::load(&state_dir).with_context(|| {
        format!(
            "no `mesh up` run in {} to find viz in; pass --viz host:port or --state-dir",
            state_dir.display()
        )
    })?;
    let clusters: Vec<_> = record
        .clusters
        .iter()
        .filter(|c| ask.from.as_ref().is_none_or(|f| *f == c.name))
        .collect();
    if clusters.is_empty() {
        bail!(
            "the run in {} has no cluster {:?}",
            state_dir.display(),
            ask.from.as_deref().unwrap_or("")
        );
    }
    clusters.iter().find_map(|c| c.viz).with_context(|| {
        format!(
            "the run in {} has no viz: install Prometheus (apt-get install prometheus) and run `mesh up` again",
            state_dir.display()
        )
    })
}
