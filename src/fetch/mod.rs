//! The fetcher port: how bytes are pulled from an origin.

mod guard;
mod http;
mod pace;

use async_trait::async_trait;
use url::Url;

use crate::lifecycle::JobError;
use crate::storage::ByteStream;

pub use guard::{DestinationGuard, HostList, Refused};
pub use http::{FetchSettings, HttpFetcher, Lookup, SystemLookup, describe, guarded_client};
pub use pace::{MinRate, at_least};

/// An origin's answer, body not yet read.
pub struct Fetched {
    /// The whole file's length, when the origin declared it (also when only the rest is sent).
    pub content_length: Option<u64>,
    pub content_type: Option<String>,
    /// What identifies this version of the file for a later `If-Range`: a strong entity tag,
    /// else the `Last-Modified` date; `None` when the origin gave neither.
    pub validator: Option<String>,
    /// Where `body` starts in the file: the offset asked for when the origin sent the rest
    /// of the same file (206), else 0 (the whole file, from its start).
    pub start: u64,
    pub body: ByteStream,
}

/// Ask only for the file from `offset` on, and only if it is still the version `validator`
/// names, `total` bytes long. An answer that does not prove all of that (see
/// [`RangeFrom::continues`]) is not used: the whole file is fetched instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeFrom {
    pub offset: u64,
    pub validator: String,
    pub total: u64,
}

/// What a `206 Partial Content` answer says it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialAnswer {
    /// `Content-Range: bytes first-last/total` (`total` `None` for `*`); `None` when the
    /// header is missing or unreadable.
    pub range: Option<(u64, u64, Option<u64>)>,
    /// The answer's strong validator (entity tag, else `Last-Modified`).
    pub validator: Option<String>,
    /// The answer's `Content-Length`, when it has one.
    pub length: Option<u64>,
}

impl RangeFrom {
    /// Whether `answer` is the rest of the very file this range was asked of: it starts at
    /// the offset, ends at the file's last byte, the file's total is known and the same,
    /// and so is its validator. `Err` says why not.
    pub fn continues(&self, answer: &PartialAnswer) -> Result<(), String> {
        let Some((first, last, total)) = answer.range else {
            return Err("no readable Content-Range".into());
        };
        let Some(total) = total else { return Err("the total length is unknown (`*`)".into()) };
        if total != self.total {
            return Err(format!("the total length is {total}, the file was {}", self.total));
        }
        if first != self.offset {
            return Err(format!("the range starts at {first}, {} was asked", self.offset));
        }
        if last.checked_add(1) != Some(total) {
            return Err(format!("the range ends at {last}, not at the file's last byte {}", total.saturating_sub(1)));
        }
        if let Some(length) = answer.length
            && length != total - first
        {
            return Err(format!("Content-Length {length} is not the range's {} bytes", total - first));
        }
        match &answer.validator {
            Some(v) if *v == self.validator => Ok(()),
            Some(v) => Err(format!("the file changed (validator {v}, was {})", self.validator)),
            None => Err("the answer names no version (no ETag or Last-Modified)".into()),
        }
    }
}

#[async_trait]
pub trait Fetcher: Send + Sync + 'static {
    /// Start fetching `url` with the caller's extra request `headers`, from `from`'s offset
    /// when the origin still has that version and can send a range (else the whole file,
    /// with [`Fetched::start`] 0); errors are classified transient or permanent.
    async fn fetch(
        &self,
        url: &Url,
        headers: &[(String, String)],
        from: Option<&RangeFrom>,
    ) -> Result<Fetched, JobError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from() -> RangeFrom {
        RangeFrom { offset: 100, validator: "\"v1\"".into(), total: 1000 }
    }

    fn answer(range: Option<(u64, u64, Option<u64>)>, validator: Option<&str>) -> PartialAnswer {
        PartialAnswer { range, validator: validator.map(str::to_owned), length: None }
    }

    #[test]
    fn only_the_rest_of_the_same_file_continues_a_checkpoint() {
        assert_eq!(from().continues(&answer(Some((100, 999, Some(1000))), Some("\"v1\""))), Ok(()));
        let refused = [
            ("unknown total", answer(Some((100, 999, None)), Some("\"v1\""))),
            ("other total", answer(Some((100, 1099, Some(1100))), Some("\"v1\""))),
            ("short total", answer(Some((100, 899, Some(900))), Some("\"v1\""))),
            ("wrong start", answer(Some((0, 999, Some(1000))), Some("\"v1\""))),
            ("later start", answer(Some((101, 999, Some(1000))), Some("\"v1\""))),
            ("not to the end", answer(Some((100, 500, Some(1000))), Some("\"v1\""))),
            ("changed validator", answer(Some((100, 999, Some(1000))), Some("\"v2\""))),
            ("no validator", answer(Some((100, 999, Some(1000))), None)),
            ("no Content-Range", answer(None, Some("\"v1\""))),
        ];
        for (what, answer) in refused {
            assert!(from().continues(&answer).is_err(), "{what} must not continue the checkpoint");
        }
        let wrong_length = PartialAnswer { length: Some(10), ..answer(Some((100, 999, Some(1000))), Some("\"v1\"")) };
        assert!(from().continues(&wrong_length).is_err());
    }
}
