//! Inbound policy per app port, streamed from the control plane and cached.
//! Until the first answer arrives a port has no policy and requests fail
//! closed; when the stream breaks, the last policy keeps applying.

use std::{collections::BTreeSet, time::Duration};

use mesh_core::{
    api::v1::{InboundPolicy, InboundRequest, policy_client::PolicyClient},
    identity::{SpiffeId, TrustDomain},
};
use tonic::transport::Channel;

use crate::follow::Follower;

/// Why a peer is refused for a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// The port is one of the proxy's own (inbound, outbound, admin).
    ProxyPort,
    /// The workload does not declare the port (`MESH_PROXY_APP_PORTS`).
    UndeclaredPort,
    /// The control plane has not answered for this port yet.
    NoPolicy,
    /// A linked cluster's caller, for a port no exported Service targets.
    NotExported,
    /// The policy does not admit this identity.
    Unauthorized,
}

impl Denied {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ProxyPort => "proxy_port",
            Self::UndeclaredPort => "undeclared_port",
            Self::NoPolicy => "no_policy",
            Self::NotExported => "not_exported",
            Self::Unauthorized => "unauthorized",
        }
    }
}

/// The ports a caller may name: the app ports the workload declares, never
/// one of the proxy's own. Checked before any policy watch is opened or any
/// metric label is made, so a caller cannot grow either.
#[derive(Clone, Debug, Default)]
pub struct Ports {
    /// The workload's declared app ports.
    pub app: BTreeSet<u16>,
    /// The proxy's own listeners on the app's address.
    pub own: BTreeSet<u16>,
}

impl Ports {
    pub fn check(&self, port: u16) -> Result<(), Denied> {
        if self.own.contains(&port) {
            Err(Denied::ProxyPort)
        } else if self.app.contains(&port) {
            Ok(())
        } else {
            Err(Denied::UndeclaredPort)
        }
    }
}

/// Whether `policy` admits `peer`. A caller of another trust domain than
/// `local` (a linked cluster's, through a gateway) reaches only exported
/// ports: a verified identity says who calls, not what it may reach.
pub fn authorize(
    policy: &InboundPolicy,
    peer: &SpiffeId,
    local: &TrustDomain,
) -> Result<(), Denied> {
    if !peer.is_member_of(local) && !policy.exported {
        return Err(Denied::NotExported);
    }
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
        let west: TrustDomain = "west.mesh.local".parse().unwrap();
        let authorize = |p: &InboundPolicy, id: &SpiffeId| {
            let exported = InboundPolicy {
                exported: true,
                ..p.clone()
            };
            authorize(&exported, id, &west)
        };
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

    #[test]
    fn linked_callers_reach_exported_ports_only() {
        let west: TrustDomain = "west.mesh.local".parse().unwrap();
        let local: SpiffeId = "spiffe://west.mesh.local/ns/shop/sa/web".parse().unwrap();
        let linked: SpiffeId = "spiffe://east.mesh.local/ns/shop/sa/web".parse().unwrap();
        let mut any = policy(vec![Authorization {
            any_authenticated: true,
            ..Default::default()
        }]);
        assert_eq!(authorize(&any, &local, &west), Ok(()));
        assert_eq!(authorize(&any, &linked, &west), Err(Denied::NotExported));
        any.exported = true;
        assert_eq!(authorize(&any, &linked, &west), Ok(()));
    }

    #[test]
    fn only_declared_app_ports_and_never_the_proxys_own() {
        let ports = Ports {
            app: [8080, 4191].into(),
            own: [4143, 4140, 4191].into(),
        };
        assert_eq!(ports.check(8080), Ok(()));
        assert_eq!(ports.check(9090), Err(Denied::UndeclaredPort));
        assert_eq!(ports.check(4140), Err(Denied::ProxyPort));
        assert_eq!(
            ports.check(4191),
            Err(Denied::ProxyPort),
            "even if declared"
        );
    }
}
