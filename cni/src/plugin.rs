//! ADD, DEL and CHECK: the pod is read from the API server; when it carries
//! the injected proxy, the interception rules are applied in its network
//! namespace (with `nsenter`), with the ports and proxy user its spec says.
//! Pods without the proxy pass through untouched. An API server that
//! cannot be reached fails the call (try again later) rather than start a
//! meshed pod without interception.

use std::{
    collections::HashMap,
    io::{Read, Write},
    process::{Command as Process, ExitCode, Output},
};

use mesh_control::inject::{annotations, pod};
use mesh_proxy::init::{ProxyOwner, Rules};
use serde_json::{Value, json};

use crate::protocol::{CniError, Code, Command, Config, Env, MAX_CONFIG, version_result};

/// Runs one CNI call: `vars` is the environment, the configuration is read
/// from stdin, the result or error goes to stdout.
pub fn main(vars: HashMap<String, String>) -> ExitCode {
    let mut input = Vec::new();
    let read = std::io::stdin()
        .take(MAX_CONFIG as u64 + 1)
        .read_to_end(&mut input);
    let version = serde_json::from_slice::<Value>(&input)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| crate::protocol::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_owned());
    let result = match read {
        Ok(_) => run(&vars, &input),
        Err(e) => Err(CniError::new(Code::Io, "cannot read stdin", e.to_string())),
    };
    let mut out = std::io::stdout().lock();
    match result {
        Ok(Some(answer)) => {
            let _ = writeln!(out, "{answer}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-cni: {e}");
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

fn run(vars: &HashMap<String, String>, input: &[u8]) -> Result<Option<Value>, CniError> {
    let env = Env::parse(vars)?;
    if env.command == Command::Version {
        return Ok(Some(version_result()));
    }
    let config = Config::parse(input)?;
    if config.kind != "mesh-cni" {
        return Err(CniError::new(
            Code::InvalidConfig,
            "this is not a mesh-cni entry",
            format!("type {:?}", config.kind),
        ));
    }
    // iptables inside the pod's network namespace.
    let run = |tool: &'static str, args: &[String]| in_netns(&env.netns, tool, args);
    match env.command {
        Command::Version => unreachable!("answered above"),
        Command::Status | Command::Gc => Ok(None),
        Command::Add => {
            let prev = config.prev_result.clone().ok_or_else(|| {
                CniError::new(
                    Code::InvalidConfig,
                    "no prevResult: mesh-cni is chained after the cluster's network plugin",
                    "list it last in the plugins of a .conflist (`mesh-cni install` does)",
                )
            })?;
            if let Some(rules) = rules_for(&env, &config)? {
                rules.apply_with(&run, ipv6_in(&env.netns)).map_err(|e| {
                    CniError::new(
                        Code::Apply,
                        "cannot apply the interception rules",
                        e.to_string(),
                    )
                })?;
                eprintln!(
                    "mesh-cni: interception rules applied for pod {}",
                    pod_name(&env).unwrap_or_default()
                );
            }
            let mut prev = prev;
            prev["cniVersion"] = json!(config.cni_version);
            Ok(Some(prev))
        }
        Command::Del => {
            // The namespace may already be gone: nothing is left to remove.
            if env.netns.is_empty() || !std::path::Path::new(&env.netns).exists() {
                return Ok(None);
            }
            mesh_proxy::init::remove_with(&run, ipv6_in(&env.netns)).map_err(|e| {
                CniError::new(
                    Code::Apply,
                    "cannot remove the interception rules",
                    e.to_string(),
                )
            })?;
            Ok(None)
        }
        Command::Check => {
            if config.prev_result.is_none() {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    "CHECK needs prevResult",
                    "",
                ));
            }
            if let Some(rules) = rules_for(&env, &config)? {
                rules
                    .check_with(&run, ipv6_in(&env.netns))
                    .map_err(|drift| {
                        CniError::new(Code::Drift, "interception rules drifted", drift)
                    })?;
            }
            Ok(None)
        }
    }
}

fn pod_name(env: &Env) -> Option<String> {
    Some(format!(
        "{}/{}",
        env.args.get("K8S_POD_NAMESPACE")?,
        env.args.get("K8S_POD_NAME")?
    ))
}

/// The rules for this pod, or `None` when it is not meshed.
fn rules_for(env: &Env, config: &Config) -> Result<Option<Rules>, CniError> {
    let (Some(namespace), Some(name)) = (
        env.args.get("K8S_POD_NAMESPACE"),
        env.args.get("K8S_POD_NAME"),
    ) else {
        // Not a Kubernetes pod: nothing of ours.
        return Ok(None);
    };
    let pod = read_pod(config, namespace, name)?;
    pod_rules(&pod, config)
}

/// What the injected spec asks for (pure: tested without a cluster).
pub fn pod_rules(pod: &Value, config: &Config) -> Result<Option<Rules>, CniError> {
    if !pod::is_injected(pod) || pod["spec"]["hostNetwork"] == json!(true) {
        return Ok(None);
    }
    let o = annotations::overrides(
        &mesh_control::inject::ProxyValues::default(),
        pod::string_map(&pod["metadata"]["annotations"]).as_ref(),
    )
    .map_err(|errors| {
        CniError::new(
            Code::InvalidConfig,
            "the pod's config.mesh.rs/ annotations",
            errors.join("; "),
        )
    })?;
    let proxy = ["initContainers", "containers"]
        .iter()
        .flat_map(|l| pod["spec"][l].as_array().into_iter().flatten())
        .find(|c| c["name"] == pod::PROXY)
        .expect("is_injected found it");
    let uid = proxy["securityContext"]["runAsUser"]
        .as_u64()
        .and_then(|u| u32::try_from(u).ok())
        .unwrap_or(o.proxy.uid);
    // The admin port, and the metrics-only port Prometheus scrapes.
    let mut skip_inbound = vec![config.admin_port, mesh_control::inject::pod::METRICS_PORT];
    skip_inbound.extend(o.skip_inbound_ports);
    Ok(Some(Rules {
        inbound_port: config.inbound_port,
        outbound_port: config.outbound_port,
        proxy: ProxyOwner::Uid(uid),
        skip_inbound_ports: skip_inbound,
        skip_outbound_ports: o.skip_outbound_ports,
    }))
}

fn read_pod(config: &Config, namespace: &str, name: &str) -> Result<Value, CniError> {
    let kubeconfig = config.kubeconfig.as_deref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "no kubeconfig in the mesh-cni entry",
            "`mesh-cni install` writes it",
        )
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(Code::Io, "cannot start the async runtime", e.to_string()))?;
    runtime.block_on(async {
        let client = mesh_control::k8s::client(Some(std::path::Path::new(kubeconfig)))
            .await
            .map_err(|e| CniError::new(Code::InvalidConfig, "cannot use the kubeconfig", e))?;
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(client, namespace);
        let get = tokio::time::timeout(std::time::Duration::from_secs(10), api.get(name));
        match get.await {
            Ok(Ok(pod)) => serde_json::to_value(pod)
                .map_err(|e| CniError::new(Code::Decode, "cannot read the pod", e.to_string())),
            Ok(Err(e)) => Err(CniError::new(
                Code::TryAgainLater,
                format!("cannot read pod {namespace}/{name} from the API server"),
                e.to_string(),
            )),
            Err(_) => Err(CniError::new(
                Code::TryAgainLater,
                format!("the API server did not answer for pod {namespace}/{name} in 10 s"),
                "",
            )),
        }
    })
}

/// Runs `tool args` inside the network namespace at `netns`.
fn in_netns(netns: &str, tool: &'static str, args: &[String]) -> std::io::Result<Output> {
    Process::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("--")
        .arg(tool)
        .args(args)
        .output()
}

/// Whether IPv6 is on inside the namespace (then ip6tables rules too).
fn ipv6_in(netns: &str) -> bool {
    Process::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["--", "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_the_injected_spec() {
        let config =
            Config::parse(br#"{"cniVersion":"1.0.0","type":"mesh-cni","prevResult":{}}"#).unwrap();
        let plain = json!({ "metadata": {}, "spec": { "containers": [{ "name": "app" }] } });
        assert!(pod_rules(&plain, &config).unwrap().is_none());
        let meshed = json!({
            "metadata": { "annotations": { "config.mesh.rs/skip-outbound-ports": "5432" } },
            "spec": {
                "initContainers": [{ "name": "mesh-proxy", "securityContext": { "runAsUser": 2200 } }],
                "containers": [{ "name": "app" }],
            },
        });
        let rules = pod_rules(&meshed, &config).unwrap().unwrap();
        assert_eq!(rules.proxy, ProxyOwner::Uid(2200));
        assert_eq!(rules.skip_outbound_ports, [5432]);
        assert_eq!(rules.skip_inbound_ports, [4191, 4192]);
        let mut bad = meshed.clone();
        bad["metadata"]["annotations"]["config.mesh.rs/skip-inbound-ports"] = json!("x");
        assert_eq!(
            pod_rules(&bad, &config).unwrap_err().code,
            Code::InvalidConfig
        );
    }
}
