//! Inbound policy per app port, streamed from the control plane and cached.
//! Until the first answer arrives a port has no policy and requests fail
//! closed; when the stream breaks, the last policy keeps applying.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_core::{
    api::v1::{InboundPolicy, InboundRequest, policy_client::PolicyClient},
    identity::SpiffeId,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::identity::backoff;

/// Why a peer is refused by a port's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// The control plane has not answered for this port yet.
    NoPolicy,
    /// The policy does not admit this identity.
    Unauthorized,
}

impl Denied {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoPolicy => "no_policy",
            Self::Unauthorized => "unauthorized",
        }
    }
}

/// Whether `policy` admits `peer`.
pub fn authorize(policy: &InboundPolicy, peer: &SpiffeId) -> Result<(), Denied> {
    let admitted = policy.authorizations.iter().any(|a| {
        a.any_authenticated
            || a.identities.iter().any(|id| id == peer.as_str())
            || a.trust_domains
                .iter()
                .any(|td| td == peer.trust_domain_str())
    });
    if admitted {
        Ok(())
    } else {
        Err(Denied::Unauthorized)
    }
}

#[derive(Clone, Debug)]
pub struct PolicyCache {
    client: PolicyClient<Channel>,
    namespace: String,
    workload: String,
    ports: Arc<Mutex<HashMap<u16, watch::Receiver<Option<InboundPolicy>>>>>,
}

impl PolicyCache {
    pub fn new(client: PolicyClient<Channel>, namespace: &str, workload: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
            workload: workload.to_owned(),
            ports: Arc::default(),
        }
    }

    /// The policy of `port`, waiting up to `fail_fast` for a first answer.
    pub async fn get(&self, port: u16, fail_fast: Duration) -> Option<InboundPolicy> {
        let mut rx = self.watch(port);
        let ready = tokio::time::timeout(fail_fast, rx.wait_for(Option::is_some)).await;
        match ready {
            Ok(Ok(policy)) => policy.clone(),
            _ => None,
        }
    }

    fn watch(&self, port: u16) -> watch::Receiver<Option<InboundPolicy>> {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = ports.get(&port) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        ports.insert(port, rx.clone());
        let (client, namespace, workload) = (
            self.client.clone(),
            self.namespace.clone(),
            self.workload.clone(),
        );
        tokio::spawn(follow(client, namespace, workload, port, tx));
        rx
    }
}

/// Follows one port's policy stream, reconnecting with backoff; the last
/// policy stays in place while disconnected.
async fn follow(
    mut client: PolicyClient<Channel>,
    namespace: String,
    workload: String,
    port: u16,
    tx: watch::Sender<Option<InboundPolicy>>,
) {
    let mut failures = 0;
    loop {
        let request = InboundRequest {
            namespace: namespace.clone(),
            workload: workload.clone(),
            port: u32::from(port),
        };
        match client.watch_inbound(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(policy)) => {
                            failures = 0;
                            tracing::debug!(port, server = %policy.server, "inbound policy updated");
                            tx.send_replace(Some(policy));
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(port, error = %e.message(), "inbound policy stream broke; keeping the last policy");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(port, error = %e.message(), "cannot watch inbound policy"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff(failures)).await;
        failures += 1;
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::api::v1::Authorization;

    use super::*;

    fn policy(authz: Vec<Authorization>) -> InboundPolicy {
        InboundPolicy {
            port: 8080,
            authorizations: authz,
            ..Default::default()
        }
    }

    #[test]
    fn identities_trust_domains_and_any() {
        let web: SpiffeId = "spiffe://west.mesh.local/ns/shop/sa/web".parse().unwrap();
        let east: SpiffeId = "spiffe://east.mesh.local/ns/shop/sa/web".parse().unwrap();
        let only_web = policy(vec![Authorization {
            identities: vec![web.to_string()],
            ..Default::default()
        }]);
        assert_eq!(authorize(&only_web, &web), Ok(()));
        assert_eq!(authorize(&only_web, &east), Err(Denied::Unauthorized));
        let east_td = policy(vec![Authorization {
            trust_domains: vec!["east.mesh.local".into()],
            ..Default::default()
        }]);
        assert_eq!(authorize(&east_td, &east), Ok(()));
        assert_eq!(authorize(&east_td, &web), Err(Denied::Unauthorized));
        let any = policy(vec![Authorization {
            any_authenticated: true,
            ..Default::default()
        }]);
        assert_eq!(authorize(&any, &east), Ok(()));
        assert_eq!(
            authorize(&policy(vec![]), &web),
            Err(Denied::Unauthorized),
            "no authorizations: deny"
        );
    }
}
