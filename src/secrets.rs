//! Keys fileflow keeps outside its database, and what they protect: per-job origin headers
//! are stored encrypted (AES-256-GCM), so a copy or a dump of the database reveals no
//! origin credentials.

use std::io::Write;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::domain::{InvalidValue, RequestHeaders, SealedHeaders};

/// A secret setting (a store's key, the encryption key, a database URL with its password,
/// an API key): `Debug` and `Display` print `[redacted]`, so no log line, error or panic
/// message shows it; [`Secret::expose`] is the one way to the value.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// `Debug` and `Display` that print `[redacted]` and nothing of the value.
macro_rules! redacted {
    ($($secret:ty),*) => {$(
        impl std::fmt::Debug for $secret {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("[redacted]")
            }
        }

        impl std::fmt::Display for $secret {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("[redacted]")
            }
        }
    )*};
}

redacted!(Secret, WebhookSecret);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// File in the data dir holding the header encryption key when none is configured.
const HEADER_KEY_FILE: &str = "encryption.key";
/// Prefix of the stored form: version 1 is base64(nonce ‖ ciphertext).
const SEALED_V1: &str = "v1.";

/// Encrypts per-job origin headers for the database and decrypts them for the worker.
pub struct HeaderSealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for HeaderSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeaderSealer([redacted])")
    }
}

impl HeaderSealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Self { cipher: Aes256Gcm::new(key.into()) }
    }

    /// The configured key (`--encryption-key`: 32 bytes in base64), or the one in
    /// `<data_dir>/encryption.key`, generated on first start. Processes that share a
    /// database must share the key: distributed deployments set it on every process.
    pub fn load(configured: Option<&Secret>, data_dir: &Path) -> anyhow::Result<Self> {
        let key = match configured {
            Some(text) => STANDARD.decode(text.expose().trim()).context("--encryption-key is not base64")?,
            None => load_or_create_key(&data_dir.join(HEADER_KEY_FILE))?,
        };
        let key: [u8; 32] = key
            .try_into()
            .map_err(|k: Vec<u8>| anyhow::anyhow!("the encryption key must be 32 bytes, not {}", k.len()))?;
        Ok(Self::new(&key))
    }

    /// The stored form of `headers`; `None` when there are none.
    pub fn seal(&self, headers: &RequestHeaders) -> Option<SealedHeaders> {
        if headers.is_empty() {
            return None;
        }
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), headers.to_json().as_bytes())
            .expect("AES-GCM encrypts any message of this size");
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        Some(SealedHeaders::from_stored(format!("{SEALED_V1}{}", STANDARD.encode(bytes))))
    }

    /// The headers in `sealed`. Rows written before headers were encrypted (a JSON array)
    /// are read as they are.
    pub fn open(&self, sealed: &SealedHeaders) -> Result<RequestHeaders, InvalidValue> {
        let text = sealed.as_str();
        let Some(encoded) = text.strip_prefix(SEALED_V1) else {
            return RequestHeaders::from_json(text);
        };
        let bytes = STANDARD.decode(encoded).map_err(|_| InvalidValue::new("stored headers are not base64"))?;
        if bytes.len() < 12 {
            return Err(InvalidValue::new("stored headers are truncated"));
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let plain = self.cipher.decrypt(Nonce::from_slice(nonce), ciphertext).map_err(|_| {
            InvalidValue::new(
                "stored headers cannot be decrypted: they were sealed with another encryption key \
                 (every process needs the same --encryption-key)",
            )
        })?;
        RequestHeaders::from_json(
            std::str::from_utf8(&plain).map_err(|_| InvalidValue::new("stored headers are corrupt"))?,
        )
    }
}

/// A 32-byte key kept in hex at `path`, generated (readable by its owner only) on first use.
/// When several processes start at once, all use whichever key landed first.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    let key = match std::fs::read_to_string(path) {
        Ok(text) => hex::decode(text.trim()).with_context(|| format!("{} is not hex", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            write_private(path, hex::encode(key).as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            let text = std::fs::read_to_string(path)?;
            hex::decode(text.trim())?
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    anyhow::ensure!(key.len() >= 32, "{} holds a key shorter than 32 bytes", path.display());
    crate::files::make_private(path).with_context(|| format!("cannot make {} private", path.display()))?;
    Ok(key)
}

/// Create `path` readable by its owner only, failing if it exists.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(contents)?;
            file.sync_all()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The key webhooks are signed with: `whsec_` and base64, as in the specification.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl std::str::FromStr for WebhookSecret {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let encoded = text.trim().strip_prefix("whsec_").unwrap_or(text.trim());
        let key = STANDARD.decode(encoded).map_err(|_| "a webhook secret is `whsec_` followed by base64".to_owned())?;
        if key.len() < 24 {
            return Err("a webhook secret needs at least 24 bytes".into());
        }
        Ok(Self(key))
    }
}

impl WebhookSecret {
    /// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        hmac::Mac::update(&mut mac, format!("{id}.{timestamp}.{body}").as_bytes());
        format!("v1,{}", STANDARD.encode(hmac::Mac::finalize(mac).into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret} {secret:?} {:?}", Some(&secret)), "[redacted] [redacted] Some([redacted])");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn headers_round_trip_and_the_stored_form_reveals_nothing() {
        let sealer = HeaderSealer::new(&[9; 32]);
        let headers = RequestHeaders::parse([("Authorization", "Bearer s3cr3t")]).unwrap();
        let sealed = sealer.seal(&headers).unwrap();
        assert!(!sealed.as_str().contains("s3cr3t") && !sealed.as_str().contains("authorization"));
        assert_eq!(sealer.open(&sealed).unwrap(), headers);
        assert_ne!(sealer.seal(&headers).unwrap(), sealed, "a fresh nonce each time");
        assert!(sealer.seal(&RequestHeaders::default()).is_none());
    }

    #[test]
    fn another_key_or_a_tampered_row_is_refused() {
        let headers = RequestHeaders::parse([("X-Token", "t")]).unwrap();
        let sealed = HeaderSealer::new(&[1; 32]).seal(&headers).unwrap();
        let err = HeaderSealer::new(&[2; 32]).open(&sealed).unwrap_err();
        assert!(err.0.contains("another encryption key"), "{err}");
        let mut text = sealed.as_str().to_owned();
        text.replace_range(10..11, if &text[10..11] == "A" { "B" } else { "A" });
        assert!(HeaderSealer::new(&[1; 32]).open(&SealedHeaders::from_stored(text)).is_err());
    }

    #[test]
    fn rows_from_before_encryption_still_read() {
        let legacy = SealedHeaders::from_stored(r#"[["authorization","Bearer t"]]"#.to_owned());
        let headers = HeaderSealer::new(&[1; 32]).open(&legacy).unwrap();
        assert_eq!(headers.pairs(), [("authorization".to_owned(), "Bearer t".to_owned())]);
    }

    #[test]
    fn the_key_file_is_generated_once_and_a_configured_key_must_be_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_key(&dir.path().join("k")).unwrap();
        let b = load_or_create_key(&dir.path().join("k")).unwrap();
        assert_eq!(a, b);
        assert!(HeaderSealer::load(Some(&STANDARD.encode([0u8; 16]).into()), dir.path()).is_err());
        assert!(HeaderSealer::load(Some(&STANDARD.encode([0u8; 32]).into()), dir.path()).is_ok());
    }
}
