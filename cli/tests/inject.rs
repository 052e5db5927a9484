//! `mesh inject` and `mesh uninject` on manifests (no cluster: the default
//! mode adds the switch; `--manual` is checked against the real webhook in
//! `tests/tests/inject.rs`).

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject")
}

fn mesh(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        let mut input = input;
        input.write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> (String, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8(out.stdout.clone()).unwrap(), stderr)
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// The Linkerd-style fixture, field by field: templates get the switch as
/// label and annotation, the Service comes back byte for byte, the List is
/// walked, an explicit `disabled` and host networking are left alone with
/// a warning, UDP is warned about, one line per resource on stderr; and
/// `mesh uninject` gives back the original.
#[test]
fn inject_adds_the_switch_to_pod_templates_and_leaves_the_rest_alone() {
    let file = fixtures().join("app.yaml");
    let original = std::fs::read_to_string(&file).unwrap();
    let (out, stderr) = ok(&mesh(&["inject", file.to_str().unwrap()], None));

    for line in [
        "deployment/web injected",
        "service/web skipped",
        "cronjob/report injected",
        "statefulset/db has mesh.rs/inject: disabled; left as is",
        "daemonset/agent uses hostNetwork",
        "daemonset/agent skipped",
        "configmap/settings skipped",
        "deployment/web declares UDP ports",
    ] {
        assert!(stderr.contains(line), "{line:?} in:\n{stderr}");
    }

    let service_text = original
        .split("---\n")
        .find(|d| d.contains("kind: Service"))
        .unwrap();
    assert!(
        out.contains(service_text),
        "the Service byte for byte:\n{out}"
    );

    let injected = docs(&out);
    let before = docs(&original);
    assert_eq!(injected.len(), 4);
    let web = &injected[0]["spec"]["template"]["metadata"];
    assert_eq!(web["labels"]["mesh.rs/inject"], "enabled");
    assert_eq!(web["annotations"]["mesh.rs/inject"], "enabled");
    assert_eq!(web["labels"]["app"], "web", "existing labels kept");
    assert_eq!(
        injected[0]["spec"]["template"]["spec"], before[0]["spec"]["template"]["spec"],
        "the default mode leaves the spec to the webhook"
    );
    let report = &injected[2]["spec"]["jobTemplate"]["spec"]["template"]["metadata"];
    assert_eq!(report["annotations"]["mesh.rs/inject"], "enabled");
    assert_eq!(
        report["annotations"]["config.mesh.rs/proxy-await"],
        "enabled"
    );
    let items = injected[3]["items"].as_array().unwrap();
    assert_eq!(items[0], before[3]["items"][0], "disabled stays disabled");
    assert_eq!(items[1], before[3]["items"][1], "hostNetwork untouched");
    assert_eq!(items[2], before[3]["items"][2]);

    // Again: nothing changes; then uninject gives back the input.
    let (twice, _) = ok(&mesh(&["inject", "-"], Some(&out)));
    assert_eq!(docs(&twice), injected, "idempotent");
    let (back, stderr) = ok(&mesh(&["uninject", "-"], Some(&out)));
    assert!(stderr.contains("deployment/web uninjected"), "{stderr}");
    assert_eq!(docs(&back), before);
}

/// JSON in, JSON out; a directory is read whole; a Namespace is annotated.
#[test]
fn json_directories_and_namespaces() {
    let (out, stderr) = ok(&mesh(&["inject", fixtures().to_str().unwrap()], None));
    assert!(stderr.contains("namespace/shop annotated"), "{stderr}");
    let json_start = out.find("{\n").expect("the JSON document");
    let ns: Value = serde_json::from_str(&out[json_start..]).unwrap();
    assert_eq!(ns["metadata"]["labels"]["mesh.rs/inject"], "enabled");
    assert_eq!(ns["metadata"]["annotations"]["mesh.rs/inject"], "enabled");
}

/// Input that is not a manifest is refused naming the file and document;
/// nothing is written.
#[test]
fn malformed_input_is_refused_naming_where() {
    let out = mesh(&["inject", "-"], Some("kind: Pod\n---\nkind: [unclosed\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("- document 2: not valid YAML"), "{stderr}");
    assert!(out.stdout.is_empty());
    let out = mesh(&["inject", "/nonexistent.yaml"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.yaml"));
    let bad = mesh(
        &["inject", "-"],
        Some(
            "kind: Pod\nmetadata: {name: p, labels: {mesh.rs/inject: maybe}}\nspec: {containers: []}\n",
        ),
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("mesh.rs/inject"),
        "{stderr}"
    );
}
