//! The API's description: every route is in it, and the answers the suite gets validate
//! against the schemas it names.

use serde_json::{Value, json};

use crate::helpers::{Origin, TestApp, spawn_app};

/// Check `value` against `schema` (the subset of JSON Schema the description uses: `$ref`,
/// `type` (also as a list), `properties`, `required`, `items`, `oneOf`/`anyOf`, `enum`,
/// `additionalProperties`); returns what does not match.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.rsplit('/').next().unwrap();
        return check(doc, &doc["components"]["schemas"][name], value, at, problems);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema[key].as_array() {
            let fits = options.iter().filter(|option| {
                let mut inner = Vec::new();
                check(doc, option, value, at, &mut inner);
                inner.is_empty()
            });
            if fits.count() == 0 {
                problems.push(format!("{at}: {value} fits none of {key} {options:?}"));
            }
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} not in {allowed:?}"));
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if !types.is_empty() && !types.iter().any(|t| *t == kind || (*t == "number" && kind == "integer")) {
        problems.push(format!("{at}: {kind} where the description says {types:?}"));
        return;
    }
    if let Value::Object(fields) = value {
        let properties = schema["properties"].as_object().cloned().unwrap_or_default();
        for required in schema["required"].as_array().into_iter().flatten() {
            if !fields.contains_key(required.as_str().unwrap()) {
                problems.push(format!("{at}: missing required {required}"));
            }
        }
        for (name, field) in fields {
            match properties.get(name) {
                Some(property) => check(doc, property, field, &format!("{at}.{name}"), problems),
                None if schema["additionalProperties"] == json!(false) || !properties.is_empty() => {
                    problems.push(format!("{at}: {name} is not in the description"))
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (value, schema.get("items")) {
        for (i, element) in items.iter().enumerate() {
            check(doc, item, element, &format!("{at}[{i}]"), problems);
        }
    }
}

/// Validate an answer against the description of `method path` for its status.
fn validate(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let response = &doc["paths"][path][method]["responses"][status.to_string()];
    assert!(response.is_object(), "{method} {path} answers {status}, which the description does not list");
    let schema = &response["content"]["application/json"]["schema"];
    let mut problems = Vec::new();
    check(doc, schema, body, &format!("{method} {path} {status}"), &mut problems);
    assert!(problems.is_empty(), "{problems:#?}\n{body:#}");
}

async fn call(app: &TestApp, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value) {
    let (status, _, answer) = app.call(method, path, None, body).await;
    (status, answer)
}

#[tokio::test]
async fn every_route_is_described_and_answers_fit_the_description() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let (status, doc) = call(&app, reqwest::Method::GET, "/api/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    for (method, path) in [
        ("post", "/api/v1/upload"),
        ("get", "/api/v1/uploads"),
        ("get", "/api/v1/uploads/{id}"),
        ("get", "/api/v1/uploads/{id}/url"),
        ("post", "/api/v1/uploads/{id}/retry"),
        ("post", "/api/v1/uploads/{id}/cancel"),
        ("post", "/api/v1/uploads/batch"),
        ("get", "/api/v1/uploads/{id}/events"),
        ("get", "/api/v1/events"),
        ("get", "/api/v1/downloads/{id}"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("post", "/api/v1/batches"),
        ("post", "/api/v1/batches/upload"),
        ("get", "/api/v1/batches"),
        ("get", "/api/v1/batches/{id}"),
        ("get", "/api/v1/batches/{id}/events"),
        ("get", "/api/v1/batches/{id}/report"),
        ("post", "/api/v1/batches/{id}/cancel"),
        ("post", "/api/v1/batches/{id}/pause"),
        ("post", "/api/v1/batches/{id}/resume"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} is not described");
    }
    let described: usize = doc["paths"].as_object().unwrap().values().map(|item| item.as_object().unwrap().len()).sum();
    assert_eq!(described, 22, "the description lists exactly the API's routes");

    // The answers of a job's life, and of refusals, fit their schemas.
    let upload = json!({ "file_url": origin.url("/file/3000"), "bucket_name": app.bucket, "object_name": "doc.bin" });
    let (status, accepted) = call(&app, reqwest::Method::POST, "/api/v1/upload", Some(&upload)).await;
    validate(&doc, "post", "/api/v1/upload", status, &accepted);
    let id = accepted["id"].as_str().unwrap().to_owned();
    app.finished(&id).await;
    let (status, job) = call(&app, reqwest::Method::GET, &format!("/api/v1/uploads/{id}"), None).await;
    validate(&doc, "get", "/api/v1/uploads/{id}", status, &job);
    let (status, list) = call(&app, reqwest::Method::GET, "/api/v1/uploads?limit=1", None).await;
    validate(&doc, "get", "/api/v1/uploads", status, &list);
    let (status, link) = call(&app, reqwest::Method::GET, &format!("/api/v1/uploads/{id}/url"), None).await;
    validate(&doc, "get", "/api/v1/uploads/{id}/url", status, &link);
    let (status, refused) = call(&app, reqwest::Method::POST, &format!("/api/v1/uploads/{id}/retry"), None).await;
    validate(&doc, "post", "/api/v1/uploads/{id}/retry", status, &refused);
    let (status, missing) = call(&app, reqwest::Method::GET, "/api/v1/uploads/999999", None).await;
    validate(&doc, "get", "/api/v1/uploads/{id}", status, &missing);
    let bad = json!({ "file_url": "ftp://x", "bucket_name": app.bucket, "object_name": "k" });
    let (status, invalid) = call(&app, reqwest::Method::POST, "/api/v1/upload", Some(&bad)).await;
    validate(&doc, "post", "/api/v1/upload", status, &invalid);
    let batch = json!({ "items": [upload, bad] });
    let (status, results) = call(&app, reqwest::Method::POST, "/api/v1/uploads/batch", Some(&batch)).await;
    validate(&doc, "post", "/api/v1/uploads/batch", status, &results);
    let manifest =
        origin.serve_manifest("doc.csv", "text/csv", format!("file_url\n{}\nftp://x\n", origin.url("/file/10")));
    let report = json!({ "bucket_name": app.bucket, "object_name": "doc-report.csv" });
    let submitted = json!({ "manifest_url": manifest, "bucket_name": app.bucket, "report": report });
    let (status, created) = call(&app, reqwest::Method::POST, "/api/v1/batches", Some(&submitted)).await;
    validate(&doc, "post", "/api/v1/batches", status, &created);
    let batch_path = format!("/api/v1/batches/{}", created["id"].as_str().unwrap());
    let ended = loop {
        let (status, view) = call(&app, reqwest::Method::GET, &batch_path, None).await;
        if !view["ended_at"].is_null() {
            break (status, view);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    validate(&doc, "get", "/api/v1/batches/{id}", ended.0, &ended.1);
    let (status, batches) = call(&app, reqwest::Method::GET, "/api/v1/batches", None).await;
    validate(&doc, "get", "/api/v1/batches", status, &batches);
    let (status, refused) = call(&app, reqwest::Method::POST, &format!("{batch_path}/pause"), None).await;
    validate(&doc, "post", "/api/v1/batches/{id}/pause", status, &refused);

    // The check can fail: a job with a number for an id and no status does not fit.
    let schema =
        &doc["paths"]["/api/v1/uploads/{id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"];
    assert!(schema["$ref"].is_string(), "{schema}");
    let mut problems = Vec::new();
    let mut wrong = job.clone();
    wrong["id"] = json!(1);
    wrong.as_object_mut().unwrap().remove("status");
    check(&doc, schema, &wrong, "wrong", &mut problems);
    assert_eq!(problems.len(), 2, "{problems:?}");

    // /docs renders it from the binary's own page.
    let page = app.client.get(app.url("/docs")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("/api/v1/openapi.json") && !page.contains("https://"), "no page from elsewhere");
    app.stop().await;
}

/// The schema of the parameter `name` of `method path`.
fn parameter<'a>(doc: &'a Value, method: &str, path: &str, name: &str) -> &'a Value {
    let parameters = doc["paths"][path][method]["parameters"].as_array().unwrap();
    &parameters.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{method} {path}: no {name}"))["schema"]
}

#[tokio::test]
async fn the_description_states_the_rules_the_server_enforces_at_their_bounds() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let (_, doc) = call(&app, reqwest::Method::GET, "/api/v1/openapi.json", None).await;
    let schemas = &doc["components"]["schemas"];

    // The rules are in the description.
    for (method, path) in [("get", "/api/v1/uploads"), ("get", "/api/v1/batches")] {
        let limit = parameter(&doc, method, path, "limit");
        assert_eq!((&limit["minimum"], &limit["maximum"]), (&json!(1), &json!(1000)), "{path}");
    }
    let expires_in = parameter(&doc, "get", "/api/v1/uploads/{id}/url", "expires_in");
    assert_eq!((&expires_in["minimum"], &expires_in["maximum"]), (&json!(1), &json!(604800)));
    assert_eq!(schemas["Sha256Hex"]["pattern"], "^[0-9a-fA-F]{64}$");
    assert_eq!(schemas["Md5Hex"]["pattern"], "^[0-9a-fA-F]{32}$");
    assert_eq!((&schemas["BucketName"]["minLength"], &schemas["BucketName"]["maxLength"]), (&json!(3), &json!(63)));
    assert_eq!((&schemas["ObjectName"]["minLength"], &schemas["ObjectName"]["maxLength"]), (&json!(1), &json!(1024)));
    assert_eq!((&schemas["HttpUrl"]["format"], &schemas["HttpUrl"]["maxLength"]), (&json!("uri"), &json!(2048)));
    assert_eq!((&schemas["Priority"]["minimum"], &schemas["Priority"]["maximum"]), (&json!(0), &json!(2147483647)));
    let upload = &schemas["UploadRequest"];
    for field in ["file_url", "bucket_name", "object_name"] {
        assert!(upload["required"].as_array().unwrap().contains(&json!(field)), "{field} is required");
        assert!(upload["properties"][field]["$ref"].is_string(), "{field} is a non-null string of its own schema");
    }
    assert_eq!(schemas["BatchItems"]["properties"]["items"]["maxItems"], 1000);
    assert_eq!(schemas["JobStatus"]["enum"], json!(["pending", "processing", "completed", "failed", "cancelled"]));
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let answers = operation["responses"].as_object().unwrap();
            let keyed = operation["security"] != json!([{}]);
            for status in ["401", "429"].into_iter().filter(|_| keyed).chain(["421"]) {
                assert!(answers.contains_key(status), "{method} {path} does not list {status}");
            }
        }
    }
    assert!(doc["paths"]["/api/v1/uploads/{id}/url"]["get"]["responses"]["422"].is_object());

    // Just outside a bound is refused with a status the description lists; just inside is taken.
    let upload = |changes: Value| {
        let mut body =
            json!({ "file_url": origin.url("/file/100"), "bucket_name": app.bucket, "object_name": "bounds.bin" });
        body.as_object_mut().unwrap().extend(changes.as_object().unwrap().clone());
        body
    };
    let sha256 = "AB".repeat(32);
    for (changes, expected) in [
        (json!({ "priority": 2147483647 }), 202),
        (json!({ "priority": 2147483648_u64 }), 422),
        (json!({ "priority": 7.0 }), 202),
        (json!({ "sha256": sha256 }), 202),
        (json!({ "sha256": &sha256[1..] }), 422),
        (json!({ "md5": "g".repeat(32) }), 422),
        (json!({ "bucket_name": "ab" }), 422),
        (json!({ "object_name": "k".repeat(1025) }), 422),
        (json!({ "object_name": "a/../b" }), 422),
        (json!({ "size": 9223372036854775807_u64 }), 202),
        (json!({ "size": 9223372036854775808_u64 }), 422),
        (json!({ "file_url": null }), 422),
        (json!({ "file_url": "ftp://example.com/x" }), 422),
        (json!({ "headers": { "Content-Length": "1" } }), 422),
        (json!({ "headers": { "X-Token": "1" } }), 202),
    ] {
        let (status, answer) =
            call(&app, reqwest::Method::POST, "/api/v1/upload", Some(&upload(changes.clone()))).await;
        assert_eq!(status, expected, "{changes}: {answer}");
        validate(&doc, "post", "/api/v1/upload", status, &answer);
    }
    for (query, expected) in [("limit=0", 422), ("limit=1", 200), ("limit=1000", 200), ("limit=1001", 422)] {
        for path in ["/api/v1/uploads", "/api/v1/batches"] {
            let (status, answer) = call(&app, reqwest::Method::GET, &format!("{path}?{query}"), None).await;
            assert_eq!(status, expected, "{path}?{query}: {answer}");
            validate(&doc, "get", path, status, &answer);
        }
    }
    let body = upload(json!({}));
    let (_, accepted) = call(&app, reqwest::Method::POST, "/api/v1/upload", Some(&body)).await;
    let id = accepted["id"].as_str().unwrap().to_owned();
    assert_eq!(app.finished(&id).await["status"], "completed");
    for (expires_in, expected) in [(0, 422), (1, 200), (604800, 200), (604801, 422)] {
        let path = format!("/api/v1/uploads/{id}/url?expires_in={expires_in}");
        let (status, answer) = call(&app, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, expected, "expires_in={expires_in}: {answer}");
        validate(&doc, "get", "/api/v1/uploads/{id}/url", status, &answer);
    }
    let empty = json!({ "items": [] });
    let (status, answer) = call(&app, reqwest::Method::POST, "/api/v1/uploads/batch", Some(&empty)).await;
    assert_eq!(status, 422, "{answer}");
    validate(&doc, "post", "/api/v1/uploads/batch", status, &answer);
    app.stop().await;
}
