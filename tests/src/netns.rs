//! Network namespaces as hosts for the tests that need root: processes
//! started in them, commands run in them (as root or as `nobody`), and
//! everything deleted when the host drops.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Fails loudly without root or a tool these tests run.
pub fn require_root_and_tools() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("?");
    assert_eq!(
        uid, "0",
        "this test needs root (network namespaces and iptables); CI runs it as root"
    );
    for (tool, arg, package) in [
        ("ip", "-V", "iproute2"),
        ("iptables", "--version", "iptables"),
        ("ip6tables", "--version", "iptables"),
        ("curl", "--version", "curl"),
        ("setpriv", "--version", "util-linux"),
        ("/usr/bin/python3", "--version", "python3"),
    ] {
        if Command::new(tool).arg(arg).output().is_err() {
            panic!("this test needs `{tool}`: apt-get install -y {package}");
        }
    }
}

/// A command's stdout and stderr together.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` on the host and panics, with its output, when it fails.
pub fn run(cmd: &Path, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd:?} {args:?}: {}", text(&out));
    out
}

/// A network namespace (a host); its processes are killed and it is
/// deleted (with its `/etc/netns` files) when it drops. Each process logs
/// to `<logs>/<name>.log`.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    logs: PathBuf,
    children: Vec<(String, Child)>,
}

impl Host {
    pub fn new(role: &str, logs: &Path) -> Self {
        let name = format!("mesh-{role}-{}", std::process::id());
        run(Path::new("ip"), &["netns", "add", &name]);
        let host = Self {
            name,
            logs: logs.to_owned(),
            children: Vec::new(),
        };
        host.ok(&["ip", "link", "set", "lo", "up"]);
        host
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("ip netns exec")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn as_nobody(&self, args: &[&str]) -> Output {
        let mut all = vec![
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    pub fn spawn(&mut self, name: &str, args: &[&str], envs: &[(&str, String)]) {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).unwrap();
        let mut cmd = self.command(args);
        cmd.envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .env("MESH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        self.children.push((name.to_owned(), cmd.spawn().unwrap()));
    }

    /// The child called `name`, taken out of the list.
    pub fn take(&mut self, name: &str) -> Child {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        self.children.remove(i).1
    }

    pub fn curl(&self, url: &str) -> String {
        text(&self.exec(&["curl", "-sS", "--max-time", "5", url]))
    }

    /// Waits for `url` (in this namespace) to answer 200.
    pub fn wait_ok(&self, url: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.exec(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url]);
            if String::from_utf8_lossy(&out.stdout) == "200" {
                return;
            }
            if Instant::now() > deadline {
                panic!("{what} not ready at {url}\n{}", self.logs_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn logs_text(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.logs).unwrap().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                all.push_str(&format!(
                    "--- {}\n{}\n",
                    p.display(),
                    std::fs::read_to_string(&p).unwrap_or_default()
                ));
            }
        }
        all
    }

    /// Whether the iptables `nat` chain exists in this namespace.
    pub fn chain_exists(&self, chain: &str) -> bool {
        self.exec(&["iptables", "-t", "nat", "-L", chain, "-n"])
            .status
            .success()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// A Python HTTP app on `addr:port` answering with the caller's verified
/// identity (`mesh-client-id`) and the path.
pub fn http_app(addr: &str, port: u16) -> String {
    format!(
        r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("client=%s path=%s\n" % (self.headers.get("mesh-client-id", "-"), self.path)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("{addr}", {port}), H).serve_forever()
"#
    )
}
