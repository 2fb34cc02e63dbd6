use std::fmt;

use super::InvalidValue;

/// Extra headers a caller wants sent to the origin (e.g. `Authorization` for a private
/// origin). They are secrets: never logged (the `Debug` form hides values) and never
/// returned by the API.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RequestHeaders(Vec<(String, String)>);

impl RequestHeaders {
    pub const MAX_COUNT: usize = 32;
    pub const MAX_BYTES: usize = 8 * 1024;

    /// Headers that belong to the connection or the framing, which fileflow controls.
    pub const RESERVED: &'static [&'static str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        // fileflow decides what to ask for: the whole file, its ranges, and whether it changed.
        "range",
        "if-range",
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
    ];

    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, InvalidValue> {
        let mut headers = Vec::new();
        let mut bytes = 0;
        for (name, value) in pairs {
            let header = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| InvalidValue::new(format!("{name:?} is not a valid header name")))?;
            if Self::RESERVED.contains(&header.as_str()) {
                return Err(InvalidValue::new(format!("{name:?} is set by fileflow and cannot be given")));
            }
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                return Err(InvalidValue::new(format!("the value of {name:?} is not a valid header value")));
            }
            bytes += name.len() + value.len();
            headers.push((header.as_str().to_owned(), value.to_owned()));
        }
        if headers.len() > Self::MAX_COUNT {
            return Err(InvalidValue::new(format!("at most {} headers", Self::MAX_COUNT)));
        }
        if bytes > Self::MAX_BYTES {
            return Err(InvalidValue::new(format!("at most {} bytes of headers", Self::MAX_BYTES)));
        }
        Ok(Self(headers))
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stored form (a JSON array of pairs).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("pairs of strings serialize")
    }

    pub fn from_json(text: &str) -> Result<Self, InvalidValue> {
        let pairs: Vec<(String, String)> =
            serde_json::from_str(text).map_err(|e| InvalidValue::new(format!("stored headers are corrupt: {e}")))?;
        Ok(Self(pairs))
    }
}

/// Per-job origin headers as the database keeps them: encrypted with a key kept outside
/// the database (see `secrets::HeaderSealer`), so a copy of the database reveals none.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedHeaders(String);

impl SealedHeaders {
    /// Headers as read back from the database.
    pub fn from_stored(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SealedHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedHeaders(<encrypted>)")
    }
}

impl fmt::Debug for RequestHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(name, _)| format!("{name}: <redacted>"))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_headers_and_hides_their_values() {
        let h = RequestHeaders::parse([("Authorization", "Bearer s3cr3t"), ("X-Api-Key", "k")]).unwrap();
        assert_eq!(h.pairs()[0], ("authorization".to_owned(), "Bearer s3cr3t".to_owned()));
        let shown = format!("{h:?}");
        assert!(!shown.contains("s3cr3t") && shown.contains("authorization"), "{shown}");
        assert_eq!(RequestHeaders::from_json(&h.to_json()).unwrap(), h);
    }

    #[test]
    fn refuses_reserved_or_malformed_headers() {
        for (name, value) in [
            ("Host", "example.com"),
            ("Content-Length", "5"),
            ("Transfer-Encoding", "chunked"),
            ("bad name", "x"),
            ("", "x"),
            ("X-Ok", "line\nbreak"),
        ] {
            assert!(RequestHeaders::parse([(name, value)]).is_err(), "{name}: {value:?}");
        }
        let many: Vec<(String, String)> = (0..33).map(|i| (format!("x-h{i}"), "v".to_owned())).collect();
        assert!(RequestHeaders::parse(many.iter().map(|(a, b)| (a.as_str(), b.as_str()))).is_err());
    }
}
