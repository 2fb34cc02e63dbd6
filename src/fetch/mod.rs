//! The fetcher port: how bytes are pulled from an origin.

mod guard;
mod http;
mod pace;

use async_trait::async_trait;
use url::Url;

use crate::lifecycle::{JobError, OriginVersion};
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
    /// The origin's `ETag` and `Last-Modified`, as sent (recorded for a later `if_changed`).
    pub origin: OriginVersion,
    /// Where `body` starts in the file: the offset asked for when the origin sent the rest
    /// of the same file (206), else 0 (the whole file, from its start).
    pub start: u64,
    /// The origin said it serves byte ranges of this file (`Accept-Ranges: bytes`).
    pub accepts_ranges: bool,
    pub body: ByteStream,
}

/// An origin's answer to a request for one range of a file ([`Fetcher::fetch_range`]).
pub enum RangeAnswer {
    /// The answer proves it is exactly the range asked of the same file (see
    /// [`RangeFrom::continues`]); its body holds that range.
    Proven(Fetched),
    /// The origin answered, but not with that range of that file (a 200 for the whole
    /// file, a 416, another range, total or validator): nothing of it may be stored.
    Unproven(String),
}

/// Ask only for the file from `offset` on, and only if it is still the version `validator`
/// names, `total` bytes long. An answer that does not prove all of that (see
/// [`RangeFrom::continues`]) is not used: the whole file is fetched instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeFrom {
    pub offset: u64,
    /// The last byte asked for; `None`: up to the file's end.
    pub end: Option<u64>,
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
    /// The `Range` header asking for this range.
    pub fn header(&self) -> String {
        match self.end {
            Some(end) => format!("bytes={}-{end}", self.offset),
            None => format!("bytes={}-", self.offset),
        }
    }

    /// The last byte this range asks for.
    fn last(&self) -> u64 {
        self.end.unwrap_or(self.total.saturating_sub(1))
    }

    /// Whether `answer` is the very range of the very file this range was asked of: it
    /// starts at the offset, ends at the last byte asked (the file's last byte unless
    /// [`RangeFrom::end`] says otherwise), the file's total is known and the same, its
    /// `Content-Length` (if any) is the range's, and so is its validator. `Err` says why not.
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
        if last != self.last() {
            return Err(match self.end {
                Some(end) => format!("the range ends at {last}, {end} was asked"),
                None => format!("the range ends at {last}, not at the file's last byte {}", total.saturating_sub(1)),
            });
        }
        if let Some(length) = answer.length
            && length != last + 1 - first
        {
            return Err(format!("Content-Length {length} is not the range's {} bytes", last + 1 - first));
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

    /// Fetch `url` as [`Fetcher::fetch`] does (from its start) unless the origin says it
    /// has not changed since `since` (`If-None-Match`, `If-Modified-Since`): `None` on its
    /// `304 Not Modified`.
    async fn fetch_if_changed(
        &self,
        url: &Url,
        headers: &[(String, String)],
        since: &OriginVersion,
    ) -> Result<Option<Fetched>, JobError>;

    /// Fetch exactly `range` of `url` (`Range` with `If-Range`), never anything else: an
    /// answer that does not prove it is that range of that version comes back
    /// [`RangeAnswer::Unproven`], unread.
    async fn fetch_range(
        &self,
        url: &Url,
        headers: &[(String, String)],
        range: &RangeFrom,
    ) -> Result<RangeAnswer, JobError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from() -> RangeFrom {
        RangeFrom { offset: 100, end: None, validator: "\"v1\"".into(), total: 1000 }
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

    #[test]
    fn a_bounded_range_is_proven_only_by_exactly_that_range() {
        let range = RangeFrom { end: Some(199), ..from() };
        assert_eq!(range.header(), "bytes=100-199");
        let exact = PartialAnswer { length: Some(100), ..answer(Some((100, 199, Some(1000))), Some("\"v1\"")) };
        assert_eq!(range.continues(&exact), Ok(()));
        let refused = [
            ("to the end", answer(Some((100, 999, Some(1000))), Some("\"v1\""))),
            ("short", answer(Some((100, 198, Some(1000))), Some("\"v1\""))),
            ("other start", answer(Some((0, 199, Some(1000))), Some("\"v1\""))),
            ("other total", answer(Some((100, 199, Some(2000))), Some("\"v1\""))),
            ("unknown total", answer(Some((100, 199, None)), Some("\"v1\""))),
            ("changed", answer(Some((100, 199, Some(1000))), Some("\"v2\""))),
        ];
        for (what, answer) in refused {
            assert!(range.continues(&answer).is_err(), "{what} must not prove the range");
        }
        let wrong_length = PartialAnswer { length: Some(900), ..exact };
        assert!(range.continues(&wrong_length).is_err());
    }
}
