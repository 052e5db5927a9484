//! The proxy's own SVID: first issuance (join token, or credentials on
//! disk), then renewal over mTLS at half its lifetime, with backoff. A new
//! certificate replaces the old one only after it validates.

use std::time::Duration;

use mesh_core::{
    api::v1::{CertifyRequest, identity_client::IdentityClient},
    grpc,
    identity::{
        BundleStore, CredentialStore, Credentials, ExpectedIdentity, SpiffeId,
        cert::{self, certs_from_pem, key_from_pem},
        csr::new_key_and_csr,
        files,
        tls::{client_config, client_config_without_cert},
    },
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use tonic::Code;

use crate::env::{Bootstrap, Config};

/// Renewal never waits less than this (DESIGN.md section 3).
pub const RENEW_FLOOR: Duration = Duration::from_secs(10);
/// Backoff ceiling between failed renewals.
pub const MAX_BACKOFF: Duration = Duration::from_secs(150);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    File(#[from] files::FileError),
    #[error("join token file {path} is empty")]
    EmptyToken { path: String },
    #[error("the control plane refused the join token: {0}")]
    Refused(String),
    #[error("credentials: {0}")]
    Credentials(String),
}

/// When to renew a certificate valid from `not_before` to `not_after`:
/// at half its lifetime, but never sooner than [`RENEW_FLOOR`] from `now`.
pub fn renew_in(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> Duration {
    let lifetime: time::Duration = not_after - not_before;
    let half = not_before + lifetime / 2;
    let left: time::Duration = half - now;
    let wait = left.max(time::Duration::ZERO).unsigned_abs();
    wait.max(RENEW_FLOOR)
}

/// Backoff after `failures` consecutive failures: 1 s, 2 s, 4 s ... 150 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(8)).min(MAX_BACKOFF)
}

fn identity_client(
    config: &Config,
    tls: rustls::ClientConfig,
) -> IdentityClient<tonic::transport::Channel> {
    // The address was checked as host:port when the config was parsed.
    let channel =
        grpc::channel(&config.control_identity_addr, tls).expect("valid control plane address");
    IdentityClient::new(channel)
}

/// Certify `csr` and turn the answer into credentials with `key`.
async fn certify(
    client: &mut IdentityClient<tonic::transport::Channel>,
    config: &Config,
    token: String,
) -> Result<Credentials, tonic::Status> {
    let (key, csr) = new_key_and_csr().map_err(|e| tonic::Status::internal(e.to_string()))?;
    let resp = client
        .certify(CertifyRequest {
            identity: config.identity.to_string(),
            csr,
            token,
            ttl_seconds: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    let chain = resp.chain.into_iter().map(CertificateDer::from).collect();
    Credentials::new(chain, key)
        .map_err(|e| tonic::Status::internal(format!("issued credentials are unusable: {e}")))
}

/// Checks new credentials are ours and chain to our trust domain's roots.
fn validate(creds: &Credentials, config: &Config, bundles: &BundleStore) -> Result<(), String> {
    creds
        .check(&config.identity, &bundles.current())
        .map_err(|e| e.to_string())
}

/// Gets the first SVID. Retries while the control plane is unreachable;
/// stops at once when it refuses the token (retrying cannot help).
pub async fn bootstrap(
    config: &Config,
    bundles: &BundleStore,
) -> Result<Credentials, IdentityError> {
    let token = match &config.bootstrap {
        Bootstrap::Credentials(dir) => return load_credentials(dir, config, bundles),
        Bootstrap::TokenFile(_) if config.via_gateway.is_some() => {
            return Err(IdentityError::Credentials(
                "a workload behind the gateway joins with `mesh-vm-agent join`, which fetches its first SVID through the gateway".into(),
            ));
        }
        Bootstrap::TokenFile(path) => {
            let text = String::from_utf8_lossy(&files::read(path)?)
                .trim()
                .to_owned();
            if text.is_empty() {
                return Err(IdentityError::EmptyToken {
                    path: path.display().to_string(),
                });
            }
            text
        }
    };
    let tls = client_config_without_cert(
        bundles.clone(),
        ExpectedIdentity::Exact(config.control_identity.clone()),
    )
    .map_err(|e| IdentityError::Credentials(e.to_string()))?;
    let mut client = identity_client(config, tls);
    let mut failures = 0;
    loop {
        match certify(&mut client, config, token.clone()).await {
            Ok(creds) => {
                validate(&creds, config, bundles).map_err(IdentityError::Credentials)?;
                tracing::info!(id = %creds.id(), not_after = %creds.info().not_after, "identity issued");
                return Ok(creds);
            }
            Err(s) if is_refusal(s.code()) => {
                return Err(IdentityError::Refused(s.message().to_owned()));
            }
            Err(s) => {
                let wait = backoff(failures);
                failures += 1;
                tracing::warn!(error = %s.message(), "control plane unreachable for Certify; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Whether the control plane refused for good (retrying cannot help),
/// rather than being unreachable.
pub fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::InvalidArgument
    )
}

fn load_credentials(
    dir: &std::path::Path,
    config: &Config,
    bundles: &BundleStore,
) -> Result<Credentials, IdentityError> {
    let crt = dir.join("leaf.crt");
    let key = dir.join("leaf.key");
    let chain = certs_from_pem(&files::read(&crt)?)
        .map_err(|e| IdentityError::Credentials(format!("{}: {e}", crt.display())))?;
    let key_der = key_from_pem(&files::read(&key)?)
        .map_err(|e| IdentityError::Credentials(format!("{}: {e}", key.display())))?;
    let creds = Credentials::new(chain, key_der)
        .map_err(|e| IdentityError::Credentials(format!("{}: {e}", crt.display())))?;
    validate(&creds, config, bundles)
        .map_err(|e| IdentityError::Credentials(format!("{}: {e}", crt.display())))?;
    Ok(creds)
}

/// Renews forever: at half lifetime, with backoff on failure. Calls
/// `on_state(Ok(not_after))` after each renewal and `on_state(Err(why))`
/// when the current certificate has expired without a replacement.
pub async fn renew_forever(
    config: Config,
    bundles: BundleStore,
    store: CredentialStore,
    on_state: impl Fn(Result<OffsetDateTime, String>) + Send + 'static,
) {
    let mut failures = 0u32;
    loop {
        let current = store.current();
        let wait = if failures == 0 {
            renew_in(
                current.info().not_before,
                current.info().not_after,
                cert::now(),
            )
        } else {
            backoff(failures - 1)
        };
        tokio::time::sleep(wait).await;
        let tls = match client_config(
            store.clone(),
            bundles.clone(),
            ExpectedIdentity::Exact(config.control_identity.clone()),
        ) {
            Ok(tls) => tls,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the renewal TLS config");
                failures += 1;
                continue;
            }
        };
        let mut client = match &config.via_gateway {
            Some(route) => match crate::proxy::through_gateway(
                route,
                mesh_core::targets::IDENTITY,
                ExpectedIdentity::Exact(config.control_identity.clone()),
                &store,
                &bundles,
            ) {
                Ok(channel) => IdentityClient::new(channel),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reach the identity service through the gateway");
                    failures += 1;
                    continue;
                }
            },
            None => identity_client(&config, tls),
        };
        let renewed = certify(&mut client, &config, String::new())
            .await
            .map_err(|s| s.message().to_owned())
            .and_then(|c| validate(&c, &config, &bundles).map(|()| c));
        match renewed.and_then(|c| store.rotate(c).map_err(|e| e.to_string())) {
            Ok(()) => {
                failures = 0;
                let not_after = store.current().info().not_after;
                tracing::info!(%not_after, "identity renewed");
                on_state(Ok(not_after));
            }
            Err(e) => {
                failures += 1;
                // Keep serving with the old certificate while it is valid.
                let expired = current.info().remaining(cert::now()).is_err();
                tracing::warn!(error = %e, failures, expired, "identity renewal failed; keeping the current certificate");
                if expired {
                    on_state(Err(format!(
                        "identity {} expired and could not be renewed: {e}",
                        SpiffeId::clone(current.id())
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life_with_a_floor() {
        let t0 = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_in(t0, t0 + day, t0), day / 2);
        assert_eq!(
            renew_in(t0, t0 + day, t0 + day / 2 + Duration::from_secs(5)),
            RENEW_FLOOR
        );
        assert_eq!(renew_in(t0, t0 + Duration::from_secs(8), t0), RENEW_FLOOR);
    }

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let got: Vec<u64> = (0..10).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 64, 128, 150, 150]);
    }
}
