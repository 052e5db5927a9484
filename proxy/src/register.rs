//! Registers the workload with the control plane and keeps it alive with
//! heartbeats; registers again if the control plane forgot it.

use std::time::Duration;

use mesh_core::api::v1::{
    DeregisterRequest, HeartbeatRequest, ProtocolHint, RegisterRequest, WorkloadPort,
    registry_client::RegistryClient,
};
use tonic::{Code, transport::Channel};

use crate::{env::Config, identity::backoff};

fn request(config: &Config, proxy_port: u16) -> RegisterRequest {
    RegisterRequest {
        namespace: config.namespace.clone(),
        name: config.workload.clone(),
        addresses: config
            .workload_addresses
            .iter()
            .map(ToString::to_string)
            .collect(),
        ports: config
            .app_ports
            .iter()
            .map(|p| WorkloadPort {
                name: p.name.clone(),
                port: u32::from(p.port),
                protocol: ProtocolHint::Unknown as i32,
            })
            .collect(),
        labels: config.labels.clone().into_iter().collect(),
        healthy: true,
        proxy_port: u32::from(proxy_port),
    }
}

/// Registers, then heartbeats forever.
pub async fn keep_registered(mut client: RegistryClient<Channel>, config: Config, proxy_port: u16) {
    let mut failures = 0;
    loop {
        let interval = match client.register(request(&config, proxy_port)).await {
            Ok(resp) => {
                failures = 0;
                let secs = resp.into_inner().heartbeat_interval_seconds.max(1);
                tracing::info!(workload = %config.workload, "registered with the control plane");
                Duration::from_secs(secs)
            }
            Err(e) => {
                let wait = backoff(failures);
                failures += 1;
                tracing::warn!(error = %e.message(), "registration failed; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        loop {
            tokio::time::sleep(interval).await;
            let beat = HeartbeatRequest {
                namespace: config.namespace.clone(),
                name: config.workload.clone(),
                healthy: true,
            };
            match client.heartbeat(beat).await {
                Ok(_) => {}
                Err(e) if e.code() == Code::NotFound => {
                    tracing::warn!("the control plane forgot this workload; registering again");
                    break;
                }
                // Transient: the next heartbeat tries again.
                Err(e) => tracing::warn!(error = %e.message(), "heartbeat failed"),
            }
        }
    }
}

/// Removes the registration on orderly shutdown.
pub async fn deregister(mut client: RegistryClient<Channel>, config: &Config) {
    let req = DeregisterRequest {
        namespace: config.namespace.clone(),
        name: config.workload.clone(),
    };
    if let Err(e) = client.deregister(req).await {
        tracing::warn!(error = %e.message(), "could not deregister");
    }
}
