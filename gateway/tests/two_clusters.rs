//! Two clusters in one process, each with its own control plane and trust
//! domain: west's `web` calls `api-east` through its own proxy (explicit
//! mode), which finds a via-gateway endpoint in discovery, opens a tunnel to
//! east's gateway and runs its mTLS session with east's `api` proxy inside
//! it. The app in east sees west's SPIFFE ID; east's policy decides on it.

mod support;

use std::time::Duration;

use mesh_control::ControlPlane;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_in_west_calls_api_in_east_through_the_gateway_as_itself() {
    cross_cluster_call("tcp", Path::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_a_quic_tunnel() {
    cross_cluster_call("quic", Path::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_falls_back_to_tcp_when_udp_is_blocked() {
    cross_cluster_call("quic", Path::UdpBlocked).await;
}

/// A QUIC handshake slower than the fallback time: the first stream takes
/// TCP, the handshake still completes, and later streams ride QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_quic_handshake_falls_back_once_then_quic_carries_on() {
    cross_cluster_call("quic", Path::SlowUdp).await;
}

/// Every byte between west's proxies and east's gateway, as a capture on
/// the wire would see them: no service name in cleartext over TCP, where
/// the only name is the gateway's (TLS SNI) ...
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_capture_shows_the_gateway_name_and_no_service_name() {
    let seen = cross_cluster_call("tcp", Path::Recorded).await;
    assert!(
        seen.tcp > 1000,
        "the capture saw the tunnel: {} bytes",
        seen.tcp
    );
    assert!(
        contains(&seen.bytes, b"localhost"),
        "the TLS ClientHello names the gateway (SNI)"
    );
    no_service_name(&seen.bytes);
}

/// ... and none over QUIC either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_capture_shows_no_service_name() {
    let seen = cross_cluster_call("quic", Path::Recorded).await;
    assert!(
        seen.udp > 1000,
        "the capture saw the QUIC tunnel: {} bytes",
        seen.udp
    );
    no_service_name(&seen.bytes);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[track_caller]
fn no_service_name(bytes: &[u8]) {
    for name in [
        "api-east",
        "api.shop",
        "svc.cluster.local",
        "shop",
        "spiffe://",
        "/hello",
    ] {
        assert!(
            !contains(bytes, name.as_bytes()),
            "{name:?} crossed the wire in cleartext"
        );
    }
}

/// `CONNECT authority` through an explicit-mode proxy, then one raw
/// HTTP/1.1 request inside: the CONNECT answer's head and what followed.
async fn via_connect(proxy: std::net::SocketAddr, authority: &str) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    let _ = tcp
        .write_all(b"GET /hello HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        .await;
    let mut rest = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut rest)).await;
    (String::from_utf8_lossy(&head).into_owned(), rest)
}

/// How west reaches east's gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Direct,
    /// Through a TCP-only relay: UDP is blocked.
    UdpBlocked,
    /// Through a relay that records every byte (TCP and UDP), addressed by
    /// name (`localhost`), as a packet capture would see it.
    Recorded,
    /// Through a relay that holds each client's UDP for 1.5 s after its
    /// first datagram.
    SlowUdp,
    /// To an address that accepts TCP and never answers (a hung load
    /// balancer in front of the gateway).
    Silent,
}

/// What the recording relay saw.
#[derive(Debug, Default)]
struct Seen {
    bytes: Vec<u8>,
    tcp: usize,
    udp: usize,
}

/// A relay to `to` on one port for TCP and UDP, recording both directions.
async fn recording_relay(
    to: std::net::SocketAddr,
    udp_delay: Duration,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Seen>>) {
    use std::sync::{Arc, Mutex};
    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let udp = Arc::new(tokio::net::UdpSocket::bind(addr).await.unwrap());
    let record = |seen: &Arc<Mutex<Seen>>, data: &[u8], tcp: bool| {
        let mut s = seen.lock().unwrap();
        s.bytes.extend_from_slice(data);
        if tcp {
            s.tcp += data.len();
        } else {
            s.udp += data.len();
        }
    };
    let tcp_seen = seen.clone();
    tokio::spawn(async move {
        while let Ok((from, _)) = listener.accept().await {
            let Ok(up) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (from_r, from_w) = from.into_split();
            let (up_r, up_w) = up.into_split();
            for (mut r, mut w) in [
                (
                    Box::new(from_r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    Box::new(up_w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                ),
                (Box::new(up_r) as _, Box::new(from_w) as _),
            ] {
                let seen = tcp_seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        record(&seen, &buf[..n], true);
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = w.shutdown().await;
                });
            }
        }
    });
    let udp_seen = seen.clone();
    tokio::spawn(async move {
        let mut ups: std::collections::HashMap<std::net::SocketAddr, Arc<tokio::net::UdpSocket>> =
            Default::default();
        let mut buf = vec![0u8; 65536];
        let mut first: std::collections::HashMap<std::net::SocketAddr, tokio::time::Instant> =
            Default::default();
        while let Ok((n, client)) = udp.recv_from(&mut buf).await {
            record(&udp_seen, &buf[..n], false);
            // Held (not dropped) until the delay after each client's first
            // datagram: every QUIC handshake is that slow.
            let hold_until = *first
                .entry(client)
                .or_insert_with(|| tokio::time::Instant::now() + udp_delay);
            let up = match ups.get(&client) {
                Some(up) => up.clone(),
                None => {
                    let up = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    up.connect(to).await.unwrap();
                    let (back, udp, seen) = (up.clone(), udp.clone(), udp_seen.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = back.recv(&mut buf).await {
                            record(&seen, &buf[..n], false);
                            let _ = udp.send_to(&buf[..n], client).await;
                        }
                    });
                    ups.insert(client, up.clone());
                    up
                }
            };
            // Forwarded on its own, so a held datagram holds up nobody else.
            let datagram = buf[..n].to_vec();
            tokio::spawn(async move {
                tokio::time::sleep_until(hold_until).await;
                let _ = up.send(&datagram).await;
            });
        }
    });
    (addr, seen)
}

/// A TCP-only way to `to` on a port where nothing answers UDP: what a
/// network that blocks UDP leaves of a gateway.
async fn tcp_only(to: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut from, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut from, &mut up).await;
                }
            });
        }
    });
    addr
}

/// West and east, west linked to east: the Link asks for `transport`, and
/// `path` says how west reaches east's gateway. West runs `web` and
/// `other` (proxies only, explicit mode).
struct Linked {
    east: East,
    _west: ControlPlane,
    _west_dir: tempfile::TempDir,
    web: mesh_proxy::Proxy,
    other: mesh_proxy::Proxy,
    /// api's port (east's app).
    port: u16,
    /// What a recording relay saw (with [`Path::Recorded`]).
    recorded: Option<std::sync::Arc<std::sync::Mutex<Seen>>>,
    /// The transports the gateway will see.
    carried: &'static [&'static str],
}

async fn linked(transport: &str, path: Path) -> Linked {
    let west_setup = west_setup();
    // East: api exported; only west's web may call it; west is linked.
    let east = east(
        &west_setup.bundle,
        &format!(
            "---\napiVersion: policy.mesh.rs/v1alpha1\nkind: Server\nmetadata: {{name: api-http, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  port: {{port}}\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: west-web, namespace: shop}}\nspec:\n  targetRef: {{kind: Server, name: api-http}}\n  requiredAuthenticationRefs: [{{kind: MeshTLSAuthentication, name: west-web}}]\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {{name: west-web, namespace: shop}}\nspec:\n  identities: [\"spiffe://{WEST}/ns/shop/sa/web\"]\n"
        ),
    )
    .await;
    let port = east.port;
    let mut recorded = None;
    let gateway_addr = match path {
        Path::Direct => east.gateway.tunnel_addr.to_string(),
        Path::UdpBlocked => tcp_only(east.gateway.tunnel_addr).await.to_string(),
        Path::Silent => {
            let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = silent.local_addr().unwrap();
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((tcp, _)) = silent.accept().await {
                    held.push(tcp);
                }
            });
            addr.to_string()
        }
        Path::SlowUdp => {
            let (addr, _) =
                recording_relay(east.gateway.tunnel_addr, Duration::from_millis(1500)).await;
            addr.to_string()
        }
        Path::Recorded => {
            let (addr, seen) = recording_relay(east.gateway.tunnel_addr, Duration::ZERO).await;
            recorded = Some(seen);
            // By name over TCP, so the TLS ClientHello carries it as SNI;
            // QUIC takes the address (a name could resolve to ::1 first).
            if transport == "tcp" {
                format!("localhost:{}", addr.port())
            } else {
                addr.to_string()
            }
        }
    };
    // The transports the gateway will see.
    let carried: &'static [&'static str] = match path {
        Path::UdpBlocked => &["tcp"],
        Path::SlowUdp => &["tcp", "quic"],
        Path::Silent => &[],
        _ if transport == "quic" => &["quic"],
        _ => &["tcp"],
    };

    // West: linked to east through its gateway, with api mirrored as
    // api-east (what the service mirror writes).
    std::fs::write(
        west_setup.config.config_dir.join("east.yaml"),
        format!(
            "{}---\napiVersion: multicluster.mesh.rs/v1alpha1\nkind: MirroredService\nmetadata: {{name: api-east, namespace: shop}}\nspec:\n  link: east\n  remoteName: api\n  ports: [{{port: {port}, appProtocol: http}}]\n  identities: [\"spiffe://{EAST}/ns/shop/sa/api\"]\n  ready: true\n",
            link_over("east", EAST, &gateway_addr, &east.bundle, transport)
        ),
    )
    .unwrap();
    let west_dir = west_setup.dir;
    let west = ControlPlane::start(west_setup.config).await.unwrap();
    let web = proxy(
        &west,
        west_dir.path(),
        "west",
        "web",
        "127.0.0.3".parse().unwrap(),
        None,
    )
    .await;
    let other = proxy(
        &west,
        west_dir.path(),
        "west",
        "other",
        "127.0.0.4".parse().unwrap(),
        None,
    )
    .await;

    Linked {
        east,
        _west: west,
        _west_dir: west_dir,
        web,
        other,
        port,
        recorded,
        carried,
    }
}

/// Asks `url` through `proxy` until east answers 200 (links reach every
/// side by polling); returns the answer.
async fn reach(proxy: std::net::SocketAddr, url: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, raw) = via_proxy(proxy, url).await;
        if status == 200 {
            return raw;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "web never reached api in east: {raw}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// web in west calls api in east over `transport`, reaching the gateway by
/// `path`. Returns what a recording relay saw (empty unless `path` is
/// [`Path::Recorded`]).
async fn cross_cluster_call(transport: &str, path: Path) -> Seen {
    let Linked {
        east,
        web,
        other,
        port,
        recorded,
        carried,
        // Kept until the end: dropping them stops west.
        _west,
        _west_dir,
    } = linked(transport, path).await;
    let url = format!("http://api-east.shop.svc.cluster.local:{port}/hello");
    let raw = reach(web.outbound_addr, &url).await;
    assert!(
        raw.contains(&format!("client=spiffe://{WEST}/ns/shop/sa/web")),
        "east's app sees west's web as itself: {raw}"
    );

    // East's policy admits only west's web: west's other gets 403 from
    // east's proxy, through the gateway.
    let (status, raw) = via_proxy(other.outbound_addr, &url).await;
    assert_eq!(status, 403, "{raw}");
    assert!(
        raw.contains(&format!("spiffe://{WEST}/ns/shop/sa/other")),
        "{raw}"
    );

    // Opaque TCP (CONNECT) rides the tunnel too: web's bytes reach api's
    // app through its own mTLS session inside the tunnel, under api's
    // policy; other's connection is closed by east's proxy.
    let authority = format!("api-east.shop.svc.cluster.local:{port}");
    let (head, rest) = via_connect(web.outbound_addr, &authority).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        rest.starts_with("HTTP/1.1 200") && rest.contains("client=-"),
        "the app answered raw bytes (no header is added to opaque TCP): {rest}"
    );
    let (_, rest) = via_connect(other.outbound_addr, &authority).await;
    assert!(
        !rest.contains("client="),
        "east's policy let other's opaque TCP through: {rest}"
    );

    // An HTTP/1.1 upgrade (as WebSocket does) rides the tunnel as well:
    // authorized, with web's identity, then raw bytes both ways.
    let mut tcp = tokio::net::TcpStream::connect(web.outbound_addr)
        .await
        .unwrap();
    tcp.write_all(
        format!(
            "GET http://{authority}/chat HTTP/1.1\r\nHost: {authority}\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
            .await
            .expect("an answer to the upgrade")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains(&format!("x-client: spiffe://{WEST}/ns/shop/sa/web")),
        "{head}"
    );
    tcp.write_all(b"ping through the tunnel").await.unwrap();
    let mut echo = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echo))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(&echo, b"ping through the tunnel");

    if path == Path::SlowUdp {
        // Once the slow handshake has completed, new streams ride QUIC.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while metric(
            &gateway_metrics(east.gateway.admin_addr).await,
            "mesh_gateway_streams_total",
            "quic",
        ) == 0
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no stream rode QUIC after the slow handshake"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = via_connect(web.outbound_addr, &authority).await;
        }
    }

    // The gateway carried both, and saw only west's trust domain.
    let m = gateway_metrics(east.gateway.admin_addr).await;
    for carried in carried {
        assert!(
            m.contains(&format!(
                "mesh_gateway_streams_total{{peer_trust_domain=\"{WEST}\",transport=\"{carried}\"}}"
            )),
            "{m}"
        );
        // One tunnel connection per proxy carries its HTTP, its opaque
        // TCP and its upgrade alike (a QUIC handshake slow enough to fall
        // back adds a TCP one).
        let tunnels = metric(&m, "mesh_gateway_tunnels_total", carried);
        assert!(
            (1..=2).contains(&tunnels),
            "{tunnels} {carried} tunnels from web and other: {m}"
        );
        if path == Path::Direct && transport == "tcp" {
            assert_eq!(tunnels, 2, "{m}");
        }
    }
    recorded
        .map(|seen| std::mem::take(&mut *seen.lock().unwrap()))
        .unwrap_or_default()
}

/// The value of `name` for west's trust domain over `transport` (0 when
/// absent).
fn metric(m: &str, name: &str, transport: &str) -> u64 {
    mesh_core::metrics_text::parse(m)
        .iter()
        .find(|s| {
            s.name == name
                && s.label("peer_trust_domain") == WEST
                && s.label("transport") == transport
        })
        .map_or(0, |s| s.value as u64)
}

/// A gateway that accepts TCP and never answers: web's requests to the
/// mirrored service fail with 502 after the connect timeout (1 s in these
/// tests) instead of hanging for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gateway_fails_after_the_connect_timeout() {
    let l = linked("tcp", Path::Silent).await;
    let url = format!("http://api-east.shop.svc.cluster.local:{}/hello", l.port);
    // Before the link has reached web's proxy the answer is another one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (took, raw) = loop {
        let started = std::time::Instant::now();
        let (status, raw) = via_proxy(l.web.outbound_addr, &url).await;
        if status == 502 {
            break (started.elapsed(), raw);
        }
        assert!(tokio::time::Instant::now() < deadline, "{raw}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        raw.contains("a tunnel connection to 127.0.0.1:") && raw.contains("timed out after 1s"),
        "{raw}"
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");

    // Opaque connections opened together wait for one attempt at the
    // tunnel connection, not for one attempt each in turn.
    let authority = format!("api-east.shop.svc.cluster.local:{}", l.port);
    let started = std::time::Instant::now();
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (proxy, authority) = (l.web.outbound_addr, authority.clone());
        opening.spawn(async move { via_connect(proxy, &authority).await });
    }
    while let Some(done) = opening.join_next().await {
        let (head, _) = done.unwrap();
        assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "10 opaque connections to a silent gateway took {took:?}"
    );
}

/// More opaque connections through a gateway than one tunnel connection
/// may carry streams: all of them open at once (none waits for another to
/// end), on a second tunnel connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_a_tunnel_connections_limit_take_another_connection() {
    more_streams_than_one_connection_carries("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_quic() {
    more_streams_than_one_connection_carries("quic").await;
}

async fn more_streams_than_one_connection_carries(transport: &str) {
    let l = linked(transport, Path::Direct).await;
    let url = format!("http://api-east.shop.svc.cluster.local:{}/hello", l.port);
    reach(l.web.outbound_addr, &url).await;
    let authority = format!("api-east.shop.svc.cluster.local:{}", l.port);
    let n = mesh_proxy::outbound::tunnel::MAX_STREAMS as usize + 20;
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (proxy, authority) = (l.web.outbound_addr, authority.clone());
        opening.spawn(async move { hold_connect(proxy, &authority).await });
    }
    let mut held = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(conn) = opening.join_next().await {
            held.push(conn.unwrap());
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "{} of {n} opaque connections answered in 30 s",
        held.len()
    );
    let m = gateway_metrics(l.east.gateway.admin_addr).await;
    let open = metric(&m, "mesh_gateway_tunnels_open", transport)
        + metric(&m, "mesh_gateway_tunnels_open", "tcp") * u64::from(transport == "quic");
    assert!(
        (2..=3).contains(&open),
        "{n} streams (and the pooled HTTP/2 one) on {open} tunnel connections: {m}"
    );
    assert!(
        metric(&m, "mesh_gateway_tunnels_open", transport) >= 1,
        "{m}"
    );
    drop(held);
}

/// `CONNECT authority` through an explicit-mode proxy and one keep-alive
/// HTTP/1.1 request inside, answered; the connection is kept open.
async fn hold_connect(proxy: std::net::SocketAddr, authority: &str) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !contains(&seen, b"client=-") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    tcp
}

/// A gateway's refusal over QUIC (a target that is not exported) is an
/// answer, not a broken transport: it reaches the caller once, and the
/// proxy neither asks again over TCP nor stops using QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_over_quic_does_not_pin_tcp() {
    let l = linked("quic", Path::Direct).await;
    // A mirror of a service east does not export.
    let config = l._west_dir.path().join("config");
    let nope = format!(
        "apiVersion: multicluster.mesh.rs/v1alpha1\nkind: MirroredService\nmetadata: {{name: nope-east, namespace: shop}}\nspec:\n  link: east\n  remoteName: nope\n  ports: [{{port: {}, appProtocol: http}}]\n  identities: [\"spiffe://{EAST}/ns/shop/sa/api\"]\n  ready: true\n",
        l.port
    );
    std::fs::write(config.join("nope.yaml"), nope).unwrap();
    let authority = format!("nope-east.shop.svc.cluster.local:{}", l.port);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Until west has read the mirror, the name is unknown (and goes
        // straight through, failing to resolve).
        let (status, raw) = via_proxy(l.web.outbound_addr, &format!("http://{authority}/")).await;
        if raw.contains("refused") {
            assert_eq!(status, 502, "{raw}");
            assert!(raw.contains("403"), "{raw}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refused: {raw}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = gateway_metrics(l.east.gateway.admin_addr).await;
    assert_eq!(
        metric(&m, "mesh_gateway_tunnels_total", "tcp"),
        0,
        "no TCP tunnel was opened to ask again: {m}"
    );
    // And QUIC carries the next call.
    reach(
        l.web.outbound_addr,
        &format!("http://api-east.shop.svc.cluster.local:{}/hello", l.port),
    )
    .await;
    let m = gateway_metrics(l.east.gateway.admin_addr).await;
    assert_eq!(metric(&m, "mesh_gateway_tunnels_total", "tcp"), 0, "{m}");
    assert!(metric(&m, "mesh_gateway_streams_total", "quic") >= 1, "{m}");
}
