//! The `mesh.rs/inject` switch and the `config.mesh.rs/` annotations an
//! operator sets per workload. Every value is checked: an unknown
//! annotation or a malformed value is refused naming it, never ignored.

use std::collections::BTreeMap;

use super::config::ProxyValues;

/// The switch, as a label (what the webhook's selectors see) or an
/// annotation, on a namespace or a pod template.
pub const INJECT: &str = "mesh.rs/inject";
/// Namespaces with this label set to `disabled` are never sent to the
/// webhook.
pub const WEBHOOK_OPT_OUT: &str = "config.mesh.rs/admission-webhooks";
/// The prefix of per-workload settings.
pub const CONFIG_PREFIX: &str = "config.mesh.rs/";
/// Set on injected pods: the version of the injector.
pub const PROXY_VERSION: &str = "mesh.rs/proxy-version";
/// Namespaces the webhook never touches.
pub const EXCLUDED_NAMESPACES: [&str; 2] = ["kube-system", "mesh-system"];
/// At most this many ports in one list annotation.
const MAX_PORTS: usize = 64;

/// The documented `config.mesh.rs/` annotations (without the prefix).
pub const KNOWN: [&str; 12] = [
    "proxy-cpu-request",
    "proxy-cpu-limit",
    "proxy-memory-request",
    "proxy-memory-limit",
    "proxy-log-level",
    "proxy-image",
    "proxy-await",
    "native-sidecar",
    "shutdown-grace",
    "skip-inbound-ports",
    "skip-outbound-ports",
    "opaque-ports",
];

/// What the switch says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    Enabled,
    Disabled,
}

/// Reads `mesh.rs/inject` from labels, then annotations. `Err` names a
/// value that is neither `enabled` nor `disabled`.
pub fn switch(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
    whose: &str,
) -> Result<Option<Switch>, String> {
    let value = labels
        .and_then(|l| l.get(INJECT))
        .or_else(|| annotations.and_then(|a| a.get(INJECT)));
    match value.map(String::as_str) {
        None => Ok(None),
        Some("enabled") => Ok(Some(Switch::Enabled)),
        Some("disabled") => Ok(Some(Switch::Disabled)),
        Some(other) => Err(format!(
            "{whose} {INJECT}: {other:?} is neither \"enabled\" nor \"disabled\""
        )),
    }
}

/// The settings of one workload: the install's, overridden by its
/// annotations.
#[derive(Clone, Debug, PartialEq)]
pub struct Overrides {
    pub proxy: ProxyValues,
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    pub opaque_ports: Vec<u16>,
}

/// Applies the `config.mesh.rs/` annotations over `base`. Every problem is
/// reported, each naming its annotation.
pub fn overrides(
    base: &ProxyValues,
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<Overrides, Vec<String>> {
    let mut out = Overrides {
        proxy: base.clone(),
        skip_inbound_ports: Vec::new(),
        skip_outbound_ports: Vec::new(),
        opaque_ports: Vec::new(),
    };
    let mut errors = Vec::new();
    for (key, value) in annotations.into_iter().flatten() {
        let Some(name) = key.strip_prefix(CONFIG_PREFIX) else {
            continue;
        };
        if name == "admission-webhooks" {
            // A namespace label; harmless on a pod.
            continue;
        }
        let p = &mut out.proxy;
        let result = match name {
            "proxy-cpu-request" => quantity(value).map(|q| p.cpu_request = q),
            "proxy-cpu-limit" => quantity(value).map(|q| p.cpu_limit = q),
            "proxy-memory-request" => quantity(value).map(|q| p.memory_request = q),
            "proxy-memory-limit" => quantity(value).map(|q| p.memory_limit = q),
            "proxy-log-level" => log_level(value).map(|l| p.log_level = l),
            "proxy-image" => image(value).map(|i| p.image = i),
            "proxy-await" => on_off(value).map(|b| p.await_ready = b),
            "native-sidecar" => on_off(value).map(|b| p.native_sidecar = b),
            "shutdown-grace" => duration(value).map(|d| p.shutdown_grace = d),
            "skip-inbound-ports" => ports(value).map(|v| out.skip_inbound_ports = v),
            "skip-outbound-ports" => ports(value).map(|v| out.skip_outbound_ports = v),
            "opaque-ports" => ports(value).map(|v| out.opaque_ports = v),
            _ => Err(format!(
                "is not a Mesh setting; known: {}",
                KNOWN.map(|k| format!("{CONFIG_PREFIX}{k}")).join(", ")
            )),
        };
        if let Err(e) = result {
            errors.push(format!("annotation {key}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// A Kubernetes quantity (`100m`, `1.5`, `64Mi`, `1e3`).
pub fn quantity(text: &str) -> Result<String, String> {
    let t = text.trim();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits_end);
    let number_ok = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && number.len() <= 20;
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || (suffix.len() <= 4
        && suffix.starts_with(['e', 'E'])
        && suffix[1..]
            .trim_start_matches(['+', '-'])
            .parse::<u8>()
            .is_ok());
    if number_ok && suffix_ok {
        Ok(t.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi)"
        ))
    }
}

fn log_level(text: &str) -> Result<String, String> {
    match text {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(text.to_owned()),
        _ => Err(format!("{text:?}: use error, warn, info, debug or trace")),
    }
}

fn image(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 512
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"./:-_@".contains(&b));
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!("{text:?} is not an image reference"))
    }
}

fn on_off(text: &str) -> Result<bool, String> {
    match text {
        "enabled" => Ok(true),
        "disabled" => Ok(false),
        _ => Err(format!("{text:?}: use enabled or disabled")),
    }
}

fn duration(text: &str) -> Result<String, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d <= std::time::Duration::from_secs(3600) => Ok(text.to_owned()),
        Ok(_) => Err(format!("{text:?} is more than an hour")),
        Err(e) => Err(format!("{text:?} is not a duration like 30s ({e})")),
    }
}

/// A comma-separated list of ports, each 1-65535, at most 64.
pub fn ports(text: &str) -> Result<Vec<u16>, String> {
    let list: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if list.len() > MAX_PORTS {
        return Err(format!("{} ports; at most {MAX_PORTS}", list.len()));
    }
    list.into_iter()
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!("{p:?} is not a port (1-65535)")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn labels_win_and_odd_values_are_refused() {
        let on = map(&[(INJECT, "enabled")]);
        let off = map(&[(INJECT, "disabled")]);
        assert_eq!(
            switch(Some(&on), Some(&off), "pod"),
            Ok(Some(Switch::Enabled))
        );
        assert_eq!(switch(None, Some(&off), "pod"), Ok(Some(Switch::Disabled)));
        assert_eq!(switch(None, None, "pod"), Ok(None));
        let odd = map(&[(INJECT, "true")]);
        let e = switch(Some(&odd), None, "namespace shop").unwrap_err();
        assert!(
            e.contains("mesh.rs/inject") && e.contains("\"true\""),
            "{e}"
        );
    }

    #[test]
    fn every_bad_annotation_is_named() {
        let a = map(&[
            ("config.mesh.rs/proxy-cpu-limit", "lots"),
            ("config.mesh.rs/skip-outbound-ports", "5432,99999"),
            ("config.mesh.rs/proxy-colour", "blue"),
            ("config.mesh.rs/proxy-log-level", "debug"),
            ("other.io/x", "anything"),
        ]);
        let errors = overrides(&ProxyValues::default(), Some(&a)).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].contains("config.mesh.rs/proxy-colour"),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("config.mesh.rs/proxy-cpu-limit"),
            "{errors:?}"
        );
        assert!(errors[2].contains("99999"), "{errors:?}");
    }

    #[test]
    fn good_annotations_override_the_install() {
        let a = map(&[
            ("config.mesh.rs/proxy-memory-limit", "1Gi"),
            ("config.mesh.rs/proxy-cpu-request", "0.5"),
            ("config.mesh.rs/proxy-await", "disabled"),
            ("config.mesh.rs/skip-inbound-ports", "9000, 9001"),
            ("config.mesh.rs/shutdown-grace", "45s"),
        ]);
        let o = overrides(&ProxyValues::default(), Some(&a)).unwrap();
        assert_eq!(o.proxy.memory_limit, "1Gi");
        assert_eq!(o.proxy.cpu_request, "0.5");
        assert!(!o.proxy.await_ready);
        assert_eq!(o.skip_inbound_ports, [9000, 9001]);
        assert_eq!(o.proxy.shutdown_grace, "45s");
    }

    #[test]
    fn quantities() {
        for ok in ["100m", "1", "0.5", "64Mi", "1e3", "2G"] {
            assert!(quantity(ok).is_ok(), "{ok}");
        }
        for bad in ["", "m", "1..2", "10 Mi", "1mi", "-1", "1e", "Mi"] {
            assert!(quantity(bad).is_err(), "{bad}");
        }
    }
}
