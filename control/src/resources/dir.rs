//! The config directory: `*.yaml` / `*.yml` files read again whenever their
//! content changes. A file that fails to parse is rejected whole and its
//! previous good version keeps serving.
//!
//! The directory is polled (content compared), which works the same on
//! every filesystem, including Kubernetes ConfigMap mounts that swap
//! symlinks; a poll of a few small files is cheap.
//!
//! What an operator's typo or a dropped file cannot do: replace a resource
//! that is serving. When two files define the same kind/namespace/name, the
//! copy already serving keeps serving and the other is refused, naming
//! both. A file over [`MAX_FILE`] is refused unread; a file modified in the
//! last [`SETTLE`] is read again at the next poll, so one being written is
//! not applied half-written.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

/// The largest config file read; larger ones are refused.
pub const MAX_FILE: u64 = 1024 * 1024;
/// A file changed more recently than this may still be being written: it
/// is read again at the next poll.
pub const SETTLE: Duration = Duration::from_millis(200);

/// `(kind, namespace, name)`: what may be defined once.
type ResourceKey = (&'static str, String, String);

fn key_of(res: &Resource) -> ResourceKey {
    let m = res.metadata();
    (res.kind(), m.namespace.clone(), m.name.clone())
}

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
    /// Some file changed too recently to be read: scan again after [`SETTLE`].
    pub unsettled: bool,
}

#[derive(Debug)]
pub struct ConfigDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The file whose copy of each resource is serving.
    owners: BTreeMap<ResourceKey, PathBuf>,
}

impl ConfigDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            owners: BTreeMap::new(),
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
            match fs::metadata(path) {
                Ok(meta) if meta.len() > MAX_FILE => {
                    let reason = format!(
                        "the file is {} bytes; the limit is {MAX_FILE}: split it",
                        meta.len()
                    );
                    let state = self.files.entry(path.clone()).or_default();
                    // Reported once per size; its last good version stays.
                    if state.content.as_deref() != Some(reason.as_str()) {
                        scan.errors.push(ConfigError {
                            file: path.clone(),
                            line: 0,
                            reason: reason.clone(),
                            kind: "too_large",
                        });
                        state.content = Some(reason);
                    }
                    continue;
                }
                Ok(meta) => {
                    let age = meta
                        .modified()
                        .ok()
                        .and_then(|m| SystemTime::now().duration_since(m).ok());
                    if age.is_some_and(|age| age < SETTLE) {
                        scan.unsettled = true;
                        continue;
                    }
                }
                Err(_) => {}
            }
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
            scan.errors.extend(self.settle_owners());
        }
        scan
    }

    /// The serving resources: for each kind/namespace/name, its owner's copy.
    pub fn resources(&self) -> Vec<Resource> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (path, state) in &self.files {
            for (_, res) in &state.good {
                let key = key_of(res);
                if self.owners.get(&key) == Some(path) && seen.insert(key) {
                    out.push(res.clone());
                }
            }
        }
        out
    }

    /// Keeps each resource with the file already serving it; a resource
    /// nobody serves goes to the first file (by name) that defines it.
    /// Every other copy is refused, naming the one that serves.
    fn settle_owners(&mut self) -> Vec<ConfigError> {
        let defines = |state: &FileState, key: &ResourceKey| {
            state.good.iter().any(|(_, r)| key_of(r) == *key)
        };
        let files = &self.files;
        self.owners
            .retain(|key, path| files.get(path).is_some_and(|state| defines(state, key)));
        let mut errors = Vec::new();
        for (path, state) in &self.files {
            let mut in_this_file = BTreeSet::new();
            for (line, res) in &state.good {
                let key = key_of(res);
                let owner = self
                    .owners
                    .entry(key.clone())
                    .or_insert_with(|| path.clone());
                if owner != path || !in_this_file.insert(key.clone()) {
                    errors.push(ConfigError {
                        file: path.clone(),
                        line: *line,
                        reason: format!(
                            "{} {}/{} is already defined in {}, which keeps serving; this copy is refused: remove one of them",
                            key.0,
                            key.1,
                            key.2,
                            owner.display()
                        ),
                        kind: "duplicate",
                    });
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
        settle();
        let scan = dir.scan();
        assert!(scan.changed && scan.errors.is_empty());
        assert_eq!(dir.resources().len(), 1);

        fs::write(
            &file,
            "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {portz: []}\n",
        )
        .unwrap();
        settle();
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
        settle();
        let scan = dir.scan();
        assert_eq!(scan.errors.len(), 1);
        assert_eq!(scan.errors[0].kind, "duplicate");
        assert!(scan.errors[0].file.ends_with("b.yml"));
        assert_eq!(dir.resources().len(), 1);
    }

    /// A copy that appears in a file that sorts first does not take over
    /// the resource already serving: the serving copy stays, the new one
    /// is refused and named, and it takes over only when the first goes.
    #[test]
    fn a_new_duplicate_never_replaces_the_serving_copy() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("b.yaml"), SVC).unwrap();
        let mut dir = ConfigDir::new(tmp.path());
        settle();
        assert!(dir.scan().errors.is_empty());
        let hijack = SVC.replace("8080", "9999");
        fs::write(tmp.path().join("a.yaml"), &hijack).unwrap();
        settle();
        let scan = dir.scan();
        assert_eq!(scan.errors.len(), 1, "{:?}", scan.errors);
        assert!(scan.errors[0].file.ends_with("a.yaml"));
        assert!(
            scan.errors[0]
                .reason
                .contains("b.yaml, which keeps serving"),
            "{}",
            scan.errors[0].reason
        );
        let Resource::Service(svc) = &dir.resources()[0] else {
            panic!()
        };
        assert_eq!(svc.spec.ports[0].port, 8080, "the serving copy stays");

        fs::remove_file(tmp.path().join("b.yaml")).unwrap();
        assert!(dir.scan().changed);
        let Resource::Service(svc) = &dir.resources()[0] else {
            panic!()
        };
        assert_eq!(svc.spec.ports[0].port, 9999);
    }

    #[test]
    fn oversized_and_fresh_files_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let big = tmp.path().join("big.yaml");
        fs::write(&big, format!("{SVC}#{}\n", "x".repeat(MAX_FILE as usize))).unwrap();
        let mut dir = ConfigDir::new(tmp.path());
        settle();
        let scan = dir.scan();
        assert_eq!(scan.errors[0].kind, "too_large");
        assert!(dir.resources().is_empty());

        // Just written: not read until it has settled.
        let fresh = tmp.path().join("fresh.yaml");
        fs::write(&fresh, SVC).unwrap();
        assert!(!dir.scan().changed);
        settle();
        assert!(dir.scan().changed);
        assert_eq!(dir.resources().len(), 1);
    }

    fn settle() {
        std::thread::sleep(SETTLE + Duration::from_millis(50));
    }
}
