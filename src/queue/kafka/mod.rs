//! The Kafka queue: jobs on `upload_file_topic`, retries on `upload_file_topic-retry`
//! (held back, without sleeping in the poll loop, until due), give-ups on
//! `upload_file_topic-dlq`. Offsets are stored in order, only once a job's outcome is
//! durable, and committed by the client's auto-commit.

mod membership;
mod message;
mod offsets;
mod options;
mod rewind;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Delivery, Queue, QueueError};
use crate::lifecycle::JobId;

use membership::Starvation;
pub use message::JobMessage;
use message::{
    ATTEMPT_HEADER, DUE_AT_HEADER, ERROR_HEADER, ORIGIN_OFFSET_HEADER, ORIGIN_PARTITION_HEADER, ORIGIN_TOPIC_HEADER,
    TRACEPARENT_HEADER, due_at_from_header,
};
use offsets::PartitionOffsets;
pub use options::{ENV_PREFIX as OPTION_ENV_PREFIX, KafkaOption, gather as gather_options};

/// How the Kafka queue connects and names things.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    /// The jobs topic; retries and give-ups go to `<topic>-retry` and `<topic>-dlq`.
    pub topic: String,
    pub group: String,
    /// Partitions of the jobs and retry topics when fileflow creates them.
    pub partitions: i32,
    /// Replicas of the topics fileflow creates; `0`: min(3, brokers in the cluster).
    pub replication_factor: i32,
    /// Longest a worker may hold a message (a whole transfer) before the group gives its
    /// partitions to another member.
    pub max_poll_interval: Duration,
    /// librdkafka settings for every client (TLS, SASL, …), applied in order.
    pub options: Vec<KafkaOption>,
}

impl KafkaSettings {
    pub fn retry_topic(&self) -> String {
        format!("{}-retry", self.topic)
    }

    pub fn dlq_topic(&self) -> String {
        format!("{}-dlq", self.topic)
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers).set("client.id", "fileflow");
        for option in &self.options {
            config.set(&option.key, &option.value);
        }
        config
    }
}

/// A client that cannot be made: librdkafka refused a setting (its message names it).
fn client_error(e: rdkafka::error::KafkaError) -> QueueError {
    let why = match e {
        // Its text would show the setting's value, which may be a secret.
        rdkafka::error::KafkaError::ClientConfig(_, _, key, _) if options::is_secret(&key) => {
            format!("librdkafka refused the setting `{key}` (its value is not shown)")
        }
        rdkafka::error::KafkaError::ClientConfig(_, description, key, _) => format!("{description} (setting `{key}`)"),
        other => other.to_string(),
    };
    QueueError::Backend(format!("cannot create a Kafka client (check --kafka-option / {OPTION_ENV_PREFIX}*): {why}"))
}

fn backend(e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(e.to_string())
}

/// The replication factor for new topics: as configured, or min(3, brokers), asked of the
/// cluster through `admin` (no client of its own).
async fn replication_factor(
    settings: &KafkaSettings,
    admin: &Arc<AdminClient<DefaultClientContext>>,
) -> Result<i32, QueueError> {
    if settings.replication_factor > 0 {
        return Ok(settings.replication_factor);
    }
    let admin = admin.clone();
    let brokers = tokio::task::spawn_blocking(move || {
        let metadata = admin.inner().fetch_metadata(None, ADMIN_REQUEST_TIMEOUT).map_err(backend)?;
        Ok::<_, QueueError>(metadata.brokers().len())
    })
    .await
    .map_err(backend)??;
    Ok(i32::try_from(brokers).unwrap_or(i32::MAX).clamp(1, 3))
}

/// How long the broker has to acknowledge a published message (librdkafka's
/// `message.timeout.ms`: queued, sent, retried and answered).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// A send is cut this long after [`MESSAGE_TIMEOUT`] even if librdkafka never reports on
/// it: no await on the broker goes unbounded.
const SEND_MARGIN: Duration = Duration::from_secs(5);
/// Longest one admin request (metadata, topic creation) may wait for the broker.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest [`ensure_topics`] may take as a whole.
const ENSURE_TOPICS_TIMEOUT: Duration = Duration::from_secs(30);

/// Create the three topics when missing, replicated as [`KafkaSettings::replication_factor`]
/// says; gives up after [`ENSURE_TOPICS_TIMEOUT`].
pub async fn ensure_topics(settings: &KafkaSettings) -> Result<(), QueueError> {
    let admin: Arc<AdminClient<DefaultClientContext>> =
        Arc::new(settings.client_config().create().map_err(client_error)?);
    let result =
        tokio::time::timeout(ENSURE_TOPICS_TIMEOUT, create_topics(settings, &admin)).await.unwrap_or_else(|_| {
            Err(QueueError::Backend(format!("no answer about the topics within {ENSURE_TOPICS_TIMEOUT:?}")))
        });
    // Destroying a client waits for its threads (and their broker connections): off the runtime.
    tokio::task::spawn_blocking(move || drop(admin));
    result
}

async fn create_topics(
    settings: &KafkaSettings,
    admin: &Arc<AdminClient<DefaultClientContext>>,
) -> Result<(), QueueError> {
    let (main, retry, dlq) = (settings.topic.clone(), settings.retry_topic(), settings.dlq_topic());
    let replicas = replication_factor(settings, admin).await?;
    let topics = [
        NewTopic::new(&main, settings.partitions, TopicReplication::Fixed(replicas)),
        NewTopic::new(&retry, settings.partitions, TopicReplication::Fixed(replicas)),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(replicas)),
    ];
    let options =
        AdminOptions::new().operation_timeout(Some(ADMIN_REQUEST_TIMEOUT)).request_timeout(Some(ADMIN_REQUEST_TIMEOUT));
    for result in admin.create_topics(&topics, &options).await.map_err(backend)? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(QueueError::Backend(format!("cannot create topic {topic}: {code}"))),
        }
    }
    Ok(())
}

/// How far the workers' group is behind on the jobs topic, asked without joining the
/// group: the reconciler holds back on overdue `pending` jobs while the topic still holds
/// messages the group has not consumed, since theirs may well be among them.
pub struct KafkaBacklog {
    consumer: Arc<BaseConsumer>,
    topic: String,
}

impl KafkaBacklog {
    pub fn new(settings: &KafkaSettings) -> Result<Self, QueueError> {
        let consumer: BaseConsumer = settings
            .client_config()
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(client_error)?;
        Ok(Self { consumer: Arc::new(consumer), topic: settings.topic.clone() })
    }

    /// Messages on the jobs topic past the group's committed offsets (from the start of
    /// the log where the group has committed nothing or the log no longer reaches).
    fn lag(consumer: &BaseConsumer, topic: &str) -> Result<i64, QueueError> {
        let timeout = Duration::from_secs(5);
        let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(backend)?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        let mut asked = TopicPartitionList::new();
        for partition in &partitions {
            asked.add_partition(topic, *partition);
        }
        let committed = consumer.committed_offsets(asked, timeout).map_err(backend)?;
        let mut lag = 0;
        for partition in partitions {
            let (low, high) = consumer.fetch_watermarks(topic, partition, timeout).map_err(backend)?;
            // Messages below the log's start are gone (retention, a broker that lost its
            // data): they are no backlog, whatever the group committed. An offset past the
            // log's end counts as caught up: Tansu reports such offsets in normal running
            // too (counting the whole log then held the relay and the reconciler back for
            // good), and after a broker lost its log the members read it again from its
            // start (`rewind`) while the reconciler announces what is overdue.
            let done = match committed.find_partition(topic, partition).map(|p| p.offset()) {
                Some(Offset::Offset(offset)) => offset.max(low),
                _ => low,
            };
            lag += (high - done).max(0);
        }
        Ok(lag)
    }
}

#[async_trait]
impl super::Backlog for KafkaBacklog {
    async fn lag(&self) -> Result<u64, QueueError> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        // Each request inside is bounded; so is the whole, whatever the partition count.
        let asking = tokio::task::spawn_blocking(move || Self::lag(&consumer, &topic));
        let lag = tokio::time::timeout(ENSURE_TOPICS_TIMEOUT, asking)
            .await
            .map_err(|_| QueueError::Backend("no answer about the group's lag in time".into()))?
            .map_err(backend)??;
        Ok(u64::try_from(lag).unwrap_or(0))
    }
}

/// Publishes job messages: used by the outbox relay and for retries and give-ups.
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
    settings: KafkaSettings,
}

impl KafkaPublisher {
    pub fn new(settings: &KafkaSettings) -> Result<Self, QueueError> {
        let producer = settings
            .client_config()
            .set("acks", "all")
            .set("message.timeout.ms", MESSAGE_TIMEOUT.as_millis().to_string())
            .create()
            .map_err(client_error)?;
        Ok(Self { producer, settings: settings.clone() })
    }

    async fn send(&self, topic: &str, key: &str, payload: &[u8], headers: OwnedHeaders) -> Result<(), QueueError> {
        let record = FutureRecord::to(topic).key(key).payload(payload).headers(headers);
        // The queue wait (a full local queue) counts against the same bound.
        let sending = self.producer.send(record, MESSAGE_TIMEOUT);
        match tokio::time::timeout(MESSAGE_TIMEOUT + SEND_MARGIN, sending).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(QueueError::Backend(format!("cannot publish to {topic}: {e}"))),
            Err(_) => Err(QueueError::Backend(format!(
                "cannot publish to {topic}: no delivery report within {:?}",
                MESSAGE_TIMEOUT + SEND_MARGIN
            ))),
        }
    }

    /// Announce a job on the jobs topic (the seed's message) for its `attempt`, with the
    /// trace context of the request that created it.
    pub async fn publish_job(
        &self,
        message: &JobMessage,
        attempt: u32,
        traceparent: Option<&str>,
    ) -> Result<(), QueueError> {
        let payload = serde_json::to_vec(message).map_err(backend)?;
        let mut headers = OwnedHeaders::new().insert(Header { key: ATTEMPT_HEADER, value: Some(&attempt.to_string()) });
        if let Some(traceparent) = traceparent {
            headers = headers.insert(Header { key: TRACEPARENT_HEADER, value: Some(traceparent) });
        }
        self.send(&self.settings.topic, &message.id, &payload, headers).await
    }
}

/// Where a delivery came from; its token is `topic/partition/offset`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    topic: String,
    partition: i32,
    offset: i64,
}

impl Origin {
    fn token(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }

    fn parse(token: &str) -> Option<Self> {
        let mut parts = token.rsplitn(3, '/');
        let offset = parts.next()?.parse().ok()?;
        let partition = parts.next()?.parse().ok()?;
        Some(Self { topic: parts.next()?.to_owned(), partition, offset })
    }
}

/// A message read from a topic, held until due.
struct Pending {
    origin: Origin,
    due_at: DateTime<Utc>,
    delivery: Option<Delivery>,
    payload: Vec<u8>,
    /// Why the message cannot be worked on (it goes to the DLQ).
    unusable: Option<String>,
}

#[derive(Default)]
struct State {
    offsets: HashMap<(String, i32), PartitionOffsets>,
    /// Paused partitions and the messages they had already delivered, oldest first.
    held: HashMap<(String, i32), VecDeque<Pending>>,
    /// The message each delivery came in, so a retry or a dead letter carries it on.
    payloads: HashMap<String, Vec<u8>>,
    /// Which consumer is the current member (one is replaced when it rejoins): a replaced
    /// one's revoke, as it closes, must not clear what its successor tracks.
    member: u64,
    /// The current member's join state (`steady`, `wait-join`, …), as its last statistics said.
    join_state: Option<String>,
    /// Assignments and revokes so far: one since the last look means the group is moving.
    rebalances: u64,
}

impl State {
    fn forget_deliveries(&mut self) {
        self.offsets.clear();
        self.payloads.clear();
        self.held.clear();
    }
}

/// Clears local bookkeeping when the group moves partitions: what was in flight will be
/// delivered again from the committed offsets.
struct RebalanceContext {
    state: Arc<Mutex<State>>,
    member: u64,
}

impl ClientContext for RebalanceContext {
    /// librdkafka's statistics carry the group member's join state, which the assignment
    /// watch reads (and logs) to tell a member left with nothing from one still joining.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(group) = statistics.cgrp else { return };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.member == self.member {
            state.join_state = Some(group.join_state);
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            tracing::info!(partitions = revoked.count(), "partitions revoked");
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.rebalances += 1;
            if state.member == self.member {
                state.forget_deliveries();
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Held messages were dropped at the revoke; their partitions must fetch again.
        if let Rebalance::Assign(assigned) = rebalance {
            self.state.lock().unwrap_or_else(|p| p.into_inner()).rebalances += 1;
            let names: Vec<String> =
                assigned.elements().iter().map(|p| format!("{}[{}]", p.topic(), p.partition())).collect();
            tracing::info!(partitions = assigned.count(), assigned = %names.join(" "), "partitions assigned");
            if let Err(e) = consumer.resume(assigned) {
                tracing::warn!(error = %e, "cannot resume assigned partitions");
            }
        }
    }
}

type Consumer_ = StreamConsumer<RebalanceContext>;

pub struct KafkaQueue {
    inner: Arc<Inner>,
    deliveries: tokio::sync::Mutex<mpsc::Receiver<Delivery>>,
    stop: CancellationToken,
}

/// What the poll loop and the workers share. The loop holds only this, so dropping the
/// queue stops the loop and closes the consumer.
struct Inner {
    /// The group member; replaced by a new one when it was left with nothing to read
    /// (see [`membership`]).
    consumer: RwLock<Arc<Consumer_>>,
    publisher: KafkaPublisher,
    state: Arc<Mutex<State>>,
}

/// A member with nothing assigned this long, while the topics have partitions, joins again.
const STARVED_FIRST: Duration = Duration::from_secs(10);
/// The longest it waits between fruitless rejoins (more members than partitions).
const STARVED_MOST: Duration = Duration::from_secs(300);
/// How often the poll loop looks at its assignment.
const ASSIGNMENT_CHECK: Duration = Duration::from_secs(1);
/// Longest a member that rejoins waits for its old self to leave the group.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause between the old member's leaving and the new one's joining.
const LEAVE_SETTLE: Duration = Duration::from_millis(500);
/// How often a member looks for partitions it reads past their log's end (see [`rewind`]).
const LOG_END_CHECK: Duration = Duration::from_secs(5);

/// A consumer in the workers' group, subscribed to the jobs and retry topics.
fn join_group(settings: &KafkaSettings, state: &Arc<Mutex<State>>) -> Result<Consumer_, QueueError> {
    let member = state.lock().unwrap_or_else(|p| p.into_inner()).member;
    let context = RebalanceContext { state: state.clone(), member };
    let consumer: Consumer_ = settings
        .client_config()
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", settings.max_poll_interval.as_millis().to_string())
        .set("queued.max.messages.kbytes", "1024")
        // Notice soon when a topic comes back (a broker that lost its state).
        .set("topic.metadata.refresh.interval.ms", "5000")
        // For the join state (see `RebalanceContext::stats`).
        .set("statistics.interval.ms", "1000")
        .create_with_context(context)
        .map_err(client_error)?;
    consumer.subscribe(&[&settings.topic, &settings.retry_topic()]).map_err(backend)?;
    Ok(consumer)
}

impl KafkaQueue {
    /// Join the consumer group and start reading; `buffer` bounds the deliveries read ahead
    /// of the workers.
    pub fn start(settings: &KafkaSettings, buffer: usize) -> Result<Arc<Self>, QueueError> {
        let state = Arc::new(Mutex::new(State::default()));
        let consumer = RwLock::new(Arc::new(join_group(settings, &state)?));
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let inner = Arc::new(Inner { consumer, publisher: KafkaPublisher::new(settings)?, state });
        let stop = CancellationToken::new();
        tokio::spawn(inner.clone().poll_loop(tx, stop.clone(), settings.clone()));
        tokio::spawn(inner.clone().watch_log_ends(stop.clone()));
        Ok(Arc::new(Self { inner, deliveries: tokio::sync::Mutex::new(rx), stop }))
    }

    /// Leave the group, committing what was stored, within `timeout`.
    async fn leave(&self, timeout: Duration) {
        self.stop.cancel();
        let inner = self.inner.clone();
        let closing = tokio::task::spawn_blocking(move || {
            let consumer = inner.consumer();
            if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                tracing::debug!(error = %e, "final commit");
            }
            consumer.unsubscribe();
        });
        let _ = tokio::time::timeout(timeout, closing).await;
    }
}

impl Inner {
    /// Read messages, hold retries until due, hand the rest to the workers. Never sleeps:
    /// a partition whose head is not due is paused, and resumed by the tick.
    async fn poll_loop(self: Arc<Self>, tx: mpsc::Sender<Delivery>, stop: CancellationToken, settings: KafkaSettings) {
        let (retry_topic, dlq_topic) = (settings.retry_topic(), settings.dlq_topic());
        let mut topics_checked = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut starvation = Starvation::new(STARVED_FIRST, STARVED_MOST, Instant::now());
        let mut assignment_checked = Instant::now();
        loop {
            if assignment_checked.elapsed() >= ASSIGNMENT_CHECK {
                assignment_checked = Instant::now();
                self.watch_assignment(&mut starvation, &settings).await;
            }
            let consumer = self.consumer();
            let ready = tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => self.due_messages(),
                message = consumer.recv() => match message {
                    Ok(message) => self.accept(&message, &retry_topic),
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka consumer error");
                        // A broker that lost its state lost the topics: create them again
                        // (now and then), so the group can read what is published next.
                        let missing = e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition);
                        if missing && topics_checked.elapsed() >= Duration::from_secs(5) {
                            topics_checked = tokio::time::Instant::now();
                            if let Err(e) = ensure_topics(&settings).await {
                                tracing::warn!(error = %e, "cannot create the Kafka topics");
                            }
                        }
                        Vec::new()
                    }
                },
            };
            for pending in ready {
                match pending.unusable {
                    Some(reason) => self.dead_letter_raw(&pending.origin, &pending.payload, &reason, &dlq_topic).await,
                    None => {
                        let delivery = pending.delivery.expect("usable messages carry a delivery");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            sent = tx.send(delivery) => if sent.is_err() { return },
                        }
                    }
                }
            }
        }
    }

    /// Now and then, read again from the start of its log any assigned partition read past
    /// the log's end (see [`rewind`]). Off the poll loop: the broker may take its time.
    async fn watch_log_ends(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(LOG_END_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let consumer = self.consumer();
            let past = match tokio::task::spawn_blocking(move || rewind::find(&consumer)).await {
                Ok(Ok(past)) => past,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot compare read offsets with the log ends; will look again");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the look at the log ends failed");
                    continue;
                }
            };
            for partition in past {
                tracing::warn!(
                    topic = %partition.topic,
                    partition = partition.partition,
                    offset = partition.at,
                    log_start = partition.low,
                    log_end = partition.high,
                    "reading past the log's end (the broker lost its log): reading the partition again from its start"
                );
                self.forget_partition(&partition.topic, partition.partition);
                let consumer = self.consumer();
                let rewound = tokio::task::spawn_blocking(move || rewind::rewind(&consumer, &partition))
                    .await
                    .map_err(backend)
                    .and_then(|r| r.map_err(backend));
                if let Err(e) = rewound {
                    tracing::warn!(error = %e, "cannot read the partition again from its start; will look again");
                }
            }
        }
    }

    /// Drop what is tracked and held for one partition, which is about to be read again:
    /// offsets tracked from before must not hold back (or be stored over) the new ones.
    fn forget_partition(&self, topic: &str, partition: i32) {
        let key = (topic.to_owned(), partition);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.offsets.remove(&key);
        if state.held.remove(&key).is_some() {
            self.set_paused(&Origin { topic: key.0, partition, offset: 0 }, false);
        }
    }

    fn consumer(&self) -> Arc<Consumer_> {
        self.consumer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Join the group again as a new member when this one has had nothing assigned for
    /// too long while the topics have partitions (see [`membership`]).
    async fn watch_assignment(&self, starvation: &mut Starvation, settings: &KafkaSettings) {
        let consumer = self.consumer();
        let assigned = consumer.assignment().map(|tpl| tpl.count()).unwrap_or(0);
        let (join_state, rebalances) = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (state.join_state.clone(), state.rebalances)
        };
        // A rebalance since the last look (partitions given, maybe taken back before the
        // look saw them): the group is at work; count from now.
        starvation.rebalanced(rebalances, Instant::now());
        // `steady`: joined, with nothing; `init`: not joining at all. Anything else is a
        // join under way, which may rightly wait on another member (one that is frozen,
        // or died and whose session has yet to expire).
        let settled = matches!(join_state.as_deref(), Some("steady" | "init"));
        let now = Instant::now();
        if !starvation.observe(assigned, settled, now) {
            return;
        }
        let starved_for = starvation.starved_for(now);
        let topics = [settings.topic.clone(), settings.retry_topic()];
        let asking = consumer.clone();
        let partitions = tokio::task::spawn_blocking(move || {
            let mut partitions = 0;
            for topic in &topics {
                let metadata = asking.fetch_metadata(Some(topic), Duration::from_secs(5)).map_err(backend)?;
                partitions += metadata
                    .topics()
                    .iter()
                    .filter(|t| t.error().is_none())
                    .map(|t| t.partitions().len())
                    .sum::<usize>();
            }
            Ok::<_, QueueError>(partitions)
        })
        .await
        .map_err(backend)
        .and_then(|r| r);
        match partitions {
            Ok(0) => {
                tracing::info!(
                    starved_for_ms = starved_for.as_millis() as u64,
                    "no partitions assigned; the topics have none yet"
                );
                starvation.nothing_to_assign(Instant::now());
            }
            Ok(partitions) => {
                tracing::warn!(
                    starved_for_ms = starved_for.as_millis() as u64,
                    partitions,
                    join_state = join_state.as_deref().unwrap_or("unknown"),
                    "no partitions assigned while the topics have some: joining the group again as a new member"
                );
                if let Err(e) = self.rejoin(settings).await {
                    tracing::warn!(error = %e, "cannot join the group again; will try later");
                }
                starvation.rejoined(Instant::now());
            }
            Err(e) => tracing::warn!(error = %e, "no partitions assigned, and cannot read the topics' metadata"),
        }
    }

    /// Replace the consumer by a new member of the group. The old one is closed off the
    /// runtime (librdkafka's close may wait on the broker); whatever it had delivered and
    /// not yet had acknowledged is delivered again from the committed offsets.
    ///
    /// The old member leaves first: a coordinator that saw the new one join while the old
    /// one was still a member (it may even have been made the leader) held the new one
    /// waiting for a sync that never came (Tansu: 80 s in `wait-sync`, twice).
    async fn rejoin(&self, settings: &KafkaSettings) -> Result<(), QueueError> {
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.forget_deliveries();
            state.member += 1;
            state.join_state = None;
        }
        let leaving = self.consumer();
        let left = tokio::task::spawn_blocking(move || leaving.unsubscribe());
        if tokio::time::timeout(LEAVE_TIMEOUT, left).await.is_err() {
            tracing::warn!("the old member did not leave the group in time; joining anyway");
        }
        // Let the LeaveGroup reach the coordinator before the new member's JoinGroup.
        tokio::time::sleep(LEAVE_SETTLE).await;
        let fresh = Arc::new(join_group(settings, &self.state)?);
        let old = std::mem::replace(&mut *self.consumer.write().unwrap_or_else(|p| p.into_inner()), fresh);
        std::thread::spawn(move || {
            // The last reference closes it: wait for the loop and the workers to let go.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(old);
        });
        Ok(())
    }

    /// Take in one message: returns it if it can go out now; otherwise holds it and pauses
    /// its partition.
    fn accept(&self, message: &BorrowedMessage<'_>, retry_topic: &str) -> Vec<Pending> {
        let origin =
            Origin { topic: message.topic().to_owned(), partition: message.partition(), offset: message.offset() };
        let header = |name: &str| {
            message.headers().and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value.map(<[u8]>::to_vec)))
        };
        let payload = message.payload().unwrap_or_default().to_vec();
        let now = Utc::now();
        let due_at =
            if origin.topic == retry_topic { due_at_from_header(header(DUE_AT_HEADER).as_deref()) } else { None };
        let attempt = header(ATTEMPT_HEADER)
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1);
        let parsed = serde_json::from_slice::<JobMessage>(&payload)
            .map_err(|e| format!("unparseable job message: {e}"))
            .and_then(|m| m.id.parse::<i64>().map_err(|_| format!("job message has a non-numeric id {:?}", m.id)));
        let (delivery, unusable) = match parsed {
            Ok(id) => {
                let traceparent = header(TRACEPARENT_HEADER).and_then(|v| String::from_utf8(v).ok());
                (Some(Delivery { job_id: JobId(id), attempt, token: origin.token(), traceparent }), None)
            }
            Err(reason) => (None, Some(reason)),
        };
        let pending = Pending { origin: origin.clone(), due_at: due_at.unwrap_or(now), delivery, payload, unusable };

        let key = (origin.topic.clone(), origin.partition);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if pending.delivery.is_some() {
            state.payloads.insert(origin.token(), pending.payload.clone());
        }
        if let Some(held) = state.held.get_mut(&key) {
            held.push_back(pending);
            return Vec::new();
        }
        if pending.due_at > now {
            self.set_paused(&origin, true);
            state.held.insert(key, VecDeque::from([pending]));
            return Vec::new();
        }
        state.offsets.entry(key).or_default().track(origin.offset);
        vec![pending]
    }

    /// Messages of paused partitions that are now due, in order; resumes emptied partitions.
    fn due_messages(&self) -> Vec<Pending> {
        let now = Utc::now();
        let mut ready = Vec::new();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let State { offsets, held, .. } = &mut *state;
        held.retain(|key, queue| {
            while queue.front().is_some_and(|p| p.due_at <= now) {
                let pending = queue.pop_front().expect("checked");
                offsets.entry(key.clone()).or_default().track(pending.origin.offset);
                ready.push(pending);
            }
            if queue.is_empty() {
                self.set_paused(&Origin { topic: key.0.clone(), partition: key.1, offset: 0 }, false);
                return false;
            }
            true
        });
        ready
    }

    fn set_paused(&self, origin: &Origin, paused: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&origin.topic, origin.partition);
        let consumer = self.consumer();
        let result = if paused { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
        if let Err(e) = result {
            tracing::warn!(topic = %origin.topic, partition = origin.partition, paused, error = %e, "cannot change partition state");
        }
    }

    /// The message's outcome is durable: let its offset be committed once all before it are.
    fn done(&self, origin: &Origin) -> Result<(), QueueError> {
        let key = (origin.topic.clone(), origin.partition);
        let stored = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.payloads.remove(&origin.token());
            state.offsets.get_mut(&key).and_then(|p| p.complete(origin.offset))
        };
        if let Some(offset) = stored {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&origin.topic, origin.partition, Offset::Offset(offset + 1)).map_err(backend)?;
            if let Err(e) = self.consumer().store_offsets(&tpl) {
                // The partition moved to another member: it will deliver the message again.
                tracing::warn!(topic = %origin.topic, partition = origin.partition, error = %e, "cannot store offset");
            }
        }
        Ok(())
    }

    async fn dead_letter_raw(&self, origin: &Origin, payload: &[u8], reason: &str, dlq_topic: &str) {
        tracing::warn!(topic = %origin.topic, partition = origin.partition, offset = origin.offset, reason, "message sent to the DLQ");
        let headers = dlq_headers(origin, reason);
        if let Err(e) = self.publisher.send(dlq_topic, "", payload, headers).await {
            tracing::error!(error = %e, "cannot publish to the DLQ; the message will be read again");
            return;
        }
        let key = (origin.topic.clone(), origin.partition);
        self.state.lock().unwrap_or_else(|p| p.into_inner()).offsets.entry(key).or_default().track(origin.offset);
        let _ = self.done(origin);
    }

    fn origin_of(delivery: &Delivery) -> Result<Origin, QueueError> {
        Origin::parse(&delivery.token)
            .ok_or_else(|| QueueError::Backend(format!("bad delivery token {}", delivery.token)))
    }

    async fn send_retry(&self, delivery: &Delivery, attempt: u32, due_at: DateTime<Utc>) -> Result<(), QueueError> {
        let payload = self.payload_of(delivery)?;
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: ATTEMPT_HEADER, value: Some(&attempt.to_string()) })
            .insert(Header { key: DUE_AT_HEADER, value: Some(&due_at.timestamp_millis().to_string()) });
        if let Some(traceparent) = &delivery.traceparent {
            headers = headers.insert(Header { key: TRACEPARENT_HEADER, value: Some(traceparent) });
        }
        let topic = self.publisher.settings.retry_topic();
        self.publisher.send(&topic, &delivery.job_id.to_string(), &payload, headers).await
    }

    /// The seed message the delivery came in; if it is no longer known (a rebalance
    /// happened meanwhile), one naming just the job, which is all a worker needs.
    fn payload_of(&self, delivery: &Delivery) -> Result<Vec<u8>, QueueError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(payload) = state.payloads.get(&delivery.token) {
            return Ok(payload.clone());
        }
        let id = delivery.job_id.to_string();
        let stub = JobMessage { id, file_url: String::new(), bucket_name: String::new(), object_name: String::new() };
        serde_json::to_vec(&stub).map_err(backend)
    }
}

fn dlq_headers(origin: &Origin, reason: &str) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header { key: ERROR_HEADER, value: Some(reason) })
        .insert(Header { key: ORIGIN_TOPIC_HEADER, value: Some(&origin.topic) })
        .insert(Header { key: ORIGIN_PARTITION_HEADER, value: Some(&origin.partition.to_string()) })
        .insert(Header { key: ORIGIN_OFFSET_HEADER, value: Some(&origin.offset.to_string()) })
}

impl Drop for KafkaQueue {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[async_trait]
impl Queue for KafkaQueue {
    async fn receive_many(&self, max: usize) -> Result<Vec<Delivery>, QueueError> {
        let mut deliveries = self.deliveries.lock().await;
        let mut taken = Vec::with_capacity(max.max(1));
        if deliveries.recv_many(&mut taken, max.max(1)).await == 0 {
            return Err(QueueError::Backend("the Kafka consumer stopped".into()));
        }
        Ok(taken)
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.inner.done(&Inner::origin_of(delivery)?)
    }

    async fn retry(&self, delivery: &Delivery, attempt: u32, due_at: DateTime<Utc>) -> Result<(), QueueError> {
        self.inner.send_retry(delivery, attempt, due_at).await?;
        self.ack(delivery).await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let origin = Inner::origin_of(delivery)?;
        let payload = self.inner.payload_of(delivery)?;
        let publisher = &self.inner.publisher;
        let dlq = publisher.settings.dlq_topic();
        publisher.send(&dlq, &delivery.job_id.to_string(), &payload, dlq_headers(&origin, reason)).await?;
        self.inner.done(&origin)
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), QueueError> {
        // Hand the job to whichever member comes next, without holding back this partition.
        self.retry(delivery, delivery.attempt, Utc::now()).await
    }

    async fn keep_alive(&self, _delivery: &Delivery) -> Result<(), QueueError> {
        // The message stays unacknowledged as long as needed; the job's lease is what
        // other workers look at.
        Ok(())
    }

    async fn defer(&self, delivery: &Delivery, _until: DateTime<Utc>) -> Result<(), QueueError> {
        // The database is the source of truth: a job held by a live lease is announced
        // again by the reconciler if its holder dies. Publishing another copy here would
        // only multiply messages.
        self.ack(delivery).await
    }

    async fn close(&self, timeout: Duration) {
        self.leave(timeout).await;
    }

    async fn abandon(&self, delivery: &Delivery) {
        // Store the offset anyway, so the partition never stalls behind this message; the
        // reconciler announces the job again once it is overdue.
        if let Err(e) = self.ack(delivery).await {
            tracing::warn!(job_id = %delivery.job_id, error = %e, "cannot let go of a delivery");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_even_with_slashes_in_topic_names() {
        let origin = Origin { topic: "a/b-retry".into(), partition: 3, offset: 42 };
        assert_eq!(Origin::parse(&origin.token()), Some(origin));
        assert_eq!(Origin::parse("nonsense"), None);
    }
}
