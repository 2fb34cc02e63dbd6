//! The distributed layout as separate processes against the real servers: an API and
//! workers sharing one consumer group, killed without warning.

#[path = "support/collector.rs"]
mod collector;

#[path = "support/origin.rs"]
mod origin;

#[path = "support/process.rs"]
mod process;

#[path = "support/services.rs"]
mod services;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use origin::{Origin, content};
use process::start_role;

/// Environment for processes sharing one fresh database, topic set, group and bucket.
struct Stack {
    env: Vec<(&'static str, String)>,
    database_url: String,
    bucket: String,
    s3: services::S3,
}

async fn stack() -> Option<Stack> {
    let database_url = services::fresh_postgres().await?;
    let kafka = services::service("FILEFLOW_TEST_KAFKA")?;
    let s3 = services::s3()?;
    let mut env = s3.env();
    env.extend([
        ("FILEFLOW_DATABASE_URL", database_url.clone()),
        ("FILEFLOW_KAFKA_BROKERS", kafka),
        ("FILEFLOW_KAFKA_TOPIC", services::unique("jobs")),
        ("FILEFLOW_KAFKA_GROUP", services::unique("workers")),
        ("FILEFLOW_KAFKA_PARTITIONS", "4".into()),
        ("FILEFLOW_WORKER_CONCURRENCY", "2".into()),
        ("FILEFLOW_JOB_LEASE", "2s".into()),
    ]);
    Some(Stack { env, database_url, bucket: services::unique("bucket-"), s3 })
}

impl Stack {
    fn with<'a>(&'a self, extra: &[(&'static str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v));
        }
        env
    }

    async fn stored(&self, key: &str) -> Vec<u8> {
        use object_store::ObjectStoreExt;
        let found = self.s3.bucket(&self.bucket).get(&object_store::path::Path::from(key)).await.unwrap();
        found.bytes().await.unwrap().to_vec()
    }
}

#[tokio::test]
async fn two_workers_share_the_group_and_killing_one_loses_nothing() {
    let Some(stack) = stack().await else { return };
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = stack.with(&[]);
    let api = start_role("api", dir.path(), &env).await;
    let mut doomed = start_role("worker", dir.path(), &env).await;
    let survivor = start_role("worker", dir.path(), &env).await;

    let total = 24u64;
    let mut ids = Vec::new();
    for i in 0..total {
        let url = origin.url(&format!("/delay/800/{}?seed={i}", 2000 + i));
        ids.push((i, api.submit_to(&url, &stack.bucket, &format!("job-{i}")).await));
    }
    // Both workers take part before one of them dies mid-run.
    let deadline = Instant::now() + Duration::from_secs(60);
    while doomed.completed_ids().is_empty() || survivor.completed_ids().is_empty() {
        assert!(Instant::now() < deadline, "both workers should get partitions");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    doomed.kill().await;
    let killed_after = doomed.completed_ids();

    api.wait_all_completed(total as usize, Duration::from_secs(120)).await;
    let mut completions: HashMap<String, usize> = HashMap::new();
    for id in killed_after.iter().chain(survivor.completed_ids().iter()) {
        *completions.entry(id.clone()).or_default() += 1;
    }
    for (i, id) in &ids {
        assert_eq!(completions.get(id), Some(&1), "job {id} completed {:?} times", completions.get(id));
        assert!(stack.stored(&format!("job-{i}")).await == content(*i, 2000 + i), "job {id} stored wrong bytes");
    }
    println!(
        "{total} jobs: {} completed by the killed worker before kill -9, {} by the survivor, each exactly once",
        killed_after.len(),
        survivor.completed_ids().len()
    );
}

#[tokio::test]
async fn jobs_accepted_while_kafka_is_unreachable_survive_an_api_crash() {
    let Some(stack) = stack().await else { return };
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();

    // An API whose broker is unreachable commits jobs but cannot publish them.
    let dead_broker = stack.with(&[("FILEFLOW_KAFKA_BROKERS", "127.0.0.1:1")]);
    let mut cut_off = start_role("api", dir.path(), &dead_broker).await;
    let mut ids = Vec::new();
    for i in 0..5u64 {
        ids.push(
            cut_off
                .submit_to(&origin.url(&format!("/file/{}?seed={i}", 100 + i)), &stack.bucket, &format!("o{i}"))
                .await,
        );
    }
    let pool = sqlx::PgPool::connect(&stack.database_url).await.unwrap();
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&pool).await.unwrap();
    assert_eq!(waiting, 5, "accepted jobs wait in the outbox");
    cut_off.kill().await;

    let env = stack.with(&[]);
    let api = start_role("api", dir.path(), &env).await;
    let _worker = start_role("worker", dir.path(), &env).await;
    api.wait_all_completed(5, Duration::from_secs(60)).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0, "the relay empties the outbox");
    for (i, id) in ids.iter().enumerate() {
        let i = i as u64;
        assert!(stack.stored(&format!("o{i}")).await == content(i, 100 + i), "job {id}");
    }
    println!("outbox: 5 jobs accepted with Kafka unreachable, API killed with -9, 5 completed after restart");
}

#[tokio::test]
async fn a_missing_bucket_fails_permanently_unless_bucket_creation_is_on() {
    let Some(stack) = stack().await else { return };
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = stack.with(&[("FILEFLOW_CREATE_BUCKETS", "false")]);
    let app = start_role("serve", dir.path(), &env).await;

    let missing = app.submit_to(&origin.url("/file/100"), &stack.bucket, "nowhere").await;
    // The test Garage starts with the bucket `fileflow-test`.
    let existing = app.submit_to(&origin.url("/file/100?seed=8"), "fileflow-test", &services::unique("k")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (job, done) = loop {
        let (job, done) = (app.job(&missing).await, app.job(&existing).await);
        if job["status"] == "failed" && done["status"] == "completed" {
            break (job, done);
        }
        assert!(Instant::now() < deadline, "{job} / {done}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["retry_count"], 0, "a missing bucket is permanent: {job}");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains("bucket does not exist") && error.contains(&stack.bucket), "{error}");
    assert_eq!(done["size"], 100);
}

/// A message naming no job goes to the DLQ at once, with the reason and its origin.
#[tokio::test]
async fn a_message_for_an_unknown_job_is_dead_lettered() {
    use rdkafka::Message;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(stack) = stack().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let env = stack.with(&[]);
    let _worker = start_role("serve", dir.path(), &env).await;
    let var = |name: &str| stack.env.iter().find(|(k, _)| *k == name).unwrap().1.clone();
    let (brokers, topic) = (var("FILEFLOW_KAFKA_BROKERS"), var("FILEFLOW_KAFKA_TOPIC"));

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let ghost = r#"{"id":"987654","file_url":"http://127.0.0.1:9/x","bucket_name":"file-bucket","object_name":"x"}"#;
    let record = FutureRecord::to(&topic).key("987654").payload(ghost);
    producer.send(record, Duration::from_secs(10)).await.unwrap();

    let dlq: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", services::unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    dlq.subscribe(&[&format!("{topic}-dlq")]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(60), dlq.recv()).await.expect("a dead letter").unwrap();
    let header = |name: &str| {
        message
            .headers()
            .and_then(|h| h.iter().find(|x| x.key == name))
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("fileflow-error").as_deref(), Some("no such job"));
    assert_eq!(header("fileflow-origin-topic"), Some(topic.clone()));
    assert!(String::from_utf8_lossy(message.payload().unwrap()).contains("987654"));
}

#[tokio::test]
async fn a_transfer_cut_by_a_dead_worker_goes_on_in_another_with_the_same_upload() {
    const MIB: u64 = 1024 * 1024;
    let Some(stack) = stack().await else { return };
    let size = 48 * MIB;
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = stack.with(&[]);
    let api = start_role("api", dir.path(), &env).await;
    let mut doomed = start_role("worker", dir.path(), &env).await;
    let url = origin.url(&format!("/resumable/worker-killed/{size}?seed=9&every_ms=40"));
    let id = api.submit_to(&url, &stack.bucket, "resumed.bin").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.job(&id).await["bytes_done"].as_u64().unwrap_or(0) < 24 * MIB {
        assert!(Instant::now() < deadline, "the transfer never got far");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill().await;
    let _next = start_role("worker", dir.path(), &env).await;
    api.wait_all_completed(1, Duration::from_secs(120)).await;
    assert!(stack.stored("resumed.bin").await == content(9, size), "stored bytes differ");
    let ranges = origin.ranges_asked("worker-killed");
    let from: u64 = ranges[1].strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).unwrap().parse().unwrap();
    assert!(from >= 15 * MIB, "went on from {from}: {ranges:?}");
    println!(
        "went on from {} MiB in another worker; origin sent {} MiB for {} MiB",
        from / MIB,
        origin.bytes_sent("worker-killed") / MIB,
        size / MIB
    );
}

#[tokio::test]
async fn an_api_streams_what_a_worker_in_another_process_does_and_workers_serve_metrics() {
    use futures::StreamExt as _;
    let Some(stack) = stack().await else { return };
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = stack.with(&[]);
    let api = start_role("api", dir.path(), &env).await;
    let worker_env = stack.with(&[("FILEFLOW_METRICS_LISTEN", "127.0.0.1:0")]);
    let worker = start_role("worker", dir.path(), &worker_env).await;

    let id = api.submit_to(&origin.url("/slow/4194304?every_ms=20"), &stack.bucket, "streamed.bin").await;
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/api/v1/uploads/{id}/events", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends with the job: {seen}");
    let events: Vec<serde_json::Value> =
        seen.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| serde_json::from_str(d.trim()).unwrap()).collect();
    assert_eq!(events.last().unwrap()["status"], "completed", "{events:?}");
    assert!(
        events.iter().any(|e| e["status"] == "processing" && e["bytes_done"].as_u64().is_some_and(|d| d > 0)),
        "progress the worker reported reached the API through PostgreSQL: {events:?}"
    );

    // The worker has no API; its metrics are on --metrics-listen.
    let addr = worker
        .events
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["message"] == "metrics listening")
        .and_then(|e| e["addr"].as_str().map(str::to_owned))
        .expect("the worker says where its metrics are");
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.lines().any(|l| l == "fileflow_jobs_completed_total 1"), "{text}");
    assert!(text.lines().any(|l| l == "fileflow_bytes_stored_total 4194304"), "{text}");
}

#[tokio::test]
async fn a_requests_trace_reaches_the_worker_through_the_kafka_message() {
    let Some(stack) = stack().await else { return };
    let origin = Origin::start().await;
    let collector = collector::Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = collector.endpoint();
    let env = stack.with(&[("FILEFLOW_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let api = start_role("api", dir.path(), &env).await;
    let worker = start_role("worker", dir.path(), &env).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = serde_json::json!({
        "file_url": origin.url("/file/2000"), "bucket_name": stack.bucket, "object_name": "traced.bin"
    });
    let answer = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/api/v1/upload", api.base))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    assert!(answer.headers().contains_key("x-request-id"));
    let id = answer.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    api.wait_all_completed(1, Duration::from_secs(60)).await;
    let in_trace = |events: &[serde_json::Value], message: &str| {
        events.iter().any(|e| {
            e["message"] == message
                && e["spans"].as_array().is_some_and(|spans| spans.iter().any(|s| s["trace_id"] == trace_id))
        })
    };
    assert!(in_trace(&api.events.lock().unwrap(), "job accepted"), "the API logged the request's trace");
    let worker_events = worker.events.lock().unwrap().clone();
    assert!(in_trace(&worker_events, "job completed"), "the worker logged the job in the same trace");
    assert!(
        worker_events.iter().any(|e| e["message"] == "job completed"
            && e["spans"].as_array().is_some_and(|s| s.iter().any(|s| s["job_id"] == id.as_str()))),
        "with its job id"
    );
    // Both processes export their spans to the collector, joined into the caller's trace.
    let spans = collector
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().any(|s| s.name == "transfer" && s.trace_id == trace_id)
                && spans.iter().any(|s| s.name == "POST /api/v1/upload" && s.trace_id == trace_id)
        })
        .await;
    let request = spans.iter().find(|s| s.name == "POST /api/v1/upload" && s.trace_id == trace_id).unwrap();
    let transfer = spans.iter().find(|s| s.name == "transfer" && s.trace_id == trace_id).unwrap();
    assert_eq!((request.process.as_str(), transfer.process.as_str()), ("api", "worker"));
    assert_eq!(request.parent_span_id, "00f067aa0ba902b7");
    assert_eq!(transfer.parent_span_id, request.span_id, "the worker's span is the request's child");
    assert_eq!(transfer.attribute("job_id"), Some(id.as_str()));
    assert_eq!(transfer.attribute("outcome"), Some("completed"));
}

/// A Kafka reached over TLS (a broker behind a TLS endpoint it advertises): the client
/// settings given as `FILEFLOW_KAFKA_OPTION_*` reach every Kafka client of the API and the
/// worker, and jobs run. Without the certificate authority the API cannot publish: its
/// jobs wait in the outbox.
#[tokio::test]
async fn a_kafka_behind_tls_is_reached_through_the_client_settings() {
    let Some(stack) = stack().await else { return };
    let (Some(brokers), Some(ca)) =
        (services::service("FILEFLOW_TEST_KAFKA_TLS"), services::service("FILEFLOW_TEST_KAFKA_TLS_CA"))
    else {
        return;
    };
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tls = [
        ("FILEFLOW_KAFKA_BROKERS", brokers.as_str()),
        ("FILEFLOW_KAFKA_OPTION_SECURITY_PROTOCOL", "SSL"),
        ("FILEFLOW_KAFKA_OPTION_SSL_CA_LOCATION", ca.as_str()),
    ];
    let env = stack.with(&tls);
    let api = start_role("api", dir.path(), &env).await;
    let _worker = start_role("worker", dir.path(), &env).await;
    for i in 0..3u64 {
        api.submit_to(&origin.url(&format!("/file/{}?seed={i}", 1000 + i)), &stack.bucket, &format!("tls/{i}")).await;
    }
    api.wait_all_completed(3, Duration::from_secs(60)).await;
    drop(api);

    // The system's roots do not know the broker's certificate.
    let untrusted = stack.with(&tls[..2]);
    let api = start_role("api", dir.path(), &untrusted).await;
    let id = api.submit_to(&origin.url("/file/100"), &stack.bucket, "tls/untrusted").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pool = sqlx::PgPool::connect(&stack.database_url).await.unwrap();
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&pool).await.unwrap();
    assert_eq!(waiting, 1, "a job was published to a broker whose certificate is not trusted");
    assert_eq!(api.job(&id).await["status"], "pending");
}

/// SASL settings reach the client: a stand-in broker records what fileflow's Kafka client
/// asks after ApiVersions: the SASL handshake, naming the mechanism asked for. The password
/// is in no log line.
#[tokio::test]
async fn sasl_settings_reach_the_kafka_client_and_the_password_is_not_logged() {
    let Some(stack) = stack().await else { return };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker = listener.local_addr().unwrap().to_string();
    // It answers ApiVersions (saying it speaks SASL) and keeps the next request.
    let first_request = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut socket, _) = listener.accept().await.unwrap();
        loop {
            let length = socket.read_u32().await.unwrap();
            let mut frame = vec![0; length as usize];
            socket.read_exact(&mut frame).await.unwrap();
            if i16::from_be_bytes([frame[0], frame[1]]) != 18 {
                return frame;
            }
            // ApiVersions v3: error 0, [ApiVersions 0-3, SaslHandshake 0-1, SaslAuthenticate 0-2].
            let mut answer = frame[4..8].to_vec();
            answer.extend(0i16.to_be_bytes());
            answer.push(4);
            for (key, min, max) in [(18i16, 0i16, 3i16), (17, 0, 1), (36, 0, 2)] {
                answer.extend(key.to_be_bytes());
                answer.extend(min.to_be_bytes());
                answer.extend(max.to_be_bytes());
                answer.push(0);
            }
            answer.extend(0i32.to_be_bytes());
            answer.push(0);
            socket.write_u32(answer.len() as u32).await.unwrap();
            socket.write_all(&answer).await.unwrap();
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let password = "correct-horse-battery-staple";
    let env =
        stack.with(&[("FILEFLOW_KAFKA_BROKERS", broker.as_str()), ("FILEFLOW_KAFKA_OPTION_SASL_PASSWORD", password)]);
    let api = tokio::process::Command::new(env!("CARGO_BIN_EXE_fileflow"))
        .args(["api", "--kafka-option", "security.protocol=SASL_PLAINTEXT", "--kafka-option", "sasl.mechanism=PLAIN"])
        .args(["--kafka-option", "sasl.username=fileflow"])
        .env("FILEFLOW_LISTEN", "127.0.0.1:0")
        .env("FILEFLOW_DATA_DIR", dir.path())
        .env("FILEFLOW_LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .envs(env)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let frame =
        tokio::time::timeout(Duration::from_secs(20), first_request).await.expect("the client connects").unwrap();
    let api_key = i16::from_be_bytes([frame[0], frame[1]]);
    assert_eq!(api_key, 17, "the request after ApiVersions is SaslHandshake");
    assert!(frame.windows(5).any(|w| w == b"PLAIN"), "it names the mechanism: {frame:?}");
    let mut api = api;
    api.start_kill().unwrap();
    let output = api.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!log.is_empty());
    assert!(!log.contains(password), "the password was logged");
}

/// A setting librdkafka does not know, or one that is fileflow's own, stops the start
/// with a message naming it.
#[tokio::test]
async fn a_bad_kafka_option_is_a_clear_start_up_error() {
    let Some(stack) = stack().await else { return };
    let dir = tempfile::tempdir().unwrap();
    for (option, says) in [
        ("no.such.setting=1", "no.such.setting"),
        ("security.protocol=carrier-pigeon", "security.protocol"),
        ("group.id=mine", "group.id"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_fileflow"))
            .args(["api", "--kafka-option", option])
            .env("FILEFLOW_LISTEN", "127.0.0.1:0")
            .env("FILEFLOW_DATA_DIR", dir.path())
            .envs(stack.with(&[]))
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(30), output).await.expect("it stops").unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{option}: started anyway");
        assert!(stderr.contains(says), "{option}: {stderr}");
    }
}
