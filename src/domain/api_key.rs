//! API keys: what a key is allowed, and how its secret is issued and checked.
//!
//! A key reads `ffk_<id>_<secret>`: the id finds the stored key (and is what `keys list`
//! shows and `keys revoke` takes); the secret is 256 random bits. Only the SHA-256 of the
//! whole key is stored (a fast hash is enough for a secret of that strength), and it is
//! compared in constant time.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{BucketName, ObjectKey};

const PREFIX: &str = "ffk_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees and acts on every job; may make fileflow create buckets.
    Admin,
    /// Submits jobs within its buckets and sees only its own.
    Submitter,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Submitter => "submitter",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Self::Admin),
            "submitter" => Ok(Self::Submitter),
            other => Err(format!("unknown role {other:?}: expected admin or submitter")),
        }
    }
}

/// Where a key may write: a whole bucket (`photos`) or the keys under a prefix
/// (`photos/users/42/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketGrant {
    bucket: String,
    prefix: String,
}

impl BucketGrant {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (bucket, rest) = text.split_once('/').unwrap_or((text, ""));
        BucketName::parse(bucket).map_err(|e| format!("{text:?}: {e}"))?;
        let prefix = rest.strip_suffix('*').unwrap_or(rest);
        if prefix.contains('*') {
            return Err(format!("{text:?}: `*` may only end a grant (bucket/prefix/*)"));
        }
        Ok(Self { bucket: bucket.to_owned(), prefix: prefix.to_owned() })
    }

    fn allows(&self, bucket: &BucketName, key: &ObjectKey) -> bool {
        self.bucket == bucket.as_str() && key.as_str().starts_with(&self.prefix)
    }
}

impl fmt::Display for BucketGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() { f.write_str(&self.bucket) } else { write!(f, "{}/{}*", self.bucket, self.prefix) }
    }
}

/// The buckets (and key prefixes) a key may write to; empty means every bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope(Vec<BucketGrant>);

impl Scope {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        entries
            .iter()
            .map(AsRef::as_ref)
            .filter(|e| !e.trim().is_empty())
            .map(BucketGrant::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn allows(&self, bucket: &BucketName, key: &ObjectKey) -> bool {
        self.0.is_empty() || self.0.iter().any(|grant| grant.allows(bucket, key))
    }

    /// The grants as text, as `keys create --buckets` takes them.
    pub fn entries(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// The stored form: a JSON array of grants.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.entries()).expect("strings serialize")
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let entries: Vec<String> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Self::parse(&entries)
    }
}

/// Limits of one key; `None` takes the server's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Requests per second (a burst of as many is allowed).
    pub rate_limit: Option<u32>,
    /// Jobs of this key not yet finished (pending or processing).
    pub max_unfinished: Option<u64>,
    /// Largest file a job of this key may store (under the server's own limit).
    pub max_file_size: Option<u64>,
    /// This key's share of the workers against other keys with waiting jobs (1 when left
    /// out: a key of weight 3 gets three turns to another's one).
    pub weight: Option<u32>,
}

/// A key to create.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub role: Role,
    pub scope: Scope,
    pub limits: KeyLimits,
    /// The webhook for jobs of this key that name none.
    pub notify_url: Option<String>,
}

/// A stored key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub scope: Scope,
    pub limits: KeyLimits,
    pub notify_url: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// A freshly issued key: the text given to its user once, and what is stored.
pub struct IssuedKey {
    pub id: String,
    /// `ffk_<id>_<secret>`: shown once, never stored.
    pub key: String,
    pub secret_sha256: String,
}

impl IssuedKey {
    pub fn generate() -> Self {
        let id = hex::encode(rand::random::<[u8; 6]>());
        let secret = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let key = format!("{PREFIX}{id}_{secret}");
        Self { secret_sha256: digest(&key), id, key }
    }
}

/// The id part of a presented key, or `None` when it does not look like one of ours.
pub fn key_id(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty()).then_some(id)
}

/// Whether `presented` is the key whose digest is `stored_sha256`, in constant time.
pub fn matches(presented: &str, stored_sha256: &str) -> bool {
    digest(presented).as_bytes().ct_eq(stored_sha256.as_bytes()).into()
}

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(bucket: &str, key: &str) -> (BucketName, ObjectKey) {
        (BucketName::parse(bucket).unwrap(), ObjectKey::parse(key).unwrap())
    }

    #[test]
    fn grants_cover_whole_buckets_or_prefixes() {
        let scope = Scope::parse(&["photos", "docs/team-a/*", "logs/2026"]).unwrap();
        let allows = |b, k| {
            let (b, k) = at(b, k);
            scope.allows(&b, &k)
        };
        assert!(allows("photos", "any/key.jpg"));
        assert!(allows("docs", "team-a/report.pdf"));
        assert!(!allows("docs", "team-b/report.pdf"));
        assert!(!allows("docs", "team-a"), "the prefix includes its slash");
        assert!(allows("logs", "2026-01.txt"), "a prefix without * is a plain prefix");
        assert!(!allows("other", "x"));
        assert!(Scope::default().allows(&at("any", "x").0, &at("any", "x").1), "empty: every bucket");
        assert_eq!(scope.entries(), ["photos", "docs/team-a/*", "logs/2026*"]);
        assert_eq!(Scope::from_json(&scope.to_json()).unwrap(), scope);
    }

    #[test]
    fn malformed_grants_are_refused() {
        for bad in ["Not_A_Bucket", "a", "docs/*/x", "/x"] {
            assert!(BucketGrant::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_issued_key_matches_only_itself() {
        let issued = IssuedKey::generate();
        assert_eq!(key_id(&issued.key), Some(issued.id.as_str()));
        assert!(matches(&issued.key, &issued.secret_sha256));
        let mut other = issued.key.clone();
        other.pop();
        other.push(if issued.key.ends_with('A') { 'B' } else { 'A' });
        assert!(!matches(&other, &issued.secret_sha256));
        assert_eq!(key_id("Bearer x"), None);
        assert_eq!(key_id("ffk_short_x"), None);
        assert_ne!(IssuedKey::generate().key, issued.key);
    }
}
