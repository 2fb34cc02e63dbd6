//! The rules the handlers enforce on the fields they take, as the API's description states
//! them (JSON Schema): what the `domain` parsers accept, said as patterns and bounds, so a
//! client generated from the description refuses what the server would refuse. Each is a
//! named schema; handlers' annotations point at it with `value_type`.
//!
//! JSON Schema counts characters where the server counts bytes (object names, URLs): for
//! ASCII the two agree; the descriptions say bytes.

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::{PartialSchema, ToSchema};

/// `BucketName::parse`: 3–63 lowercase letters, digits, dots and hyphens, starting and
/// ending with a letter or digit, no `..`, `.-` or `-.`, not an IPv4 address.
pub const BUCKET_NAME: &str = concat!(
    r"^(?!(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$)",
    r"(?!.*\.\.)(?!.*\.-)(?!.*-\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
);

/// `ObjectKey::parse`: no control characters or backslashes, no leading or trailing `/`,
/// no empty, `.` or `..` segment.
pub const OBJECT_NAME: &str = r"^(?!/)(?!.*//)(?!.*/$)(?!(?:.*/)?\.\.?(?:/|$))[^\x00-\x1f\x7f-\x9f\\]+$";

/// `Sha256Hex::parse` and `Md5Hex::parse`: hex digits of either case.
pub const SHA256_HEX: &str = "^[0-9a-fA-F]{64}$";
pub const MD5_HEX: &str = "^[0-9a-fA-F]{32}$";

/// `Idempotency-Key`: 1 to 255 visible ASCII characters.
pub const IDEMPOTENCY_KEY: &str = "^[!-~]{1,255}$";

/// Header names fileflow sets itself, which `RequestHeaders::parse` refuses (any case).
pub const RESERVED_HEADERS: &[&str] = crate::domain::RequestHeaders::RESERVED;

/// The highest `priority` (a signed 32-bit integer's).
pub const MAX_PRIORITY: i64 = i32::MAX as i64;

fn string(pattern: &str, description: &str) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).pattern(Some(pattern)).description(Some(description))
}

/// Each schema of this module: its name in the description and its schema.
macro_rules! named_schema {
    ($(#[$doc:meta])* $name:ident => $schema:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $schema.into()
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

named_schema!(
    /// A bucket (an S3 bucket, an Azure container, a GCS bucket).
    BucketName => string(BUCKET_NAME, "A bucket name by S3's rules: 3–63 lowercase letters, digits, dots and hyphens, \
        starting and ending with a letter or digit, without `..`, `.-` or `-.`, not an IPv4 address.")
        .min_length(Some(3))
        .max_length(Some(63))
        .examples(["file-bucket"])
);

named_schema!(
    /// An object's key.
    ObjectName => string(OBJECT_NAME, "An object's key: 1–1024 bytes of UTF-8 without control characters or \
        backslashes, not starting or ending with `/`, without empty, `.` or `..` segments. The local store \
        (embedded mode) also keeps each `/`-separated segment as a file name of at most 235 bytes, with the \
        characters a file name cannot hold percent-encoded.")
        .min_length(Some(1))
        .max_length(Some(1024))
        .examples(["photos/2024/cat.jpg"])
);

named_schema!(
    /// A URL fileflow connects to (a source, a manifest, a webhook).
    HttpUrl => string(&http_url_pattern(), "An absolute http or https URL naming a host, without credentials, \
        at most 2048 bytes. Destinations on loopback, private, link-local and other non-public networks \
        (and the names `localhost`, `*.localhost`, `metadata`, `metadata.google.internal`) are refused unless \
        the server runs with --fetch-allow-private, as are those --fetch-deny names. The pattern admits host \
        names only; the server also takes IP literals of public addresses and international names.")
        .format(Some(SchemaFormat::Custom("uri".into())))
        .max_length(Some(2048))
);

named_schema!(
    /// A SHA-256 digest.
    Sha256Hex => string(SHA256_HEX, "A SHA-256 digest: 64 hex digits, either case.")
);

named_schema!(
    /// An MD5 digest.
    Md5Hex => string(MD5_HEX, "An MD5 digest: 32 hex digits, either case.")
);

named_schema!(
    /// A job's priority.
    Priority => ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .maximum(Some(MAX_PRIORITY))
        .description(Some("Among the caller's waiting jobs, higher goes first: 0 to 2147483647 (default 0)."))
);

named_schema!(
    /// The key of an idempotent request.
    IdempotencyKey => string(IDEMPOTENCY_KEY, "1 to 255 visible ASCII characters.")
        .min_length(Some(1))
        .max_length(Some(255))
);

named_schema!(
    /// Headers sent to the origin.
    OriginHeaders => ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("Request headers sent to the origin (and only to it), e.g. `Authorization`: at most \
            32, at most 8 KiB of names and values together; names are HTTP tokens, not one that fileflow sets \
            itself (`Host`, `Content-Length`, `Transfer-Encoding`, `Connection`, `Keep-Alive`, `Upgrade`, `TE`, \
            `Trailer`, `Proxy-Authorization`, `Proxy-Connection`); values hold no control characters but tab."))
        .max_properties(Some(32))
        .property_names(Some(string(&header_name_pattern(), "A header name.")))
        .additional_properties(Some(string(r"^[^\x00-\x08\x0a-\x1f\x7f]*$", "A header value.")))
);

named_schema!(
    /// A Storage Transfer Service URL list.
    UrlList => string(r"^[ \t]*TsvHttpData-1\.0[ \t]*\r?\n[\s\S]*\S", "A `TsvHttpData-1.0` line, then one line \
        per file (1 to 1,000, blank lines aside): `URL[<TAB>size in bytes[<TAB>base64 MD5]]`.")
);

/// `name` (letters, digits, `-` and `.`) matched in any case: JSON Schema's patterns have
/// no flags. (`-` needs no escape outside a class, and ECMA-262's unicode mode refuses one.)
fn any_case(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            c if c.is_ascii_alphabetic() => format!("[{}{}]", c.to_ascii_uppercase(), c),
            '.' => r"\.".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// An HTTP token (RFC 9110) that is none of [`RESERVED_HEADERS`] in any case.
fn header_name_pattern() -> String {
    let reserved: Vec<String> = RESERVED_HEADERS.iter().map(|name| any_case(name)).collect();
    format!(r"^(?!(?:{})$)[!#$%&'*+\-.^_`|~0-9A-Za-z]+$", reserved.join("|"))
}

/// URLs the server accepts, as far as a pattern can say: `SourceUrl::parse` (http or
/// https in any case, a host, no `user:password@`) and the destination guard's checks of a
/// name before it is looked up. Kept to what certainly passes both: a host name of DNS
/// labels whose last starts with a letter (so it is no IPv4 number, which the guard would
/// judge), no `xn--` label (punycode that may not decode), not a refused name; a port up to
/// 65535; then a path, query and fragment of the characters RFC 3986 allows there (the
/// server takes more, and percent-encodes them).
fn http_url_pattern() -> String {
    let label = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
    let last = "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
    let end_of_host = "(?:[:/?#]|$)";
    let localhost = format!("(?!(?:{label}\\.)*{}{end_of_host})", any_case("localhost"));
    let metadata = format!("(?!{}(?:{})?{end_of_host})", any_case("metadata"), any_case(".google.internal"));
    let port = "(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?";
    let punycode = format!("(?!(?:{label}\\.)*[Xx][Nn]--)");
    let pchar = "(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})";
    format!(
        "^{scheme}[Ss]?://{localhost}{metadata}{punycode}(?:{label}\\.)*{last}{port}\
         (?:/{pchar}*)*(?:\\?(?:{pchar}|[/?])*)?(?:#(?:{pchar}|[/?])*)?$",
        scheme = any_case("http"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RequestHeaders;

    #[test]
    fn the_reserved_header_names_are_those_the_parser_refuses() {
        for &name in RESERVED_HEADERS {
            assert!(RequestHeaders::parse([(name, "v")]).is_err(), "{name} is accepted");
            assert!(RequestHeaders::parse([(name.to_uppercase().as_str(), "v")]).is_err(), "{name} is accepted");
        }
        for name in ["authorization", "x-api-key", "cookie", "accept", "user-agent", "hosts", "tea", "if-ranged"] {
            assert!(RequestHeaders::parse([(name, "v")]).is_ok(), "{name} is refused");
        }
        let pattern = header_name_pattern();
        assert!(pattern.starts_with(r"^(?!(?:[Hh][Oo][Ss][Tt]|[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll]"), "{pattern}");
    }
}
