//! The stream between origin and store: counts, hashes and checks bytes on their way,
//! so nothing is held in memory and a bad file is refused before it is committed.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use md5::Md5;
use sha2::digest::common::hazmat::SerializableState as _;
use sha2::{Digest, Sha256};

use crate::lifecycle::{Cause, JobError};
use crate::storage::ByteStream;

/// What the stream promises to deliver.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// Refuse the file once it grows past this many bytes.
    pub max_size: u64,
    /// The origin's Content-Length: a shorter body is an interrupted transfer.
    pub declared_length: Option<u64>,
    pub sha256: Option<String>,
    pub md5: Option<String>,
    /// The size the caller said the content has.
    pub size: Option<u64>,
}

/// Size and checksums of a body that was read to its end and matched its expectations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub size: u64,
    pub sha256: String,
    pub md5: String,
}

/// The hashes part way through a body, saved so a later attempt can go on from there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HashState {
    /// Bytes hashed so far.
    pub size: u64,
    /// The SHA-256 and MD5 states as their crates serialize them, base64.
    sha256: String,
    md5: String,
}

struct Hashing {
    sha256: Sha256,
    md5: Md5,
    size: u64,
    digests: Option<Digests>,
}

/// A verified stream's running hashes and, once it ended well, its digests.
#[derive(Clone)]
pub struct Verifier(Arc<Mutex<Hashing>>);

impl Verifier {
    fn lock(&self) -> std::sync::MutexGuard<'_, Hashing> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Size and checksums, once the stream has ended and matched its expectations.
    pub fn digests(&self) -> Option<Digests> {
        self.lock().digests.clone()
    }

    /// The hashes of the bytes that have gone by so far.
    pub fn state(&self) -> HashState {
        let h = self.lock();
        HashState { size: h.size, sha256: BASE64.encode(h.sha256.serialize()), md5: BASE64.encode(h.md5.serialize()) }
    }
}

struct State {
    body: ByteStream,
    expect: Expectations,
    hashing: Verifier,
    done: bool,
}

impl State {
    /// The end of the body: the last chance to refuse it, before the store commits.
    fn finish(&mut self) -> Result<(), JobError> {
        let mut h = self.hashing.lock();
        if let Some(declared) = self.expect.declared_length
            && h.size != declared
        {
            return Err(JobError::transient(format!(
                "origin body interrupted: received {} of {declared} declared bytes",
                h.size
            ))
            .because(Cause::Network));
        }
        if let Some(expected) = self.expect.size
            && h.size != expected
        {
            return Err(JobError::permanent(format!(
                "size mismatch: expected {expected} bytes, content has {}",
                h.size
            ))
            .because(Cause::Verification));
        }
        let sha256 = hex::encode(h.sha256.finalize_reset());
        let md5 = hex::encode(h.md5.finalize_reset());
        for (name, expected, actual) in [("sha256", &self.expect.sha256, &sha256), ("md5", &self.expect.md5, &md5)] {
            if let Some(expected) = expected
                && expected != actual
            {
                return Err(JobError::permanent(format!(
                    "checksum mismatch: expected {name} {expected}, content has {actual}"
                ))
                .because(Cause::Verification));
            }
        }
        h.digests = Some(Digests { size: h.size, sha256, md5 });
        Ok(())
    }
}

/// Wrap `body` so it is measured and verified as it streams: the whole file's body, or,
/// given the hashes of the bytes before it (`from`), the rest of it. The verifier holds
/// the digests once the stream ended without error.
pub fn verified(body: ByteStream, expect: Expectations, from: Option<&HashState>) -> (ByteStream, Verifier) {
    let (sha256, md5, size) = match from.map(restore).transpose() {
        Ok(Some(restored)) => restored,
        Ok(None) => (Sha256::new(), Md5::new(), 0),
        Err(e) => return (futures::stream::once(async move { Err(e) }).boxed(), Verifier::empty()),
    };
    let hashing = Verifier(Arc::new(Mutex::new(Hashing { sha256, md5, size, digests: None })));
    let state = State { body, expect, hashing: hashing.clone(), done: false };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let item = match st.body.next().await {
            Some(Ok(chunk)) => {
                let mut h = st.hashing.lock();
                h.size += chunk.len() as u64;
                if h.size > st.expect.max_size {
                    Err(JobError::permanent(format!(
                        "file too large: more than the limit of {} bytes",
                        st.expect.max_size
                    ))
                    .because(Cause::TooLarge))
                } else {
                    h.sha256.update(&chunk);
                    h.md5.update(&chunk);
                    drop(h);
                    return Some((Ok(chunk), st));
                }
            }
            Some(Err(e)) => Err(e),
            None => match st.finish() {
                Ok(()) => return None,
                Err(e) => Err(e),
            },
        };
        st.done = true;
        Some((item, st))
    });
    (stream.boxed(), hashing)
}

impl Verifier {
    fn empty() -> Self {
        Self(Arc::new(Mutex::new(Hashing { sha256: Sha256::new(), md5: Md5::new(), size: 0, digests: None })))
    }
}

/// The hashers a [`HashState`] saved.
fn restore(state: &HashState) -> Result<(Sha256, Md5, u64), JobError> {
    let broken = |what: &str| JobError::transient(format!("saved {what} hash state is unreadable; starting over"));
    let sha256 = BASE64.decode(&state.sha256).map_err(|_| broken("SHA-256"))?;
    let md5 = BASE64.decode(&state.md5).map_err(|_| broken("MD5"))?;
    let sha256 =
        sha256.as_slice().try_into().ok().and_then(|s| Sha256::deserialize(s).ok()).ok_or_else(|| broken("SHA-256"))?;
    let md5 = md5.as_slice().try_into().ok().and_then(|s| Md5::deserialize(s).ok()).ok_or_else(|| broken("MD5"))?;
    Ok((sha256, md5, state.size))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::TryStreamExt;

    use super::*;

    fn body(parts: &[&'static [u8]]) -> ByteStream {
        let parts: Vec<Result<Bytes, JobError>> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        futures::stream::iter(parts).boxed()
    }

    fn expect() -> Expectations {
        Expectations { max_size: 1 << 20, ..Default::default() }
    }

    const HELLO_SHA256: &str = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
    const HELLO_MD5: &str = "5eb63bbbe01eeed093cb22bb8f5acdc3";

    #[tokio::test]
    async fn passes_bytes_through_and_records_digests() {
        let (stream, slot) = verified(body(&[b"hello", b" ", b"world"]), expect(), None);
        let out: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(out.concat(), b"hello world");
        let digests = slot.digests().unwrap();
        assert_eq!(digests, Digests { size: 11, sha256: HELLO_SHA256.into(), md5: HELLO_MD5.into() });
    }

    #[tokio::test]
    async fn matching_checksums_pass_and_a_mismatch_is_permanent() {
        let good = Expectations { sha256: Some(HELLO_SHA256.into()), md5: Some(HELLO_MD5.into()), ..expect() };
        let (stream, _) = verified(body(&[b"hello world"]), good, None);
        assert!(stream.try_collect::<Vec<_>>().await.is_ok());

        let sized = Expectations { size: Some(11), ..expect() };
        assert!(verified(body(&[b"hello world"]), sized, None).0.try_collect::<Vec<_>>().await.is_ok());
        let missized = Expectations { size: Some(4), ..expect() };
        let err = verified(body(&[b"hello world"]), missized, None).0.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(!err.is_transient() && err.message.contains("size mismatch: expected 4 bytes"), "{err}");

        let bad = Expectations { sha256: Some("0".repeat(64)), ..expect() };
        let (stream, slot) = verified(body(&[b"hello world"]), bad, None);
        let err = stream.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(!err.is_transient());
        assert!(err.message.contains("checksum mismatch"), "{err}");
        assert!(slot.digests().is_none());
    }

    #[tokio::test]
    async fn stops_as_soon_as_the_size_limit_is_passed() {
        let small = Expectations { max_size: 8, ..expect() };
        let (stream, _) = verified(body(&[b"hello", b" world", b"never read"]), small, None);
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 2);
        let err = items[1].clone().unwrap_err();
        assert!(!err.is_transient() && err.message.contains("too large"), "{err}");
    }

    #[tokio::test]
    async fn a_body_shorter_than_declared_is_transient() {
        let declared = Expectations { declared_length: Some(20), ..expect() };
        let (stream, slot) = verified(body(&[b"hello world"]), declared, None);
        let err = stream.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(slot.digests().is_none());
    }

    #[tokio::test]
    async fn a_saved_state_goes_on_where_the_first_part_ended() {
        // A first attempt that got 6 bytes and then broke off.
        let broken = body(&[b"hello", b" "]).chain(futures::stream::once(async { Err(JobError::transient("cut")) }));
        let (first, verifier) = verified(broken.boxed(), expect(), None);
        assert!(first.try_collect::<Vec<_>>().await.is_err());
        let saved = verifier.state();
        assert_eq!(saved.size, 6);
        let saved: HashState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        let whole = Expectations { declared_length: Some(11), sha256: Some(HELLO_SHA256.into()), ..expect() };
        let (rest, verifier) = verified(body(&[b"world"]), whole, Some(&saved));
        assert_eq!(rest.try_collect::<Vec<_>>().await.unwrap().concat(), b"world");
        assert_eq!(
            verifier.digests().unwrap(),
            Digests { size: 11, sha256: HELLO_SHA256.into(), md5: HELLO_MD5.into() }
        );

        let garbled = HashState { sha256: "AAAA".into(), ..saved };
        let err = verified(body(&[b"world"]), expect(), Some(&garbled)).0.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(err.is_transient() && err.message.contains("unreadable"), "{err}");
    }
}
