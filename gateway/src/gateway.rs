//! Assembles a running gateway: trust bundle -> admin (not ready) ->
//! identity -> exports, discovery and linked trust from the local control
//! plane -> tunnel listener -> ready. Identity, renewal and the watch
//! followers are the proxy's own.

use std::{net::SocketAddr, sync::Arc};

use mesh_core::{
    api::v1::{
        WatchExportsRequest, WatchGatewayWorkloadsRequest, WatchRequest,
        discovery_client::DiscoveryClient, federation_client::FederationClient,
        registry_client::RegistryClient,
    },
    identity::{ExpectedIdentity, tls},
};
use mesh_proxy::{
    follow::Follower,
    identity,
    proxy::{Joined, join},
};
use tokio::{net::TcpListener, task::JoinSet};

use crate::{
    config::GatewayArgs,
    metrics::Metrics,
    tunnel::{self, ALPN_TUNNEL, Tunnel},
};

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Join(#[from] mesh_proxy::StartError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen for tunnels on {addr} (TCP and UDP): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running gateway; dropping it stops everything it started.
#[derive(Debug)]
pub struct Gateway {
    pub tunnel_addr: SocketAddr,
    /// The QUIC tunnel (UDP), on the TCP tunnel's port.
    pub quic_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Metrics,
    tasks: JoinSet<()>,
}

impl Gateway {
    pub async fn start(args: GatewayArgs) -> Result<Self, StartError> {
        let config = args.identity_config().map_err(StartError::Config)?;
        tracing::info!(?args, "starting gateway");
        let metrics = Metrics::new();
        let mut tasks = JoinSet::new();
        let Joined {
            bundles,
            creds,
            api,
            readiness,
            admin_addr,
        } = join(&config, metrics.registry.clone(), None, &mut tasks).await?;
        let federation = FederationClient::new(api.clone());
        let cluster = args.cluster.clone();
        let exports = Follower::new("exports", move |(): ()| {
            let (mut client, cluster) = (federation.clone(), cluster.clone());
            async move {
                client
                    .watch_exports(WatchExportsRequest { cluster })
                    .await
                    .map(tonic::Response::into_inner)
            }
        });
        let discovery_client = DiscoveryClient::new(api.clone());
        let discovery = Follower::new("discovery", move |authority: String| {
            let mut client = discovery_client.clone();
            async move {
                client
                    .watch(WatchRequest { authority })
                    .await
                    .map(tonic::Response::into_inner)
            }
        });
        let registry = RegistryClient::new(api.clone());
        let behind = Follower::new("gateway workloads", move |(): ()| {
            let mut client = registry.clone();
            async move {
                client
                    .watch_gateway_workloads(WatchGatewayWorkloadsRequest {})
                    .await
                    .map(tonic::Response::into_inner)
            }
        });
        // Start following exports now, so the first stream need not wait.
        let _ = exports.watch(&());
        let _ = behind.watch(&());
        let tunnel = Arc::new(Tunnel::new(
            readiness.clone(),
            args.trust_domain.clone(),
            args.cluster_domain.clone(),
            (
                args.control_api_addr.clone(),
                args.control_identity_addr.clone(),
            ),
            exports,
            discovery,
            behind,
            metrics.clone(),
        ));

        // Callers are verified against their own trust domain's bundle; the
        // tunnel then decides by who they are (linked clusters, this
        // cluster's workloads behind the gateway). A caller without a
        // certificate (a VM joining) may only reach the identity service.
        let mut tunnel_tls = tls::server_config_optional_client(
            creds.clone(),
            bundles.clone(),
            ExpectedIdentity::AnyTrusted,
        )?;
        tunnel_tls.alpn_protocols =
            vec![ALPN_TUNNEL.to_vec(), crate::behind::ALPN_REVERSE.to_vec()];
        let listener = TcpListener::bind(args.tunnel_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: args.tunnel_addr,
                source,
            })?;
        let tunnel_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: args.tunnel_addr,
            source,
        })?;
        tasks.spawn(tunnel::accept(
            listener,
            Arc::new(tunnel_tls),
            tunnel.clone(),
        ));

        // The same tunnel over QUIC, on the same port over UDP.
        let mut quic_tls =
            tls::server_config(creds.clone(), bundles.clone(), ExpectedIdentity::AnyTrusted)?;
        quic_tls.alpn_protocols = vec![crate::quic::ALPN_QUIC.to_vec()];
        let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(quic_tls)
            .map_err(|e| StartError::Config(format!("QUIC TLS: {e}")))?;
        let mut quic_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
        // The same stream limit as over TCP; proxies open another tunnel
        // connection past it.
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(tunnel::MAX_STREAMS));
        quic_config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(quic_config, tunnel_addr).map_err(|source| {
            StartError::Bind {
                addr: tunnel_addr,
                source,
            }
        })?;
        let quic_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
            addr: tunnel_addr,
            source,
        })?;
        tasks.spawn(crate::quic::accept(endpoint, tunnel));

        let ready = readiness.clone();
        tasks.spawn(identity::renew_forever(
            config,
            bundles,
            creds,
            move |state| match state {
                Ok(_) => ready.set_ready(),
                Err(why) => ready.set_not_ready(why),
            },
        ));
        readiness.set_ready();
        tracing::info!(%tunnel_addr, %quic_addr, %admin_addr, "gateway ready");
        Ok(Self {
            tunnel_addr,
            quic_addr,
            admin_addr,
            metrics,
            tasks,
        })
    }

    /// Stops accepting and drops every tunnel.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}
