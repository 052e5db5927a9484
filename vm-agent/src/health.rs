//! Health checks of the VM's app, with Kubernetes probe semantics: a check
//! every `period`, each bounded by `timeout`; `failure_threshold` failures in
//! a row make the app unhealthy, `success_threshold` successes in a row make
//! it healthy again. The app starts unhealthy until its first success, as a
//! pod starts unready. The result goes out with the registration, so
//! discovery stops sending traffic to an unhealthy VM.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// What a check runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Check {
    /// `GET` this `http://` URL; 200-399 is healthy.
    Http(String),
    /// A TCP connection to this address is accepted.
    Tcp(SocketAddr),
    /// This program (no shell) exits 0.
    Command(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub check: Check,
    #[serde(with = "humantime_serde_secs")]
    pub period: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// Durations as whole seconds in the file, which reads plainly.
mod humantime_serde_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

impl HealthConfig {
    /// Kubernetes' defaults: every 10 s, 1 s timeout, 1 success, 3 failures.
    pub fn new(check: Check) -> Self {
        Self {
            check,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if self.period < Duration::from_millis(100) || self.period > Duration::from_secs(3600) {
            return Err("health.period must be between 0.1 s and 1 h".into());
        }
        if self.timeout.is_zero() || self.timeout > self.period {
            return Err("health.timeout must be more than 0 and at most the period".into());
        }
        if !(1..=100).contains(&self.success_threshold)
            || !(1..=100).contains(&self.failure_threshold)
        {
            return Err("health thresholds must be between 1 and 100".into());
        }
        match &self.check {
            Check::Http(url) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| format!("health.check.http {url:?}: {e}"))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(format!(
                        "health.check.http {url:?}: give an http://host:port/path URL"
                    ));
                }
            }
            Check::Command(argv) if argv.is_empty() || argv[0].is_empty() => {
                return Err("health.check.command is empty".into());
            }
            _ => {}
        }
        Ok(())
    }
}

/// What the checks count.
#[derive(Clone, Debug, Default)]
pub struct HealthMetrics {
    /// 1 while the app is healthy.
    pub healthy: Gauge,
    /// Failed checks by reason (`timeout`, `refused`, `status`, `exit`, ...).
    pub failures: Family<ReasonLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

impl HealthMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "mesh_vm_agent_app_healthy",
            "1 while the app passes its health checks",
            self.healthy.clone(),
        );
        registry.register(
            "mesh_vm_agent_health_check_failures",
            "Failed health checks of the app, by reason",
            self.failures.clone(),
        );
    }
}

/// Runs one check; `Err` names why it failed (a metric reason).
pub async fn probe(check: &Check, timeout: Duration) -> Result<(), &'static str> {
    match tokio::time::timeout(timeout, probe_once(check)).await {
        Ok(result) => result,
        Err(_) => Err("timeout"),
    }
}

async fn probe_once(check: &Check) -> Result<(), &'static str> {
    match check {
        Check::Tcp(addr) => tokio::net::TcpStream::connect(addr)
            .await
            .map(|_| ())
            .map_err(|_| "refused"),
        Check::Http(url) => {
            let uri: http::Uri = url.parse().map_err(|_| "bad_url")?;
            let authority = uri.authority().ok_or("bad_url")?.clone();
            let port = authority.port_u16().unwrap_or(80);
            let tcp = tokio::net::TcpStream::connect((authority.host(), port))
                .await
                .map_err(|_| "refused")?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
                    .await
                    .map_err(|_| "http")?;
            tokio::spawn(conn);
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            let req = http::Request::get(path)
                .header(http::header::HOST, authority.as_str())
                .header(http::header::USER_AGENT, "mesh-vm-agent/health")
                .body(Empty::new())
                .map_err(|_| "bad_url")?;
            let resp = sender.send_request(req).await.map_err(|_| "http")?;
            let code = resp.status().as_u16();
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err("status")
            }
        }
        Check::Command(argv) => {
            let status = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|_| "spawn")?;
            if status.success() {
                Ok(())
            } else {
                Err("exit")
            }
        }
    }
}

/// Consecutive results turned into a state, as a kubelet's prober does.
#[derive(Debug)]
pub struct Tally {
    healthy: bool,
    successes: u32,
    failures: u32,
}

impl Tally {
    pub fn new() -> Self {
        Self {
            healthy: false,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one result; returns the state after it.
    pub fn record(&mut self, ok: bool, config: &HealthConfig) -> bool {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= config.success_threshold {
                self.healthy = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= config.failure_threshold {
                self.healthy = false;
            }
        }
        self.healthy
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self::new()
    }
}

/// Checks forever, publishing each change of state on `out`.
pub async fn run(config: HealthConfig, out: watch::Sender<bool>, metrics: HealthMetrics) {
    let mut tally = Tally::new();
    let mut ticker = tokio::time::interval(config.period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = probe(&config.check, config.timeout).await;
        if let Err(reason) = result {
            metrics
                .failures
                .get_or_create(&ReasonLabel {
                    reason: reason.into(),
                })
                .inc();
        }
        let healthy = tally.record(result.is_ok(), &config);
        metrics.healthy.set(i64::from(healthy));
        if *out.borrow() != healthy {
            match result {
                Ok(()) => tracing::info!(check = ?config.check, "the app is healthy"),
                Err(reason) => {
                    tracing::warn!(check = ?config.check, reason, "the app is unhealthy")
                }
            }
            out.send_replace(healthy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_work_as_kubernetes_probes_do() {
        let mut config = HealthConfig::new(Check::Tcp("127.0.0.1:1".parse().unwrap()));
        config.success_threshold = 2;
        config.failure_threshold = 3;
        let mut t = Tally::new();
        assert!(!t.record(true, &config), "one success is not enough");
        assert!(t.record(true, &config));
        assert!(t.record(false, &config));
        assert!(t.record(false, &config));
        assert!(t.record(true, &config), "a success resets the failures");
        assert!(t.record(false, &config));
        assert!(t.record(false, &config));
        assert!(!t.record(false, &config), "the third failure in a row");
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = HealthConfig::new(Check::Http("https://x/".into()));
        assert!(c.check().unwrap_err().contains("http://"));
        c.check = Check::Command(vec![]);
        assert!(c.check().unwrap_err().contains("command"));
        c.check = Check::Tcp("127.0.0.1:5432".parse().unwrap());
        c.timeout = Duration::from_secs(60);
        assert!(c.check().unwrap_err().contains("timeout"));
    }

    #[tokio::test]
    async fn each_kind_of_check_tells_up_from_down() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap();
        let t = Duration::from_secs(2);
        assert_eq!(probe(&Check::Tcp(up), t).await, Ok(()));
        drop(listener);
        // A port held bound but not listening: refused. (A freed port can
        // be connected to by itself: the kernel may pick it as the source
        // port, a TCP simultaneous open.)
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let down = held.local_addr().unwrap();
        assert_eq!(probe(&Check::Tcp(down), t).await, Err("refused"));
        assert_eq!(probe(&Check::Command(vec!["true".into()]), t).await, Ok(()));
        assert_eq!(
            probe(&Check::Command(vec!["false".into()]), t).await,
            Err("exit")
        );
        assert_eq!(
            probe(
                &Check::Command(vec!["sleep".into(), "5".into()]),
                Duration::from_millis(100)
            )
            .await,
            Err("timeout")
        );
    }
}
