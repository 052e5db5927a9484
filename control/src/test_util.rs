//! Fixtures for tests of this crate and of crates that need a real control
//! plane (behind the `test-util` feature).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_core::identity::{
    BundleStore, CertificateAuthority, RootCa, TrustBundleSet,
    ca::{DEFAULT_ISSUER_TTL, DEFAULT_ROOT_TTL},
    cert::now,
    files,
};

use crate::{config::Config, index::Liveness};

/// The trust domain of test control planes.
pub const TD: &str = "west.mesh.local";

/// Creates (once) a CA directory, and the config and data directories,
/// under `root`. Returns `(ca, config, data)`.
pub fn make_dirs(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    make_dirs_for(root, TD)
}

/// [`make_dirs`] with a CA for trust domain `td`.
pub fn make_dirs_for(root: &Path, td: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_dir = root.join("ca");
    if !ca_dir.join(files::ISSUER_CERT).exists() {
        let rca = RootCa::generate(DEFAULT_ROOT_TTL, now()).expect("root");
        let ca = CertificateAuthority::generate(
            td.parse().expect("td"),
            &rca,
            DEFAULT_ISSUER_TTL,
            now(),
        )
        .expect("issuer");
        files::write_ca_dir(&ca_dir, &rca, &ca, true).expect("CA files");
    }
    let cfg = root.join("config");
    let data = root.join("data");
    std::fs::create_dir_all(&cfg).expect("config dir");
    std::fs::create_dir_all(&data).expect("data dir");
    (ca_dir, cfg, data)
}

/// The trust bundle of a CA directory.
pub fn bundles_of(ca_dir: &Path) -> BundleStore {
    bundles_of_td(ca_dir, TD)
}

/// The trust bundle of a CA directory of trust domain `td`.
pub fn bundles_of_td(ca_dir: &Path, td: &str) -> BundleStore {
    let bundle =
        files::load_bundle(&ca_dir.join(files::BUNDLE), td.parse().expect("td")).expect("bundle");
    BundleStore::new([bundle].into_iter().collect::<TrustBundleSet>())
}

/// A config for a control plane under `root`, on 127.0.0.1 ephemeral ports.
pub fn config(root: &Path) -> Config {
    config_for(root, "west", TD)
}

/// [`config`] for cluster `cluster` with its own CA for `td`.
pub fn config_for(root: &Path, cluster: &str, td: &str) -> Config {
    let (ca_dir, config_dir, data_dir) = make_dirs_for(root, td);
    Config {
        cluster: cluster.into(),
        cluster_domain: "cluster.local".into(),
        ca_dir,
        config_dir,
        admin_socket: data_dir.join("admin.sock"),
        data_dir,
        identity_addr: "127.0.0.1:0".parse().expect("addr"),
        api_addr: "127.0.0.1:0".parse().expect("addr"),
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
        metrics_addr: None,
        liveness: Liveness::default(),
        poll_interval: Duration::from_millis(100),
        leaf_ttl: Duration::from_secs(24 * 3600),
        certify_burst: 100,
        certify_rate: 10.0,
        max_workloads_per_namespace: crate::index::MAX_WORKLOADS_PER_NAMESPACE,
        gateway_addresses: Vec::new(),
        kube: None,
    }
}
