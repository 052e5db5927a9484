//! The agent's SPIFFE Workload API, read by two clients we did not write:
//! the `spiffe` crate and py-spiffe (Python, gRPC C-core). Callers are
//! attested by uid; a rotation reaches an open stream.
#![allow(clippy::print_stdout)] // measured times go to the test log

mod support;

use std::{path::Path, time::Duration};

use mesh_vm_agent::{Agent, AgentConfig};
use support::*;
use tokio_stream::StreamExt;

async fn vm(world: &World, allowed_uids: Vec<u32>) -> (Agent, std::path::PathBuf) {
    let ip = "127.0.0.71".parse().unwrap();
    let mut opts = world.vm_options("billing-1", ip);
    opts.workload_api.allowed_uids = allowed_uids;
    let js = world
        .join_string("billing-1", Duration::from_secs(600))
        .await;
    mesh_vm_agent::join::join(&js, &opts).await.unwrap();
    let agent = Agent::start(AgentConfig::load(&opts.config_path).unwrap())
        .await
        .unwrap();
    (agent, opts.workload_api.socket)
}

async fn client(socket: &Path) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap()
}

#[tokio::test]
async fn the_spiffe_crate_reads_the_svid_and_bundles_and_gets_rotations_pushed() {
    // Leaves of 20 s are renewed within about 10 s.
    let world = World::new(Duration::from_secs(20)).await;
    let (agent, socket) = vm(&world, vec![0]).await;
    let client = client(&socket).await;

    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/ns/shop/sa/billing")
    );
    assert_eq!(
        svid.leaf().as_bytes(),
        agent.proxy.credentials.current().chain()[0].as_ref(),
        "the SVID the proxy uses"
    );
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let bundle = bundles.get(&td).expect("our trust domain's bundle");
    let roots = mesh_control::test_util::bundles_of(&world.cfg.ca_dir);
    assert_eq!(
        bundle.authorities()[0].as_bytes(),
        roots.current().iter().next().unwrap().roots()[0].as_ref()
    );

    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let first_leaf = first.default_svid().unwrap().leaf().as_bytes().to_vec();
    let started = tokio::time::Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("a rotation reached the open stream within 30 s")
        .unwrap()
        .unwrap();
    let rotated = next.default_svid().unwrap().leaf().as_bytes().to_vec();
    assert_ne!(rotated, first_leaf, "the pushed SVID is the renewed one");
    assert_eq!(
        rotated,
        agent.proxy.credentials.current().chain()[0].as_ref()
    );
    println!(
        "rotation pushed {:?} after the stream opened",
        started.elapsed()
    );
    agent.stop(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn callers_without_the_header_or_with_another_uid_are_refused() {
    let world = World::new(Duration::from_secs(3600)).await;
    // Root (this test) is not on the allow-list.
    let (agent, socket) = vm(&world, vec![4242]).await;
    let err = client(&socket).await.fetch_x509_svid().await.unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("PermissionDenied"), "{text}");
    assert!(text.contains("uid 0 may not"), "{text}");

    // A raw client that leaves out `workload.spiffe.io: true`.
    let path = socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower_service(path))
        .await
        .unwrap();
    let mut raw =
        mesh_vm_agent::workload_api::pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            channel,
        );
    let status = raw
        .fetch_x509svid(mesh_vm_agent::workload_api::pb::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(agent.proxy.admin_addr)
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(
        metrics.contains("mesh_vm_agent_workload_api_refused_total{reason=\"uid_not_allowed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mesh_vm_agent_workload_api_refused_total{reason=\"missing_header\"} 1"),
        "{metrics}"
    );
    agent.stop(Duration::from_millis(100)).await;
}

fn tower_service(
    path: std::path::PathBuf,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        }
    })
}

/// py-spiffe (PyPI `spiffe`, on grpcio) fetches the SVID and bundles.
/// gRPC C-core sends the socket path as `:authority`, which the agent's
/// relay turns into `localhost` (see `uds.rs`).
#[tokio::test]
async fn py_spiffe_reads_the_svid_and_bundles() {
    let world = World::new(Duration::from_secs(3600)).await;
    let (agent, socket) = vm(&world, vec![0]).await;
    let script = r#"
import sys
from spiffe import WorkloadApiClient
with WorkloadApiClient(socket_path="unix:" + sys.argv[1]) as client:
    svid = client.fetch_x509_svid()
    print("svid", svid.spiffe_id)
    bundles = client.fetch_x509_bundles()
    for b in bundles.bundles:
        print("bundle", b.trust_domain.name, len(b.x509_authorities))
"#;
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&socket)
        .output()
        .await
        .expect("python3 runs (.ci/run installs it with py-spiffe: pip install spiffe)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "py-spiffe failed (is it installed? `pip install spiffe`):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("svid spiffe://{TD}/ns/shop/sa/billing")),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("bundle {TD} 1")), "{stdout}");
    agent.stop(Duration::from_millis(100)).await;
}
