//! `mesh proxy probe ready|live`: the injected pod's probes. The admin
//! endpoint listens on loopback only, which the kubelet's HTTP probes
//! cannot reach, so the probes run this inside the pod: a GET of
//! `/ready` or `/live` on `MESH_PROXY_ADMIN_ADDR`.

use std::{collections::HashMap, net::SocketAddr, process::ExitCode, time::Duration};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

const DEFAULT_ADMIN: &str = "127.0.0.1:4191";
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Exits 0 when the proxy answers 200, retrying until `wait` has passed.
pub fn main(what: &str, wait: Option<Duration>, vars: &HashMap<String, String>) -> ExitCode {
    let text = vars
        .get("MESH_PROXY_ADMIN_ADDR")
        .map_or(DEFAULT_ADMIN, String::as_str);
    let Ok(addr) = text.parse::<SocketAddr>() else {
        eprintln!("error: MESH_PROXY_ADMIN_ADDR {text:?} is not host:port");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let path = format!("/{what}");
    let deadline = tokio::time::Instant::now() + wait.unwrap_or_default();
    runtime.block_on(async {
        loop {
            let last = tokio::time::timeout(ATTEMPT_TIMEOUT, get(addr, &path))
                .await
                .unwrap_or_else(|_| Err("no answer within 1 s".into()));
            match last {
                Ok(()) => return ExitCode::SUCCESS,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    eprintln!("proxy at {addr} is not {what}: {e}");
                    return ExitCode::FAILURE;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
}

async fn get(addr: SocketAddr, path: &str) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let status = sender
        .send_request(req)
        .await
        .map_err(|e| e.to_string())?
        .status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}
