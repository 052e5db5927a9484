//! Binding a Unix socket that a local client reaches: the control plane's
//! admin socket (0600) and the VM agent's Workload API (0666, callers
//! checked by uid).

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
};

use tokio::net::UnixListener;

/// Binds `path` with `mode`, replacing a stale file from a crash; refuses
/// when a live server answers there. The socket is bound inside a fresh
/// 0700 directory, given its mode there, then renamed into place, so no
/// other user can connect while it still has the umask's mode.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another server is answering on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let parent = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent)?;
    let private = parent.join(format!(".sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("sock");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    bound
}
