//! Identity on Kubernetes: a proxy's first Certify carries its projected
//! service-account token (audience [`AUDIENCE`]); the API server's
//! TokenReview says whose it is. The token is never parsed or trusted here.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

/// The audience Mesh's tokens are for: a token minted for the API server
/// (or anything else) is refused.
pub const AUDIENCE: &str = "identity.mesh.rs";
/// Longest token sent for review (projected tokens are about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Whose token it is: a service account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
}

/// Why a token was refused; [`Refused::reason`] is the metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "the token is not for audience {AUDIENCE}; mount a projected token with `audience: {AUDIENCE}` ({0})"
    )]
    WrongAudience(String),
    #[error(
        "the token has expired; the kubelet renews projected tokens, so read it again from its file ({0})"
    )]
    Expired(String),
    #[error("the token's service account no longer exists ({0})")]
    ServiceAccountGone(String),
    #[error("the API server did not accept the token: {0}")]
    Invalid(String),
    #[error("the token is not a service account's (user {0:?})")]
    NotServiceAccount(String),
    #[error("the token is over {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error(
        "TokenReview failed; is the API server reachable and may this control plane create tokenreviews? ({0})"
    )]
    Unavailable(String),
}

impl Refused {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::WrongAudience(_) => "token_wrong_audience",
            Self::Expired(_) => "token_expired",
            Self::ServiceAccountGone(_) => "token_service_account_gone",
            Self::Invalid(_) => "token_invalid",
            Self::NotServiceAccount(_) => "token_not_service_account",
            Self::TooLong => "token_malformed",
            Self::Unavailable(_) => "token_review_unavailable",
        }
    }
}

/// Asks the API server about tokens.
#[derive(Clone)]
pub struct TokenReviewer {
    client: Client,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer").finish_non_exhaustive()
    }
}

/// Whether `token` has the shape of a JWT (three base64url parts), so
/// it is a Kubernetes token rather than a Mesh join token.
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl TokenReviewer {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    pub async fn review(&self, token: &str) -> Result<Reviewed, Refused> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Refused::TooLong);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refused::Unavailable(e.to_string()))?;
        interpret(answer.status.unwrap_or_default())
    }
}

/// The API server's answer, read strictly: authenticated, for our
/// audience, a service account.
pub fn interpret(status: TokenReviewStatus) -> Result<Reviewed, Refused> {
    if status.authenticated != Some(true) {
        let error = status.error.unwrap_or_else(|| "not authenticated".into());
        let lower = error.to_ascii_lowercase();
        return Err(if lower.contains("audience") {
            Refused::WrongAudience(error)
        } else if lower.contains("expired") {
            Refused::Expired(error)
        } else if lower.contains("not found") || lower.contains("deleted") {
            Refused::ServiceAccountGone(error)
        } else {
            Refused::Invalid(error)
        });
    }
    if !status
        .audiences
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|a| a == AUDIENCE)
    {
        return Err(Refused::WrongAudience(format!(
            "the review names audiences {:?}",
            status.audiences.unwrap_or_default()
        )));
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    let mut parts = username.split(':');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("system"), Some("serviceaccount"), Some(ns), Some(sa), None)
            if !ns.is_empty() && !sa.is_empty() =>
        {
            Ok(Reviewed {
                namespace: ns.to_owned(),
                service_account: sa.to_owned(),
            })
        }
        _ => Err(Refused::NotServiceAccount(username)),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(authenticated: bool, error: Option<&str>, user: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            error: error.map(str::to_owned),
            audiences: Some(vec![AUDIENCE.into()]),
            user: Some(UserInfo {
                username: Some(user.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_an_authenticated_service_account_for_our_audience_passes() {
        assert_eq!(
            interpret(status(true, None, "system:serviceaccount:shop:web")),
            Ok(Reviewed {
                namespace: "shop".into(),
                service_account: "web".into()
            })
        );
        let reason = |s| interpret(s).unwrap_err().reason();
        assert_eq!(
            reason(status(true, None, "admin")),
            "token_not_service_account"
        );
        assert_eq!(
            reason(status(true, None, "system:serviceaccount:shop:web:x")),
            "token_not_service_account"
        );
        assert_eq!(
            reason(status(
                false,
                Some(
                    "[invalid bearer token, token audiences [\"x\"] is invalid for the target audiences [\"identity.mesh.rs\"]]"
                ),
                ""
            )),
            "token_wrong_audience"
        );
        assert_eq!(
            reason(status(
                false,
                Some("[invalid bearer token, serviceaccounts \"web\" not found]"),
                ""
            )),
            "token_service_account_gone"
        );
        assert_eq!(
            reason(status(
                false,
                Some(
                    "[invalid bearer token, square/go-jose/jwt: validation failed, token is expired (exp)]"
                ),
                ""
            )),
            "token_expired"
        );
        let mut other_audience = status(true, None, "system:serviceaccount:shop:web");
        other_audience.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        assert_eq!(reason(other_audience), "token_wrong_audience");
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(!looks_like_jwt("mesh_0123"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c d"));
    }
}
