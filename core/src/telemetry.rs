//! Logging for every Mesh binary: to stderr, filtered by `MESH_LOG`, a list
//! of `target=level` directives and an optional bare default level, such as
//! `info` or `mesh_control=debug,warn`.
//!
//! The filter is tracing's `Targets`, not `EnvFilter`: span and field
//! filters are not needed here, and `EnvFilter` links the regex crates into
//! every binary, the sidecar too (about 250 KiB of code).

use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

/// Installs the subscriber; `default` applies when `MESH_LOG` is unset or
/// does not parse (which is reported on stderr). Calling it twice is harmless.
pub fn init(default: &str) {
    let filter = filter(std::env::var("MESH_LOG").ok().as_deref(), default).unwrap_or_else(
        |(fallback, message)| {
            eprintln!("{message}");
            fallback
        },
    );
    use std::io::IsTerminal;
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .try_init();
}

/// The filter `MESH_LOG` asks for, or the default with a message saying
/// what was wrong with it.
fn filter(var: Option<&str>, default: &str) -> Result<Targets, (Targets, String)> {
    let fallback = || default.parse().unwrap_or_default();
    match var.map(str::trim) {
        None | Some("") => Ok(fallback()),
        Some(directives) => directives.parse().map_err(|e| {
            (
                fallback(),
                format!(
                    "MESH_LOG={directives:?} is not a log filter ({e}); \
                     give levels like `info` or `mesh_proxy=debug,warn`; logging at `{default}`"
                ),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::filter;

    #[test]
    fn directives_and_defaults() {
        let f = filter(Some("mesh_proxy=debug,warn"), "info").unwrap();
        assert!(f.would_enable("mesh_proxy::outbound", &Level::DEBUG));
        assert!(!f.would_enable("hyper", &Level::INFO));
        assert!(f.would_enable("hyper", &Level::WARN));

        let f = filter(None, "info").unwrap();
        assert!(f.would_enable("anything", &Level::INFO));
        assert!(!f.would_enable("anything", &Level::DEBUG));
    }

    #[test]
    fn a_bad_filter_is_named_and_the_default_kept() {
        let (f, message) = filter(Some("mesh_proxy=loud"), "info").unwrap_err();
        assert!(
            message.contains("MESH_LOG=\"mesh_proxy=loud\""),
            "{message}"
        );
        assert!(message.contains("mesh_proxy=debug,warn"), "{message}");
        assert!(f.would_enable("mesh_proxy", &Level::INFO));
        assert!(!f.would_enable("mesh_proxy", &Level::DEBUG));
    }
}
