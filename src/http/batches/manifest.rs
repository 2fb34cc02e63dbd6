//! Reading a manifest: its format, its lines (streamed, never whole in memory), and each
//! row as an upload body. CSV has a header row of upload field names; JSON Lines has one
//! upload body per line; a `TsvHttpData-1.0` URL list is read as `POST
//! /api/v1/uploads/batch` reads it.

use bytes::{Buf as _, BytesMut};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde_json::{Map, Value, json};

use crate::http::batch::{TSV_HEADER, tsv_item};
use crate::http::error::ApiError;

/// The longest line a manifest may have.
pub const MAX_LINE: usize = 64 * 1024;

/// The fields a CSV header may name.
const CSV_FIELDS: [&str; 9] =
    ["file_url", "bucket_name", "object_name", "sha256", "md5", "size", "if_exists", "priority", "notify_url"];

/// A manifest's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
    Tsv,
}

impl Format {
    /// The format a content type names, if it names one.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "text/csv" | "application/csv" => Some(Self::Csv),
            "application/x-ndjson" | "application/jsonl" | "application/json-lines" | "application/x-jsonlines" => {
                Some(Self::Jsonl)
            }
            "text/tab-separated-values" => Some(Self::Tsv),
            _ => None,
        }
    }

    /// The format a file name's extension names, if it names one.
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        let name = name.split(['?', '#']).next().unwrap_or("");
        if name.ends_with(".csv") {
            Some(Self::Csv)
        } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            Some(Self::Jsonl)
        } else if name.ends_with(".tsv") {
            Some(Self::Tsv)
        } else {
            None
        }
    }

    /// The format a manifest's first line shows.
    pub fn sniff(first_line: &[u8]) -> Self {
        let line = String::from_utf8_lossy(first_line);
        if line.trim() == TSV_HEADER {
            Self::Tsv
        } else if line.trim_start().starts_with('{') {
            Self::Jsonl
        } else {
            Self::Csv
        }
    }
}

/// Lines of a byte stream, one at a time, holding at most one line (and one chunk).
pub struct Lines {
    body: BoxStream<'static, std::io::Result<bytes::Bytes>>,
    buffer: BytesMut,
    ended: bool,
}

/// One line, or one that was too long (its bytes skipped up to its end).
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Text(Vec<u8>),
    TooLong,
}

impl Lines {
    pub fn new(body: BoxStream<'static, std::io::Result<bytes::Bytes>>) -> Self {
        Self { body, buffer: BytesMut::new(), ended: false }
    }

    /// The next line, without its end (`\n` or `\r\n`); `None` at the end.
    pub async fn next(&mut self) -> std::io::Result<Option<Line>> {
        let mut too_long = false;
        loop {
            if let Some(at) = self.buffer.iter().position(|&b| b == b'\n') {
                let mut line = self.buffer.split_to(at + 1).to_vec();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(if too_long || line.len() > MAX_LINE { Line::TooLong } else { Line::Text(line) }));
            }
            if self.buffer.len() > MAX_LINE {
                // Keep none of a line that will be refused anyway.
                too_long = true;
                self.buffer.advance(self.buffer.len());
            }
            if self.ended {
                if self.buffer.is_empty() && !too_long {
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.buffer).to_vec();
                return Ok(Some(if too_long { Line::TooLong } else { Line::Text(line) }));
            }
            match self.body.next().await {
                Some(chunk) => self.buffer.extend_from_slice(&chunk?),
                None => self.ended = true,
            }
        }
    }
}

/// The fields of one CSV line (RFC 4180 quoting within the line).
pub fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '"') if at_start => quoted = true,
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => {
                quoted = false;
                if !matches!(chars.peek(), None | Some(',')) {
                    return Err("text after a closing quote".into());
                }
            }
            (false, ',') => {
                fields.push(std::mem::take(&mut field));
                at_start = true;
                continue;
            }
            (_, c) => field.push(c),
        }
        at_start = false;
    }
    if quoted {
        return Err("a quoted field is not closed on its line".into());
    }
    fields.push(field);
    Ok(fields)
}

/// A CSV header: the field each column fills.
pub fn csv_header(line: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> =
        csv_fields(line.trim_start_matches('\u{feff}'))?.into_iter().map(|n| n.trim().to_owned()).collect();
    for name in &names {
        if !CSV_FIELDS.contains(&name.as_str()) {
            return Err(format!("unknown column {name:?} in the header (columns: {})", CSV_FIELDS.join(", ")));
        }
    }
    if !names.iter().any(|n| n == "file_url") {
        return Err("the header has no file_url column".into());
    }
    Ok(names)
}

/// A row's upload body before the batch's defaults: `Err` says why the row is invalid.
pub fn row_item(
    format: Format,
    header: &[String],
    line: &str,
    defaults: &Defaults,
) -> Result<Map<String, Value>, String> {
    match format {
        Format::Csv => {
            let fields = csv_fields(line)?;
            if fields.len() != header.len() {
                return Err(format!("{} fields where the header names {}", fields.len(), header.len()));
            }
            let mut item = Map::new();
            for (name, value) in header.iter().zip(fields) {
                let value = value.trim();
                if value.is_empty() {
                    continue;
                }
                let value = match name.as_str() {
                    "size" | "priority" => {
                        json!(value.parse::<u64>().map_err(|_| format!("{name}: {value:?} is not a whole number"))?)
                    }
                    _ => json!(value),
                };
                item.insert(name.clone(), value);
            }
            Ok(item)
        }
        Format::Jsonl => match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(item)) => Ok(item),
            Ok(_) => Err("a line must be a JSON object".into()),
            Err(e) => Err(format!("not JSON: {e}")),
        },
        Format::Tsv => {
            let bucket = defaults.bucket_name.as_deref().ok_or("a URL list needs the batch's bucket_name")?;
            // The URL list's own naming already puts the prefix in front.
            return tsv_item(line, bucket, &defaults.prefix)
                .map(|item| defaults.apply_options(item))
                .map_err(|e| reason(&e));
        }
    }
    .map(|item| defaults.apply(item))
}

/// What a batch's rows take when they do not say.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Defaults {
    pub bucket_name: Option<String>,
    /// Put in front of every object name.
    #[serde(default)]
    pub prefix: String,
    pub if_exists: Option<String>,
    pub priority: Option<u32>,
    pub notify_url: Option<String>,
}

impl Defaults {
    /// `item` with the batch's defaults where it has none, and the prefix on its name (a
    /// missing name is the URL's host and path, as for a URL list).
    pub fn apply(&self, mut item: Map<String, Value>) -> Map<String, Value> {
        if let Some(bucket) = &self.bucket_name {
            item.entry("bucket_name").or_insert_with(|| json!(bucket));
        }
        let name = match item.get("object_name").and_then(Value::as_str) {
            Some(name) => Some(name.to_owned()),
            None => item
                .get("file_url")
                .and_then(Value::as_str)
                .and_then(|u| url::Url::parse(u).ok())
                .map(|u| format!("{}{}", u.host_str().unwrap_or(""), u.path())),
        };
        if let Some(name) = name {
            item.insert("object_name".into(), json!(format!("{}{name}", self.prefix)));
        }
        self.apply_options(item)
    }

    /// `item` with the batch's `if_exists`, `priority` and `notify_url` where it has none.
    pub fn apply_options(&self, mut item: Map<String, Value>) -> Map<String, Value> {
        if let Some(v) = &self.if_exists {
            item.entry("if_exists").or_insert_with(|| json!(v));
        }
        if let Some(v) = self.priority {
            item.entry("priority").or_insert_with(|| json!(v));
        }
        if let Some(v) = &self.notify_url {
            item.entry("notify_url").or_insert_with(|| json!(v));
        }
        item
    }
}

/// Why a row is invalid, as the report and the batch view say it: the field, then what is wrong.
pub fn reason(error: &ApiError) -> String {
    let detail = error.body();
    match detail.field {
        Some(field) => format!("{field}: {}", detail.message),
        None => detail.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_split_as_rfc_4180_says_within_a_line() {
        assert_eq!(csv_fields("a,b,,c").unwrap(), ["a", "b", "", "c"]);
        assert_eq!(csv_fields(r#""a,b","say ""hi""",c"#).unwrap(), ["a,b", r#"say "hi""#, "c"]);
        assert!(csv_fields(r#""open"#).is_err());
        assert!(csv_header("file_url,colour").is_err());
        assert!(csv_header("bucket_name,object_name").is_err());
        assert_eq!(csv_header("\u{feff}file_url, object_name").unwrap(), ["file_url", "object_name"]);
    }

    #[test]
    fn rows_take_the_batch_defaults_and_its_prefix() {
        let defaults =
            Defaults { bucket_name: Some("b".into()), prefix: "in/".into(), priority: Some(3), ..Default::default() };
        let header = csv_header("file_url,object_name,size").unwrap();
        let item = row_item(Format::Csv, &header, "https://x.example/a/b.bin,,12", &defaults).unwrap();
        assert_eq!(item["object_name"], "in/x.example/a/b.bin");
        assert_eq!(
            (item["bucket_name"].as_str(), item["size"].as_u64(), item["priority"].as_u64()),
            (Some("b"), Some(12), Some(3))
        );
        let named = row_item(
            Format::Jsonl,
            &[],
            r#"{"file_url":"https://x.example/a","object_name":"k","priority":1}"#,
            &defaults,
        )
        .unwrap();
        assert_eq!((named["object_name"].as_str(), named["priority"].as_u64()), (Some("in/k"), Some(1)));
        assert!(row_item(Format::Csv, &header, "https://x.example/a,k,twelve", &defaults).is_err());
        assert!(row_item(Format::Csv, &header, "https://x.example/a", &defaults).is_err());
        assert!(row_item(Format::Jsonl, &[], "[1]", &defaults).is_err());
        let tsv = row_item(Format::Tsv, &[], "https://x.example/t.txt\t5", &defaults).unwrap();
        assert_eq!(tsv["object_name"], "in/x.example/t.txt");
    }

    #[tokio::test]
    async fn lines_come_one_at_a_time_whatever_the_chunks() {
        let chunks = ["a,b\r", "\nccc", "\n\nlast"].map(|c| Ok(bytes::Bytes::from(c)));
        let mut lines = Lines::new(futures::stream::iter(chunks).boxed());
        let mut seen = Vec::new();
        while let Some(line) = lines.next().await.unwrap() {
            seen.push(line);
        }
        let text = |s: &str| Line::Text(s.as_bytes().to_vec());
        assert_eq!(seen, [text("a,b"), text("ccc"), text(""), text("last")]);
        let long = vec![b'x'; MAX_LINE + 10];
        let chunks = [Ok(bytes::Bytes::from(long)), Ok(bytes::Bytes::from("\nok\n"))];
        let mut lines = Lines::new(futures::stream::iter(chunks).boxed());
        assert_eq!(lines.next().await.unwrap(), Some(Line::TooLong));
        assert_eq!(lines.next().await.unwrap(), Some(text("ok")));
    }
}
