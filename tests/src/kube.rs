//! A real Kubernetes control plane for tests: etcd, kube-apiserver and
//! kube-controller-manager from `tests/kube-apiserver/` (built once by its
//! `build.sh`, cached under `target/`), on free loopback ports, removed when
//! the [`Kube`] is dropped or the test process ends.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// One running cluster control plane (no kubelet: tests play the kubelet).
#[derive(Debug)]
pub struct Kube {
    child: Child,
    /// Held open: the control plane exits when this closes.
    _stdin: ChildStdin,
    pub dir: tempfile::TempDir,
    /// An admin (`system:masters`) kubeconfig.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// How long it took to become ready.
    pub started_in: Duration,
}

/// The `mesh-test-kube` binary, built if needed (a cold build takes minutes;
/// `.ci/run` builds it before the tests).
pub fn kube_exe() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let script = crate::repo().join("tests/kube-apiserver/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{} failed; Go is needed to build the test API server",
            script.display()
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

impl Kube {
    /// Starts one and waits until the API server is ready and the
    /// controller manager works (the `default` ServiceAccount exists).
    pub fn start() -> Self {
        let exe = kube_exe();
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let log = std::fs::File::create(dir.path().join("kube.log")).unwrap();
        let mut child = Command::new(&exe)
            .args(["up", "--dir"])
            .arg(dir.path().join("cluster"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(json) = line.strip_prefix("READY ") {
                    let _ = tx.send(json.to_owned());
                }
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(180))
            .unwrap_or_else(|_| {
                let log = std::fs::read_to_string(dir.path().join("kube.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "the test API server was not ready in 180 s; last log lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            });
        let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
        Self {
            child,
            _stdin: stdin,
            kubeconfig: PathBuf::from(ready["kubeconfig"].as_str().unwrap()),
            server: ready["server"].as_str().unwrap().to_owned(),
            dir,
            started_in: started.elapsed(),
        }
    }

    /// `kubectl ARGS` against this cluster as admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_input(args, "")
    }

    /// `kubectl ARGS` with `input` on its stdin.
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Output {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed (.ci/run installs it)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// `kubectl ARGS` that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `kubectl apply -f -` of `yaml`, which must succeed.
    pub fn apply(&self, yaml: &str) -> String {
        let out = self.kubectl_with_input(&["apply", "-f", "-"], yaml);
        assert!(
            out.status.success(),
            "kubectl apply: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        // The controller manager follows: its stdin closes.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
