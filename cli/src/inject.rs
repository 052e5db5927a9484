//! `mesh inject` and `mesh uninject`: manifests in (files, directories or
//! `-`; YAML or JSON; several documents and `kind: List`), manifests out.
//! By default workloads get the `mesh.rs/inject: enabled` label and
//! annotation on their pod template and the webhook does the rest;
//! `--manual` renders the injected spec here, with the webhook's own code
//! and the cluster's `mesh-config`, so both give the same pod. Documents
//! that do not change are written back byte for byte; changed ones are
//! re-serialized (keys sorted).

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use mesh_control::inject::{
    InjectConfig,
    annotations::{INJECT, PROXY_VERSION},
    pod,
};
use serde_json::{Value, json};

/// Inputs larger than this are refused (a manifest, not a data dump).
const MAX_INPUT: u64 = 16 << 20;

#[derive(Debug, Args)]
pub(crate) struct InjectArgs {
    /// Files or directories (read recursively: .yaml, .yml, .json), or `-`
    /// for standard input.
    #[arg(required = true, value_name = "FILE|DIR|-")]
    inputs: Vec<PathBuf>,
    /// Render the full injected spec here instead of adding the
    /// annotation (reads mesh-system/mesh-config from the cluster).
    #[arg(long)]
    manual: bool,
    /// With --manual: the kubeconfig [default: KUBECONFIG, ~/.kube/config].
    #[arg(long, requires = "manual")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct UninjectArgs {
    /// Files or directories (.yaml, .yml, .json), or `-` for standard input.
    #[arg(required = true, value_name = "FILE|DIR|-")]
    inputs: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Annotate,
    Manual,
    Remove,
}

/// One input file's text and whether it is JSON.
struct Input {
    name: String,
    text: String,
}

pub(crate) fn inject(args: InjectArgs, out: &mut impl Write) -> Result<ExitCode> {
    let inputs = read_inputs(&args.inputs)?;
    let config = if args.manual {
        Some(cluster_config(args.kubeconfig.as_deref())?)
    } else {
        None
    };
    let mode = if args.manual {
        Mode::Manual
    } else {
        Mode::Annotate
    };
    run(&inputs, mode, config.as_ref(), out)
}

pub(crate) fn uninject(args: UninjectArgs, out: &mut impl Write) -> Result<ExitCode> {
    let inputs = read_inputs(&args.inputs)?;
    run(&inputs, Mode::Remove, None, out)
}

fn cluster_config(kubeconfig: Option<&Path>) -> Result<(InjectConfig, String)> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use mesh_control::k8s::install::{CONFIG, NAMESPACE};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = mesh_control::k8s::client(kubeconfig)
            .await
            .map_err(anyhow::Error::msg)?;
        let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, NAMESPACE);
        let cm = api.get(CONFIG).await.with_context(|| {
            format!("cannot read ConfigMap {NAMESPACE}/{CONFIG} (is Mesh installed? `mesh check`)")
        })?;
        mesh_control::inject::webhook::config_from(cm.data.as_ref()).map_err(anyhow::Error::msg)
    })
}

fn read_inputs(paths: &[PathBuf]) -> Result<Vec<Input>> {
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .take(MAX_INPUT + 1)
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            if text.len() as u64 > MAX_INPUT {
                bail!("standard input is larger than {} MiB", MAX_INPUT >> 20);
            }
            files.push(Input {
                name: "-".into(),
                text,
            });
        } else if path.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found)?;
            found.sort();
            for file in found {
                files.push(read_file(&file)?);
            }
        } else {
            files.push(read_file(path)?);
        }
    }
    Ok(files)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, found)?;
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            found.push(path);
        }
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Input> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if size > MAX_INPUT {
        bail!("{} is larger than {} MiB", path.display(), MAX_INPUT >> 20);
    }
    Ok(Input {
        name: path.display().to_string(),
        text: std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    })
}

fn run(
    inputs: &[Input],
    mode: Mode,
    config: Option<&(InjectConfig, String)>,
    out: &mut impl Write,
) -> Result<ExitCode> {
    let mut rendered = Vec::new();
    for input in inputs {
        let is_json = input.text.trim_start().starts_with(['{', '[']);
        if is_json {
            let mut doc: Value = serde_json::from_str(&input.text)
                .with_context(|| format!("{}: not valid JSON", input.name))?;
            if process(&mut doc, mode, config, &input.name)? {
                rendered.push(serde_json::to_string_pretty(&doc)? + "\n");
            } else {
                rendered.push(input.text.clone());
            }
            continue;
        }
        let mut text = String::new();
        for (i, (separator, body)) in split_documents(&input.text).into_iter().enumerate() {
            text.push_str(separator);
            let parsed: Option<Value> = serde_saphyr::from_str(body)
                .with_context(|| format!("{} document {}: not valid YAML", input.name, i + 1))?;
            let Some(mut doc) = parsed.filter(|d| !d.is_null()) else {
                text.push_str(body);
                continue;
            };
            if process(&mut doc, mode, config, &input.name)? {
                text.push_str(&serde_saphyr::to_string(&doc)?);
            } else {
                text.push_str(body);
            }
        }
        rendered.push(text);
    }
    for (i, text) in rendered.iter().enumerate() {
        if i > 0 && !text.trim_start().starts_with("---") {
            out.write_all(b"---\n")?;
        }
        out.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            out.write_all(b"\n")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Splits a YAML stream at `---` lines, keeping each separator line (and
/// the text of each document) as written.
fn split_documents(text: &str) -> Vec<(&str, &str)> {
    let mut docs = Vec::new();
    let mut sep_start = 0;
    let mut body_start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let is_separator =
            line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
        if is_separator {
            if at > 0 || body_start != at {
                docs.push((&text[sep_start..body_start], &text[body_start..at]));
            }
            sep_start = at;
            body_start = at + line.len();
        }
        at += line.len();
    }
    docs.push((&text[sep_start..body_start], &text[body_start..]));
    docs
}

/// Changes `doc` for `mode`; returns whether it changed. Prints one line
/// per resource on stderr.
fn process(
    doc: &mut Value,
    mode: Mode,
    config: Option<&(InjectConfig, String)>,
    file: &str,
) -> Result<bool> {
    if doc["kind"] == "List" {
        let mut changed = false;
        if let Some(items) = doc["items"].as_array_mut() {
            for item in items {
                changed |= process(item, mode, config, file)?;
            }
        }
        return Ok(changed);
    }
    let kind = doc["kind"].as_str().unwrap_or("").to_owned();
    let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_owned();
    let what = format!("{}/{name}", kind.to_lowercase());
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let template = match kind.as_str() {
        "Pod" => Some(&mut *doc),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&mut doc["spec"]["template"])
        }
        "CronJob" => Some(&mut doc["spec"]["jobTemplate"]["spec"]["template"]),
        "Namespace" => None,
        _ => {
            eprintln!("{what} skipped");
            return Ok(false);
        }
    };
    let Some(template) = template else {
        // A Namespace: the switch on the namespace itself.
        let changed = match mode {
            Mode::Remove => remove_switch(&mut doc["metadata"]),
            _ => set_switch(&mut doc["metadata"]),
        };
        eprintln!(
            "{what} {}",
            match (mode, changed) {
                (_, false) => "unchanged",
                (Mode::Remove, true) => "uninjected",
                _ => "annotated",
            }
        );
        return Ok(changed);
    };
    if !template["spec"].is_object() {
        eprintln!("{what} skipped (no pod template)");
        return Ok(false);
    }
    if mesh_control::inject::annotations::EXCLUDED_NAMESPACES.contains(&namespace.as_str()) {
        eprintln!("warning: {what} is in {namespace}, which injection never touches; skipped");
        return Ok(false);
    }
    if mode != Mode::Remove {
        warn(template, &what);
        let switch = mesh_control::inject::annotations::switch(
            pod::string_map(&template["metadata"]["labels"]).as_ref(),
            pod::string_map(&template["metadata"]["annotations"]).as_ref(),
            &what,
        )
        .map_err(anyhow::Error::msg)?;
        if switch == Some(mesh_control::inject::annotations::Switch::Disabled) {
            eprintln!("warning: {what} has {INJECT}: disabled; left as is");
            return Ok(false);
        }
        if template["spec"]["hostNetwork"] == json!(true) {
            eprintln!("{what} skipped");
            return Ok(false);
        }
    }
    let changed = match mode {
        Mode::Annotate => {
            if template.get("metadata").is_none_or(|m| !m.is_object()) {
                template["metadata"] = json!({});
            }
            set_switch(&mut template["metadata"])
        }
        Mode::Manual => {
            let (config, bundle) = config.expect("--manual reads the cluster's config");
            let before = template.clone();
            pod::inject(template, config, bundle)
                .map_err(|errors| anyhow::anyhow!("{file}: {what}: {}", errors.join("; ")))?;
            *template != before
        }
        Mode::Remove => uninject_template(template),
    };
    let verb = match (mode, changed) {
        (_, false) => "unchanged",
        (Mode::Remove, true) => "uninjected",
        _ => "injected",
    };
    eprintln!("{what} {verb}");
    Ok(changed)
}

fn warn(template: &Value, what: &str) {
    if template["spec"]["hostNetwork"] == json!(true) {
        eprintln!(
            "warning: {what} uses hostNetwork: it shares the node's network and cannot be meshed"
        );
    }
    let udp = template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .any(|p| p["protocol"] == "UDP");
    if udp {
        eprintln!(
            "warning: {what} declares UDP ports: the proxy carries TCP only; UDP bypasses it"
        );
    }
}

fn set_switch(meta: &mut Value) -> bool {
    let mut changed = false;
    for key in ["labels", "annotations"] {
        if !meta[key].is_object() {
            meta[key] = json!({});
        }
        if meta[key][INJECT] != "enabled" {
            meta[key][INJECT] = json!("enabled");
            changed = true;
        }
    }
    changed
}

fn remove_switch(meta: &mut Value) -> bool {
    let mut changed = false;
    let Some(meta) = meta.as_object_mut() else {
        return false;
    };
    for key in ["labels", "annotations"] {
        let Some(map) = meta.get_mut(key).and_then(Value::as_object_mut) else {
            continue;
        };
        // An explicit `disabled` is the owner's choice, not ours to undo.
        if map.get(INJECT).is_some_and(|v| v == "enabled") {
            map.remove(INJECT);
            changed = true;
        }
        if key == "annotations" {
            changed |= map.remove(PROXY_VERSION).is_some();
        }
        if map.is_empty() {
            meta.remove(key);
        }
    }
    changed
}

/// Undoes both `mesh inject` and `mesh inject --manual`.
fn uninject_template(template: &mut Value) -> bool {
    let mut changed = template.get_mut("metadata").is_some_and(remove_switch);
    let Some(spec) = template.get_mut("spec").and_then(Value::as_object_mut) else {
        return changed;
    };
    for (list, unwanted) in [
        ("initContainers", [pod::PROXY, pod::INIT]),
        ("containers", [pod::PROXY, pod::INIT]),
        ("volumes", [pod::TOKEN_VOLUME, pod::TOKEN_VOLUME]),
    ] {
        let Some(items) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        let before = items.len();
        items.retain(|c| !unwanted.iter().any(|u| c["name"] == *u));
        changed |= items.len() != before;
        if items.is_empty() && list != "containers" {
            spec.remove(list);
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_where_written() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n";
        let docs = split_documents(text);
        assert_eq!(
            docs,
            [("", "a: 1\n"), ("---\n", "b: 2\n"), ("--- # c\n", "c: 3\n")]
        );
        let joined: String = docs.iter().map(|(s, b)| format!("{s}{b}")).collect();
        assert_eq!(joined, text);
        assert_eq!(split_documents("---\nx: 1\n"), [("---\n", "x: 1\n")]);
    }
}
