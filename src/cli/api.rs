//! A running fileflow's HTTP API as the command-line client calls it, and how its answers
//! print: shared by the job commands (`client`) and the batch commands (`batch`).

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::Value;
use url::Url;

use crate::config::OutputFormat;

/// A running fileflow's API.
pub struct Client {
    http: reqwest::Client,
    server: Url,
    api_key: Option<crate::secrets::Secret>,
}

impl Client {
    pub fn new(server: Url, api_key: Option<crate::secrets::Secret>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("fileflow-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self { http, server, api_key })
    }

    /// Send a request; a 2xx answer's JSON, or the API's error message as the error.
    pub(super) async fn call(&self, method: Method, path: &str, request: Option<Request>) -> anyhow::Result<Value> {
        let url = self.server.join(path).with_context(|| format!("bad server URL {}", self.server))?;
        let mut builder = self.http.request(method, url);
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        builder = match request {
            Some(Request::Json(body)) => builder.json(&body),
            Some(Request::Tsv(text)) => {
                builder.header(reqwest::header::CONTENT_TYPE, "text/tab-separated-values").body(text)
            }
            // A body of any size: sent as it is read, with no time limit on the whole request.
            Some(Request::Stream { content_type, body }) => builder
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .timeout(Duration::from_secs(24 * 3600))
                .body(body),
            None => builder,
        };
        let response = builder.send().await.with_context(|| format!("cannot reach fileflow at {}", self.server))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        match body["error"]["message"].as_str() {
            Some(message) => {
                bail!("{message} (HTTP {}, {})", status.as_u16(), body["error"]["code"].as_str().unwrap_or(""))
            }
            None => bail!("fileflow answered HTTP {status}"),
        }
    }

    pub async fn submit(&self, body: Value) -> anyhow::Result<String> {
        let answer = self.call(Method::POST, "/api/v1/upload", Some(Request::Json(body))).await?;
        answer["id"].as_str().map(str::to_owned).context("the answer names no job id")
    }

    /// Submit a Storage Transfer URL list (`TsvHttpData-1.0`): one result per line.
    pub async fn submit_list(&self, tsv: String, bucket: &str, prefix: &str) -> anyhow::Result<Vec<Value>> {
        let mut path = Url::parse("http://x/api/v1/uploads/batch").expect("a valid URL");
        path.query_pairs_mut().append_pair("bucket_name", bucket).append_pair("prefix", prefix);
        let answer = self
            .call(Method::POST, &format!("{}?{}", path.path(), path.query().unwrap_or("")), Some(Request::Tsv(tsv)))
            .await?;
        answer["results"].as_array().cloned().context("the answer has no results")
    }

    pub async fn job(&self, id: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, &format!("/api/v1/uploads/{id}"), None).await
    }

    pub async fn jobs(&self, status: Option<&str>, limit: u32, before: Option<&str>) -> anyhow::Result<Value> {
        let mut path = format!("/api/v1/uploads?limit={limit}");
        for (name, value) in [("status", status), ("before", before)] {
            if let Some(value) = value {
                path.push_str(&format!("&{name}={value}"));
            }
        }
        self.call(Method::GET, &path, None).await
    }

    pub async fn retry(&self, id: &str) -> anyhow::Result<Value> {
        self.call(Method::POST, &format!("/api/v1/uploads/{id}/retry"), None).await
    }

    pub async fn cancel(&self, id: &str) -> anyhow::Result<Value> {
        self.call(Method::POST, &format!("/api/v1/uploads/{id}/cancel"), None).await
    }

    pub async fn url(&self, id: &str, expires_in: Option<Duration>) -> anyhow::Result<Value> {
        let query = expires_in.map(|d| format!("?expires_in={}", d.as_secs().max(1))).unwrap_or_default();
        self.call(Method::GET, &format!("/api/v1/uploads/{id}/url{query}"), None).await
    }
}

pub(super) enum Request {
    Json(Value),
    Tsv(String),
    Stream { content_type: &'static str, body: reqwest::Body },
}

/// Bytes for people: `1.5 MiB`.
pub(super) fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

pub(super) fn print_value(
    out: &mut impl Write,
    format: OutputFormat,
    value: &Value,
    table: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(value)?)?,
        OutputFormat::Table => table(out)?,
    }
    Ok(())
}
