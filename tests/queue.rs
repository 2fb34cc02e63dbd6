//! One conformance suite for the queue, run against the embedded queue (fed by SQLite) and
//! Kafka (fed by the PostgreSQL outbox through the relay).

#[path = "support/services.rs"]
mod services;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use fileflow::domain::{BucketName, ObjectKey, SourceUrl};
use fileflow::lifecycle::{Cause, Grant, JobId, NewJob, Settlement, StoredObject};
use fileflow::metadata::{Claim, JobRepository, Lease, PgDb, PgRepository, SqliteDb, SqliteRepository};
use fileflow::queue::kafka::{KafkaBacklog, KafkaQueue, KafkaSettings, ensure_topics};
use fileflow::queue::{Backlog, Delivery, EmbeddedQueue, Queue};
use fileflow::relay::OutboxRelay;

/// A queue and a way to put jobs on it the way the API does.
struct Backend {
    repo: Arc<dyn JobRepository>,
    queue: Arc<dyn Queue>,
    relay: Option<Arc<OutboxRelay>>,
    /// Opens another consumer of the same queue (a restarted worker).
    reopen: Box<dyn Fn() -> Arc<dyn Queue> + Send + Sync>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    async fn create(&self, key: &str) -> JobId {
        let job = NewJob {
            source: SourceUrl::parse("https://example.com/x").unwrap(),
            bucket: BucketName::parse("file-bucket").unwrap(),
            key: ObjectKey::parse(key).unwrap(),
            expected_sha256: None,
            expected_md5: None,
            expected_size: None,
            if_exists: Default::default(),
            priority: 0,
            notify_url: None,
            headers: None,
            grant: Grant::open(),
            traceparent: None,
            batch: None,
        };
        let id = self.repo.create(&job, Utc::now()).await.unwrap().id;
        if let Some(relay) = &self.relay {
            assert_eq!(relay.run_once(200).await.unwrap(), 1);
        }
        id
    }
}

async fn receive(queue: &Arc<dyn Queue>, within: Duration) -> Option<Delivery> {
    tokio::time::timeout(within, queue.receive()).await.ok().map(|d| d.unwrap())
}

async fn embedded() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::connect(&SqliteDb::default_url(dir.path())).await.unwrap();
    db.migrate().await.unwrap();
    let lock = Duration::from_secs(1);
    let queue: Arc<dyn Queue> = Arc::new(EmbeddedQueue::new(db.clone(), lock, "a"));
    let again = db.clone();
    Backend {
        repo: Arc::new(SqliteRepository::new(db)),
        queue,
        relay: None,
        reopen: Box::new(move || Arc::new(EmbeddedQueue::new(again.clone(), lock, "b"))),
        _dir: Some(dir),
    }
}

async fn kafka() -> Option<Backend> {
    Some(kafka_with_settings().await?.0)
}

async fn kafka_with_settings() -> Option<(Backend, KafkaSettings)> {
    let url = services::fresh_postgres().await?;
    let brokers = services::service("FILEFLOW_TEST_KAFKA")?;
    let db = PgDb::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let settings = KafkaSettings {
        brokers,
        topic: services::unique("jobs"),
        group: services::unique("workers"),
        partitions: 2,
        replication_factor: 0,
        max_poll_interval: Duration::from_secs(60),
        options: Vec::new(),
    };
    ensure_topics(&settings).await.unwrap();
    let queue: Arc<dyn Queue> = KafkaQueue::start(&settings, 4).unwrap();
    let relay = Arc::new(OutboxRelay::new(db.clone(), &settings, 0).unwrap());
    let reopen = settings.clone();
    let backend = Backend {
        repo: Arc::new(PgRepository::new(db)),
        queue,
        relay: Some(relay),
        reopen: Box::new(move || KafkaQueue::start(&reopen, 4).unwrap()),
        _dir: None,
    };
    Some((backend, settings))
}

/// Time for a consumer to join its group and get partitions (Kafka).
const FIRST: Duration = Duration::from_secs(30);

async fn an_acknowledged_job_is_delivered_once(b: Backend) {
    let id = b.create("once").await;
    let delivery = receive(&b.queue, FIRST).await.expect("the job is delivered");
    assert_eq!((delivery.job_id, delivery.attempt), (id, 1));
    b.queue.ack(&delivery).await.unwrap();
    assert_eq!(receive(&b.queue, Duration::from_secs(2)).await, None, "an acknowledged job comes back");
}

async fn a_retry_waits_until_due_without_holding_up_other_jobs(b: Backend) {
    let first = b.create("first").await;
    let delivery = receive(&b.queue, FIRST).await.unwrap();
    assert_eq!(delivery.job_id, first);
    let due = Utc::now() + chrono::Duration::seconds(3);
    b.queue.retry(&delivery, 2, due).await.unwrap();

    let second = b.create("second").await;
    let started = Instant::now();
    let next = receive(&b.queue, Duration::from_secs(2)).await.expect("other work is not held up");
    assert_eq!(next.job_id, second);
    assert!(started.elapsed() < Duration::from_secs(2));
    b.queue.ack(&next).await.unwrap();

    let retried = receive(&b.queue, Duration::from_secs(10)).await.expect("the retry comes when due");
    assert_eq!((retried.job_id, retried.attempt), (first, 2));
    assert!(Utc::now() >= due, "delivered {} ms early", (due - Utc::now()).num_milliseconds());
    b.queue.ack(&retried).await.unwrap();
}

async fn an_unacknowledged_job_is_delivered_again_to_the_next_consumer(b: Backend) {
    let id = b.create("crashy").await;
    let delivery = receive(&b.queue, FIRST).await.unwrap();
    assert_eq!(delivery.job_id, id);
    // The consumer "crashes": no ack. Another consumer of the same queue gets the job.
    drop(b.queue);
    let next = (b.reopen)();
    let again = receive(&next, FIRST).await.expect("the unacknowledged job comes back");
    assert_eq!(again.job_id, id);
    next.ack(&again).await.unwrap();
}

/// What was acknowledged stays acknowledged after the consumer closes (Kafka: its offsets
/// were committed); what was received and not acknowledged goes to the next consumer.
async fn acknowledgements_outlive_the_consumer(b: Backend) {
    let done = b.create("committed").await;
    let delivery = receive(&b.queue, FIRST).await.expect("the job is delivered");
    assert_eq!(delivery.job_id, done);
    b.queue.ack(&delivery).await.unwrap();
    let open = b.create("still-open").await;
    let pending = receive(&b.queue, Duration::from_secs(10)).await.expect("the second job is delivered");
    assert_eq!(pending.job_id, open);
    b.queue.close(Duration::from_secs(10)).await;
    drop(b.queue);
    let next = (b.reopen)();
    let again = receive(&next, FIRST).await.expect("the unacknowledged job comes back");
    assert_eq!(again.job_id, open, "only the unacknowledged job comes back");
    next.ack(&again).await.unwrap();
    assert_eq!(receive(&next, Duration::from_secs(3)).await, None, "an acknowledged job came back");
}

async fn released_and_dead_lettered_jobs(b: Backend) {
    let id = b.create("released").await;
    let delivery = receive(&b.queue, FIRST).await.unwrap();
    b.queue.release(&delivery).await.unwrap();
    let again = receive(&b.queue, Duration::from_secs(10)).await.expect("a released job comes back at once");
    assert_eq!((again.job_id, again.attempt), (id, 1));
    b.queue.dead_letter(&again, "gave up").await.unwrap();
    assert_eq!(receive(&b.queue, Duration::from_secs(2)).await, None, "a dead letter is not delivered again");
}

async fn several_due_jobs_are_taken_at_once(b: Backend) {
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(b.create(&format!("many/{i}")).await);
    }
    let mut taken: Vec<Delivery> = Vec::new();
    let deadline = Instant::now() + FIRST;
    while taken.len() < ids.len() && Instant::now() < deadline {
        let asked = 3.min(ids.len() - taken.len());
        let batch = tokio::time::timeout(FIRST, b.queue.receive_many(asked)).await.expect("jobs are due").unwrap();
        assert!(!batch.is_empty() && batch.len() <= asked, "asked for {asked}, got {}", batch.len());
        taken.extend(batch);
    }
    let mut got: Vec<_> = taken.iter().map(|d| (d.job_id, d.attempt)).collect();
    got.sort();
    assert_eq!(got, ids.iter().map(|&id| (id, 1)).collect::<Vec<_>>(), "each job once");
    let tokens: std::collections::HashSet<_> = taken.iter().map(|d| d.token.clone()).collect();
    assert_eq!(tokens.len(), taken.len(), "every delivery has its own token");
    // Each delivery is acknowledged on its own token.
    for delivery in &taken {
        b.queue.ack(delivery).await.unwrap();
    }
    assert_eq!(receive(&b.queue, Duration::from_secs(2)).await, None, "an acknowledged job came back");
}

macro_rules! conformance {
    ($($name:ident),*) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::embedded().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kafka() {
                if let Some(backend) = super::kafka().await {
                    super::$name(backend).await;
                }
            }
        }
    )*};
}

conformance!(
    an_acknowledged_job_is_delivered_once,
    acknowledgements_outlive_the_consumer,
    a_retry_waits_until_due_without_holding_up_other_jobs,
    an_unacknowledged_job_is_delivered_again_to_the_next_consumer,
    released_and_dead_lettered_jobs,
    several_due_jobs_are_taken_at_once
);

/// Embedded only: acknowledgements sent at once are each applied, and one whose lock token
/// no longer holds deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_acknowledgements_sent_together() {
    let b = embedded().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(b.create(&format!("together/{i}")).await);
    }
    // All due, so the embedded queue hands over as many as asked for in one go.
    let mut deliveries = Vec::new();
    while deliveries.len() < ids.len() {
        let asked = 8.min(ids.len() - deliveries.len());
        let batch = b.queue.receive_many(asked).await.unwrap();
        assert_eq!(batch.len(), asked);
        deliveries.extend(batch);
    }
    // One delivery is handed back first: its token is stale when the acks go out.
    let stale = deliveries.pop().unwrap();
    b.queue.release(&stale).await.unwrap();
    let acks: Vec<_> = deliveries
        .into_iter()
        .chain([stale.clone()])
        .map(|delivery| {
            let queue = b.queue.clone();
            tokio::spawn(async move { queue.ack(&delivery).await.unwrap() })
        })
        .collect();
    for ack in acks {
        ack.await.unwrap();
    }
    let again = receive(&b.queue, Duration::from_secs(2)).await.expect("the released job is still queued");
    assert_eq!(again.job_id, stale.job_id);
    b.queue.ack(&again).await.unwrap();
    assert_eq!(receive(&b.queue, Duration::from_secs(2)).await, None, "an acknowledged job came back");
}

/// Embedded only: recording a job's final outcome removes its message in the same write,
/// so a worker that stops right after (no acknowledgement) does not get it again; a
/// scheduled retry keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_final_outcomes_remove_their_messages() {
    let b = embedded().await;
    let stored = StoredObject {
        etag: "e".into(),
        size: 1,
        sha256: Some("s".into()),
        md5: Some("m".into()),
        content_type: Some("text/plain".into()),
        version: None,
        crc64nvme: None,
        origin: Default::default(),
        not_modified: false,
    };
    let outcomes = [
        Settlement::Completed(stored),
        Settlement::Failed { last_error: "HTTP 404".into(), cause: Cause::OriginStatus },
        Settlement::RetryScheduled { retry_count: 1, last_error: "HTTP 503".into(), due_at: Utc::now() },
    ];
    let mut ids = Vec::new();
    for (i, outcome) in outcomes.iter().enumerate() {
        let id = b.create(&format!("outcome/{i}")).await;
        let delivery = receive(&b.queue, FIRST).await.unwrap();
        assert_eq!(delivery.job_id, id);
        let lease = Lease { owner: delivery.token.clone(), length: Duration::from_secs(1) };
        assert!(matches!(b.repo.claim(id, &lease).await.unwrap(), Claim::Claimed(_)));
        assert!(b.repo.settle(id, &delivery.token, outcome, Utc::now()).await.unwrap());
        ids.push(id);
    }
    // Locks last a second: only the retried job's message is left to come back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = receive(&b.queue, Duration::from_secs(3)).await.expect("the retried job comes back");
    assert_eq!(again.job_id, ids[2]);
    b.queue.ack(&again).await.unwrap();
    assert_eq!(receive(&b.queue, Duration::from_secs(2)).await, None, "a finished job was delivered again");
}

/// Kafka only: the backlog the reconciler asks about is the jobs topic past the group's
/// committed offsets: none on an empty topic, some once a job is published and not yet
/// consumed, none again once its offset is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_backlog_is_what_the_group_has_not_consumed() {
    let Some((b, settings)) = kafka_with_settings().await else { return };
    let backlog = KafkaBacklog::new(&settings).unwrap();
    assert_eq!(backlog.lag().await.unwrap(), 0, "an empty topic holds no backlog");
    let id = b.create("lagging").await;
    assert_eq!(backlog.lag().await.unwrap(), 1, "a published job not yet consumed is a backlog");
    let delivery = receive(&b.queue, FIRST).await.expect("the job is delivered");
    assert_eq!(delivery.job_id, id);
    b.queue.ack(&delivery).await.unwrap();
    b.queue.close(Duration::from_secs(10)).await;
    assert_eq!(backlog.lag().await.unwrap(), 0, "consumed and committed: no backlog");
}

/// Kafka only: what cannot be worked on goes to the DLQ at once, with the reason and the
/// message's origin in headers, and does not hold up what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_dead_letters_carry_the_reason_and_origin() {
    use rdkafka::Message;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some((b, settings)) = kafka_with_settings().await else { return };
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &settings.brokers).create().unwrap();
    producer
        .send(FutureRecord::<str, str>::to(&settings.topic).payload("not json").partition(0), Duration::from_secs(10))
        .await
        .unwrap();
    let id = b.create("after-garbage").await;
    let delivery = receive(&b.queue, FIRST).await.expect("the next job is delivered");
    assert_eq!(delivery.job_id, id);
    b.queue.dead_letter(&delivery, "origin answered HTTP 404 Not Found").await.unwrap();

    let dlq: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", services::unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    dlq.subscribe(&[&settings.dlq_topic()]).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = tokio::time::timeout(FIRST, dlq.recv()).await.expect("dead letters arrive").unwrap();
        let headers: std::collections::HashMap<String, String> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| (x.key.to_owned(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        seen.push((payload, headers));
    }
    let garbage = seen.iter().find(|(p, _)| p == "not json").expect("the unparseable message is dead-lettered");
    assert!(garbage.1["fileflow-error"].contains("unparseable"), "{:?}", garbage.1);
    assert_eq!(garbage.1["fileflow-origin-topic"], settings.topic);
    assert_eq!(garbage.1["fileflow-origin-partition"], "0");
    let gave_up = seen.iter().find(|(p, _)| p.contains(&format!("\"id\":\"{id}\""))).expect("the job is dead-lettered");
    assert_eq!(gave_up.1["fileflow-error"], "origin answered HTTP 404 Not Found");
    assert!(gave_up.0.contains("https://example.com/x"), "the dead letter is the seed's message: {}", gave_up.0);
    assert!(gave_up.1["fileflow-origin-offset"].parse::<i64>().is_ok());
}
