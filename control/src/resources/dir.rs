//! The config directory: `*.yaml` / `*.yml` files read again whenever their
//! content changes. A file that fails to parse is rejected whole and its
//! previous good version keeps serving.
//!
//! The directory is polled (content compared), which works the same on
//! every filesystem, including Kubernetes ConfigMap mounts that swap
//! symlinks; a poll of a few small files is cheap.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use super::{
    parse::{ConfigError, parse_file},
    types::Resource,
};

/// A config file's last seen content and last good resources.
#[derive(Debug, Default)]
struct FileState {
    content: Option<String>,
    good: Vec<(usize, Resource)>,
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The set of good resources changed.
    pub changed: bool,
    /// New errors (each bad content is reported once).
    pub errors: Vec<ConfigError>,
}

#[derive(Debug)]
pub struct ConfigDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl ConfigDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Reads every changed file, keeps last-good versions of bad ones.
    pub fn scan(&mut self) -> Scan {
        let mut scan = Scan::default();
        let paths = match list_yaml(&self.dir) {
            Ok(paths) => paths,
            Err(e) => {
                scan.errors.push(ConfigError {
                    file: self.dir.clone(),
                    line: 0,
                    reason: format!("cannot list the config directory: {e}"),
                    kind: "io",
                });
                return scan;
            }
        };
        let before: BTreeSet<PathBuf> = self.files.keys().cloned().collect();
        for gone in before.difference(&paths) {
            // A deleted file takes its resources with it.
            if let Some(state) = self.files.remove(gone) {
                scan.changed |= !state.good.is_empty();
            }
        }
        for path in &paths {
            let text = match fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    scan.errors.push(ConfigError {
                        file: path.clone(),
                        line: 0,
                        reason: format!("cannot read: {e}"),
                        kind: "io",
                    });
                    continue;
                }
            };
            let state = self.files.entry(path.clone()).or_default();
            if state.content.as_deref() == Some(text.as_str()) {
                continue;
            }
            match parse_file(path, &text) {
                Ok(good) => {
                    scan.changed |= good != state.good;
                    state.good = good;
                }
                Err(e) => scan.errors.push(e),
            }
            state.content = Some(text);
        }
        if scan.changed {
            scan.errors.extend(self.duplicates());
        }
        scan
    }

    /// The good resources of every file; where two files define the same
    /// kind/namespace/name, the first file (by name) wins.
    pub fn resources(&self) -> Vec<Resource> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (_, res) in self.files.values().flat_map(|f| f.good.iter()) {
            let m = res.metadata();
            if seen.insert((res.kind(), m.namespace.clone(), m.name.clone())) {
                out.push(res.clone());
            }
        }
        out
    }

    fn duplicates(&self) -> Vec<ConfigError> {
        let mut first: BTreeMap<(&str, &str, &str), &Path> = BTreeMap::new();
        let mut errors = Vec::new();
        for (path, state) in &self.files {
            for (line, res) in &state.good {
                let m = res.metadata();
                let key = (res.kind(), m.namespace.as_str(), m.name.as_str());
                match first.get(&key) {
                    Some(earlier) => errors.push(ConfigError {
                        file: path.clone(),
                        line: *line,
                        reason: format!(
                            "{} {}/{} is already defined in {}; this copy is ignored",
                            key.0,
                            key.1,
                            key.2,
                            earlier.display()
                        ),
                        kind: "duplicate",
                    }),
                    None => {
                        first.insert(key, path);
                    }
                }
            }
        }
        errors
    }
}

fn list_yaml(dir: &Path) -> std::io::Result<BTreeSet<PathBuf>> {
    let mut out = BTreeSet::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && path.is_file() {
            out.insert(path);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  ports: [{port: 8080}]\n";

    #[test]
    fn bad_edit_keeps_the_last_good_version() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("shop.yaml");
        fs::write(&file, SVC).unwrap();
        let mut dir = ConfigDir::new(tmp.path());
        let scan = dir.scan();
        assert!(scan.changed && scan.errors.is_empty());
        assert_eq!(dir.resources().len(), 1);

        fs::write(
            &file,
            "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {portz: []}\n",
        )
        .unwrap();
        let scan = dir.scan();
        assert!(!scan.changed);
        assert_eq!(scan.errors.len(), 1);
        assert_eq!(dir.resources().len(), 1, "the old version keeps serving");
        assert!(
            dir.scan().errors.is_empty(),
            "an error is reported once per content"
        );

        fs::remove_file(&file).unwrap();
        assert!(dir.scan().changed);
        assert!(dir.resources().is_empty());
    }

    #[test]
    fn duplicates_across_files_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("a.yaml"), SVC).unwrap();
        fs::write(tmp.path().join("b.yml"), SVC).unwrap();
        fs::write(tmp.path().join("notes.txt"), "ignored").unwrap();
        let mut dir = ConfigDir::new(tmp.path());
        let scan = dir.scan();
        assert_eq!(scan.errors.len(), 1);
        assert_eq!(scan.errors[0].kind, "duplicate");
        assert!(scan.errors[0].file.ends_with("b.yml"));
        assert_eq!(dir.resources().len(), 1);
    }
}
