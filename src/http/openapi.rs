//! The API's description: OpenAPI 3.1 generated from the handlers' annotations and the
//! types they answer with, at `/api/v1/openapi.json`, and `/docs`, a page built into the
//! binary that renders it.

use axum::Router;
use axum::extract::State;
use axum::http::header::{CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ApiError;
use super::state::AppState;
use super::{batch, batches, downloads, events, health, uploads};

#[derive(OpenApi)]
#[openapi(
    info(title = "fileflow", description = "Fetch files from URLs into object storage."),
    paths(
        uploads::create_upload,
        uploads::list_uploads,
        uploads::get_upload,
        uploads::download_url,
        uploads::retry_upload,
        uploads::cancel_upload,
        batch::create_batch,
        batches::create_batch,
        batches::upload_batch,
        batches::list_batches,
        batches::get_batch,
        batches::batch_events,
        batches::batch_report,
        batches::cancel_batch,
        batches::pause_batch,
        batches::resume_batch,
        events::job_events,
        events::all_events,
        downloads::download,
        health::healthz,
        health::readyz,
        super::metrics::metrics,
    ),
    // Schemas only headers name (utoipa collects those of bodies and other parameters).
    components(schemas(super::fields::IdempotencyKey)),
    modifiers(&BearerKeys),
    security(("api_key" = [])),
)]
struct ApiDoc;

/// API keys as bearer tokens (`Authorization: Bearer ffk_…`).
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("ffk_<id>_<secret>").build();
        components.add_security_scheme("api_key", SecurityScheme::Http(scheme));
    }
}

/// The description as JSON.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the description serializes");
    doc["info"]["version"] = env!("CARGO_PKG_VERSION").into();
    state_what_annotations_cannot(&mut doc);
    add_the_answers_of_every_route(&mut doc);
    link_the_ids_answers_give(&mut doc);
    doc
}

/// The description as this server serves it: its download links live at most as long as
/// it makes them, and without a webhook secret it takes no `notify_url`.
fn document_for(state: &AppState) -> Value {
    let mut doc = document();
    let parameters = doc["paths"]["/api/v1/uploads/{id}/url"]["get"]["parameters"].as_array_mut();
    for parameter in parameters.into_iter().flatten().filter(|p| p["name"] == "expires_in") {
        parameter["schema"]["maximum"] = uploads::max_link_secs(state).into();
    }
    if !state.webhooks_signed {
        let refused = "webhooks need a signing secret, and this server has none (--webhook-secret)";
        for body in ["UploadRequest", "BatchSubmission"] {
            doc["components"]["schemas"][body]["properties"]["notify_url"] =
                json!({ "type": "null", "description": refused });
        }
        let parameters = doc["paths"]["/api/v1/batches/upload"]["post"]["parameters"].as_array_mut();
        for parameter in parameters.into_iter().flatten().filter(|p| p["name"] == "notify_url") {
            parameter["schema"] = json!({ "not": {} });
            parameter["description"] = refused.into();
        }
    }
    doc
}

/// What utoipa's attributes cannot say: which of a batch's fields go together, the values
/// of fields the API writes as plain strings, an uploaded manifest's body, and an event
/// stream's events.
fn state_what_annotations_cannot(doc: &mut Value) {
    let schemas = &mut doc["components"]["schemas"];
    // `manifest_url` or `manifest`, exactly one of them not null; a URL list needs the
    // batch's `bucket_name`.
    schemas["BatchSubmission"]["allOf"] = json!([
        { "oneOf": [
            { "required": ["manifest_url"],
              "properties": { "manifest_url": { "type": "string" }, "manifest": { "type": "null" } } },
            { "required": ["manifest"],
              "properties": { "manifest": { "type": "object" }, "manifest_url": { "type": "null" } } },
        ] },
        { "anyOf": [
            { "not": { "required": ["format"], "properties": { "format": { "const": "tsv" } } } },
            { "required": ["bucket_name"], "properties": { "bucket_name": { "type": "string" } } },
        ] },
    ]);
    schemas["BatchView"]["properties"]["status"]["enum"] =
        json!(["reading", "running", "paused", "completed", "cancelled"]);
    schemas["JobChange"]["properties"]["status"] = json!({ "$ref": "#/components/schemas/JobStatus" });
    schemas["ErrorDetail"]["properties"]["code"]["enum"] = json!(ApiError::CODES);

    // An uploaded manifest is any bytes: its format comes from `format`, the content type
    // or its first line; an empty one is an empty batch.
    let manifest = &mut doc["paths"]["/api/v1/batches/upload"]["post"]["requestBody"];
    manifest["required"] = false.into();
    let bodies = manifest["content"].as_object_mut().into_iter().flat_map(|bodies| bodies.values_mut());
    bodies.for_each(|body| body["schema"] = json!({}));

    let Some(paths) = doc["paths"].as_object_mut() else { return };
    for operation in paths.values_mut().filter_map(Value::as_object_mut).flat_map(|item| item.values_mut()) {
        // An event stream's schema is that of each event (as OpenAPI 3.2's `itemSchema`
        // says it): its `data` is JSON of the schema the annotation names.
        let streams = operation["responses"].as_object_mut().into_iter().flat_map(|r| r.values_mut());
        let streams = streams.filter_map(|answer| answer.get_mut("content")?.get_mut("text/event-stream"));
        for stream in streams {
            let data = stream["schema"].take();
            stream["schema"] = json!({
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": { "type": "string", "contentMediaType": "application/json", "contentSchema": data },
                    "event": { "type": "string" },
                },
            });
        }
    }
}

/// OpenAPI links: where the id an answer gives can be used next (a client, or a fuzzer's
/// stateful tests, follows them).
fn link_the_ids_answers_give(doc: &mut Value) {
    let job = ["get_upload", "download_url", "retry_upload", "cancel_upload", "job_events"];
    let batch = ["get_batch", "cancel_batch", "pause_batch", "resume_batch"];
    let from: [(&str, &str, &str, &str, &[&str]); 6] = [
        ("/api/v1/upload", "post", "202", "/id", &job),
        ("/api/v1/uploads/batch", "post", "207", "/results/0/id", &job),
        ("/api/v1/uploads/{id}/retry", "post", "202", "/id", &job),
        ("/api/v1/uploads/{id}/cancel", "post", "202", "/id", &job),
        ("/api/v1/batches", "post", "202", "/id", &batch),
        ("/api/v1/batches/upload", "post", "202", "/id", &batch),
    ];
    for (path, method, status, pointer, targets) in from {
        let answer =
            doc["paths"].get_mut(path).and_then(|item| item.get_mut(method)?.get_mut("responses")?.get_mut(status));
        let answer = answer.unwrap_or_else(|| panic!("{method} {path} answers {status}"));
        let id = format!("$response.body#{pointer}");
        for target in targets {
            answer["links"][*target] = json!({ "operationId": target, "parameters": { "id": id } });
        }
        if targets == batch {
            answer["links"]["list_uploads"] = json!({ "operationId": "list_uploads", "parameters": { "batch": id } });
        }
    }
}

/// The answers any route may give besides its own: from the door every `/api/` request but
/// downloads passes (401, 429), the cross-site check of requests that change things (403),
/// the body's reading (400, 413, 415), the Host check (421), the request timeout (408) and
/// internal errors (500). A route that states one itself keeps its own description.
fn add_the_answers_of_every_route(doc: &mut Value) {
    let error = |description: &str| {
        json!({ "description": description,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } } })
    };
    let header =
        |description: &str| json!({ "description": description, "required": true, "schema": { "type": "string" } });
    let Some(paths) = doc["paths"].as_object_mut() else { return };
    for (path, item) in paths {
        let Some(operations) = item.as_object_mut() else { continue };
        for (method, operation) in operations {
            let keyed = operation["security"] != json!([{}]);
            let body = &operation["requestBody"]["content"];
            let (reads_body, reads_json) = (body.is_object(), body.get("application/json").is_some());
            let Some(responses) = operation["responses"].as_object_mut() else { continue };
            let cross_site =
                "a page of another site (its `Origin`, or `Sec-Fetch-Site: cross-site`) may not change anything";
            if method != "get"
                && let Some(own) = responses.get_mut("403")
            {
                let described = own["description"].as_str().unwrap_or_default().to_owned();
                own["description"] = format!("{described}; or {cross_site}").into();
            }
            let mut add = |status: &str, answer: Value| {
                responses.entry(status).or_insert(answer);
            };
            if keyed {
                add(
                    "401",
                    error(
                        "a key is needed (the API is open only on loopback before any key exists), or it is not valid",
                    ),
                );
                add("429", error("over the key's request rate (or, without a valid key, the address's)"));
            }
            if method != "get" {
                add("403", error(cross_site));
            }
            if reads_body {
                add("413", error("the body is larger than the route takes"));
            }
            if reads_json {
                add("400", error("the body is not a JSON object"));
                add("415", error("the body is not `Content-Type: application/json`"));
            }
            add("408", json!({ "description": "the request was not read and answered within --request-timeout" }));
            add("421", error("addressed to a host fileflow is not served under (see --allowed-hosts)"));
            if !matches!(path.as_str(), "/healthz" | "/readyz") {
                add("500", error("an internal error, logged by the server and answered without detail"));
            }
            if let Some(refused) = responses.get_mut("401") {
                refused["headers"]["www-authenticate"] =
                    header("`Bearer realm=\"fileflow\"`, with `error=\"invalid_token\"` for a key that is not valid");
            }
            if let Some(limited) = responses.get_mut("429") {
                limited["headers"]["retry-after"] = header("whole seconds to wait before asking again");
            }
        }
    }
}

const DOCS: &str = include_str!("../../assets/docs.html");

pub fn router() -> Router<AppState> {
    let served = |State(state): State<AppState>| async move { axum::Json(document_for(&state)) };
    Router::new().route("/api/v1/openapi.json", get(served)).route(
        "/docs",
        get(|| async {
            let policy = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'";
            ([(CONTENT_TYPE, "text/html; charset=utf-8"), (CONTENT_SECURITY_POLICY, policy)], DOCS).into_response()
        }),
    )
}
