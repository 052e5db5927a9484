//! Inbound policy per app port, streamed from the control plane and cached.
//! Until the first answer arrives a port has no policy and requests fail
//! closed; when the stream breaks, the last policy keeps applying.

use std::time::Duration;

use mesh_core::{
    api::v1::{InboundPolicy, InboundRequest, policy_client::PolicyClient},
    identity::SpiffeId,
};
use tonic::transport::Channel;

use crate::follow::Follower;

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

/// Inbound policies of this workload's ports, followed from the control plane.
#[derive(Clone, Debug)]
pub struct PolicyCache(Follower<u16, InboundPolicy>);

impl PolicyCache {
    pub fn new(client: PolicyClient<Channel>, namespace: &str, workload: &str) -> Self {
        let (namespace, workload) = (namespace.to_owned(), workload.to_owned());
        Self(Follower::new("inbound policy", move |port: u16| {
            let mut client = client.clone();
            let request = InboundRequest {
                namespace: namespace.clone(),
                workload: workload.clone(),
                port: u32::from(port),
            };
            async move {
                client
                    .watch_inbound(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        }))
    }

    /// The policy of `port`, waiting up to `fail_fast` for a first answer.
    pub async fn get(
        &self,
        port: u16,
        fail_fast: Duration,
    ) -> Option<std::sync::Arc<InboundPolicy>> {
        self.0.get(&port, fail_fast).await
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
