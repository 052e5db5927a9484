//! The workspace denies unsafe code rather than forbidding it, so that the
//! one `sys` module STYLE.md allows can exist. This keeps it the only one:
//! no other file may allow unsafe code, and every crate takes the
//! workspace's lints.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("core sits in the workspace")
        .to_owned()
}

/// Every file under `dir` whose name ends with `suffix`, outside `target`.
fn files(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source tree") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                files(&path, suffix, out);
            }
        } else if name.ends_with(suffix) {
            out.push(path);
        }
    }
}

#[test]
fn only_core_sys_allows_unsafe_code() {
    let root = workspace();
    let mut sources = Vec::new();
    files(&root, ".rs", &mut sources);
    assert!(sources.len() > 50, "found only {} sources", sources.len());
    // Spelled in two parts so that this file does not match itself.
    let lint = ["unsafe", "_code"].concat();
    let allowed = root.join("core/src/sys.rs");
    let mut offenders = Vec::new();
    for path in &sources {
        let text = std::fs::read_to_string(path).expect("readable source");
        let allows = text.lines().any(|line| {
            let line = line.trim();
            line.starts_with('#')
                && line.contains(&lint)
                && !line.contains("forbid")
                && !line.contains("deny")
        });
        if allows && *path != allowed {
            offenders.push(path.strip_prefix(&root).unwrap_or(path).to_owned());
        }
    }
    assert!(
        offenders.is_empty(),
        "only core/src/sys.rs may allow unsafe code; also: {offenders:?}"
    );
    let sys = std::fs::read_to_string(&allowed).expect("core/src/sys.rs");
    let blocks = sys.matches("unsafe {").count();
    assert_eq!(
        sys.matches("// SAFETY:").count(),
        blocks,
        "every unsafe block in core/src/sys.rs says why it is sound"
    );
}

#[test]
fn every_crate_takes_the_workspace_lints() {
    let root = workspace();
    let mut manifests = Vec::new();
    files(&root, "Cargo.toml", &mut manifests);
    let mut missing = Vec::new();
    for path in manifests
        .iter()
        .filter(|p| p.parent() != Some(root.as_path()))
    {
        let text = std::fs::read_to_string(path).expect("readable manifest");
        // Fuzz targets are their own workspaces, with cargo-fuzz's layout.
        if !text.contains("[package]") || text.contains("cargo-fuzz = true") {
            continue;
        }
        let takes = text
            .split("[lints]")
            .nth(1)
            .is_some_and(|rest| rest.trim_start().starts_with("workspace = true"));
        if !takes {
            missing.push(path.strip_prefix(&root).unwrap_or(path).to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "these crates do not take the workspace lints (unsafe code would pass): {missing:?}"
    );
}
