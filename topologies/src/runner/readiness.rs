//! When a component counts as ready (its own `/ready`, or its ports
//! accepting), and waiting for the run to be.

use super::*;

/// Scrapes `/metrics` at `addr`.
pub fn scrape(addr: SocketAddr) -> std::io::Result<Vec<metrics_text::Sample>> {
    scrape_in(None, addr)
}

/// `GET path` on an admin address, inside network namespace `netns` when given.
pub fn fetch_admin(
    netns: Option<&str>,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
    match netns {
        Some(ns) => netns::fetch(ns, addr, path),
        None => metrics_text::fetch(addr, path, Duration::from_secs(2)),
    }
}

/// Scrapes `/metrics` at `addr`, inside `netns` when given.
pub fn scrape_in(
    netns: Option<&str>,
    addr: SocketAddr,
) -> std::io::Result<Vec<metrics_text::Sample>> {
    let (status, body) = fetch_admin(netns, addr, "/metrics")?;
    if status != 200 {
        return Err(std::io::Error::other(format!("{addr}/metrics: {status}")));
    }
    Ok(metrics_text::parse(&body))
}

pub(super) async fn check_ready(c: &Component) -> Result<(), String> {
    let (ready, netns) = (c.ready.clone(), c.netns.clone());
    tokio::task::spawn_blocking(move || {
        let ns = netns.as_deref();
        match ready {
            Ready::Admin(addr) => match fetch_admin(ns, addr, "/ready") {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!("/ready answers {status}: {}", body.trim())),
                Err(e) => Err(format!("admin {addr}: {e}")),
            },
            Ready::Ports(addrs) => {
                let connects = |a: &SocketAddr| match ns {
                    Some(ns) => netns::connects(ns, *a),
                    None => std::net::TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok(),
                };
                match addrs.iter().find(|a| !connects(a)) {
                    Some(a) => Err(format!("{a} does not accept connections")),
                    None => Ok(()),
                }
            }
            Ready::Alive => Ok(()),
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

impl Run {
    pub(super) async fn start_and_wait(&self, names: &[String], started: Instant) -> Result<()> {
        for name in names {
            self.spawn(name).await?;
        }
        let deadline = Instant::now() + self.opts.ready_timeout;
        let mut waiting: Vec<String> = names.to_vec();
        let mut last_note = Instant::now();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for name in waiting {
                let c = self.component(&name).expect("a planned component");
                if let Some(status) = self.exited(&name) {
                    return Err(self.failed(&c, format!("exited ({status}) before it was ready")));
                }
                match check_ready(&c).await {
                    Ok(()) => self.progress(format!(
                        "  ready  {:<28} {:>5.1}s",
                        c.name,
                        started.elapsed().as_secs_f64()
                    )),
                    Err(why) if Instant::now() >= deadline => {
                        return Err(self.failed(
                            &c,
                            format!(
                                "not ready after {}: {why}",
                                humantime::format_duration(self.opts.ready_timeout)
                            ),
                        ));
                    }
                    Err(_) => still.push(name),
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                if last_note.elapsed() >= Duration::from_secs(3) {
                    last_note = Instant::now();
                    self.progress(format!("  waiting for {}", waiting.join(", ")));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    pub(super) async fn wait_for_mirrors(&self, started: Instant) -> Result<()> {
        let deadline = Instant::now() + self.opts.ready_timeout;
        for c in self.snapshot().clusters {
            let Some(admin) = c.mirror_admin else {
                continue;
            };
            loop {
                let links = scrape(admin)
                    .map(|s| mesh_service_mirror::metrics::LinkStatus::read(&s))
                    .unwrap_or_default();
                let missing: Vec<String> = c
                    .mirrors
                    .iter()
                    .filter(|(other, want)| {
                        links
                            .get(*other)
                            .is_none_or(|l| !l.alive || (l.services as usize) < **want)
                    })
                    .map(|(other, want)| format!("{other} ({want} services)"))
                    .collect();
                if missing.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    let me = self
                        .component(&format!("{}/service-mirror", c.name))
                        .expect("a mirror");
                    return Err(self.failed(
                        &me,
                        format!("did not mirror {} in time", missing.join(", ")),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            self.progress(format!(
                "  ready  {:<28} {:>5.1}s",
                format!("{}/mirrors", c.name),
                started.elapsed().as_secs_f64()
            ));
        }
        // Control planes read the mirrors' files on their next poll.
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok(())
    }
}
