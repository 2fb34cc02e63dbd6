use std::fmt;

use url::Url;

use super::InvalidValue;

/// The absolute http(s) URL a job fetches from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUrl(Url);

impl SourceUrl {
    pub const MAX_LEN: usize = 2048;

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if raw.len() > Self::MAX_LEN {
            return Err(InvalidValue::new(format!("must be at most {} bytes, got {}", Self::MAX_LEN, raw.len())));
        }
        let url = Url::parse(raw).map_err(|e| InvalidValue::new(format!("is not an absolute URL: {e}")))?;
        Self::from_url(url)
    }

    pub fn from_url(url: Url) -> Result<Self, InvalidValue> {
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(InvalidValue::new(format!("must use http or https, not {other:?}")));
            }
        }
        if url.host().is_none() {
            return Err(InvalidValue::new("must name a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(InvalidValue::new("must not carry credentials (user:password@)"));
        }
        Ok(Self(url))
    }

    pub fn as_url(&self) -> &Url {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_http_and_https() {
        for raw in [
            "https://cdn.pixabay.com/photo/2024/02/28/07/42/european-shorthair-8601492_640.jpg",
            "http://127.0.0.1:9000/file.bin?x=1",
        ] {
            assert_eq!(SourceUrl::parse(raw).unwrap().as_str(), raw);
        }
    }

    #[test]
    fn refuses_other_schemes_relative_urls_credentials_and_long_urls() {
        let long = format!("https://example.com/{}", "a".repeat(2048));
        for raw in [
            "",
            "photo.jpg",
            "/relative/path",
            "ftp://example.com/file",
            "file:///etc/passwd",
            "local://sonny.jpg",
            "gopher://example.com/",
            "https://user:pass@example.com/file",
            "https://user@example.com/file",
            "http://",
            long.as_str(),
        ] {
            assert!(SourceUrl::parse(raw).is_err(), "{raw:?} was accepted");
        }
    }
}
