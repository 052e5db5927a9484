//! Leader election on a `coordination.k8s.io` Lease, for the writers that
//! must run once per cluster (status, garbage collection). Every replica
//! serves identity, discovery and policy; only the holder writes.
//!
//! The holder renews every [`RENEW`]; another replica takes over when the
//! record has not changed for [`DURATION`] as *it* observed it (its own
//! clock, never the holder's timestamps, so skew does not matter). A
//! replica that stops cleanly releases the Lease for an immediate
//! takeover. Every write is a compare-and-swap on the resourceVersion.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

/// How long a Lease that is not renewed stays held.
pub const DURATION: Duration = Duration::from_secs(10);
/// How often the holder renews, and others look.
pub const RENEW: Duration = Duration::from_secs(2);

/// One replica's candidacy.
#[derive(Clone)]
pub struct Candidate {
    api: Api<Lease>,
    name: String,
    holder: String,
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate")
            .field("name", &self.name)
            .field("holder", &self.holder)
            .finish()
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// What this replica last saw of the Lease, and when it saw it change.
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    at: Instant,
}

impl Candidate {
    pub fn new(client: Client, namespace: &str, name: &str, holder: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            holder: holder.to_owned(),
        }
    }

    /// Campaigns until aborted; `leader` says whether this replica holds
    /// the Lease now.
    pub async fn run(self, leader: watch::Sender<bool>) {
        let mut observed: Option<Observed> = None;
        let mut last_renewed: Option<Instant> = None;
        loop {
            match self.step(&mut observed).await {
                Ok(held) => {
                    if held {
                        last_renewed = Some(Instant::now());
                    }
                    if *leader.borrow() != held {
                        tracing::info!(holder = %self.holder, "{} the control plane's writer Lease", if held { "acquired" } else { "lost" });
                    }
                    leader.send_replace(held);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Lease {}: cannot reach the API server", self.name);
                    // Never write past what the Lease guarantees.
                    if last_renewed.is_none_or(|t| t.elapsed() >= DURATION - RENEW) {
                        leader.send_replace(false);
                    }
                }
            }
            tokio::time::sleep(RENEW).await;
        }
    }

    /// One look: acquire, renew or stand by. `Ok(true)` when held.
    async fn step(&self, observed: &mut Option<Observed>) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now(), 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (spec.holder_identity.clone(), spec.renew_time.clone());
        if observed.as_ref().is_none_or(|o| o.record != record) {
            *observed = Some(Observed {
                record,
                at: Instant::now(),
            });
        }
        let mine = spec.holder_identity.as_deref() == Some(self.holder.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let expired = observed.as_ref().is_some_and(|o| o.at.elapsed() > DURATION);
        if !(mine || free || expired) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine {
            spec.acquire_time.clone().unwrap_or_else(now)
        } else {
            now()
        };
        lease.spec = Some(self.spec(acquired, transitions));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, acquired: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(DURATION.as_secs() as i32),
            acquire_time: Some(acquired),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Gives the Lease up if held, so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return;
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!("released the writer Lease"),
            Err(e) => tracing::warn!(error = %e, "could not release the writer Lease"),
        }
    }
}
