//! The haproxy pair of `mesh bench --peer haproxy`: two haproxy processes
//! doing what the Mesh pair does (plaintext in, mTLS with HTTP/2 between
//! them, plaintext to the app), with SVIDs from the bench's own CA.
//!
//! haproxy's configuration language has no serializer; the file is built
//! from values this module made (loopback addresses, paths in the bench's
//! temporary directory), and a path with a character the language would
//! read otherwise is refused before it is written.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use mesh_core::identity::{
    Credentials,
    cert::{certs_to_pem, key_to_pem},
    files,
};

/// How to install haproxy, for the error when it is missing.
const INSTALL_HINT: &str = "haproxy is not installed: install it with `sudo apt-get install haproxy` (Debian, Ubuntu) or your system's package manager, or run `mesh bench` without `--peer`";

/// The haproxy binary on `PATH`.
pub(crate) fn find() -> Result<PathBuf> {
    mesh_topologies::cli::find_on_path("haproxy").context(INSTALL_HINT)
}

/// Where each haproxy listens. `client_h1` / `client_h2` take the load
/// generator's plaintext HTTP/1.1 and HTTP/2; `server_h1` / `server_h2` are
/// the server side's mTLS ports, which forward to the app in the caller's
/// protocol (as the Mesh server proxy does).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ports {
    pub(crate) client_h1: SocketAddr,
    pub(crate) client_h2: SocketAddr,
    pub(crate) server_h1: SocketAddr,
    pub(crate) server_h2: SocketAddr,
    pub(crate) app: SocketAddr,
    /// Connections each side takes at once (haproxy queues the rest, and
    /// the bench holds its connections open): above what the bench opens.
    pub(crate) max_connections: usize,
}

/// Files one side needs: its certificate chain with its key (written
/// 0600), and the root it trusts.
struct Side {
    crt: PathBuf,
    ca: PathBuf,
}

impl Side {
    fn write(dir: &Path, name: &str, creds: &Credentials, root: &Path) -> Result<Self> {
        let crt = dir.join(format!("{name}.pem"));
        let mut pem = certs_to_pem(creds.chain());
        pem.push_str(&key_to_pem(creds.key_der()));
        files::write_private(&crt, pem.as_bytes())?;
        Ok(Self {
            crt,
            ca: root.to_owned(),
        })
    }
}

/// A path as haproxy reads it, in double quotes; refused if it holds a
/// character that would end or escape the quoted word.
fn quoted(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    if text
        .chars()
        .any(|c| c == '"' || c == '\\' || c == '$' || c == '#' || c.is_control())
    {
        bail!(
            "the bench directory {text} holds a character haproxy's configuration cannot carry; set TMPDIR to a plain path"
        );
    }
    Ok(format!("\"{text}\""))
}

// No global maxconn: haproxy derives it from the open-files limit.
const GLOBAL: &str = "global
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
";

fn common(p: &Ports) -> String {
    format!("{GLOBAL}    maxconn {}\n", p.max_connections)
}

/// The client side: plaintext in, mTLS (ALPN h2) to the server side, which
/// must present a certificate chaining to the bench's root.
fn client_config(p: &Ports, side: &Side) -> Result<String> {
    let (crt, ca) = (quoted(&side.crt)?, quoted(&side.ca)?);
    let mut out = common(p);
    for (name, from, to) in [
        ("h1", p.client_h1, p.server_h1),
        ("h2", p.client_h2, p.server_h2),
    ] {
        out.push_str(&format!(
            "
frontend in_{name}
    bind {from}
    default_backend out_{name}

backend out_{name}
    server peer {to} ssl verify required ca-file {ca} crt {crt} alpn h2
"
        ));
    }
    Ok(out)
}

/// The server side: mTLS in (client certificate required, chained to the
/// bench's root), plaintext to the app in the caller's protocol.
fn server_config(p: &Ports, side: &Side) -> Result<String> {
    let (crt, ca) = (quoted(&side.crt)?, quoted(&side.ca)?);
    let mut out = common(p);
    for (name, from, proto) in [("h1", p.server_h1, ""), ("h2", p.server_h2, " proto h2")] {
        out.push_str(&format!(
            "
frontend in_{name}
    bind {from} ssl crt {crt} ca-file {ca} verify required alpn h2,http/1.1
    default_backend app_{name}

backend app_{name}
    server app {app}{proto}
",
            app = p.app
        ));
    }
    Ok(out)
}

/// Writes both configurations and checks them with `haproxy -c`; returns
/// the commands that run each side in the foreground.
pub(crate) fn commands(
    haproxy: &Path,
    dir: &Path,
    ports: &Ports,
    root: &Path,
    client: &Credentials,
    server: &Credentials,
) -> Result<(Command, Command)> {
    let dir = dir.join("haproxy");
    std::fs::create_dir_all(&dir)?;
    let prepare = |name: &str, config: String| -> Result<Command> {
        let path = dir.join(format!("{name}.cfg"));
        files::write_private(&path, config.as_bytes())?;
        let check = Command::new(haproxy)
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", haproxy.display()))?;
        if !check.status.success() {
            bail!(
                "haproxy refused the {name} configuration {}: {}",
                path.display(),
                String::from_utf8_lossy(&check.stderr).trim()
            );
        }
        let mut cmd = Command::new(haproxy);
        // -db: stay in the foreground, so the bench holds the process.
        cmd.arg("-db").arg("-f").arg(&path).stdin(Stdio::null());
        Ok(cmd)
    };
    let client_side = Side::write(&dir, "client", client, root)?;
    let server_side = Side::write(&dir, "server", server, root)?;
    Ok((
        prepare("client", client_config(ports, &client_side)?)?,
        prepare("server", server_config(ports, &server_side)?)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_haproxy_would_misread_is_refused() {
        assert!(quoted(Path::new("/tmp/mesh-bench-1/haproxy/client.pem")).is_ok());
        for bad in [
            "/tmp/a\"b",
            "/tmp/a#b",
            "/tmp/a\nb",
            "/tmp/$HOME",
            "/tmp/a\\b",
        ] {
            let err = quoted(Path::new(bad)).unwrap_err().to_string();
            assert!(err.contains("TMPDIR"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_server_side_requires_a_client_certificate_and_tls_1_3() {
        let ports = Ports {
            client_h1: "127.0.0.1:1".parse().unwrap(),
            client_h2: "127.0.0.1:2".parse().unwrap(),
            server_h1: "127.0.0.1:3".parse().unwrap(),
            server_h2: "127.0.0.1:4".parse().unwrap(),
            app: "127.0.0.1:5".parse().unwrap(),
            max_connections: 1600,
        };
        let side = Side {
            crt: "/d/server.pem".into(),
            ca: "/d/root.crt".into(),
        };
        let server = server_config(&ports, &side).unwrap();
        assert_eq!(server.matches("verify required").count(), 2, "{server}");
        assert!(server.contains("ssl-min-ver TLSv1.3"), "{server}");
        assert!(server.contains("    maxconn 1600\n"), "{server}");
        assert!(
            server.contains("server app 127.0.0.1:5 proto h2"),
            "{server}"
        );
        let client = client_config(&ports, &side).unwrap();
        assert!(
            client.contains("server peer 127.0.0.1:3 ssl verify required"),
            "{client}"
        );
    }
}
