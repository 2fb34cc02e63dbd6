use std::fmt;
use std::net::Ipv4Addr;

use super::InvalidValue;

/// A bucket name that follows the S3 naming rules, so it is valid on every store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketName(String);

impl BucketName {
    pub fn parse(name: &str) -> Result<Self, InvalidValue> {
        let len = name.len();
        if !(3..=63).contains(&len) {
            return Err(InvalidValue::new(format!("must be 3 to 63 characters long, got {len}")));
        }
        if let Some(c) =
            name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '.' || *c == '-'))
        {
            return Err(InvalidValue::new(format!(
                "may contain only lowercase letters, digits, dots and hyphens, found {c:?}"
            )));
        }
        let bytes = name.as_bytes();
        if !bytes[0].is_ascii_alphanumeric() || !bytes[len - 1].is_ascii_alphanumeric() {
            return Err(InvalidValue::new("must start and end with a letter or digit"));
        }
        if name.contains("..") {
            return Err(InvalidValue::new("must not contain two adjacent dots"));
        }
        if name.contains(".-") || name.contains("-.") {
            return Err(InvalidValue::new("must not contain a dot next to a hyphen"));
        }
        if name.parse::<Ipv4Addr>().is_ok() {
            return Err(InvalidValue::new("must not be formatted as an IP address"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BucketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_seeds_bucket_and_other_valid_names() {
        for name in ["file-bucket", "abc", "my.bucket.2024", "a1b", &"a".repeat(63)] {
            assert_eq!(BucketName::parse(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn refuses_names_outside_the_s3_rules() {
        let bad = [
            "",
            "ab",
            &"a".repeat(64),
            "File-Bucket",
            "file_bucket",
            "-bucket",
            "bucket-",
            ".bucket",
            "bucket.",
            "my..bucket",
            "my.-bucket",
            "my-.bucket",
            "192.168.5.4",
            "bucket/key",
            "bück",
            "has space",
        ];
        for name in bad {
            assert!(BucketName::parse(name).is_err(), "{name:?} was accepted");
        }
    }
}
