//! SPIFFE IDs and trust domains, parsed and printed exactly as the SPIFFE-ID
//! standard says (`spiffe://<trust-domain>/<path>`).
//!
//! Parsing is strict on purpose: an ID is compared byte for byte in policy,
//! so two spellings of one identity must never both be accepted.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The URI scheme of every SPIFFE ID.
const SCHEME_PREFIX: &str = "spiffe://";
/// The standard's limit on a whole SPIFFE ID, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The standard's limit on a trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID or trust domain. Each rule of the
/// standard has its own variant so callers (and metrics) can tell them apart.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("empty string: a SPIFFE ID looks like spiffe://example.org/ns/shop/sa/web")]
    Empty,
    #[error("SPIFFE ID is {len} bytes; the limit is {MAX_SPIFFE_ID_LEN}")]
    TooLong { len: usize },
    #[error("scheme must be `spiffe://` (lower case); got {got:?}")]
    WrongScheme { got: String },
    #[error("trust domain is missing: write spiffe://<trust-domain>/...")]
    MissingTrustDomain,
    #[error("trust domain is {len} bytes; the limit is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong { len: usize },
    #[error("trust domain must be lower case; write {lowered:?}")]
    UpperCaseTrustDomain { lowered: String },
    #[error("trust domain may only hold a-z, 0-9, '.', '-' and '_'; found {found:?}")]
    BadTrustDomainChar { found: char },
    #[error("a port is not allowed in a SPIFFE ID's trust domain")]
    Port,
    #[error("user info (`user@`) is not allowed in a SPIFFE ID")]
    UserInfo,
    #[error("a query (`?...`) is not allowed in a SPIFFE ID")]
    Query,
    #[error("a fragment (`#...`) is not allowed in a SPIFFE ID")]
    Fragment,
    #[error("percent-encoded characters are not allowed in a SPIFFE ID")]
    PercentEncoded,
    #[error("path has an empty segment (`//`)")]
    EmptySegment,
    #[error("path has a `.` or `..` segment")]
    DotSegment,
    #[error("path must not end with `/`")]
    TrailingSlash,
    #[error("path segments may only hold a-z, A-Z, 0-9, '.', '-' and '_'; found {found:?}")]
    BadPathChar { found: char },
}

/// A SPIFFE trust domain such as `west.mesh.local`: the name of one
/// authority (here: one cluster's CA).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`west.mesh.local`) or the ID of a
    /// trust domain (`spiffe://west.mesh.local`).
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.contains("://") {
            let id = SpiffeId::parse(s)?;
            return Ok(id.trust_domain());
        }
        check_trust_domain(s)?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID naming the trust domain itself (`spiffe://<td>`).
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            text: format!("{SCHEME_PREFIX}{}", self.0),
            td_end: SCHEME_PREFIX.len() + self.0.len(),
        }
    }
}

/// A SPIFFE ID such as `spiffe://west.mesh.local/ns/shop/sa/web`.
///
/// Holds the canonical text; printing it gives back exactly what was parsed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    text: String,
    /// Byte offset where the trust domain ends and the path starts.
    td_end: usize,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let Some(rest) = s.strip_prefix(SCHEME_PREFIX) else {
            let got = s.split_once("://").map_or(s, |(scheme, _)| scheme);
            return Err(SpiffeIdError::WrongScheme {
                got: got.chars().take(32).collect(),
            });
        };
        // These are illegal anywhere, and a URL parser would treat them as
        // structure, so they are reported before the parts are split.
        if s.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if s.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if s.contains('%') {
            return Err(SpiffeIdError::PercentEncoded);
        }
        let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        check_trust_domain(td)?;
        check_path(path)?;
        Ok(Self {
            text: s.to_owned(),
            td_end: SCHEME_PREFIX.len() + td.len(),
        })
    }

    /// The ID of a Kubernetes-style workload: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "{SCHEME_PREFIX}{}/ns/{namespace}/sa/{service_account}",
            td.0
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.text[SCHEME_PREFIX.len()..self.td_end]
    }

    /// The path, starting with `/`, or empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.text[self.td_end..]
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(SpiffeIdError::UpperCaseTrustDomain {
            lowered: td.to_ascii_lowercase(),
        });
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(found) => Err(SpiffeIdError::BadTrustDomainChar { found }),
        None => Ok(()),
    }
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    // `path` starts with '/', so the first split item is always empty.
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(found) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar { found });
        }
    }
    Ok(())
}

macro_rules! string_like {
    ($ty:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = SpiffeIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_like!(SpiffeId);
string_like!(TrustDomain);

#[cfg(test)]
mod tests {
    use super::*;
    use SpiffeIdError as E;

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://west.mesh.local/ns/shop/sa/web",
            "spiffe://a_b-c.9/Path.With-Mixed_Case/x",
            "spiffe://td/.../a..b",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://west.mesh.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "west.mesh.local");
        assert_eq!(id.path(), "/ns/shop/sa/web");
        let td = TrustDomain::parse("west.mesh.local").unwrap();
        assert_eq!(SpiffeId::workload(&td, "shop", "web").unwrap(), id);
        assert_eq!(td.id().as_str(), "spiffe://west.mesh.local");
        assert_eq!(
            TrustDomain::parse("spiffe://west.mesh.local").unwrap(),
            td,
            "a trust domain may be given as its ID"
        );
    }

    #[test]
    fn each_rule_has_its_own_error() {
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        let long_td = format!("spiffe://{}", "a".repeat(MAX_TRUST_DOMAIN_LEN + 1));
        let cases: &[(&str, E)] = &[
            ("", E::Empty),
            (&long, E::TooLong { len: long.len() }),
            ("http://td/x", E::WrongScheme { got: "http".into() }),
            (
                "SPIFFE://td/x",
                E::WrongScheme {
                    got: "SPIFFE".into(),
                },
            ),
            ("td/x", E::WrongScheme { got: "td/x".into() }),
            ("spiffe:///x", E::MissingTrustDomain),
            ("spiffe://", E::MissingTrustDomain),
            (
                &long_td,
                E::TrustDomainTooLong {
                    len: MAX_TRUST_DOMAIN_LEN + 1,
                },
            ),
            (
                "spiffe://West.org/x",
                E::UpperCaseTrustDomain {
                    lowered: "west.org".into(),
                },
            ),
            ("spiffe://we$t/x", E::BadTrustDomainChar { found: '$' }),
            ("spiffe://td:8080/x", E::Port),
            ("spiffe://user@td/x", E::UserInfo),
            ("spiffe://td/x?a=b", E::Query),
            ("spiffe://td/x#frag", E::Fragment),
            ("spiffe://td/x%20y", E::PercentEncoded),
            ("spiffe://td/a//b", E::EmptySegment),
            ("spiffe://td/a/./b", E::DotSegment),
            ("spiffe://td/a/..", E::DotSegment),
            ("spiffe://td/a/", E::TrailingSlash),
            ("spiffe://td/", E::TrailingSlash),
            ("spiffe://td/a b", E::BadPathChar { found: ' ' }),
            ("spiffe://td/caf\u{e9}", E::BadPathChar { found: '\u{e9}' }),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn serde_round_trip_rejects_bad_ids() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://td/ns/a/sa/b\"").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"spiffe://td/ns/a/sa/b\""
        );
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://TD/x\"").unwrap_err();
        assert!(err.to_string().contains("lower case"), "{err}");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any string that parses prints back to itself, and parsing the
            /// printed form gives an equal value.
            #[test]
            fn parse_print_round_trip(s in "spiffe://[a-z0-9._-]{1,20}(/[a-zA-Z0-9._-]{1,12}){0,6}") {
                if let Ok(id) = SpiffeId::parse(&s) {
                    prop_assert_eq!(id.to_string(), s.clone());
                    prop_assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
                }
            }

            /// Arbitrary input never panics, and whatever is accepted round-trips.
            #[test]
            fn arbitrary_input_round_trips_or_errors(s in "\\PC{0,64}") {
                for input in [s.clone(), format!("spiffe://{s}")] {
                    if let Ok(id) = SpiffeId::parse(&input) {
                        prop_assert_eq!(id.as_str(), input.as_str());
                    }
                }
            }
        }
    }
}
