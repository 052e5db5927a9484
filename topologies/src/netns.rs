//! `network: namespaces`: every replica in a network namespace of its own,
//! like a pod, its TCP redirected to its proxy by `mesh proxy init`, so apps
//! reach services without knowing about the mesh (no `HTTP_PROXY`).
//!
//! Cluster `n` gets a bridge `mb<n>` on the host holding 10.<n>.0.1 (its
//! control plane) and 10.<n>.0.2 (its gateway); each replica a namespace
//! with a veth into that bridge and the address 10.<n>.<1+k/250>.<k%250+1>,
//! routed through 10.<n>.0.1. Everything a replica reaches outside its
//! cluster is a host address, so nothing is forwarded between bridges.
//! The proxy runs as root with group 0 and the app as root with group
//! [`APP_GID`]: the rules tell them apart by group. Service names resolve
//! (through `/etc/netns/<ns>/hosts`) to a placeholder address; the
//! redirected request is routed by its Host or `:authority`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::runner::VmRoute;

/// The group apps run with; its TCP is redirected to the proxy.
pub const APP_GID: u32 = 1337;

/// What a run made on the host, for teardown.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Made {
    pub bridges: Vec<String>,
    pub namespaces: Vec<String>,
}

/// One replica's namespace.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub veth: String,
    pub bridge: String,
    pub ip: IpAddr,
    /// The host address it routes through (the cluster's control plane).
    pub gateway: IpAddr,
    /// Service names it resolves (to [`placeholder`]).
    pub names: Vec<String>,
}

pub fn bridge(n: u8) -> String {
    format!("mb{n}")
}

pub fn host_ip(n: u8, fourth: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, n, 0, fourth))
}

pub fn pod_ip(n: u8, k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        n,
        1 + (k / 250) as u8,
        (k % 250) as u8 + 1,
    ))
}

/// Where service names point: never contacted (the proxy routes by name).
pub fn placeholder(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, n, 255, 254))
}

/// Root and the commands namespaces need, or an error naming what is missing.
pub fn check_host() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "network: namespaces needs root (network namespaces, bridges and iptables); run as root or use network: loopback"
        );
    }
    for (cmd, arg, package) in [
        ("ip", "-V", "iproute2"),
        ("iptables", "--version", "iptables"),
        ("setpriv", "--version", "util-linux"),
        ("bash", "--version", "bash"),
        ("timeout", "--version", "coreutils"),
    ] {
        let ok = Command::new(cmd)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            bail!("network: namespaces needs `{cmd}`; install {package}");
        }
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes the bridge of cluster `n` with its host addresses.
pub fn make_bridge(n: u8, made: &mut Made) -> Result<()> {
    let name = bridge(n);
    // A bridge left by a run that was killed.
    let _ = ip(&["link", "del", &name]);
    ip(&["link", "add", &name, "type", "bridge"])?;
    made.bridges.push(name.clone());
    for fourth in [1, 2] {
        ip(&[
            "addr",
            "add",
            &format!("{}/16", host_ip(n, fourth)),
            "dev",
            &name,
        ])?;
    }
    ip(&["link", "set", &name, "up"])?;
    Ok(())
}

/// The namespace with its veth into the bridge, `lo` up.
fn make_namespace(pod: &Pod, made: &mut Made) -> Result<()> {
    let ns = pod.namespace.as_str();
    let _ = ip(&["netns", "del", ns]);
    let _ = ip(&["link", "del", &pod.veth]);
    ip(&["netns", "add", ns])?;
    made.namespaces.push(ns.to_owned());
    ip(&[
        "link", "add", &pod.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["link", "set", &pod.veth, "master", &pod.bridge, "up"])?;
    in_ns(ns, &["link", "set", "lo", "up"])?;
    in_ns(ns, &["link", "set", "eth0", "up"])
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Makes a replica's namespace: veth into the bridge, address, route,
/// hosts file, and the proxy's interception rules.
pub fn make_pod(pod: &Pod, mesh: &std::path::Path, made: &mut Made) -> Result<()> {
    let ns = pod.namespace.as_str();
    make_namespace(pod, made)?;
    address_and_route(pod, VmRoute::Default)?;
    let dir = hosts_dir(ns);
    std::fs::create_dir_all(&dir)?;
    let mut hosts = String::from("127.0.0.1 localhost\n");
    if let IpAddr::V4(v4) = pod.ip {
        let placeholder = placeholder(v4.octets()[1]);
        for name in &pod.names {
            hosts.push_str(&format!("{placeholder} {name}\n"));
        }
    }
    std::fs::write(dir.join("hosts"), hosts)?;
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(mesh)
        .args(["proxy", "init", "--apply", "--proxy-gid", "0"])
        .output()?;
    if !out.status.success() {
        bail!(
            "{ns}: mesh proxy init failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes a VM's namespace: routed as a pod, or with a route to the
/// gateway only (its address alone, nothing else on the bridge reachable);
/// its resolver is the VM agent's DNS. No interception rules: the agent
/// applies its own.
pub fn make_vm(pod: &Pod, route: VmRoute, made: &mut Made) -> Result<()> {
    let ns = pod.namespace.as_str();
    make_namespace(pod, made)?;
    address_and_route(pod, route)?;
    let dir = hosts_dir(ns);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n")?;
    std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.153\n")?;
    Ok(())
}

/// The namespace's address and route: a pod's (`/16`, the default route
/// via the cluster's host address), or the gateway only (`/32`, one route).
fn address_and_route(pod: &Pod, route: VmRoute) -> Result<()> {
    let ns = pod.namespace.as_str();
    match route {
        VmRoute::Default => {
            in_ns(
                ns,
                &["addr", "add", &format!("{}/16", pod.ip), "dev", "eth0"],
            )?;
            in_ns(
                ns,
                &["route", "add", "default", "via", &pod.gateway.to_string()],
            )?;
        }
        VmRoute::GatewayOnly(gateway) => {
            in_ns(
                ns,
                &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
            )?;
            in_ns(
                ns,
                &["route", "add", &format!("{gateway}/32"), "dev", "eth0"],
            )?;
        }
    }
    Ok(())
}

fn hosts_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

/// Removes what a run made (best effort: what is gone already is fine).
pub fn teardown(made: &Made) {
    for ns in &made.namespaces {
        let _ = ip(&["netns", "del", ns]);
        let _ = std::fs::remove_dir_all(hosts_dir(ns));
    }
    for bridge in &made.bridges {
        let _ = ip(&["link", "del", bridge]);
    }
}

/// `cmd` run inside namespace `ns` (as root, group 0).
pub fn wrap(ns: &str, program: &std::path::Path, args: &[String]) -> (PathBuf, Vec<String>) {
    let mut all = vec!["netns".into(), "exec".into(), ns.into()];
    all.push(program.display().to_string());
    all.extend(args.iter().cloned());
    ("ip".into(), all)
}

/// `cmd` run inside `ns` as an app: root, but with group [`APP_GID`], so
/// its TCP goes to the proxy.
pub fn wrap_app(ns: &str, program: &std::path::Path, args: &[String]) -> (PathBuf, Vec<String>) {
    let mut all = vec![
        "netns".into(),
        "exec".into(),
        ns.into(),
        "setpriv".into(),
        format!("--regid={APP_GID}"),
        "--clear-groups".into(),
        "--".into(),
    ];
    all.push(program.display().to_string());
    all.extend(args.iter().cloned());
    ("ip".into(), all)
}

/// `GET path` on `addr` from inside `ns` (where the proxy's loopback admin
/// listens): the status and the body.
pub fn fetch(ns: &str, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
        addr.ip(),
        addr.port()
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "3", "bash", "-c", &script])
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{ns} {addr}{path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    mesh_core::metrics_text::parse_response(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| std::io::Error::other(format!("{ns} {addr}{path}: not HTTP")))
}

/// Whether `addr` accepts a connection from inside `ns` (as the proxy
/// would connect: not redirected).
pub fn connects(ns: &str, addr: SocketAddr) -> bool {
    let script = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
    Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "2", "bash", "-c", &script])
        .output()
        .is_ok_and(|o| o.status.success())
}
