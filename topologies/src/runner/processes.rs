//! Starting, supervising (restart with backoff) and stopping the processes
//! of a run; process groups and pid checks.

use super::*;

/// Whether `pid` runs, and (when given) runs with `needle` on its command line
/// (a pid reused by another program does not count).
pub fn process_alive(pid: u32, needle: Option<&str>) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie has exited; it only waits for its parent.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    if zombie {
        return false;
    }
    needle.is_none_or(|n| String::from_utf8_lossy(&cmdline).contains(n))
}

/// Sends `signal` to `pid`'s process group (every component leads its own).
pub(super) fn signal_group(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// How long to wait before restarting a component that exited, given
/// when it last started and the last delay: 1 s, doubling while it keeps
/// dying within 30 s of its start, up to 30 s.
pub(super) fn restart_delay(last: Option<(Instant, Duration)>) -> Duration {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);
    match last {
        Some((started, delay)) if started.elapsed() < MAX => (delay * 2).clamp(FIRST, MAX),
        _ => FIRST,
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(s) = self.supervisor.take() {
            s.abort();
        }
        // Children are killed on drop (kill_on_drop); their groups too.
        for child in self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if let Some(pid) = child.id() {
                signal_group(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Run {
    pub(super) fn failed(&self, c: &Component, reason: String) -> anyhow::Error {
        StartError {
            component: c.name.clone(),
            reason,
            log: c.log.clone(),
            tail: tail(&c.log, 15),
        }
        .into()
    }

    /// The exit status of a child that has exited.
    pub(super) fn exited(&self, name: &str) -> Option<std::process::ExitStatus> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children.get_mut(name)?.try_wait().ok().flatten()
    }

    /// Starts (or restarts) component `name`.
    pub(super) async fn spawn(&self, name: &str) -> Result<()> {
        let c = self.component(name).expect("a planned component");
        if let Some(token) = &c.token {
            let cluster = self.cluster(&c.cluster).expect("a planned cluster");
            let answer = admin_socket::request(
                &cluster.data_dir().join(admin_socket::SOCKET_FILE),
                &AdminRequest::CreateToken {
                    namespace: token.namespace.clone(),
                    service_account: token.service_account.clone(),
                    ttl_seconds: 600,
                    claims: token.claims.clone(),
                },
            )
            .await
            .with_context(|| {
                format!(
                    "{name}: cannot reach {}/control for a join token",
                    c.cluster
                )
            })?;
            let Some(secret) = answer.token else {
                bail!(
                    "{name}: {}/control refused a join token: {}",
                    c.cluster,
                    answer.error.unwrap_or_default()
                );
            };
            mesh_core::identity::files::write_private(&token.file, secret.as_bytes())?;
        }
        if let Some(join) = &c.vm_join {
            self.join_vm(&c, join).await?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)
            .with_context(|| format!("cannot open {}", c.log.display()))?;
        let child = Command::new(&c.program)
            .args(&c.args)
            .envs(c.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: the runner stops it (and whatever it
            // started) in order, and a terminal's Ctrl-C reaches only us.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("{name}: cannot run {}", c.program.display()))?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), child);
        {
            let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(me) = record.components.iter_mut().find(|x| x.name == name) {
                me.pid = pid;
            }
        }
        self.save();
        Ok(())
    }

    /// Restarts components that exit while the run is up (1 s apart).
    pub(super) fn supervise(&mut self) {
        let record = self.record.clone();
        let children = self.children.clone();
        let me = Run {
            record: record.clone(),
            children: children.clone(),
            opts: self.opts.clone(),
            supervisor: None,
        };
        self.supervisor = Some(tokio::spawn(async move {
            // Per component: when it was last started, and the last delay.
            let mut backoff: BTreeMap<String, (Instant, Duration)> = BTreeMap::new();
            let mut due: BTreeMap<String, Instant> = BTreeMap::new();
            let held = |name: &str| {
                record
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .components
                    .iter()
                    .any(|c| c.name == name && c.held)
            };
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let dead: Vec<(String, std::process::ExitStatus)> = {
                    let mut children = children.lock().unwrap_or_else(|p| p.into_inner());
                    let dead: Vec<_> = children
                        .iter_mut()
                        .filter_map(|(n, c)| Some((n.clone(), c.try_wait().ok().flatten()?)))
                        .collect();
                    for (name, _) in &dead {
                        children.remove(name);
                    }
                    dead
                };
                for (name, status) in dead {
                    if held(&name) {
                        continue;
                    }
                    let delay = restart_delay(backoff.get(&name).copied());
                    tracing::warn!(component = %name, %status, "exited; restarting in {delay:?}");
                    backoff
                        .entry(name.clone())
                        .and_modify(|b| b.1 = delay)
                        .or_insert((Instant::now(), delay));
                    due.insert(name, Instant::now() + delay);
                }
                let now = Instant::now();
                let ready: Vec<String> = due
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in ready {
                    due.remove(&name);
                    if held(&name) {
                        continue;
                    }
                    {
                        let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(c) = r.components.iter_mut().find(|c| c.name == name) {
                            c.restarts += 1;
                            c.pid = None;
                        }
                    }
                    if let Some(b) = backoff.get_mut(&name) {
                        b.0 = Instant::now();
                    }
                    if let Err(e) = me.spawn(&name).await {
                        tracing::warn!(component = %name, error = %format!("{e:#}"), "restart failed; trying again");
                        let delay = restart_delay(backoff.get(&name).copied());
                        due.insert(name, Instant::now() + delay);
                    }
                }
            }
        }));
    }

    /// Stops component `name` (SIGKILL, as a crash would); the run restarts it.
    pub fn kill(&self, name: &str) -> Result<()> {
        let pid = self
            .component(name)
            .and_then(|c| c.pid)
            .with_context(|| format!("no running component {name}"))?;
        signal_group(pid, rustix::process::Signal::KILL);
        Ok(())
    }

    /// Stops component `name` (SIGKILL, as a crash would) and keeps it
    /// stopped until [`Run::release`].
    pub fn hold(&self, name: &str) -> Result<()> {
        {
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            let c = r
                .components
                .iter_mut()
                .find(|c| c.name == name)
                .with_context(|| format!("no component {name}"))?;
            c.held = true;
        }
        self.kill(name)
    }

    /// Starts a component [`Run::hold`] stopped.
    pub async fn release(&self, name: &str) -> Result<()> {
        // Until the supervisor has reaped it, it still counts as running.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        {
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = r.components.iter_mut().find(|c| c.name == name) {
                c.held = false;
            }
        }
        self.spawn(name).await
    }

    /// Stops every process: traffic and apps first, then proxies, then
    /// gateways and mirrors, then control planes. Each gets SIGTERM and 5 s,
    /// then SIGKILL.
    pub async fn stop(&mut self) {
        if let Some(s) = self.supervisor.take() {
            s.abort();
        }
        let order: [&dyn Fn(&Component) -> bool; 4] = [
            &|c| c.kind == Kind::App,
            &|c| c.kind == Kind::Proxy,
            &|c| {
                matches!(
                    c.kind,
                    Kind::Gateway | Kind::ServiceMirror | Kind::Prometheus
                )
            },
            &|c| c.kind == Kind::Control,
        ];
        for group in order {
            let names = self.names(group);
            let mut children: Vec<(String, Child)> = {
                let mut all = self.children.lock().unwrap_or_else(|p| p.into_inner());
                names
                    .iter()
                    .filter_map(|n| Some((n.clone(), all.remove(n)?)))
                    .collect()
            };
            for (_, child) in &children {
                if let Some(pid) = child.id() {
                    signal_group(pid, rustix::process::Signal::TERM);
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            for (name, child) in &mut children {
                let pid = child.id();
                if tokio::time::timeout_at(deadline, child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(component = %name, "did not stop within 5s; killing it");
                    if let Some(pid) = pid {
                        signal_group(pid, rustix::process::Signal::KILL);
                    }
                    let _ = child.wait().await;
                }
                // Whatever it started in its group goes too.
                if let Some(pid) = pid {
                    signal_group(pid, rustix::process::Signal::KILL);
                }
            }
        }
        {
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            netns::teardown(&r.made);
            r.made = netns::Made::default();
            r.stopped = true;
        }
        self.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn restarts_back_off_while_a_component_keeps_dying() {
        assert_eq!(restart_delay(None), Duration::from_secs(1));
        let now = Instant::now();
        let d = |s| Duration::from_secs(s);
        assert_eq!(restart_delay(Some((now, d(1)))), d(2));
        assert_eq!(restart_delay(Some((now, d(16)))), d(30));
        assert_eq!(restart_delay(Some((now, d(30)))), d(30));
        // One that ran a while starts over.
        let long_ago = now - d(31);
        assert_eq!(restart_delay(Some((long_ago, d(30)))), d(1));
    }
}
