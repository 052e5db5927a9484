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

    // The app is not up: the VM is registered but not ready.
    let (status, _) = get_via(web.outbound_addr, &svc("billing")).await;
    assert_eq!(
        status, 503,
        "no ready endpoint while the app fails its check"
    );

    // The app comes up: web reaches it over mTLS, and the app sees web.
    let app = echo_app((vm_ip, APP_PORT).into(), "billing").await;
    let (status, body) = until(
        web.outbound_addr,
        &svc("billing"),
        Duration::from_secs(10),
        |s, _| s == 200,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("app=billing client=spiffe://{TD}/ns/shop/sa/web")
    );

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
    let (status, _) = until(
        web.outbound_addr,
        &svc("billing"),
        Duration::from_secs(10),
        |s, _| s == 503,
    )
    .await;
    assert_eq!(status, 503);
    println!(
        "unhealthy VM out of discovery {:?} after its app stopped",
        started.elapsed()
    );
    let metrics = reqwest_metrics(agent.proxy.admin_addr).await;
    assert!(metrics.contains("mesh_vm_agent_app_healthy 0"), "{metrics}");
    assert!(
        metrics.contains("mesh_vm_agent_health_check_failures_total{reason=\"refused\"}"),
        "{metrics}"
    );

    // Stopping deregisters at once.
    let _app = echo_app((vm_ip, APP_PORT).into(), "billing").await;
    until(
        web.outbound_addr,
        &svc("billing"),
        Duration::from_secs(10),
        |s, _| s == 200,
    )
    .await;
    agent.stop(Duration::from_secs(1)).await;
    let (status, _) = until(
        web.outbound_addr,
        &svc("billing"),
        Duration::from_secs(5),
        |s, _| s == 503,
    )
    .await;
    assert_eq!(status, 503, "a stopped agent is deregistered");
}

async fn reqwest_metrics(admin: std::net::SocketAddr) -> String {
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
    let metrics = reqwest_metrics(agent.proxy.admin_addr).await;
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
