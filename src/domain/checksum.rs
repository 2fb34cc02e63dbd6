use std::fmt;

use super::InvalidValue;

macro_rules! hex_digest {
    ($name:ident, $bytes:literal, $label:literal) => {
        #[doc = concat!("A ", $label, " digest given as hex by a caller; stored lowercase.")]
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
                let ok = raw.len() == $bytes * 2 && raw.bytes().all(|b| b.is_ascii_hexdigit());
                if !ok {
                    return Err(InvalidValue::new(concat!(
                        "must be a ",
                        $label,
                        " digest: ",
                        stringify!($bytes),
                        " bytes as hexadecimal"
                    )));
                }
                Ok(Self(raw.to_ascii_lowercase()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

hex_digest!(Sha256Hex, 32, "SHA-256");
hex_digest!(Md5Hex, 16, "MD5");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_lowercases_hex_digests() {
        let sha = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        assert_eq!(Sha256Hex::parse(sha).unwrap().as_str(), sha.to_lowercase());
        assert!(Md5Hex::parse("d41d8cd98f00b204e9800998ecf8427e").is_ok());
    }

    #[test]
    fn refuses_wrong_length_or_non_hex() {
        assert!(Sha256Hex::parse("d41d8cd98f00b204e9800998ecf8427e").is_err());
        assert!(Md5Hex::parse("").is_err());
        assert!(Md5Hex::parse("z41d8cd98f00b204e9800998ecf8427e").is_err());
        assert!(Md5Hex::parse("d41d8cd98f00b204e9800998ecf8427e0").is_err());
    }
}
