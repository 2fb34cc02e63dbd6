use std::fmt;

use super::InvalidValue;

/// An object key that is valid on S3 and that maps to a path inside its bucket's
/// directory on the local store: it can never name anything outside the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    pub const MAX_LEN: usize = 1024;

    pub fn parse(key: &str) -> Result<Self, InvalidValue> {
        if key.is_empty() {
            return Err(InvalidValue::new("must not be empty"));
        }
        if key.len() > Self::MAX_LEN {
            return Err(InvalidValue::new(format!("must be at most {} bytes, got {}", Self::MAX_LEN, key.len())));
        }
        if key.chars().any(char::is_control) {
            return Err(InvalidValue::new("must not contain control characters"));
        }
        if key.contains('\\') {
            return Err(InvalidValue::new("must not contain backslashes"));
        }
        if key.starts_with('/') {
            return Err(InvalidValue::new("must not start with '/'"));
        }
        for segment in key.split('/') {
            match segment {
                "" if !key.ends_with('/') => {
                    return Err(InvalidValue::new("must not contain empty path segments ('//')"));
                }
                "." | ".." => {
                    return Err(InvalidValue::new("must not contain '.' or '..' path segments"));
                }
                _ => {}
            }
        }
        if key.ends_with('/') {
            return Err(InvalidValue::new("must not end with '/'"));
        }
        Ok(Self(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_nested_keys() {
        for key in ["kitty2.jpg", "photos/2024/cat.jpg", "ünïcødé ☃.txt", "a..b", ".hidden", &"k".repeat(1024)] {
            assert_eq!(ObjectKey::parse(key).unwrap().as_str(), key);
        }
    }

    #[test]
    fn refuses_keys_that_could_leave_the_bucket_or_are_malformed() {
        let too_long = "k".repeat(1025);
        let bad = [
            "",
            too_long.as_str(),
            "../etc/passwd",
            "a/../../b",
            "a/./b",
            "..",
            ".",
            "/absolute",
            "a\\b",
            "..\\windows",
            "a//b",
            "dir/",
            "tab\there",
            "nul\0byte",
            "new\nline",
        ];
        for key in bad {
            assert!(ObjectKey::parse(key).is_err(), "{key:?} was accepted");
        }
    }

    #[test]
    fn counts_bytes_not_characters() {
        // 342 three-byte characters = 1026 bytes.
        assert!(ObjectKey::parse(&"☃".repeat(342)).is_err());
        assert!(ObjectKey::parse(&"☃".repeat(341)).is_ok());
    }
}
