//! gRPC through two proxies: a tonic client sends to its proxy's outbound
//! port (HTTP/2 prior knowledge, as a gRPC client does), and a tonic server
//! behind the destination proxy answers, over mTLS in between. A
//! server-streaming call shows that streams cross intact, and the server
//! sees the caller's verified identity in `mesh-client-id`.

mod support;

use std::{net::SocketAddr, time::Duration};

use mesh_core::api::v1::{
    DiscoveryUpdate, NoSuchService, WatchRequest,
    discovery_client::DiscoveryClient,
    discovery_server::{Discovery, DiscoveryServer},
    discovery_update::Kind,
};
use mesh_proxy::env::AppPort;
use support::*;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

/// A gRPC app: `Watch` streams three answers naming the caller it saw.
struct Echo;

#[tonic::async_trait]
impl Discovery for Echo {
    type WatchStream = tokio_stream::Iter<std::vec::IntoIter<Result<DiscoveryUpdate, Status>>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let seen = req
            .metadata()
            .get("mesh-client-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let asked = req.into_inner().authority;
        let answers = (0..3)
            .map(|i| {
                Ok(DiscoveryUpdate {
                    kind: Some(Kind::NoSuchService(NoSuchService {
                        authority: format!("{asked}#{i}"),
                        reason: seen.clone(),
                    })),
                })
            })
            .collect::<Vec<_>>();
        Ok(Response::new(tokio_stream::iter(answers)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_crosses_two_proxies_with_mtls_and_identity() {
    let w = world(Duration::from_secs(24 * 3600)).await;
    // A `grpc` service in shop, its app a tonic server on 127.0.0.6.
    let port = w.app_port;
    std::fs::write(
        w.dir.path().join("config/grpc.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: grpc, namespace: shop}}\nspec:\n  selector: {{app: grpc}}\n  ports: [{{port: {port}, appProtocol: grpc}}]\n"
        ),
    )
    .unwrap();
    let app: SocketAddr = format!("127.0.0.6:{port}").parse().unwrap();
    let listener = tokio::net::TcpListener::bind(app).await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let spec = Spec {
        sa: "grpc",
        name: "grpc-0",
        labels: &[("app", "grpc")],
        app_ports: vec![AppPort {
            name: "grpc".into(),
            port,
        }],
        ip: app.ip(),
    };
    let _server_proxy = start_proxy(w.plane(), w.dir.path(), &w.anchors, spec).await;
    let web = w.proxy("web", "web-0", &[("app", "web")]).await;

    // The client names the service; its connection goes to its proxy.
    let outbound = web.outbound_addr;
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://grpc.shop.svc.cluster.local:{port}"
    ))
    .unwrap()
    .connect_with_connector(tower::service_fn(move |_: http::Uri| async move {
        tokio::net::TcpStream::connect(outbound)
            .await
            .map(hyper_util::rt::TokioIo::new)
    }))
    .await
    .unwrap();
    let mut client = DiscoveryClient::new(channel);

    // The config directory is polled: until the service is known the name
    // goes straight through (and fails to resolve), so retry a while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let answers = loop {
        let answers: Result<Vec<DiscoveryUpdate>, Status> = async {
            let stream = client
                .watch(WatchRequest {
                    authority: "hello".into(),
                })
                .await?;
            stream.into_inner().collect().await
        }
        .await;
        match answers {
            Ok(answers) => break answers,
            Err(status) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the gRPC call never succeeded: {status}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(answers.len(), 3, "every streamed message arrives");
    for (i, answer) in answers.iter().enumerate() {
        let Some(Kind::NoSuchService(n)) = &answer.kind else {
            panic!("{answer:?}");
        };
        assert_eq!(n.authority, format!("hello#{i}"));
        assert_eq!(
            n.reason,
            id("web").as_str(),
            "the server saw web's identity"
        );
    }
}
