//! `mesh viz install`: the Prometheus scrape configuration for a
//! Kubernetes cluster. Injected proxies and the control plane serve
//! `GET /metrics` (and nothing else) on their `mesh-metrics` port (4192,
//! on the pod's address; admin ports stay on loopback, so `/tap` is never
//! exposed); the configuration keeps exactly those ports, with the labels
//! viz reads.

use serde_json::{Value, json};

#[derive(Clone, Debug, clap::Args)]
pub struct InstallArgs {
    /// This cluster's name (put on every series as `mesh_cluster`).
    #[arg(long)]
    pub cluster: String,
    /// How often Prometheus scrapes.
    #[arg(long, default_value = "10s")]
    pub scrape_interval: String,
}

/// The scrape configuration, as a document Prometheus reads.
pub fn scrape_config(args: &InstallArgs) -> Value {
    let relabel =
        |source: &str, target: &str| json!({ "source_labels": [source], "target_label": target });
    json!({
        "global": { "scrape_interval": args.scrape_interval },
        "scrape_configs": [{
            "job_name": "mesh",
            "kubernetes_sd_configs": [{ "role": "pod" }],
            "relabel_configs": [
                {
                    "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                    "action": "keep",
                    "regex": mesh_control_metrics_port_name(),
                },
                { "target_label": "mesh_cluster", "replacement": args.cluster },
                relabel("__meta_kubernetes_namespace", "mesh_namespace"),
                // The deployment: `app.kubernetes.io/name` (the control
                // plane's), overridden by `app` where a pod has one.
                relabel("__meta_kubernetes_pod_label_app_kubernetes_io_name", "mesh_deployment"),
                {
                    "source_labels": ["__meta_kubernetes_pod_label_app"],
                    "regex": "(.+)",
                    "target_label": "mesh_deployment",
                },
                relabel("__meta_kubernetes_pod_name", "mesh_pod"),
                relabel("__meta_kubernetes_pod_container_name", "mesh_component"),
            ],
        }],
    })
}

/// The container port name injection gives the metrics-only listener.
fn mesh_control_metrics_port_name() -> &'static str {
    "mesh-metrics"
}

pub fn print(args: &InstallArgs) -> anyhow::Result<()> {
    if !crate::server::is_name(&args.cluster) {
        anyhow::bail!(
            "--cluster {:?} is not a name (lowercase letters, digits and '-')",
            args.cluster
        );
    }
    let yaml = serde_saphyr::to_string(&scrape_config(args))?;
    outln!(
        "# Prometheus scrape configuration for Mesh in cluster {}.",
        args.cluster
    );
    outln!(
        "# Every pod's metrics-only port (4192, `mesh-metrics`: injected proxies, the control plane); admin and /tap stay on loopback."
    );
    outln!("{}", yaml.trim_end());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scrape_config_keeps_only_the_metrics_port_and_names_the_cluster() {
        let args = InstallArgs {
            cluster: "west".into(),
            scrape_interval: "10s".into(),
        };
        let c = scrape_config(&args);
        let job = &c["scrape_configs"][0];
        assert_eq!(job["relabel_configs"][0]["action"], "keep");
        assert_eq!(job["relabel_configs"][0]["regex"], "mesh-metrics");
        assert_eq!(job["relabel_configs"][1]["replacement"], "west");
        let yaml = serde_saphyr::to_string(&c).unwrap();
        assert!(yaml.contains("kubernetes_sd_configs"), "{yaml}");
    }
}
