//! Links the `mesh-proxy` binary with packed relative relocations
//! (`DT_RELR`) where the C library supports them (glibc 2.36 and later).
//!
//! A position-independent Rust binary carries one 24-byte `RELA` entry per
//! pointer in its read-only data (about 22 000 in the sidecar, 520 KiB) and
//! the loader reads all of them at start, so they stay resident in every
//! sidecar. `RELR` packs them into about 6 KiB. The binary stays
//! position-independent; only the table's encoding changes.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    // Only for a native glibc build: a cross build cannot ask the target's
    // glibc, and a binary with RELR does not start on an older glibc.
    if var("CARGO_CFG_TARGET_OS") != "linux"
        || var("CARGO_CFG_TARGET_ENV") != "gnu"
        || var("HOST") != var("TARGET")
    {
        return;
    }
    if glibc_version().is_some_and(|version| version >= (2, 36)) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The host's glibc version, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn glibc_version() -> Option<(u32, u32)> {
    let out = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let (major, minor) = text.trim().strip_prefix("glibc ")?.split_once('.')?;
    Some((major.parse().ok()?, minor.split('.').next()?.parse().ok()?))
}
