//! Client settings passed through to librdkafka (`--kafka-option key=value`,
//! `FILEFLOW_KAFKA_OPTION_<KEY>`): TLS, SASL and anything else a managed Kafka asks for.

use std::fmt;

/// Settings fileflow owns: changing them would break how it consumes and commits.
const OWNED: [&str; 6] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "client.id",
];

/// The environment form's prefix: `FILEFLOW_KAFKA_OPTION_SASL_PASSWORD` is `sasl.password`.
pub const ENV_PREFIX: &str = "FILEFLOW_KAFKA_OPTION_";

/// One librdkafka client setting. Its value is never shown when the key names a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaOption {
    pub key: String,
    pub value: String,
}

impl KafkaOption {
    /// `key=value`, as given to `--kafka-option`.
    pub fn parse(text: &str) -> Result<Self, String> {
        // Not echoed: it may be a secret given without its name.
        let (key, value) = text.split_once('=').ok_or("a Kafka option is key=value; one given has no `=`")?;
        Self::new(key.trim(), value)
    }

    fn new(key: &str, value: &str) -> Result<Self, String> {
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_') {
            return Err(format!("`{key}` is not a Kafka client setting's name"));
        }
        if OWNED.contains(&key) {
            return Err(format!(
                "`{key}` is fileflow's own (set the brokers with --kafka-brokers, the group with --kafka-group)"
            ));
        }
        Ok(Self { key: key.to_owned(), value: value.to_owned() })
    }

    /// Whether the value is a secret (a password, a private key, a token).
    pub fn is_secret(&self) -> bool {
        is_secret(&self.key)
    }
}

/// Whether a setting's value is a secret, by its name.
pub fn is_secret(key: &str) -> bool {
    ["password", "secret", ".key", "jaas", "token", "credentials"].iter().any(|word| key.contains(word))
}

impl fmt::Debug for KafkaOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.is_secret() {
            true => write!(f, "{}=<redacted>", self.key),
            false => write!(f, "{}={}", self.key, self.value),
        }
    }
}

/// The options from the environment (`FILEFLOW_KAFKA_OPTION_SECURITY_PROTOCOL=SASL_SSL`:
/// the rest of the name lowercased, `_` read as `.`), in name order, then `flags`
/// (`key=value` each), which win over them. Errors never show a value.
pub fn gather(env: impl IntoIterator<Item = (String, String)>, flags: &[String]) -> Result<Vec<KafkaOption>, String> {
    let mut from_env: Vec<(String, String)> = env
        .into_iter()
        .filter_map(|(name, value)| {
            Some((name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase().replace('_', "."), value))
        })
        .collect();
    from_env.sort();
    let mut options = Vec::new();
    for (key, value) in from_env {
        options.push(KafkaOption::new(&key, &value).map_err(|e| format!("{ENV_PREFIX}…: {e}"))?);
    }
    for flag in flags {
        options.push(KafkaOption::parse(flag).map_err(|e| format!("--kafka-option: {e}"))?);
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_secrets_stay_hidden() {
        let option = KafkaOption::parse("sasl.password=s3=cr;et").unwrap();
        assert_eq!((option.key.as_str(), option.value.as_str()), ("sasl.password", "s3=cr;et"));
        assert_eq!(format!("{option:?}"), "sasl.password=<redacted>");
        assert_eq!(format!("{:?}", KafkaOption::parse("ssl.key.pem=-----BEGIN").unwrap()), "ssl.key.pem=<redacted>");
        let plain = KafkaOption::parse("security.protocol=SASL_SSL").unwrap();
        assert_eq!(format!("{plain:?}"), "security.protocol=SASL_SSL");
        for bad in ["=value", "bad key=1", "group.id=mine", "bootstrap.servers=x:1"] {
            assert!(KafkaOption::parse(bad).is_err(), "{bad}");
        }
        assert!(!KafkaOption::parse("hunter2").unwrap_err().contains("hunter2"));
    }

    #[test]
    fn the_environment_form_is_read_and_flags_win() {
        let env = [
            ("FILEFLOW_KAFKA_OPTION_SECURITY_PROTOCOL", "SASL_SSL"),
            ("FILEFLOW_KAFKA_OPTION_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("FILEFLOW_KAFKA_BROKERS", "ignored:9092"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let flags = ["sasl.mechanism=PLAIN".to_owned()];
        let options = gather(env, &flags).unwrap();
        let pairs: Vec<_> = options.iter().map(|o| (o.key.as_str(), o.value.as_str())).collect();
        assert_eq!(
            pairs,
            [("sasl.mechanism", "SCRAM-SHA-512"), ("security.protocol", "SASL_SSL"), ("sasl.mechanism", "PLAIN")]
        );
        let owned = [("FILEFLOW_KAFKA_OPTION_GROUP_ID".to_owned(), "x".to_owned())];
        assert!(gather(owned, &[]).unwrap_err().contains("group.id"));
        let secret = gather([], &["hunter2".to_owned()]).unwrap_err();
        assert!(secret.starts_with("--kafka-option") && !secret.contains("hunter2"), "{secret}");
    }
}
