//! Registers the workload with the control plane and keeps it alive with
//! heartbeats; registers again if the control plane forgot it. The health
//! each carries is the app's, as the caller's checks see it (a sidecar
//! reports healthy; the VM agent probes its app), and a change is sent at
//! once rather than at the next heartbeat.

use std::time::Duration;

use mesh_core::api::v1::{
    DeregisterRequest, HeartbeatRequest, ProtocolHint, RegisterRequest, WorkloadPort,
    registry_client::RegistryClient,
};
use tonic::{Code, transport::Channel};

use crate::{env::Config, identity::backoff};

/// The app's health as the registration reports it.
pub type Health = tokio::sync::watch::Receiver<bool>;

/// Health that is always good (a sidecar: the kubelet or the app's own
/// readiness decides elsewhere).
pub fn always_healthy() -> Health {
    tokio::sync::watch::channel(true).1
}

fn request(config: &Config, proxy_port: u16, healthy: bool) -> RegisterRequest {
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
        healthy,
        proxy_port: u32::from(proxy_port),
        via_gateway: config.via_gateway.is_some(),
    }
}

/// Registers, then heartbeats forever.
pub async fn keep_registered(
    mut client: RegistryClient<Channel>,
    config: Config,
    proxy_port: u16,
    mut health: Health,
) {
    let mut failures = 0;
    loop {
        let healthy = *health.borrow_and_update();
        let interval = match client.register(request(&config, proxy_port, healthy)).await {
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
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                // A sender that went away leaves the last value standing.
                Ok(()) = health.changed() => {}
            }
            let healthy = *health.borrow_and_update();
            let beat = HeartbeatRequest {
                namespace: config.namespace.clone(),
                name: config.workload.clone(),
                healthy,
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
