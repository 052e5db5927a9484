//! `mesh-service-mirror`: makes linked clusters' exported services callable
//! here. One controller per Link watches the remote exports through the
//! remote gateway and writes `MirroredService` resources (`<svc>-<cluster>`)
//! into the local control plane's config directory; see `mirror.rs`.

pub mod cli;
pub mod config;
pub mod metrics;
pub mod mirror;
pub mod sink;
pub mod validate;

use std::{net::SocketAddr, path::PathBuf};

pub use config::MirrorArgs;
use mesh_proxy::proxy::{Joined, join};
use tokio::task::JoinSet;

/// Why the service mirror did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Join(#[from] mesh_proxy::StartError),
}

/// A running service mirror; dropping it stops every controller.
#[derive(Debug)]
pub struct ServiceMirror {
    pub admin_addr: SocketAddr,
    pub config_dir: Option<PathBuf>,
    tasks: JoinSet<()>,
}

impl ServiceMirror {
    pub async fn start(args: MirrorArgs) -> Result<Self, StartError> {
        let config = args.identity_config().map_err(StartError::Config)?;
        let sink = match (&args.config_dir, args.store) {
            (Some(dir), config::Store::Local) => {
                if !dir.is_dir() {
                    return Err(StartError::Config(format!(
                        "--config-dir {} is not a directory; give the control plane's --config-dir",
                        dir.display()
                    )));
                }
                sink::Sink::Dir(dir.clone())
            }
            (None, config::Store::Local) => {
                return Err(StartError::Config(
                    "--config-dir is required with --store local (the control plane's --config-dir)".into(),
                ));
            }
            (Some(_), config::Store::Kube) => {
                return Err(StartError::Config(
                    "--config-dir is for --store local; with --store kube mirrors go to the API server".into(),
                ));
            }
            (None, config::Store::Kube) => sink::Sink::Kube(
                mesh_control::k8s::client(args.kubeconfig.as_deref())
                    .await
                    .map_err(StartError::Config)?,
            ),
        };
        tracing::info!(?args, "starting service mirror");
        let metrics = metrics::Metrics::new();
        let mut tasks = JoinSet::new();
        let Joined {
            bundles,
            creds,
            api,
            readiness,
            admin_addr,
        } = join(&config, metrics.registry.clone(), None, &mut tasks).await?;
        tasks.spawn(mesh_proxy::identity::renew_forever(
            config,
            bundles.clone(),
            creds.clone(),
            |_| {},
        ));
        tasks.spawn(mirror::run(
            api,
            args.cluster.clone(),
            sink,
            creds,
            bundles,
            metrics,
        ));
        readiness.set_ready();
        Ok(Self {
            admin_addr,
            config_dir: args.config_dir,
            tasks,
        })
    }

    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}
