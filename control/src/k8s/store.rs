//! The `kube` store's durable state, in the API server:
//!
//! | state | where |
//! |---|---|
//! | join tokens | Secrets `mesh-join-<sha256 of the token>` in the control plane's namespace (type `mesh.rs/join-token`); only the hash, never the token |
//! | grants of redeemed tokens | Secrets `mesh-grant-<sha256 of ns/name>` beside them (type `mesh.rs/workload-grant`) |
//! | registrations | `ExternalWorkload` objects, in the workload's namespace, named like it |
//! | issued serials | Events (`reason: Issued`) on the identity's ServiceAccount: an audit trail kept as long as the cluster keeps events |
//!
//! A token is consumed with an optimistic-concurrency update (the
//! resourceVersion read), so two replicas can never both redeem it.
//! [`Store`] calls block: they run off the async threads.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{
        core::v1::{ObjectReference, Secret},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};

use mesh_core::identity::cert::hex;

use crate::{
    index::Registration,
    resources::types::{ExternalWorkload, ExternalWorkloadPort, ExternalWorkloadSpec},
    store::{Grant, SerialRecord, Store, StoreError, TokenError, TokenRecord},
};

const TOKEN_TYPE: &str = "mesh.rs/join-token";
const GRANT_TYPE: &str = "mesh.rs/workload-grant";
const KIND_LABEL: &str = "mesh.rs/state";
const RECORD_KEY: &str = "record";
/// The field manager of every write.
const MANAGER: &str = "mesh-control";

/// The annotation holding a registration's last recorded heartbeat (unix
/// seconds).
pub const HEARTBEAT_ANNOTATION: &str = "workload.mesh.rs/last-heartbeat";

/// Durable state in the API server.
#[derive(Clone)]
pub struct KubeStore {
    client: Client,
    /// The control plane's own namespace (tokens and grants live there).
    namespace: String,
    /// A registration silent this long is dead (`--removal-grace`).
    grace: Duration,
    /// When each workload's heartbeat was last written: at most every
    /// [`KubeStore::stamp_every`].
    stamped: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<(String, String), std::time::Instant>>,
    >,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn api_err(e: kube::Error) -> StoreError {
    StoreError::Db(format!("API server: {e}"))
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn sha256_hex(text: &str) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes()).as_ref())
}

/// Runs an API call from the synchronous [`Store`] interface.
fn run<T>(future: impl std::future::Future<Output = T>) -> T {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(future))
}

impl KubeStore {
    pub fn new(client: Client, namespace: &str, grace: Duration) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
            grace,
            stamped: Default::default(),
        }
    }

    /// How often a live workload's heartbeat is written: often enough that
    /// the writer never takes it for dead.
    fn stamp_every(&self) -> Duration {
        (self.grace / 3).min(Duration::from_secs(60))
    }

    /// Deletes the ExternalWorkloads whose last heartbeat (or, without one,
    /// creation) is older than the grace period, wherever they were
    /// registered. Run by the Lease holder. Returns how many.
    pub async fn collect_dead(&self) -> Result<usize, String> {
        let api: Api<ExternalWorkload> = Api::all(self.client.clone());
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let mut deleted = 0;
        for o in api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
        {
            let stamp = o
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(HEARTBEAT_ANNOTATION))
                .and_then(|v| v.parse::<i64>().ok())
                .or_else(|| {
                    o.metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.as_second())
                })
                .unwrap_or(now);
            if now - stamp <= self.grace.as_secs() as i64 {
                continue;
            }
            let (Some(ns), Some(name)) = (&o.metadata.namespace, &o.metadata.name) else {
                continue;
            };
            let ns_api: Api<ExternalWorkload> = Api::namespaced(self.client.clone(), ns);
            match ns_api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(workload = %format!("{ns}/{name}"), "ExternalWorkload deleted: no heartbeat for {}s", now - stamp);
                    deleted += 1;
                }
                Err(e) if is_status(&e, 404) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(deleted)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn token_name(hash: &[u8; 32]) -> String {
        format!("mesh-join-{}", hex(hash))
    }

    fn grant_name(namespace: &str, name: &str) -> String {
        format!("mesh-grant-{}", sha256_hex(&format!("{namespace}/{name}")))
    }

    fn record_secret<T: serde::Serialize>(
        &self,
        name: String,
        type_: &str,
        kind: &str,
        record: &T,
    ) -> Result<Secret, StoreError> {
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(Secret {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (KIND_LABEL.to_owned(), kind.to_owned()),
                    (
                        super::crds::PART_OF.0.to_owned(),
                        super::crds::PART_OF.1.to_owned(),
                    ),
                ])),
                ..Default::default()
            },
            type_: Some(type_.to_owned()),
            data: Some(BTreeMap::from([(RECORD_KEY.to_owned(), ByteString(json))])),
            ..Default::default()
        })
    }
}

fn read_record<T: serde::de::DeserializeOwned>(
    secret: &Secret,
    table: &'static str,
) -> Result<T, StoreError> {
    let bytes =
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(RECORD_KEY))
            .ok_or(StoreError::Corrupt {
                table,
                reason: format!("Secret {:?} has no `record`", secret.metadata.name),
            })?;
    serde_json::from_slice(&bytes.0).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

impl Store for KubeStore {
    fn create_token(&self, hash: &[u8; 32], record: &TokenRecord) -> Result<(), StoreError> {
        let secret =
            self.record_secret(Self::token_name(hash), TOKEN_TYPE, "join-token", record)?;
        run(self.secrets().create(&PostParams::default(), &secret))
            .map(|_| ())
            .map_err(api_err)
    }

    fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        match run(self.secrets().get_opt(&Self::token_name(hash))).map_err(api_err)? {
            Some(s) if s.type_.as_deref() == Some(TOKEN_TYPE) => {
                read_record(&s, "join_tokens").map(Some)
            }
            _ => Ok(None),
        }
    }

    fn consume_token(
        &self,
        hash: &[u8; 32],
        now: i64,
        serial: &SerialRecord,
    ) -> Result<Result<(), TokenError>, StoreError> {
        let name = Self::token_name(hash);
        let Some(mut secret) = run(self.secrets().get_opt(&name)).map_err(api_err)? else {
            return Ok(Err(TokenError::Unknown));
        };
        if secret.type_.as_deref() != Some(TOKEN_TYPE) {
            return Ok(Err(TokenError::Unknown));
        }
        let mut record: TokenRecord = read_record(&secret, "join_tokens")?;
        if let Err(e) = record.redeem(now) {
            return Ok(Err(e));
        }
        let json = serde_json::to_vec(&record).map_err(|e| StoreError::Db(e.to_string()))?;
        secret
            .data
            .get_or_insert_default()
            .insert(RECORD_KEY.to_owned(), ByteString(json));
        // The resourceVersion read above makes this a compare-and-swap:
        // another replica's redemption in between fails it.
        match run(self
            .secrets()
            .replace(&name, &PostParams::default(), &secret))
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => return Ok(Err(TokenError::Used { at: now })),
            Err(e) => return Err(api_err(e)),
        }
        if let Some(claims) = &record.claims {
            let grant = Grant {
                spiffe_id: serial.spiffe_id.clone(),
                claims: claims.clone(),
                granted_at: now,
                enrollment_key: serial.enrollment_key.clone(),
            };
            let secret = self.record_secret(
                Self::grant_name(&record.namespace, &claims.workload),
                GRANT_TYPE,
                "workload-grant",
                &grant,
            )?;
            let name = secret.metadata.name.clone().unwrap_or_default();
            run(self.secrets().patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&secret),
            ))
            .map_err(api_err)?;
        }
        self.record_serial(serial)?;
        Ok(Ok(()))
    }

    fn record_serial(&self, serial: &SerialRecord) -> Result<(), StoreError> {
        // An Event on the identity's ServiceAccount; events are best
        // effort by nature, so a failure is logged, not fatal.
        let (ns, sa) = serial
            .spiffe_id
            .split_once("/ns/")
            .and_then(|(_, rest)| rest.split_once("/sa/"))
            .unwrap_or(("", ""));
        if ns.is_empty() || sa.is_empty() {
            return Ok(());
        }
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{sa}.svid-")),
                namespace: Some(ns.to_owned()),
                ..Default::default()
            },
            event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            reason: Some("Issued".into()),
            action: Some("Certify".into()),
            type_: Some("Normal".into()),
            reporting_controller: Some("mesh.rs/control".into()),
            reporting_instance: Some(MANAGER.into()),
            note: Some(format!(
                "issued SVID {} serial {} via {}, notAfter unix {}",
                serial.spiffe_id, serial.serial, serial.via, serial.not_after
            )),
            regarding: Some(ObjectReference {
                kind: Some("ServiceAccount".into()),
                namespace: Some(ns.to_owned()),
                name: Some(sa.to_owned()),
                api_version: Some("v1".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        if let Err(e) = run(api.create(&PostParams::default(), &event)) {
            tracing::warn!(error = %e, serial = %serial.serial, "could not record the issued serial as an Event");
        }
        Ok(())
    }

    fn grant(&self, namespace: &str, name: &str) -> Result<Option<Grant>, StoreError> {
        match run(self.secrets().get_opt(&Self::grant_name(namespace, name))).map_err(api_err)? {
            Some(s) if s.type_.as_deref() == Some(GRANT_TYPE) => {
                read_record(&s, "workload_grants").map(Some)
            }
            _ => Ok(None),
        }
    }

    fn heartbeat(&self, reg: &Registration, now: i64) -> Result<(), StoreError> {
        let key = (reg.namespace.clone(), reg.name.clone());
        {
            let mut stamped = self.stamped.lock().unwrap_or_else(|p| p.into_inner());
            if stamped
                .get(&key)
                .is_some_and(|at| at.elapsed() < self.stamp_every())
            {
                return Ok(());
            }
            stamped.insert(key, std::time::Instant::now());
        }
        let patch = serde_json::json!({ "metadata": { "annotations": { HEARTBEAT_ANNOTATION: now.to_string() } } });
        let api: Api<ExternalWorkload> = Api::namespaced(self.client.clone(), &reg.namespace);
        match run(api.patch(&reg.name, &PatchParams::default(), &Patch::Merge(&patch))) {
            Ok(_) => Ok(()),
            // Collected meanwhile: the registration is written again whole.
            Err(e) if is_status(&e, 404) => self.put_registration(reg),
            Err(e) => Err(api_err(e)),
        }
    }

    fn sweep_deletes(&self) -> bool {
        false
    }

    fn put_registration(&self, reg: &Registration) -> Result<(), StoreError> {
        let mut object = external_workload(reg);
        object.metadata.annotations.get_or_insert_default().insert(
            HEARTBEAT_ANNOTATION.to_owned(),
            k8s_openapi::jiff::Timestamp::now().as_second().to_string(),
        );
        let api: Api<ExternalWorkload> = Api::namespaced(self.client.clone(), &reg.namespace);
        run(api.patch(
            &reg.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&object),
        ))
        .map(|_| ())
        .map_err(api_err)
    }

    fn delete_registration(&self, namespace: &str, name: &str) -> Result<(), StoreError> {
        let api: Api<ExternalWorkload> = Api::namespaced(self.client.clone(), namespace);
        match run(api.delete(name, &DeleteParams::default())) {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(api_err(e)),
        }
    }

    fn registrations(&self) -> Result<Vec<Registration>, StoreError> {
        let api: Api<ExternalWorkload> = Api::all(self.client.clone());
        let list = run(api.list(&ListParams::default())).map_err(api_err)?;
        Ok(list.items.iter().filter_map(registration).collect())
    }

    fn prune_tokens(&self, now: i64, keep: Duration) -> Result<usize, StoreError> {
        let cutoff = now - keep.as_secs() as i64;
        let list = run(self
            .secrets()
            .list(&ListParams::default().labels(&format!("{KIND_LABEL}=join-token"))))
        .map_err(api_err)?;
        let mut pruned = 0;
        for secret in &list.items {
            let Ok(record) = read_record::<TokenRecord>(secret, "join_tokens") else {
                continue;
            };
            if record.expires_at < cutoff {
                let name = secret.metadata.name.clone().unwrap_or_default();
                match run(self.secrets().delete(&name, &DeleteParams::default())) {
                    Ok(_) => pruned += 1,
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => return Err(api_err(e)),
                }
            }
        }
        Ok(pruned)
    }
}

/// A registration as its `ExternalWorkload`.
pub fn external_workload(reg: &Registration) -> ExternalWorkload {
    let mut object = ExternalWorkload::new(
        &reg.name,
        ExternalWorkloadSpec {
            identity: reg.spiffe_id.clone(),
            addresses: reg.addresses.iter().map(ToString::to_string).collect(),
            ports: reg
                .ports
                .iter()
                .map(|p| ExternalWorkloadPort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: protocol_name(p.protocol).map(str::to_owned),
                })
                .collect(),
            proxy_port: (reg.proxy_port != 0).then_some(reg.proxy_port),
            via_gateway: reg.via_gateway,
        },
    );
    object.metadata.namespace = Some(reg.namespace.clone());
    object.metadata.labels = Some(reg.labels.clone());
    object.metadata.annotations = Some(BTreeMap::from([(
        "workload.mesh.rs/healthy".to_owned(),
        reg.healthy.to_string(),
    )]));
    object
}

fn protocol_name(hint: i32) -> Option<&'static str> {
    match hint {
        1 => Some("http"),
        2 => Some("http2"),
        3 => Some("grpc"),
        4 => Some("opaque"),
        _ => None,
    }
}

fn protocol_hint(name: Option<&str>) -> i32 {
    match name {
        Some("http") => 1,
        Some("http2") => 2,
        Some("grpc") => 3,
        Some("opaque") => 4,
        _ => 0,
    }
}

/// An `ExternalWorkload` back as a registration; one that does not parse
/// is left out (and logged).
pub fn registration(o: &ExternalWorkload) -> Option<Registration> {
    let name = o.metadata.name.clone()?;
    let namespace = o.metadata.namespace.clone()?;
    let addresses: Result<Vec<_>, _> = o.spec.addresses.iter().map(|a| a.parse()).collect();
    let Ok(addresses) = addresses else {
        tracing::warn!(
            "ExternalWorkload {namespace}/{name} has an address that is not an IP; left out"
        );
        return None;
    };
    Some(Registration {
        namespace,
        name,
        spiffe_id: o.spec.identity.clone(),
        addresses,
        ports: o
            .spec
            .ports
            .iter()
            .map(|p| crate::index::WorkloadPort {
                name: p.name.clone(),
                port: p.port,
                protocol: protocol_hint(p.protocol.as_deref()),
            })
            .collect(),
        labels: o.metadata.labels.clone().unwrap_or_default(),
        healthy: o
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("workload.mesh.rs/healthy"))
            .is_none_or(|h| h == "true"),
        proxy_port: o.spec.proxy_port.unwrap_or(0),
        via_gateway: o.spec.via_gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_survives_the_round_trip_through_its_external_workload() {
        let reg = Registration {
            namespace: "shop".into(),
            name: "vm-1".into(),
            spiffe_id: "spiffe://east.mesh.local/ns/shop/sa/api".into(),
            addresses: vec!["10.0.0.5".parse().unwrap()],
            ports: vec![crate::index::WorkloadPort {
                name: "http".into(),
                port: 8080,
                protocol: 1,
            }],
            labels: BTreeMap::from([("app".into(), "api".into())]),
            healthy: false,
            proxy_port: 4143,
            via_gateway: true,
        };
        assert_eq!(registration(&external_workload(&reg)), Some(reg));
    }
}
