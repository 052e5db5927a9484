//! `kill -9` loses nothing committed: the real `mesh-control` binary is
//! killed after registrations, restarted on the same directories, and
//! discovery still lists them. Tokens created through the CLI survive too.

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_core::api::v1::{HeartbeatRequest, WatchRequest, discovery_update::Kind};
use support::*;

/// A port free right now (the OS may hand it out again later; fine here).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Addrs {
    identity: SocketAddr,
    api: SocketAddr,
    admin: SocketAddr,
}

impl Addrs {
    /// Loopback addresses on ports free right now.
    fn free() -> Self {
        let free = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self {
            identity: free(),
            api: free(),
            admin: free(),
        }
    }
}

fn spawn(root: &Path, addrs: &Addrs) -> Child {
    spawn_with(root, addrs, &[])
}

fn spawn_with(root: &Path, addrs: &Addrs, extra: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("control.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .args(["--cluster", "west", "--poll-interval", "100ms"])
        .arg("--ca")
        .arg(root.join("ca"))
        .arg("--config-dir")
        .arg(root.join("config"))
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--identity-addr")
        .arg(addrs.identity.to_string())
        .arg("--api-addr")
        .arg(addrs.api.to_string())
        .arg("--admin-addr")
        .arg(addrs.admin.to_string())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn wait_ready(addr: SocketAddr, root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http_get(addr, "/ready").await.contains(" 200 ")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "control plane not ready; log:\n{}",
            std::fs::read_to_string(root.join("control.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A token for `shop/<sa>` through the CLI; with `workload` = (name, ip),
/// for that workload (label app=<sa>).
fn token_via_cli(root: &Path, sa: &str, workload: Option<(&str, &str)>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-control"));
    cmd.args([
        "token", "create", "--ns", "shop", "--sa", sa, "--ttl", "10m",
    ]);
    if let Some((name, ip)) = workload {
        cmd.args(["--workload", name, "--labels", &format!("app={sa}")])
            .args(["--addresses", ip]);
    }
    let out = cmd
        .arg("--data-dir")
        .arg(root.join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A discovery watch on the `api` service, as `creds`.
async fn watch_api(
    c: &Clients,
    creds: &mesh_core::identity::Credentials,
) -> tonic::Streaming<mesh_core::api::v1::DiscoveryUpdate> {
    c.discovery(creds)
        .watch(WatchRequest {
            authority: "api.shop.svc.cluster.local:8080".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_keeps_registrations_and_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ca_dir, config_dir, _) = make_dirs(root);
    std::fs::write(config_dir.join("shop.yaml"), API_SERVICE).unwrap();
    let bundles = bundles_of(&ca_dir);
    let addrs = Addrs::free();

    let mut child = spawn(root, &addrs);
    wait_ready(addrs.admin, root).await;
    let c = Clients {
        bundles,
        identity: addrs.identity,
        api: addrs.api,
    };
    let mut api = None;
    let mut used = Vec::new();
    for (i, ip) in ["127.0.0.7", "127.0.0.8"].iter().enumerate() {
        let name = format!("api-{i}");
        let token = token_via_cli(root, "api", Some((&name, ip)));
        let creds = c.join(&token, "shop", "api").await;
        used.push(token);
        c.registry(&creds)
            .register(register_request("shop", &name, "api", ip))
            .await
            .unwrap();
        api = Some(creds);
    }
    let api = api.unwrap();
    // A token created before the crash, used after it.
    let spare = token_via_cli(root, "web", None);

    child.kill().unwrap(); // SIGKILL: no shutdown code runs.
    child.wait().unwrap();
    // Every serial issued before the crash is on disk.
    let serials_before = {
        let store = mesh_control::store::LocalStore::open(&root.join("data")).unwrap();
        store.serial_count().unwrap()
    };
    assert!(
        serials_before >= 2,
        "{serials_before} serials after kill -9"
    );

    let mut child = spawn(root, &addrs);
    wait_ready(addrs.admin, root).await;
    let mut watch = watch_api(&c, &api).await;
    let update = watch.message().await.unwrap().unwrap().kind.unwrap();
    let mut got = match update {
        Kind::Endpoints(set) => set
            .endpoints
            .into_iter()
            .map(|e| e.address)
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    got.sort();
    assert_eq!(got, vec!["127.0.0.7:8080", "127.0.0.8:8080"]);
    let web = c.join(&spare, "shop", "web").await;
    assert_eq!(web.id().as_str(), format!("spiffe://{TD}/ns/shop/sa/web"));
    // A token used before the crash stays used after it.
    let id = format!("spiffe://{TD}/ns/shop/sa/api");
    let err = certify(&mut c.anonymous_identity(), &id, &used[0])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    child.kill().unwrap();
    child.wait().unwrap();
    let store = mesh_control::store::LocalStore::open(&root.join("data")).unwrap();
    assert!(
        store.serial_count().unwrap() > serials_before,
        "the serials from before the crash are kept, and web's is added"
    );
}

/// The control plane is stopped (SIGSTOP) for 5 s, past a 2 s heartbeat
/// window, while its workload keeps heartbeating, then continued: a
/// discovery watcher never receives an empty endpoint set for it. Before,
/// the resumed sweep judged every workload silent and pushed empty sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_control_plane_pushes_no_empty_endpoint_sets() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ca_dir, config_dir, _) = make_dirs(root);
    std::fs::write(config_dir.join("shop.yaml"), API_SERVICE).unwrap();
    let addrs = Addrs::free();
    let mut child = spawn_with(
        root,
        &addrs,
        &["--heartbeat-interval", "1s", "--heartbeat-misses", "2"],
    );
    wait_ready(addrs.admin, root).await;
    let c = Clients {
        bundles: bundles_of(&ca_dir),
        identity: addrs.identity,
        api: addrs.api,
    };
    let api = c
        .join(
            &token_via_cli(root, "api", Some(("api-0", "127.0.0.7"))),
            "shop",
            "api",
        )
        .await;
    let mut registry = c.registry(&api);
    registry
        .register(register_request("shop", "api-0", "api", "127.0.0.7"))
        .await
        .unwrap();
    // The workload heartbeats every 500 ms, as a proxy would.
    let beats = tokio::spawn(async move {
        loop {
            let _ = registry
                .heartbeat(HeartbeatRequest {
                    namespace: "shop".into(),
                    name: "api-0".into(),
                    healthy: true,
                })
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut watch = watch_api(&c, &api).await;
    let sizes = tokio::spawn(async move {
        let mut sizes = Vec::new();
        while let Ok(Some(update)) = watch.message().await {
            if let Some(Kind::Endpoints(set)) = update.kind {
                sizes.push(set.endpoints.len());
            }
        }
        sizes
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig}");
    };
    signal("-STOP");
    tokio::time::sleep(Duration::from_secs(5)).await;
    signal("-CONT");
    tokio::time::sleep(Duration::from_secs(4)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    beats.abort();
    let sizes = sizes.await.unwrap();
    assert_eq!(sizes.first(), Some(&1), "{sizes:?}");
    assert!(
        !sizes.contains(&0),
        "an empty endpoint set was pushed after the pause: {sizes:?}"
    );
}
