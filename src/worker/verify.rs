//! The stream between origin and store: counts, hashes and checks bytes on their way,
//! so nothing is held in memory and a bad file is refused before it is committed.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use md5::Md5;
use sha2::{Digest, Sha256};

use crate::lifecycle::JobError;
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

/// Filled in when the verified stream has ended well.
pub type DigestSlot = Arc<Mutex<Option<Digests>>>;

struct State {
    body: ByteStream,
    expect: Expectations,
    sha256: Sha256,
    md5: Md5,
    size: u64,
    slot: DigestSlot,
    done: bool,
}

impl State {
    /// The end of the body: the last chance to refuse it, before the store commits.
    fn finish(&mut self) -> Result<(), JobError> {
        if let Some(declared) = self.expect.declared_length
            && self.size != declared
        {
            return Err(JobError::transient(format!(
                "origin body interrupted: received {} of {declared} declared bytes",
                self.size
            )));
        }
        if let Some(expected) = self.expect.size
            && self.size != expected
        {
            return Err(JobError::permanent(format!(
                "size mismatch: expected {expected} bytes, content has {}",
                self.size
            )));
        }
        let sha256 = hex::encode(self.sha256.finalize_reset());
        let md5 = hex::encode(self.md5.finalize_reset());
        for (name, expected, actual) in [("sha256", &self.expect.sha256, &sha256), ("md5", &self.expect.md5, &md5)] {
            if let Some(expected) = expected
                && expected != actual
            {
                return Err(JobError::permanent(format!(
                    "checksum mismatch: expected {name} {expected}, content has {actual}"
                )));
            }
        }
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Digests { size: self.size, sha256, md5 });
        Ok(())
    }
}

/// Wrap `body` so it is measured and verified as it streams. The slot holds the digests
/// once the stream ended without error.
pub fn verified(body: ByteStream, expect: Expectations) -> (ByteStream, DigestSlot) {
    let slot = DigestSlot::default();
    let state =
        State { body, expect, sha256: Sha256::new(), md5: Md5::new(), size: 0, slot: slot.clone(), done: false };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let item = match st.body.next().await {
            Some(Ok(chunk)) => {
                st.size += chunk.len() as u64;
                if st.size > st.expect.max_size {
                    Err(JobError::permanent(format!(
                        "file too large: more than the limit of {} bytes",
                        st.expect.max_size
                    )))
                } else {
                    st.sha256.update(&chunk);
                    st.md5.update(&chunk);
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
    (stream.boxed(), slot)
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
        let (stream, slot) = verified(body(&[b"hello", b" ", b"world"]), expect());
        let out: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(out.concat(), b"hello world");
        let digests = slot.lock().unwrap().clone().unwrap();
        assert_eq!(digests, Digests { size: 11, sha256: HELLO_SHA256.into(), md5: HELLO_MD5.into() });
    }

    #[tokio::test]
    async fn matching_checksums_pass_and_a_mismatch_is_permanent() {
        let good = Expectations { sha256: Some(HELLO_SHA256.into()), md5: Some(HELLO_MD5.into()), ..expect() };
        let (stream, _) = verified(body(&[b"hello world"]), good);
        assert!(stream.try_collect::<Vec<_>>().await.is_ok());

        let sized = Expectations { size: Some(11), ..expect() };
        assert!(verified(body(&[b"hello world"]), sized).0.try_collect::<Vec<_>>().await.is_ok());
        let missized = Expectations { size: Some(4), ..expect() };
        let err = verified(body(&[b"hello world"]), missized).0.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(!err.is_transient() && err.message.contains("size mismatch: expected 4 bytes"), "{err}");

        let bad = Expectations { sha256: Some("0".repeat(64)), ..expect() };
        let (stream, slot) = verified(body(&[b"hello world"]), bad);
        let err = stream.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(!err.is_transient());
        assert!(err.message.contains("checksum mismatch"), "{err}");
        assert!(slot.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn stops_as_soon_as_the_size_limit_is_passed() {
        let small = Expectations { max_size: 8, ..expect() };
        let (stream, _) = verified(body(&[b"hello", b" world", b"never read"]), small);
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 2);
        let err = items[1].clone().unwrap_err();
        assert!(!err.is_transient() && err.message.contains("too large"), "{err}");
    }

    #[tokio::test]
    async fn a_body_shorter_than_declared_is_transient() {
        let declared = Expectations { declared_length: Some(20), ..expect() };
        let (stream, slot) = verified(body(&[b"hello world"]), declared);
        let err = stream.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(slot.lock().unwrap().is_none());
    }
}
