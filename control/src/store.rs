//! Durable state: join tokens, the workload claims redeemed tokens
//! granted, workload registrations, issued serials.
//!
//! Controllers use the [`Store`] trait; [`LocalStore`] keeps it in an
//! embedded redb database under `--data-dir`. Every write is one committed
//! (fsynced) transaction, so `kill -9` loses nothing a caller was told
//! succeeded. Calls block on disk I/O: call them from `spawn_blocking`.

use std::{collections::BTreeMap, net::IpAddr, path::Path, time::Duration};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::index::Registration;

const TOKENS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("join_tokens");
const REGISTRATIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("registrations");
const SERIALS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("issued_serials");
const GRANTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("workload_grants");

/// The database file inside `--data-dir`.
pub const DB_FILE: &str = "control.redb";

/// A join token as stored: only its SHA-256 is the key; the token itself is
/// never written down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub namespace: String,
    pub service_account: String,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: i64,
    /// Unix seconds of the one use, once used.
    pub used_at: Option<i64>,
    /// What the workload joining with it may register; without claims,
    /// the identity it gets may register nothing (a gateway's, a mirror's).
    #[serde(default)]
    pub claims: Option<WorkloadClaims>,
}

impl TokenRecord {
    /// Marks the token used at `now`, unless it was used or has expired.
    pub fn redeem(&mut self, now: i64) -> Result<(), TokenError> {
        if let Some(at) = self.used_at {
            return Err(TokenError::Used { at });
        }
        if self.expires_at <= now {
            return Err(TokenError::Expired {
                ago: now - self.expires_at,
            });
        }
        self.used_at = Some(now);
        Ok(())
    }
}

/// The workload a join token is for, fixed when the token is created: the
/// registration its identity may make later is bounded by this, not by
/// what the workload says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadClaims {
    /// The workload (replica) name it registers as.
    pub workload: String,
    /// Exactly the labels it registers (what Service selectors match).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The addresses it may register; empty: any address no other
    /// workload holds.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The application ports it may register; empty: any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// Ports a token may grant at most.
pub const MAX_CLAIMED_PORTS: usize = 64;

/// Labels a token may grant at most.
pub const MAX_CLAIMED_LABELS: usize = 64;
/// Addresses a token may grant at most.
pub const MAX_CLAIMED_ADDRESSES: usize = 16;

impl WorkloadClaims {
    /// Kubernetes rules for the name and labels, and bounded counts.
    pub fn check(&self) -> Result<(), String> {
        crate::resources::parse::check_name("workload", &self.workload)?;
        if self.labels.len() > MAX_CLAIMED_LABELS {
            return Err(format!("at most {MAX_CLAIMED_LABELS} labels"));
        }
        let chars = |s: &str, extra: &[u8]| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
        };
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > 253 || !chars(k, b"-_./") {
                return Err(format!("label key {k:?} is not a Kubernetes label key"));
            }
            if v.len() > 63 || !chars(v, b"-_.") {
                return Err(format!("label {k}={v:?}: not a Kubernetes label value"));
            }
        }
        if self.addresses.len() > MAX_CLAIMED_ADDRESSES {
            return Err(format!("at most {MAX_CLAIMED_ADDRESSES} addresses"));
        }
        if self.ports.len() > MAX_CLAIMED_PORTS {
            return Err(format!("at most {MAX_CLAIMED_PORTS} ports"));
        }
        if self.ports.contains(&0) {
            return Err("port 0 is not a port".into());
        }
        Ok(())
    }
}

/// What a redeemed token granted: the claims, and the identity that may
/// use them (the one the token's SVID names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub spiffe_id: String,
    pub claims: WorkloadClaims,
    /// Unix seconds.
    pub granted_at: i64,
    /// The enrollment public key the token's holder gave (a VM agent's;
    /// base64 of an uncompressed P-256 point). Its signature lets the
    /// workload re-enroll after its SVID expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_key: Option<String>,
}

/// An issued certificate, for audit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRecord {
    pub serial: String,
    pub spiffe_id: String,
    pub not_after: i64,
    pub issued_at: i64,
    /// `token`, `renewal`, `service_account` or `reenrollment`.
    pub via: String,
    /// With `token`: the enrollment key the holder gave, which goes into
    /// the grant of the token's claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the state database {path}: {reason}. If a control plane is running with this --data-dir, use its admin socket (--admin-socket) instead"
    )]
    Open { path: String, reason: String },
    #[error("state database error: {0}")]
    Db(String),
    #[error("corrupt record in {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
}

/// Why a token could not be consumed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("unknown join token")]
    Unknown,
    #[error(
        "join token was already used (at unix time {at}); tokens are single use, create a new one"
    )]
    Used { at: i64 },
    #[error("join token expired {} ago; create a new one", mesh_core::identity::cert::human_duration(Duration::from_secs(*.ago as u64)))]
    Expired { ago: i64 },
}

/// The state the controllers need, whatever keeps it.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Releases the store (its file lock) for a restart; later calls fail.
    fn close(&self) {}
    fn create_token(&self, hash: &[u8; 32], record: &TokenRecord) -> Result<(), StoreError>;
    fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError>;
    /// Marks the token used and records the serial it paid for (and the
    /// grant of its claims, for the serial's identity), in one
    /// transaction; re-checks use and expiry inside it.
    fn consume_token(
        &self,
        hash: &[u8; 32],
        now: i64,
        serial: &SerialRecord,
    ) -> Result<Result<(), TokenError>, StoreError>;
    fn record_serial(&self, serial: &SerialRecord) -> Result<(), StoreError>;
    /// What a redeemed token granted workload `namespace/name`.
    fn grant(&self, namespace: &str, name: &str) -> Result<Option<Grant>, StoreError>;
    fn put_registration(&self, reg: &Registration) -> Result<(), StoreError>;
    fn delete_registration(&self, namespace: &str, name: &str) -> Result<(), StoreError>;
    fn registrations(&self) -> Result<Vec<Registration>, StoreError>;
    /// Deletes tokens that expired more than `keep` ago; returns how many.
    fn prune_tokens(&self, now: i64, keep: Duration) -> Result<usize, StoreError>;
    /// A heartbeat of `reg` arrived (unix seconds `now`). Stores shared
    /// by several replicas record it so that the writer can tell a dead
    /// workload from one another replica hears.
    fn heartbeat(&self, _reg: &Registration, _now: i64) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether the liveness sweep deletes a silent workload's stored
    /// registration itself. `false` where several replicas share the
    /// store: only the writer collects, from the recorded heartbeats.
    fn sweep_deletes(&self) -> bool {
        true
    }
}

/// The embedded `local` store.
#[derive(Debug)]
pub struct LocalStore {
    /// `None` once closed (the file lock is released when the last
    /// transaction in flight ends).
    db: std::sync::RwLock<Option<std::sync::Arc<Database>>>,
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

impl LocalStore {
    /// Opens (or creates) the database in `data_dir`. Fails while another
    /// process holds it.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(DB_FILE);
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(data_dir).map_err(|e| open_err(e.to_string()))?;
        let db = Database::create(&path).map_err(|e| open_err(e.to_string()))?;
        // Create the tables up front so reads never meet a missing table.
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(TOKENS).map_err(db_err)?;
        tx.open_table(REGISTRATIONS).map_err(db_err)?;
        tx.open_table(SERIALS).map_err(db_err)?;
        tx.open_table(GRANTS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self {
            db: std::sync::RwLock::new(Some(std::sync::Arc::new(db))),
        })
    }

    fn db(&self) -> Result<std::sync::Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::Db("the store is closed (the control plane is stopping)".into())
            })
    }

    /// Number of issued serials recorded (for tests and audit).
    pub fn serial_count(&self) -> Result<u64, StoreError> {
        let tx = self.db()?.begin_read().map_err(db_err)?;
        let table = tx.open_table(SERIALS).map_err(db_err)?;
        table.len().map_err(db_err)
    }
}

impl Store for LocalStore {
    fn close(&self) {
        self.db.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn create_token(&self, hash: &[u8; 32], record: &TokenRecord) -> Result<(), StoreError> {
        let tx = self.db()?.begin_write().map_err(db_err)?;
        tx.open_table(TOKENS)
            .map_err(db_err)?
            .insert(hash.as_slice(), encode(record).as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        let tx = self.db()?.begin_read().map_err(db_err)?;
        let table = tx.open_table(TOKENS).map_err(db_err)?;
        let value = table.get(hash.as_slice()).map_err(db_err)?;
        value.map(|v| decode("join_tokens", v.value())).transpose()
    }

    fn consume_token(
        &self,
        hash: &[u8; 32],
        now: i64,
        serial: &SerialRecord,
    ) -> Result<Result<(), TokenError>, StoreError> {
        let tx = self.db()?.begin_write().map_err(db_err)?;
        {
            let mut tokens = tx.open_table(TOKENS).map_err(db_err)?;
            let record: Option<TokenRecord> = tokens
                .get(hash.as_slice())
                .map_err(db_err)?
                .map(|v| decode("join_tokens", v.value()))
                .transpose()?;
            let mut record = match record {
                None => return Ok(Err(TokenError::Unknown)),
                Some(r) => r,
            };
            if let Err(e) = record.redeem(now) {
                return Ok(Err(e));
            }
            tokens
                .insert(hash.as_slice(), encode(&record).as_slice())
                .map_err(db_err)?;
            if let Some(claims) = &record.claims {
                let grant = Grant {
                    spiffe_id: serial.spiffe_id.clone(),
                    claims: claims.clone(),
                    granted_at: now,
                    enrollment_key: serial.enrollment_key.clone(),
                };
                let key = format!("{}/{}", record.namespace, claims.workload);
                tx.open_table(GRANTS)
                    .map_err(db_err)?
                    .insert(key.as_str(), encode(&grant).as_slice())
                    .map_err(db_err)?;
            }
            tx.open_table(SERIALS)
                .map_err(db_err)?
                .insert(serial.serial.as_str(), encode(serial).as_slice())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(Ok(()))
    }

    fn record_serial(&self, serial: &SerialRecord) -> Result<(), StoreError> {
        let tx = self.db()?.begin_write().map_err(db_err)?;
        tx.open_table(SERIALS)
            .map_err(db_err)?
            .insert(serial.serial.as_str(), encode(serial).as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn grant(&self, namespace: &str, name: &str) -> Result<Option<Grant>, StoreError> {
        let key = format!("{namespace}/{name}");
        let tx = self.db()?.begin_read().map_err(db_err)?;
        let table = tx.open_table(GRANTS).map_err(db_err)?;
        let value = table.get(key.as_str()).map_err(db_err)?;
        value
            .map(|v| decode("workload_grants", v.value()))
            .transpose()
    }

    fn put_registration(&self, reg: &Registration) -> Result<(), StoreError> {
        let key = format!("{}/{}", reg.namespace, reg.name);
        let tx = self.db()?.begin_write().map_err(db_err)?;
        tx.open_table(REGISTRATIONS)
            .map_err(db_err)?
            .insert(key.as_str(), encode(reg).as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn delete_registration(&self, namespace: &str, name: &str) -> Result<(), StoreError> {
        let key = format!("{namespace}/{name}");
        let tx = self.db()?.begin_write().map_err(db_err)?;
        tx.open_table(REGISTRATIONS)
            .map_err(db_err)?
            .remove(key.as_str())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn registrations(&self) -> Result<Vec<Registration>, StoreError> {
        let tx = self.db()?.begin_read().map_err(db_err)?;
        let table = tx.open_table(REGISTRATIONS).map_err(db_err)?;
        table
            .iter()
            .map_err(db_err)?
            .map(|row| {
                let (_, v) = row.map_err(db_err)?;
                decode("registrations", v.value())
            })
            .collect()
    }

    fn prune_tokens(&self, now: i64, keep: Duration) -> Result<usize, StoreError> {
        let cutoff = now - keep.as_secs() as i64;
        let tx = self.db()?.begin_write().map_err(db_err)?;
        let pruned = {
            let mut table = tx.open_table(TOKENS).map_err(db_err)?;
            let mut stale = Vec::new();
            for row in table.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let record: TokenRecord = decode("join_tokens", v.value())?;
                if record.expires_at < cutoff {
                    stale.push(k.value().to_vec());
                }
            }
            for key in &stale {
                table.remove(key.as_slice()).map_err(db_err)?;
            }
            stale.len()
        };
        tx.commit().map_err(db_err)?;
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::tests::reg;

    fn serial(s: &str) -> SerialRecord {
        SerialRecord {
            serial: s.into(),
            spiffe_id: "spiffe://west.mesh.local/ns/shop/sa/web".into(),
            not_after: 2,
            issued_at: 1,
            via: "token".into(),
            enrollment_key: None,
        }
    }

    #[test]
    fn tokens_are_single_use_and_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path()).unwrap();
        let record = TokenRecord {
            namespace: "shop".into(),
            service_account: "web".into(),
            created_at: 100,
            expires_at: 200,
            used_at: None,
            claims: Some(WorkloadClaims {
                workload: "web-0".into(),
                labels: [("app".to_owned(), "web".to_owned())].into(),
                addresses: vec![],
                ports: Vec::new(),
            }),
        };
        store.create_token(&[1; 32], &record).unwrap();
        store.create_token(&[2; 32], &record).unwrap();
        assert_eq!(store.get_token(&[1; 32]).unwrap(), Some(record));
        assert_eq!(
            store.consume_token(&[9; 32], 150, &serial("a")).unwrap(),
            Err(TokenError::Unknown)
        );
        assert_eq!(store.grant("shop", "web-0").unwrap(), None);
        assert_eq!(
            store.consume_token(&[1; 32], 150, &serial("a")).unwrap(),
            Ok(())
        );
        let grant = store.grant("shop", "web-0").unwrap().unwrap();
        assert_eq!(grant.claims.labels["app"], "web");
        assert_eq!(grant.spiffe_id, serial("a").spiffe_id);
        assert_eq!(
            store.consume_token(&[1; 32], 160, &serial("b")).unwrap(),
            Err(TokenError::Used { at: 150 })
        );
        assert_eq!(
            store.consume_token(&[2; 32], 260, &serial("c")).unwrap(),
            Err(TokenError::Expired { ago: 60 })
        );
        assert_eq!(
            store.serial_count().unwrap(),
            1,
            "only the paid-for serial is recorded"
        );
        assert_eq!(
            store
                .prune_tokens(200 + 3600, Duration::from_secs(60))
                .unwrap(),
            2
        );
    }

    #[test]
    fn registrations_survive_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = LocalStore::open(tmp.path()).unwrap();
            store
                .put_registration(&reg("shop", "api-0", "api", &[], "10.0.0.1"))
                .unwrap();
            store
                .put_registration(&reg("shop", "api-1", "api", &[], "10.0.0.2"))
                .unwrap();
            store.delete_registration("shop", "api-1").unwrap();
            assert!(
                LocalStore::open(tmp.path()).is_err(),
                "one process at a time"
            );
        }
        let store = LocalStore::open(tmp.path()).unwrap();
        let regs = store.registrations().unwrap();
        assert_eq!(regs.len(), 1);
        assert_eq!(regs[0].name, "api-0");
    }
}
