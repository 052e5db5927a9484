//! What the `mesh` command-line tests share.

use std::process::Command;

const MESH: &str = env!("CARGO_BIN_EXE_mesh");

/// Runs `mesh args`: whether it succeeded, its stdout, its stderr.
pub(crate) fn mesh(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(MESH).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
