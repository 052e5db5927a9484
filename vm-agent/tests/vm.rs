//! The VM agent against a real control plane and real sidecar proxies, in
//! one process: join (pin, tokens), registration and health, traffic both
//! ways with identities, and an identity that outlives its control plane.
#![allow(clippy::print_stdout)] // measured times go to the test log

mod support;

use std::{net::IpAddr, time::Duration};

use mesh_vm_agent::{
    Agent, AgentConfig,
    config::{BUNDLE, ENROLL_KEY, LEAF_CRT, LEAF_KEY},
    health::{Check, HealthConfig},
    join::{JoinError, join},
};
use support::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn join_checks_the_pin_and_refuses_reused_and_expired_tokens() {
    let world = World::new(Duration::from_secs(3600)).await;
    let opts = world.vm_options("billing-1", ip("127.0.0.31"));

    // A pin that is not the cluster's: refused before the token is sent,
    // nothing written, and the token still works afterwards.
    let mut forged = world
        .join_string("billing-1", Duration::from_secs(600))
        .await;
    let real_pin = forged.pin.clone();
    forged.pin = format!("sha256:{}", "0".repeat(64));
    let err = join(&forged, &opts).await.unwrap_err();
    assert!(matches!(err, JoinError::PinMismatch { .. }), "{err}");
    assert!(err.to_string().contains("mesh vm token create"), "{err}");
    assert!(
        !opts.config_path.exists(),
        "nothing is written on a bad pin"
    );
    forged.pin = real_pin;
    let joined = join(&forged, &opts).await.unwrap();
    assert_eq!(
        joined.identity.as_str(),
        format!("spiffe://{TD}/ns/shop/sa/billing")
    );
    for f in [LEAF_CRT, LEAF_KEY, BUNDLE, ENROLL_KEY] {
        assert_eq!(mode(&opts.state_dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&opts.config_path), 0o600);
    assert_eq!(mode(&opts.state_dir), 0o700);
    let written = AgentConfig::load(&opts.config_path).unwrap();
    assert_eq!(written.ports, vec![APP_PORT]);
    assert_eq!(written.labels["app"], "billing");

    // Joined already: refused without --force, nothing changed.
    let before = std::fs::read(opts.state_dir.join(LEAF_CRT)).unwrap();
    let again = world
        .join_string("billing-1", Duration::from_secs(600))
        .await;
    let err = join(&again, &opts).await.unwrap_err();
    assert!(matches!(err, JoinError::AlreadyJoined { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(opts.state_dir.join(LEAF_CRT)).unwrap(),
        before
    );

    // The same token twice: refused, with what to do.
    let other = world.vm_options("billing-2", ip("127.0.0.32"));
    let err = join(&forged, &other).await.unwrap_err();
    assert!(matches!(err, JoinError::Refused(_)), "{err}");
    assert!(err.to_string().contains("already used"), "{err}");

    // An expired token: refused, with what to do.
    let short = world.join_string("billing-2", Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = join(&short, &other).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(!other.config_path.exists());

    // --force rejoins with a fresh token.
    let mut forced = opts.clone();
    forced.force = true;
    join(&again, &forced).await.unwrap();
    assert_ne!(
        std::fs::read(opts.state_dir.join(LEAF_CRT)).unwrap(),
        before
    );
}

#[tokio::test]
async fn a_joined_vm_is_called_with_mtls_calls_in_and_health_decides_its_readiness() {
    let world = World::new(Duration::from_secs(3600)).await;
    let vm_ip = ip("127.0.0.41");
    let _api_app = echo_app((ip("127.0.0.42"), APP_PORT).into(), "api").await;
    let _api = world.sidecar("api", ip("127.0.0.42"), true).await;
    let web = world.sidecar("web", ip("127.0.0.43"), false).await;

    let mut opts = world.vm_options("billing-1", vm_ip);
    let mut health = HealthConfig::new(Check::Tcp((vm_ip, APP_PORT).into()));
    health.period = Duration::from_millis(200);
    health.timeout = Duration::from_millis(200);
    health.failure_threshold = 2;
    opts.health = Some(health);
    let js = world
        .join_string("billing-1", Duration::from_secs(600))
        .await;
    join(&js, &opts).await.unwrap();
    let agent = Agent::start(AgentConfig::load(&opts.config_path).unwrap())
        .await
        .unwrap();

    // Mesh names resolve on the VM, through the agent's DNS.
    {
        use hickory_proto::{
            op::{Message, Query},
            rr::{Name, RData, RecordType, rdata::A},
        };
        let dns = agent.dns_addr.expect("the agent serves DNS");
        let mut q = Message::query();
        q.queries.push(Query::query(
            Name::from_ascii("api.shop.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&q.to_vec().unwrap(), dns).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let answer = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(
            answer.answers[0].data,
            RData::A(A(mesh_vm_agent::dns::MESH_ADDRESS))
        );
    }

    // The app is not up: the VM is registered but not ready.
    let (status, _) = get_via(web.outbound_addr, &svc("billing")).await;
    assert_eq!(
        status, 503,
        "no ready endpoint while the app fails its check"
    );

    // The app comes up: web reaches it over mTLS, and the app sees web.
    let app = echo_app((vm_ip, APP_PORT).into(), "billing").await;
    answers_with(
        web.outbound_addr,
        "billing",
        Duration::from_secs(10),
        "billing",
        "web",
    )
    .await;

    // The VM calls in: api sees the VM's own identity.
    let (status, body) = get_via(agent.proxy.outbound_addr, &svc("api")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("app=api client=spiffe://{TD}/ns/shop/sa/billing")
    );

    // The app goes down: the VM leaves discovery, callers get 503 fast.
    app.abort();
    let started = tokio::time::Instant::now();
    let status = status_within(web.outbound_addr, "billing", Duration::from_secs(10), 503).await;
    assert_eq!(status, 503);
    println!(
        "unhealthy VM out of discovery {:?} after its app stopped",
        started.elapsed()
    );
    let metrics = admin_metrics(agent.proxy.admin_addr).await;
    assert!(metrics.contains("mesh_vm_agent_app_healthy 0"), "{metrics}");
    assert!(
        metrics.contains("mesh_vm_agent_health_check_failures_total{reason=\"refused\"}"),
        "{metrics}"
    );

    // Stopping deregisters at once.
    let _app = echo_app((vm_ip, APP_PORT).into(), "billing").await;
    status_within(web.outbound_addr, "billing", Duration::from_secs(10), 200).await;
    agent.stop(Duration::from_secs(1)).await;
    let status = status_within(web.outbound_addr, "billing", Duration::from_secs(5), 503).await;
    assert_eq!(status, 503, "a stopped agent is deregistered");
}

/// Calls `service` through `proxy` until it answers `want` or `within`
/// passes; the last status.
async fn status_within(
    proxy: std::net::SocketAddr,
    service: &str,
    within: Duration,
    want: u16,
) -> u16 {
    until(proxy, &svc(service), within, |s, _| s == want)
        .await
        .0
}

/// Calls `service` through `proxy` until it answers 200 (within
/// `within`), and checks that app `app` answered and saw caller `sa`.
async fn answers_with(
    proxy: std::net::SocketAddr,
    service: &str,
    within: Duration,
    app: &str,
    sa: &str,
) {
    let (status, body) = until(proxy, &svc(service), within, |s, _| s == 200).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("app={app} client=spiffe://{TD}/ns/shop/sa/{sa}")
    );
}

async fn admin_metrics(admin: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Leaves of 20 s (renewed at 10 s): the control plane stops; a restart of
/// the agent keeps serving with the identity on disk; past its expiry,
/// calls fail closed; once the control plane returns the agent re-enrolls
/// by itself and calls succeed again.
#[tokio::test]
async fn past_its_lifetime_without_a_control_plane_the_vm_fails_closed_then_recovers() {
    let leaf = Duration::from_secs(20);
    let mut world = World::new(leaf).await;
    let vm_ip = ip("127.0.0.51");
    let _api_app = echo_app((ip("127.0.0.52"), APP_PORT).into(), "api").await;
    let _api = world.sidecar("api", ip("127.0.0.52"), true).await;
    let opts = world.vm_options("billing-1", vm_ip);
    world.join_vm("billing-1", vm_ip).await;
    let config = AgentConfig::load(&opts.config_path).unwrap();
    let agent = Agent::start(config.clone()).await.unwrap();
    let (status, body) = get_via(agent.proxy.outbound_addr, &svc("api")).await;
    assert_eq!(status, 200, "{body}");

    world.stop_control_plane().await;
    let down_at = tokio::time::Instant::now();
    // A restart while the control plane is away: the identity on disk is
    // loaded and serves, the discovery the proxy already had is gone, but
    // the restarted agent must start and keep its identity.
    agent.stop(Duration::from_millis(100)).await;
    let agent = Agent::start(config.clone()).await.unwrap();
    let not_after = agent.proxy.credentials.current().info().not_after;
    println!("restarted with the control plane down; identity valid until {not_after}");

    // The api sidecar keeps its own identity too, but it also expires: so
    // judge the VM by its own credentials, then by traffic once it is back.
    let expired_in = agent
        .proxy
        .credentials
        .current()
        .info()
        .remaining(mesh_core::identity::cert::now())
        .unwrap_or_default();
    tokio::time::sleep(expired_in + Duration::from_secs(1)).await;
    assert!(
        agent
            .proxy
            .credentials
            .current()
            .info()
            .remaining(mesh_core::identity::cert::now())
            .is_err(),
        "the identity expired while the control plane was away"
    );
    let ready = admin_ready(agent.proxy.admin_addr).await;
    assert!(!ready, "an agent with an expired identity is not ready");
    let (status, _) = get_via(agent.proxy.outbound_addr, &svc("api")).await;
    assert_ne!(status, 200, "no traffic on an expired identity");
    println!(
        "failed closed {:?} after the control plane stopped",
        down_at.elapsed()
    );

    world.restart_control_plane().await;
    let back = tokio::time::Instant::now();
    let deadline = back + Duration::from_secs(40);
    while !admin_ready(agent.proxy.admin_addr).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent re-enrolled within 40 s of the control plane's return"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "re-enrolled {:?} after the control plane returned",
        back.elapsed()
    );
    assert!(
        agent
            .proxy
            .credentials
            .current()
            .info()
            .remaining(mesh_core::identity::cert::now())
            .is_ok()
    );
    // The re-enrolled identity is on disk for the next restart.
    let on_disk = std::fs::read_to_string(config.state_file(LEAF_CRT)).unwrap();
    let chain = mesh_core::identity::cert::certs_from_pem(on_disk.as_bytes()).unwrap();
    let info = mesh_core::identity::cert::CertInfo::parse(&chain[0]).unwrap();
    assert!(info.not_after > not_after);
    let metrics = admin_metrics(agent.proxy.admin_addr).await;
    assert!(
        metrics.contains("mesh_vm_agent_reenrollments_total 1"),
        "{metrics}"
    );
    agent.stop(Duration::from_millis(100)).await;
}

async fn admin_ready(admin: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else {
        return false;
    };
    if s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").await.is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
}

/// Re-enrollment is only for the holder of the enrollment key.
#[tokio::test]
async fn reenrollment_needs_the_enrollment_key_the_vm_joined_with() {
    let world = World::new(Duration::from_secs(3600)).await;
    world.join_vm("billing-1", ip("127.0.0.61")).await;
    let opts = world.vm_options("billing-1", ip("127.0.0.61"));
    let config = AgentConfig::load(&opts.config_path).unwrap();
    let identity = config.identity().unwrap();
    let bundles = mesh_control::test_util::bundles_of(&world.cfg.ca_dir);

    let real = mesh_core::identity::enroll::EnrollmentKey::from_pkcs8(
        &std::fs::read(opts.state_dir.join(ENROLL_KEY)).unwrap(),
    )
    .unwrap();
    let creds = mesh_vm_agent::agent::reenroll(&config, &identity, &bundles, &real)
        .await
        .unwrap();
    assert_eq!(creds.id(), &identity);

    let thief = mesh_core::identity::enroll::EnrollmentKey::generate().unwrap();
    let err = mesh_vm_agent::agent::reenroll(&config, &identity, &bundles, &thief)
        .await
        .unwrap_err();
    assert!(err.contains("PermissionDenied"), "{err}");
    assert!(
        err.contains("not signed by the key it joined with"),
        "{err}"
    );

    // Another workload name: no grant of that name for this identity.
    let mut other = config.clone();
    other.workload = "billing-9".into();
    let err = mesh_vm_agent::agent::reenroll(&other, &identity, &bundles, &real)
        .await
        .unwrap_err();
    assert!(err.contains("has no grant"), "{err}");
}

/// A VM whose only route is to the gateway: it joins, reaches the control
/// plane, calls in and is called, all through the gateway, with its own
/// identity end to end. The VM's listeners are on an address the cluster's
/// workloads never dial: every byte to it comes over its reverse connection.
#[tokio::test]
async fn a_vm_behind_the_gateway_joins_calls_and_is_called_through_it() {
    let gw_addr: std::net::SocketAddr = (ip("127.0.0.90"), free_port()).into();
    let world = World::with_gateway(Duration::from_secs(3600), Some(gw_addr)).await;
    let gateway = world.gateway(gw_addr).await;
    let _api_app = echo_app((ip("127.0.0.92"), APP_PORT).into(), "api").await;
    let _api = world.sidecar("api", ip("127.0.0.92"), true).await;
    let web = world.sidecar("web", ip("127.0.0.93"), false).await;

    // The VM: its app and proxy on 127.0.0.91, registered as 10.0.2.15 (a
    // qemu guest's address, which nothing here routes to).
    let vm_ip = ip("127.0.0.91");
    let _vm_app = echo_app((vm_ip, APP_PORT).into(), "billing").await;
    let mut js = world
        .join_string("billing-1", Duration::from_secs(600))
        .await;
    js.gateway = Some(gw_addr.to_string());
    // The control plane's own addresses are not used (nor reachable).
    js.identity_addr = "192.0.2.1:8080".into();
    js.api_addr = "192.0.2.1:8086".into();
    let mut opts = world.vm_options("billing-1", vm_ip);
    opts.address = Some(ip("10.0.2.15"));
    let joined = join(&js, &opts).await.unwrap();
    assert_eq!(
        joined.config.gateway.as_deref(),
        Some(gw_addr.to_string().as_str())
    );
    let agent = Agent::start(AgentConfig::load(&opts.config_path).unwrap())
        .await
        .unwrap();

    // Called: web reaches the VM's app through the gateway, and the app sees web.
    answers_with(
        web.outbound_addr,
        "billing",
        Duration::from_secs(15),
        "billing",
        "web",
    )
    .await;
    // Calling: the VM reaches api through the gateway, and api sees the VM.
    answers_with(
        agent.proxy.outbound_addr,
        "api",
        Duration::from_secs(15),
        "api",
        "billing",
    )
    .await;
    let metrics = admin_metrics(gateway.admin_addr).await;
    assert!(
        metrics.contains("mesh_gateway_reverse_connections 1"),
        "{metrics}"
    );
    gateway.shutdown().await;
    agent.stop(Duration::from_millis(100)).await;
}

/// CONNECT `target` on a fresh tunnel to `gateway`, with `creds` or none:
/// the gateway's answer.
async fn connect_status(
    gateway: std::net::SocketAddr,
    creds: Option<&mesh_core::identity::CredentialStore>,
    bundles: &mesh_core::identity::BundleStore,
    target: &str,
) -> u16 {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let gw_id: mesh_core::identity::SpiffeId = format!("spiffe://{TD}/ns/mesh-system/sa/gateway")
        .parse()
        .unwrap();
    let expect = mesh_core::identity::ExpectedIdentity::Exact(gw_id);
    let mut tls = match creds {
        Some(c) => mesh_core::identity::tls::client_config(c.clone(), bundles.clone(), expect),
        None => mesh_core::identity::tls::client_config_without_cert(bundles.clone(), expect),
    }
    .unwrap();
    tls.alpn_protocols = vec![mesh_proxy::outbound::tunnel::ALPN_TUNNEL.to_vec()];
    let tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(
            rustls::pki_types::ServerName::try_from("gateway").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    send.send_request(req).await.unwrap().status().as_u16()
}

/// What the gateway refuses: a caller without a certificate anywhere but
/// the identity service; this cluster's workloads that are not behind it
/// anywhere but the control plane and VMs; a VM anywhere but a meshed
/// proxy; and a reverse connection claiming someone else's workload.
#[tokio::test]
async fn the_gateway_admits_vms_and_nothing_more() {
    let gw_addr: std::net::SocketAddr = (ip("127.0.0.100"), free_port()).into();
    let world = World::with_gateway(Duration::from_secs(3600), Some(gw_addr)).await;
    let gateway = world.gateway(gw_addr).await;
    let api = world.sidecar("api", ip("127.0.0.102"), true).await;
    let web = world.sidecar("web", ip("127.0.0.103"), false).await;
    let bundles = mesh_control::test_util::bundles_of(&world.cfg.ca_dir);
    let vm_ip = ip("127.0.0.101");
    let mut js = world
        .join_string("billing-1", Duration::from_secs(600))
        .await;
    js.gateway = Some(gw_addr.to_string());
    let opts = world.vm_options("billing-1", vm_ip);
    join(&js, &opts).await.unwrap();
    let agent = Agent::start(AgentConfig::load(&opts.config_path).unwrap())
        .await
        .unwrap();
    let api_proxy = format!("127.0.0.102:{}", api.inbound_addr.port());

    let identity = mesh_core::targets::IDENTITY;
    let federation = mesh_proxy::outbound::tunnel::FEDERATION_TARGET;
    assert_eq!(connect_status(gw_addr, None, &bundles, identity).await, 200);
    assert_eq!(
        connect_status(gw_addr, None, &bundles, federation).await,
        403
    );
    assert_eq!(
        connect_status(gw_addr, None, &bundles, &api_proxy).await,
        403
    );
    assert_eq!(
        connect_status(gw_addr, None, &bundles, &svc("api")).await,
        403
    );

    // web is of this cluster but not behind the gateway.
    let webc = Some(&web.credentials);
    assert_eq!(
        connect_status(gw_addr, webc, &bundles, &api_proxy).await,
        403
    );
    assert_eq!(
        connect_status(gw_addr, webc, &bundles, &svc("api")).await,
        403
    );

    // The VM, once registered: meshed proxies only.
    let vmc = Some(&agent.proxy.credentials);
    let mut status = 0;
    for _ in 0..50 {
        status = connect_status(gw_addr, vmc, &bundles, &api_proxy).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the registered VM reaches a meshed proxy");
    assert_eq!(
        connect_status(gw_addr, vmc, &bundles, "127.0.0.102:22").await,
        403,
        "not a meshed workload's proxy"
    );
    assert_eq!(
        connect_status(gw_addr, vmc, &bundles, &svc("api")).await,
        403
    );

    // web claims to be billing-1 on a reverse connection: refused.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let gw_id: mesh_core::identity::SpiffeId =
            format!("spiffe://{TD}/ns/mesh-system/sa/gateway")
                .parse()
                .unwrap();
        let mut tls = mesh_core::identity::tls::client_config(
            web.credentials.clone(),
            bundles.clone(),
            mesh_core::identity::ExpectedIdentity::Exact(gw_id),
        )
        .unwrap();
        tls.alpn_protocols = vec![mesh_proxy::outbound::tunnel::ALPN_REVERSE.to_vec()];
        let tcp = tokio::net::TcpStream::connect(gw_addr).await.unwrap();
        let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect(
                rustls::pki_types::ServerName::try_from("gateway").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let claim = b"shop/billing-1";
        s.write_all(&(claim.len() as u16).to_be_bytes())
            .await
            .unwrap();
        s.write_all(claim).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the gateway closes the connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "no HTTP/2 on a refused claim");
    }
    let metrics = admin_metrics(gateway.admin_addr).await;
    for reason in [
        "no_identity",
        "same_trust_domain",
        "not_meshed",
        "not_behind",
    ] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "{reason} counted:\n{metrics}"
        );
    }
    gateway.shutdown().await;
    agent.stop(Duration::from_millis(100)).await;
}
