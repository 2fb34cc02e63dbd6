//! One conformance suite for the metadata repository, run against SQLite and PostgreSQL.

#[path = "support/services.rs"]
mod services;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fileflow::auth::{IssuedKey, KeyLimits, KeyStore, NewKey, Role, Scope};
use fileflow::domain::{BucketName, ObjectKey, SealedHeaders, SourceUrl};
use fileflow::lifecycle::{Cause, Grant, JobStatus, NewJob, Settlement, StoredObject};
use fileflow::metadata::{
    Claim, Created, IdempotencyKey, JobRepository, Lease, ListFilter, PgDb, PgRepository, Requeue, SqliteDb,
    SqliteRepository, Sweep,
};

fn new_job(key: &str) -> NewJob {
    NewJob {
        source: SourceUrl::parse("https://example.com/a.jpg").unwrap(),
        bucket: BucketName::parse("file-bucket").unwrap(),
        key: ObjectKey::parse(key).unwrap(),
        expected_sha256: None,
        expected_md5: None,
        expected_size: Some(5),
        if_exists: fileflow::lifecycle::IfExists::Skip,
        priority: 7,
        notify_url: None,
        // The repository keeps sealed headers as they are given (the API seals them).
        headers: Some(SealedHeaders::from_stored("v1.c2VhbGVk".into())),
        grant: Grant::open(),
        traceparent: Some(TRACEPARENT.into()),
        batch: None,
    }
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn lease(owner: &str) -> Lease {
    Lease { owner: owner.into(), length: Duration::from_secs(30) }
}

fn short_lease(owner: &str, millis: u64) -> Lease {
    Lease { owner: owner.into(), length: Duration::from_millis(millis) }
}

/// A sweep that announces overdue pending jobs too.
fn sweep(grace: Duration, limit: u32) -> Sweep {
    Sweep { grace, limit, pending: true }
}

fn stored() -> StoredObject {
    StoredObject {
        etag: "e".into(),
        size: 5,
        sha256: Some("s".into()),
        md5: Some("m".into()),
        content_type: Some("text/plain".into()),
        version: Some("ino-mtime-size".into()),
        crc64nvme: None,
        origin: Default::default(),
        not_modified: false,
    }
}

/// Timestamps are compared at millisecond precision, what every backend keeps.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
}

async fn create_get_and_list(repo: Arc<dyn JobRepository>) {
    let t = now();
    let a = repo.create(&new_job("a"), t).await.unwrap();
    let b = repo.create(&new_job("b"), t).await.unwrap();
    assert!(b.id > a.id);
    assert_eq!(a.status, JobStatus::Pending);
    assert_eq!((a.retry_count, a.created_at, a.updated_at), (0, t, t));
    let got = repo.get(a.id).await.unwrap().unwrap();
    assert_eq!(got, a);
    assert_eq!(got.request_headers.as_ref().map(SealedHeaders::as_str), Some("v1.c2VhbGVk"));
    assert_eq!(got.grant, Grant::open());
    assert_eq!((got.expected_size, got.if_exists, got.priority), (Some(5), fileflow::lifecycle::IfExists::Skip, 7));
    assert_eq!(got.traceparent.as_deref(), Some(TRACEPARENT), "the creating request's trace is kept");
    assert_eq!(repo.get(fileflow::lifecycle::JobId(a.id.0 + 1000)).await.unwrap(), None);

    let all = repo.list(&ListFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), [b.id, a.id]);
    let page = repo.list(&ListFilter { limit: 1, before: Some(b.id), ..Default::default() }).await.unwrap();
    assert_eq!(page.iter().map(|j| j.id).collect::<Vec<_>>(), [a.id]);
    let failed = ListFilter { status: Some(JobStatus::Failed), limit: 10, ..Default::default() };
    assert!(repo.list(&failed).await.unwrap().is_empty());
}

/// Jobs created at the same moment may share a transaction (SQLite writes them in
/// groups); each caller must still get back exactly the job it asked for.
async fn concurrent_creates_each_get_their_own_job(repo: Arc<dyn JobRepository>) {
    let t = now();
    let creates = (0..300).map(|i| {
        let repo = repo.clone();
        tokio::spawn(async move {
            let mut job = new_job(&format!("k/{i}"));
            job.source = SourceUrl::parse(&format!("https://example.com/{i}.bin")).unwrap();
            job.headers = if i % 2 == 0 { None } else { job.headers };
            (i, repo.create(&job, t).await.unwrap())
        })
    });
    let mut ids = std::collections::HashSet::new();
    for create in creates.collect::<Vec<_>>() {
        let (i, job) = create.await.unwrap();
        assert_eq!(job.object_name.as_str(), format!("k/{i}"));
        assert_eq!(job.file_url.as_str(), format!("https://example.com/{i}.bin"));
        assert_eq!(job.request_headers.is_none(), i % 2 == 0, "job {i}");
        assert!(ids.insert(job.id), "id {} handed out twice", job.id);
        assert_eq!(repo.get(job.id).await.unwrap().unwrap(), job);
    }
    let all = repo.list(&ListFilter { limit: 1000, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 300);
}

/// Claims and completions made at the same moment may share a statement (SQLite writes
/// them in groups); each must still be decided for its own job and lease.
async fn concurrent_claims_and_completions(repo: Arc<dyn JobRepository>) {
    let t = now();
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(repo.create(&new_job(&format!("c/{i}")), t).await.unwrap().id);
    }
    // Every job is claimed twice at once, by two owners: exactly one of them gets it.
    let mut claims = Vec::new();
    for &id in &ids {
        for who in ["a", "b"] {
            let repo = repo.clone();
            claims.push(tokio::spawn(async move {
                (id, who, repo.claim(id, &lease(&format!("{who}{}", id.0))).await.unwrap())
            }));
        }
    }
    let mut winners = std::collections::HashMap::new();
    for claim in claims {
        match claim.await.unwrap() {
            (id, who, Claim::Claimed(job)) => {
                assert_eq!((job.id, job.status), (id, JobStatus::Processing));
                assert!(winners.insert(id, who).is_none(), "job {id} claimed twice");
            }
            (_, _, Claim::Busy { .. } | Claim::Waiting { .. }) => {}
            (id, _, other) => panic!("job {id}: unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), ids.len());
    // The losers' completions are refused, the winners' recorded.
    let mut settles = Vec::new();
    for (&id, &who) in &winners {
        let repo = repo.clone();
        settles.push(tokio::spawn(async move {
            let loser = if who == "a" { "b" } else { "a" };
            let done = |owner: String| {
                let repo = repo.clone();
                async move { repo.settle(id, &owner, &Settlement::Completed(stored()), t).await.unwrap() }
            };
            (done(format!("{loser}{}", id.0)).await, done(format!("{who}{}", id.0)).await)
        }));
    }
    for settle in settles {
        assert_eq!(settle.await.unwrap(), (false, true));
    }
    let completed = ListFilter { status: Some(JobStatus::Completed), limit: 1000, ..Default::default() };
    let completed = repo.list(&completed).await.unwrap();
    assert_eq!(completed.len(), ids.len());
    assert!(completed.iter().all(|job| job.etag.as_deref() == Some("e") && job.size == Some(5)));
}

async fn claims_are_exclusive_until_the_lease_lapses(repo: Arc<dyn JobRepository>) {
    let t = now();
    let job = repo.create(&new_job("c"), t).await.unwrap();
    let first = repo.claim(job.id, &short_lease("w1", 800)).await.unwrap();
    assert!(matches!(first, Claim::Claimed(ref j) if j.status == JobStatus::Processing));
    match repo.claim(job.id, &lease("w2")).await.unwrap() {
        Claim::Busy { until } => assert!(until > t && until < t + chrono::Duration::seconds(5), "{until}"),
        other => panic!("a held job: {other:?}"),
    }
    assert!(!repo.renew(job.id, &lease("w2")).await.unwrap(), "only the holder renews");
    assert!(!repo.holds(job.id, "w2", Duration::ZERO).await.unwrap(), "only the holder holds");
    assert!(repo.holds(job.id, "w1", Duration::ZERO).await.unwrap());
    assert!(!repo.holds(job.id, "w1", Duration::from_secs(5)).await.unwrap(), "less than 5 s of the lease are left");

    // A renewal really extends the lease: without it, the lease would lapse in between.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(repo.renew(job.id, &short_lease("w1", 800)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        matches!(repo.claim(job.id, &lease("w2")).await.unwrap(), Claim::Busy { .. }),
        "the renewed lease still holds"
    );

    // w1 dies; once its (renewed) lease lapses, w2 may take the job.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!repo.holds(job.id, "w1", Duration::ZERO).await.unwrap(), "the lease lapsed");
    assert!(matches!(repo.claim(job.id, &lease("w2")).await.unwrap(), Claim::Claimed(_)));
    assert!(!repo.renew(job.id, &short_lease("w1", 800)).await.unwrap(), "w1 lost it");
    assert!(!repo.settle(job.id, "w1", &Settlement::Completed(stored()), t).await.unwrap(), "w1 lost it");
    assert!(repo.settle(job.id, "w2", &Settlement::Completed(stored()), t).await.unwrap());
    let done = repo.get(job.id).await.unwrap().unwrap();
    assert_eq!((done.status, done.size, done.etag.as_deref()), (JobStatus::Completed, Some(5), Some("e")));
    assert_eq!(repo.claim(job.id, &lease("w3")).await.unwrap(), Claim::Finished(JobStatus::Completed));
    assert_eq!(repo.claim(fileflow::lifecycle::JobId(job.id.0 + 1000), &lease("w3")).await.unwrap(), Claim::NotFound);
}

/// Several claims in one request (how a worker pool takes a batch of deliveries): each is
/// decided for its own job and lease, in the order asked.
async fn a_batch_of_claims_is_decided_request_by_request(repo: Arc<dyn JobRepository>) {
    let t = now();
    let free = repo.create(&new_job("free"), t).await.unwrap();
    let done = repo.create(&new_job("done"), t).await.unwrap();
    repo.claim(done.id, &lease("w0")).await.unwrap();
    assert!(repo.settle(done.id, "w0", &Settlement::Completed(stored()), t).await.unwrap());
    let held = repo.create(&new_job("held"), t).await.unwrap();
    repo.claim(held.id, &lease("w0")).await.unwrap();
    let twice = repo.create(&new_job("twice"), t).await.unwrap();
    let missing = fileflow::lifecycle::JobId(twice.id.0 + 1000);

    let asked = [
        (twice.id, lease("w1")),
        (free.id, lease("w2")),
        (done.id, lease("w3")),
        (held.id, lease("w4")),
        (missing, lease("w5")),
        (twice.id, lease("w6")),
    ];
    let claims = repo.claim_many(&asked).await.unwrap();
    assert_eq!(claims.len(), asked.len());
    match &claims[1] {
        Claim::Claimed(job) => {
            assert_eq!((job.id, job.object_name.as_str(), job.status), (free.id, "free", JobStatus::Processing))
        }
        other => panic!("the free job: {other:?}"),
    }
    assert_eq!(claims[2], Claim::Finished(JobStatus::Completed));
    assert!(matches!(claims[3], Claim::Busy { until } if until > t), "{:?}", claims[3]);
    assert_eq!(claims[4], Claim::NotFound);
    // The job asked for twice goes to exactly one of the two leases.
    let (winner, loser) = match (&claims[0], &claims[5]) {
        (Claim::Claimed(job), Claim::Busy { .. } | Claim::Waiting { .. }) => {
            assert_eq!(job.id, twice.id);
            ("w1", "w6")
        }
        (Claim::Busy { .. } | Claim::Waiting { .. }, Claim::Claimed(job)) => {
            assert_eq!(job.id, twice.id);
            ("w6", "w1")
        }
        other => panic!("the job asked for twice: {other:?}"),
    };
    assert!(!repo.settle(twice.id, loser, &Settlement::Completed(stored()), t).await.unwrap());
    assert!(repo.settle(twice.id, winner, &Settlement::Completed(stored()), t).await.unwrap());
    assert!(repo.settle(free.id, "w2", &Settlement::Completed(stored()), t).await.unwrap());
    assert!(repo.claim_many(&[]).await.unwrap().is_empty());
}

/// One job at a time writes an object: of two due jobs for one bucket and key, only the
/// older is claimed (in one batch or apart, also when claims race); the other waits until
/// the first is settled, while jobs for other keys are claimed as usual.
async fn one_job_at_a_time_writes_an_object(repo: Arc<dyn JobRepository>) {
    let t = now();
    let first = repo.create(&new_job("same"), t).await.unwrap();
    let second = repo.create(&new_job("same"), t).await.unwrap();
    let other = repo.create(&new_job("other"), t).await.unwrap();
    let claims =
        repo.claim_many(&[(second.id, lease("w2")), (first.id, lease("w1")), (other.id, lease("w3"))]).await.unwrap();
    assert!(matches!(&claims[0], Claim::Waiting { at } if *at > t), "{:?}", claims[0]);
    assert!(matches!(&claims[1], Claim::Claimed(job) if job.id == first.id), "{:?}", claims[1]);
    assert!(matches!(&claims[2], Claim::Claimed(job) if job.id == other.id), "{:?}", claims[2]);
    assert!(matches!(repo.claim(second.id, &lease("w4")).await.unwrap(), Claim::Waiting { .. }));
    assert!(repo.settle(first.id, "w1", &Settlement::Completed(stored()), t).await.unwrap());
    assert!(matches!(repo.claim(second.id, &lease("w4")).await.unwrap(), Claim::Claimed(_)));
    assert!(repo.settle(second.id, "w4", &Settlement::Completed(stored()), t).await.unwrap());

    // Claims racing for ten jobs of one object, each from its own task: one at a time.
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(repo.create(&new_job("raced"), t).await.unwrap().id);
    }
    let mut done = 0;
    while done < ids.len() {
        let claims = futures::future::join_all(ids.iter().enumerate().map(|(i, id)| {
            let repo = repo.clone();
            let id = *id;
            async move { (id, i, repo.claim(id, &lease(&format!("r{i}"))).await.unwrap()) }
        }))
        .await;
        let won: Vec<_> = claims.iter().filter(|(_, _, c)| matches!(c, Claim::Claimed(_))).collect();
        assert_eq!(won.len(), 1, "exactly one writer at a time: {claims:?}");
        let (id, i, _) = won[0];
        assert!(repo.settle(*id, &format!("r{i}"), &Settlement::Completed(stored()), t).await.unwrap());
        done += 1;
    }
}

async fn retries_releases_and_requeues(repo: Arc<dyn JobRepository>) {
    let t = now();
    let job = repo.create(&new_job("r"), t).await.unwrap();
    repo.claim(job.id, &lease("w")).await.unwrap();
    let due = now() + chrono::Duration::seconds(1);
    let retry = Settlement::RetryScheduled { retry_count: 1, last_error: "HTTP 503".into(), due_at: due };
    assert!(repo.settle(job.id, "w", &retry, t).await.unwrap());
    let pending = repo.get(job.id).await.unwrap().unwrap();
    assert_eq!((pending.status, pending.retry_count), (JobStatus::Pending, 1));
    assert_eq!((pending.last_error.as_deref(), pending.next_attempt_at), (Some("HTTP 503"), Some(due)));
    // A delivery that comes before the retry is due (a redelivered original) waits for it.
    assert_eq!(repo.claim(job.id, &lease("early")).await.unwrap(), Claim::NotDue { at: due });
    tokio::time::sleep((due - Utc::now()).to_std().unwrap_or_default()).await;

    repo.claim(job.id, &lease("w")).await.unwrap();
    assert!(repo.release(job.id, "w", t).await.unwrap());
    let released = repo.get(job.id).await.unwrap().unwrap();
    assert_eq!((released.status, released.retry_count), (JobStatus::Pending, 1), "a hand-back is not an attempt");

    assert_eq!(repo.requeue_failed(job.id, t).await.unwrap(), Requeue::NotFailed(JobStatus::Pending));
    repo.claim(job.id, &lease("w")).await.unwrap();
    assert!(
        repo.settle(job.id, "w", &Settlement::Failed { last_error: "HTTP 404".into(), cause: Cause::OriginStatus }, t)
            .await
            .unwrap()
    );
    match repo.requeue_failed(job.id, t).await.unwrap() {
        Requeue::Requeued(job) => assert_eq!((job.status, job.retry_count), (JobStatus::Pending, 0)),
        other => panic!("expected a requeue, got {other:?}"),
    }
    assert_eq!(repo.requeue_failed(fileflow::lifecycle::JobId(job.id.0 + 1000), t).await.unwrap(), Requeue::NotFound);
    repo.ping().await.unwrap();
}

/// A job records the key that created it and what the key allowed; a key's jobs are
/// listed and counted apart from everyone else's; a completion records the object's version.
async fn jobs_belong_to_their_key(repo: Arc<dyn JobRepository>) {
    let t = now();
    let owned = |key: &str, owner: &str| NewJob {
        grant: Grant { owner: Some(owner.into()), max_file_size: Some(1024), may_create_bucket: false },
        ..new_job(key)
    };
    let a1 = repo.create(&owned("a1", "key-a"), t).await.unwrap();
    let b1 = repo.create(&owned("b1", "key-b"), t).await.unwrap();
    let a2 = repo.create(&owned("a2", "key-a"), t).await.unwrap();
    let open = repo.create(&new_job("open"), t).await.unwrap();
    assert_eq!(
        repo.get(a1.id).await.unwrap().unwrap().grant,
        Grant { owner: Some("key-a".into()), max_file_size: Some(1024), may_create_bucket: false }
    );
    let of = |owner: &str, status| ListFilter { owner: Some(owner.into()), status, limit: 10, ..Default::default() };
    let ids = |jobs: Vec<fileflow::lifecycle::Job>| jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(ids(repo.list(&of("key-a", None)).await.unwrap()), [a2.id, a1.id]);
    assert_eq!(ids(repo.list(&of("key-b", Some(JobStatus::Pending))).await.unwrap()), [b1.id]);
    assert!(repo.list(&of("key-c", None)).await.unwrap().is_empty());
    // Owner, status and cursor together: the next page of key-a's pending jobs.
    let next_page = ListFilter { before: Some(a2.id), ..of("key-a", Some(JobStatus::Pending)) };
    assert_eq!(ids(repo.list(&next_page).await.unwrap()), [a1.id]);
    let everyone = ListFilter { limit: 10, ..Default::default() };
    assert_eq!(ids(repo.list(&everyone).await.unwrap()), [open.id, a2.id, b1.id, a1.id]);

    assert_eq!(repo.unfinished_of("key-a").await.unwrap(), 2);
    repo.claim(a1.id, &lease("w")).await.unwrap();
    assert_eq!(repo.unfinished_of("key-a").await.unwrap(), 2, "processing is unfinished");
    assert!(repo.settle(a1.id, "w", &Settlement::Completed(stored()), t).await.unwrap());
    assert_eq!(repo.unfinished_of("key-a").await.unwrap(), 1);
    assert_eq!(repo.get(a1.id).await.unwrap().unwrap().object_version.as_deref(), Some("ino-mtime-size"));
}

/// API keys: created with their grants and limits, found by id with the secret's digest,
/// listed, revoked once.
async fn keys_are_kept_hashed_and_revoked_once(keys: Arc<dyn KeyStore>) {
    assert!(!keys.has_keys().await.unwrap());
    let issued = IssuedKey::generate();
    let new = NewKey {
        name: "uploader".into(),
        role: Role::Submitter,
        scope: Scope::parse(&["photos", "docs/team-a/*"]).unwrap(),
        limits: KeyLimits {
            rate_limit: Some(5),
            max_unfinished: Some(10),
            max_file_size: Some(1 << 20),
            weight: Some(2),
        },
        notify_url: Some("https://hooks.example.com/fileflow".into()),
    };
    let t = now();
    let key = keys.create_key(&issued, &new, t).await.unwrap();
    assert_eq!(
        (key.id.as_str(), key.role, &key.scope, key.limits),
        (issued.id.as_str(), Role::Submitter, &new.scope, new.limits)
    );
    assert_eq!((key.created_at, key.revoked_at), (t, None));
    assert_eq!(key.notify_url, new.notify_url);
    assert!(keys.has_keys().await.unwrap());

    let (found, digest) = keys.find_key(&issued.id).await.unwrap().unwrap();
    assert_eq!(found, key);
    assert_eq!(digest, issued.secret_sha256);
    assert!(!digest.contains(&issued.key) && !issued.key.contains(&digest), "only a digest is kept");
    assert!(keys.find_key("000000000000").await.unwrap().is_none());

    let admin = IssuedKey::generate();
    let admin_key = NewKey {
        name: "ops".into(),
        role: Role::Admin,
        scope: Scope::default(),
        limits: KeyLimits::default(),
        notify_url: None,
    };
    keys.create_key(&admin, &admin_key, t).await.unwrap();
    let listed = keys.list_keys().await.unwrap();
    assert_eq!(listed.len(), 2);

    assert!(keys.revoke_key(&issued.id, t).await.unwrap());
    assert!(!keys.revoke_key(&issued.id, t).await.unwrap(), "already revoked");
    assert!(!keys.revoke_key("000000000000", t).await.unwrap(), "no such key");
    assert_eq!(keys.find_key(&issued.id).await.unwrap().unwrap().0.revoked_at, Some(t));
    assert!(keys.has_keys().await.unwrap(), "a revoked key still counts: the API stays protected");
}

#[tokio::test]
async fn sqlite_keys_are_kept_hashed_and_revoked_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::connect(&SqliteDb::default_url(dir.path())).await.unwrap();
    db.migrate().await.unwrap();
    keys_are_kept_hashed_and_revoked_once(Arc::new(db)).await;
}

#[tokio::test]
async fn postgres_keys_are_kept_hashed_and_revoked_once() {
    if let Some(url) = services::fresh_postgres().await {
        let db = PgDb::connect(&url).await.unwrap();
        db.migrate().await.unwrap();
        keys_are_kept_hashed_and_revoked_once(Arc::new(db)).await;
    }
}

/// An idempotency key creates one job; the same request gets it back, another is refused;
/// after a day the key is forgotten (on reuse, and by the sweep's clean-up).
async fn idempotency_keys_last_a_day(repo: Arc<dyn JobRepository>) {
    let key =
        |k: &str, digest: &str| IdempotencyKey { owner: "tenant".into(), key: k.into(), request_sha256: digest.into() };
    let t = now();
    let Created::New(first) = repo.create_once(&new_job("a"), &key("k1", "d1"), t).await.unwrap() else { panic!() };
    assert_eq!(repo.create_once(&new_job("a"), &key("k1", "d1"), t).await.unwrap(), Created::Replayed(first.clone()));
    assert_eq!(repo.create_once(&new_job("b"), &key("k1", "d2"), t).await.unwrap(), Created::KeyReused);
    let other_tenant = IdempotencyKey { owner: "other".into(), ..key("k1", "d2") };
    assert!(matches!(repo.create_once(&new_job("b"), &other_tenant, t).await.unwrap(), Created::New(_)));
    let day_later = t + chrono::Duration::hours(24) + chrono::Duration::seconds(1);
    let Created::New(second) = repo.create_once(&new_job("c"), &key("k1", "d3"), day_later).await.unwrap() else {
        panic!("a key older than a day is forgotten")
    };
    assert_ne!(second.id, first.id);
    repo.create_once(&new_job("d"), &key("k2", "d1"), t).await.unwrap();
    assert_eq!(
        repo.forget_idempotency_keys(t + chrono::Duration::seconds(1), 10).await.unwrap(),
        2,
        "k2 and the other tenant's"
    );
    assert_eq!(repo.forget_idempotency_keys(t + chrono::Duration::seconds(1), 10).await.unwrap(), 0);
}

/// The lease holder's progress is recorded; the answer says whether a cancel came; a
/// claim starts the count again and a completion ends it at the object's size.
async fn progress_is_recorded_for_the_lease_holder(repo: Arc<dyn JobRepository>) {
    let t = now();
    let job = repo.create(&new_job("p"), t).await.unwrap();
    assert_eq!((job.bytes_done, job.bytes_total), (None, None));
    repo.claim(job.id, &lease("w")).await.unwrap();
    assert_eq!(repo.report_progress(job.id, "w", 10, Some(100)).await.unwrap(), Some(false));
    assert_eq!(repo.report_progress(job.id, "someone-else", 99, None).await.unwrap(), None);
    let got = repo.get(job.id).await.unwrap().unwrap();
    assert_eq!((got.bytes_done, got.bytes_total), (Some(10), Some(100)));
    assert!(matches!(repo.cancel(job.id, t).await.unwrap(), fileflow::metadata::Cancel::Requested(_)));
    assert_eq!(repo.report_progress(job.id, "w", 20, None).await.unwrap(), Some(true));
    assert!(repo.settle(job.id, "w", &Settlement::Completed(stored()), t).await.unwrap());
    let done = repo.get(job.id).await.unwrap().unwrap();
    assert_eq!((done.bytes_done, done.bytes_total), (Some(5), Some(5)));
}

/// Checkpoints: only the lease holder saves one (each replacing the one before), saving
/// moves the job's progress to at least what is stored, and a cleared one is gone.
async fn checkpoints_are_kept_for_the_lease_holder(repo: Arc<dyn JobRepository>) {
    let t = now();
    let job = repo.create(&new_job("cp"), t).await.unwrap();
    assert_eq!(repo.checkpoint(job.id).await.unwrap(), None);
    repo.claim(job.id, &lease("w")).await.unwrap();
    assert!(repo.save_checkpoint(job.id, "w", 16, Some(100), "first").await.unwrap());
    assert!(repo.save_checkpoint(job.id, "w", 32, Some(100), "second").await.unwrap());
    assert!(!repo.save_checkpoint(job.id, "someone-else", 48, None, "theirs").await.unwrap());
    assert_eq!(repo.checkpoint(job.id).await.unwrap().as_deref(), Some("second"));
    let got = repo.get(job.id).await.unwrap().unwrap();
    assert_eq!((got.bytes_done, got.bytes_total), (Some(32), Some(100)));
    // Progress reported beyond the stored part is not taken back by a checkpoint.
    repo.report_progress(job.id, "w", 40, Some(100)).await.unwrap();
    assert!(repo.save_checkpoint(job.id, "w", 32, Some(100), "again").await.unwrap());
    assert_eq!(repo.get(job.id).await.unwrap().unwrap().bytes_done, Some(40));
    repo.clear_checkpoint(job.id).await.unwrap();
    assert_eq!(repo.checkpoint(job.id).await.unwrap(), None);
}

async fn sqlite() -> (Arc<dyn JobRepository>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::connect(&SqliteDb::default_url(dir.path())).await.unwrap();
    db.migrate().await.unwrap();
    (Arc::new(SqliteRepository::new(db)), dir)
}

async fn postgres() -> Option<Arc<dyn JobRepository>> {
    let url = services::fresh_postgres().await?;
    let db = PgDb::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.migrate().await.expect("migrating twice is harmless");
    Some(Arc::new(PgRepository::new(db)))
}

macro_rules! conformance {
    ($($name:ident),*) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let (repo, _dir) = super::sqlite().await;
                super::$name(repo).await;
            }

            #[tokio::test]
            async fn postgres() {
                if let Some(repo) = super::postgres().await {
                    super::$name(repo).await;
                }
            }
        }
    )*};
}

/// Retention: finished jobs past the age go, oldest first and a bounded batch at a time,
/// with their checkpoints and keys; unfinished and recent ones stay, and so does one whose
/// webhook is still to be delivered.
async fn finished_jobs_past_the_retention_age_are_deleted(repo: Arc<dyn JobRepository>) {
    let t = now();
    let old = t - chrono::Duration::days(2);
    let mut jobs = Vec::new();
    for key in ["done", "broke", "waiting", "recent", "notified", "older"] {
        let mut new = new_job(key);
        if key == "notified" {
            new.notify_url = Some(SourceUrl::parse("https://hooks.example.com/fileflow").unwrap());
        }
        jobs.push(repo.create(&new, old).await.unwrap().id);
    }
    let asked: Vec<_> = jobs.iter().map(|id| (*id, lease("w"))).collect();
    repo.claim_many(&asked).await.unwrap();
    let (done, broke, waiting, recent, notified, older) = (jobs[0], jobs[1], jobs[2], jobs[3], jobs[4], jobs[5]);
    let failed = Settlement::Failed { last_error: "HTTP 404".into(), cause: Cause::OriginStatus };
    assert!(repo.settle(older, "w", &Settlement::Completed(stored()), old - chrono::Duration::hours(1)).await.unwrap());
    assert!(repo.settle(done, "w", &Settlement::Completed(stored()), old).await.unwrap());
    assert!(repo.settle(broke, "w", &failed, old).await.unwrap());
    assert!(repo.release(waiting, "w", old).await.unwrap());
    assert!(repo.settle(recent, "w", &Settlement::Completed(stored()), t).await.unwrap());
    assert!(repo.settle(notified, "w", &Settlement::Completed(stored()), old).await.unwrap());
    repo.save_checkpoint(done, "w", 1, Some(5), "state").await.ok();

    let cutoff = t - chrono::Duration::days(1);
    assert_eq!(repo.forget_finished(cutoff, 1).await.unwrap(), 1, "a bounded batch");
    assert!(repo.get(older).await.unwrap().is_none(), "the oldest goes first");
    assert_eq!(repo.forget_finished(cutoff, 100).await.unwrap(), 2);
    for gone in [done, broke] {
        assert!(repo.get(gone).await.unwrap().is_none());
    }
    assert_eq!(repo.checkpoint(done).await.unwrap(), None);
    for kept in [waiting, recent, notified] {
        assert!(repo.get(kept).await.unwrap().is_some(), "job {kept} was deleted");
    }
    assert_eq!(repo.forget_finished(cutoff, 100).await.unwrap(), 0);
}

conformance!(
    finished_jobs_past_the_retention_age_are_deleted,
    create_get_and_list,
    concurrent_creates_each_get_their_own_job,
    concurrent_claims_and_completions,
    claims_are_exclusive_until_the_lease_lapses,
    a_batch_of_claims_is_decided_request_by_request,
    one_job_at_a_time_writes_an_object,
    retries_releases_and_requeues,
    jobs_belong_to_their_key,
    idempotency_keys_last_a_day,
    progress_is_recorded_for_the_lease_holder,
    checkpoints_are_kept_for_the_lease_holder
);

/// PostgreSQL announces a job through its outbox in the same commit as the job's row.
/// Jobs created at the same moment share a statement; each still gets exactly one outbox
/// row, and the relay sees them in job order.
#[tokio::test]
async fn postgres_creates_announce_each_job_once_and_in_order() {
    let Some(url) = services::fresh_postgres().await else { return };
    let db = PgDb::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let repo = Arc::new(PgRepository::new(db.clone()));
    let t = now();
    let creates: Vec<_> = (0..200)
        .map(|i| {
            let repo = repo.clone();
            tokio::spawn(async move { repo.create(&new_job(&format!("o/{i}")), t).await.unwrap().id.0 })
        })
        .collect();
    let mut ids = Vec::new();
    for create in creates {
        ids.push(create.await.unwrap());
    }
    ids.sort_unstable();
    let announced: Vec<(i64, i32)> =
        sqlx::query_as("SELECT job_id, attempt FROM outbox ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(announced, ids.iter().map(|&id| (id, 1)).collect::<Vec<_>>());
}

/// The reconciler's sweep on PostgreSQL: a job whose message the broker lost, and one
/// whose worker died, are announced again (one outbox row each, with the attempt they are
/// on); a job still in the outbox, a job held under a live lease and a finished job are
/// left alone; a job just announced waits out the grace period before the next time.
#[tokio::test]
async fn postgres_sweep_announces_again_what_the_queue_lost() {
    let Some(url) = services::fresh_postgres().await else { return };
    let db = PgDb::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let repo = Arc::new(PgRepository::new(db.clone()));
    let t = now();
    let lost = repo.create(&new_job("lost"), t).await.unwrap();
    let orphaned = repo.create(&new_job("orphaned"), t).await.unwrap();
    let held = repo.create(&new_job("held"), t).await.unwrap();
    let finished = repo.create(&new_job("finished"), t).await.unwrap();
    // The relay published these four (and the broker then lost them).
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await.unwrap();
    let waiting = repo.create(&new_job("waiting"), t).await.unwrap();
    assert!(matches!(repo.claim(orphaned.id, &short_lease("dead", 1)).await.unwrap(), Claim::Claimed(_)));
    assert!(matches!(repo.claim(held.id, &lease("alive")).await.unwrap(), Claim::Claimed(_)));
    assert!(matches!(repo.claim(finished.id, &lease("w")).await.unwrap(), Claim::Claimed(_)));
    assert!(repo.settle(finished.id, "w", &Settlement::Completed(stored()), t).await.unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await;

    // While the queue holds a backlog, only the job whose worker died is announced again.
    let quiet = repo.reconcile(&Sweep { grace: Duration::ZERO, limit: 100, pending: false }).await.unwrap();
    assert_eq!((quiet.pending, quiet.expired), (0, 1), "{quiet:?}");
    sqlx::query("DELETE FROM outbox WHERE job_id = $1").bind(orphaned.id.0).execute(&db.pool).await.unwrap();
    sqlx::query("UPDATE files SET announced_at = NULL WHERE id = $1")
        .bind(orphaned.id.0)
        .execute(&db.pool)
        .await
        .unwrap();

    // Two sweeps at once (two API replicas): the jobs are announced once between them.
    let now = sweep(Duration::ZERO, 100);
    let (a, b) = tokio::join!(repo.reconcile(&now), repo.reconcile(&now));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.pending + b.pending, a.expired + b.expired), (1, 1), "{a:?} {b:?}");
    let announced: Vec<(i64, i32)> =
        sqlx::query_as("SELECT job_id, attempt FROM outbox ORDER BY job_id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(announced, [(lost.id.0, 1), (orphaned.id.0, 1), (waiting.id.0, 1)]);

    // Just announced: not again within the grace period, again after it.
    assert_eq!(repo.reconcile(&sweep(Duration::from_secs(60), 100)).await.unwrap().total(), 0);
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await.unwrap();
    assert_eq!(repo.reconcile(&sweep(Duration::from_secs(60), 100)).await.unwrap().total(), 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        repo.reconcile(&sweep(Duration::from_millis(10), 100)).await.unwrap().total(),
        3,
        "lost, orphaned, waiting"
    );
    // The limit bounds a sweep.
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(repo.reconcile(&sweep(Duration::from_millis(10), 2)).await.unwrap().total(), 2);
}

/// How many jobs the sweep storms below work on, and how they run: `SWEEPERS` sweeps at
/// once (API replicas), each `ROUNDS` times in a row, `SWEEP_LIMIT` jobs a sweep at most.
const STORM_JOBS: usize = 300;
const SWEEPERS: usize = 16;
const ROUNDS: usize = 12;
const SWEEP_LIMIT: u32 = 25;

/// `STORM_JOBS` jobs created an hour ago, every third of them claimed under a lease that
/// has already lapsed (its worker died).
async fn overdue_jobs(repo: &Arc<dyn JobRepository>) -> Vec<i64> {
    let t = now() - chrono::Duration::hours(1);
    let mut ids = Vec::new();
    for i in 0..STORM_JOBS {
        let job = repo.create(&new_job(&format!("storm/{i}")), t).await.unwrap();
        if i % 3 == 0 {
            assert!(matches!(repo.claim(job.id, &short_lease("dead", 1)).await.unwrap(), Claim::Claimed(_)));
        }
        ids.push(job.id.0);
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    ids
}

/// `SWEEPERS` sweeps at once, each at least `ROUNDS` times and on until every job is
/// announced, then a few more; returns how many jobs they said they announced between them.
/// (A sweep that finds another at work announces nothing, so the count decides when to stop.)
async fn sweep_storm(repo: &Arc<dyn JobRepository>, grace: Duration) -> u64 {
    let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let sweepers: Vec<_> = (0..SWEEPERS)
        .map(|_| {
            let (repo, total) = (repo.clone(), total.clone());
            tokio::spawn(async move {
                let (mut rounds, mut after_all) = (0, 0);
                while rounds < ROUNDS || after_all < 3 {
                    let announced = repo.reconcile(&sweep(grace, SWEEP_LIMIT)).await.unwrap().total();
                    total.fetch_add(announced, std::sync::atomic::Ordering::SeqCst);
                    rounds += 1;
                    if total.load(std::sync::atomic::Ordering::SeqCst) >= STORM_JOBS as u64 {
                        after_all += 1;
                    }
                    assert!(std::time::Instant::now() < deadline, "the sweeps did not announce every job within 60 s");
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for sweeper in sweepers {
        sweeper.await.unwrap();
    }
    total.load(std::sync::atomic::Ordering::SeqCst)
}

/// Under load, concurrent sweeps (many API replicas) announce each lost job exactly once
/// between them: one outbox row per job, and the counts they report add up to the jobs.
/// Then, with a relay draining the outbox while the sweeps go on, a job already announced
/// is not announced again within the grace period.
#[tokio::test]
async fn postgres_concurrent_sweeps_announce_each_job_once() {
    let Some(url) = services::fresh_postgres().await else { return };
    let db = PgDb::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let repo: Arc<dyn JobRepository> = Arc::new(PgRepository::new(db.clone()));
    let mut ids = overdue_jobs(&repo).await;
    ids.sort_unstable();
    // The relay published them all, and the broker lost them.
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await.unwrap();

    // No grace period: only the outbox rows tell a sweep that a job is on its way.
    let reported = sweep_storm(&repo, Duration::ZERO).await;
    let announced: Vec<i64> =
        sqlx::query_scalar("SELECT job_id FROM outbox ORDER BY job_id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(announced, ids, "each job announced exactly once (a repeated id is a duplicate)");
    assert_eq!(reported, STORM_JOBS as u64, "the sweeps' counts add up to the jobs");

    // Lost again; this time a relay drains the outbox while the sweeps run, so only each
    // job's `announced_at` and the grace period keep it from going out twice.
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await.unwrap();
    sqlx::query("UPDATE files SET announced_at = NULL").execute(&db.pool).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut published = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<i64> =
                    sqlx::query_scalar("DELETE FROM outbox RETURNING job_id").fetch_all(&pool).await.unwrap();
                published.extend(batch);
                tokio::task::yield_now().await;
            }
            published
        })
    };
    let reported = sweep_storm(&repo, Duration::from_secs(60)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut announced = relay.await.unwrap();
    announced.extend(sqlx::query_scalar::<_, i64>("SELECT job_id FROM outbox").fetch_all(&db.pool).await.unwrap());
    announced.sort_unstable();
    assert_eq!(announced, ids, "each job announced exactly once within the grace period");
    assert_eq!(reported, STORM_JOBS as u64);
}

/// The embedded stack has the same property: concurrent sweeps give each job that lost its
/// queue row exactly one back, and their counts add up.
#[tokio::test]
async fn sqlite_concurrent_sweeps_give_each_job_one_queue_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::connect(&SqliteDb::default_url(dir.path())).await.unwrap();
    db.migrate().await.unwrap();
    let repo: Arc<dyn JobRepository> = Arc::new(SqliteRepository::new(db.clone()));
    let mut ids = overdue_jobs(&repo).await;
    ids.sort_unstable();
    sqlx::query("DELETE FROM queue").execute(&db.reads).await.unwrap();
    let reported = sweep_storm(&repo, Duration::ZERO).await;
    let queued: Vec<i64> =
        sqlx::query_scalar("SELECT job_id FROM queue ORDER BY job_id").fetch_all(&db.reads).await.unwrap();
    assert_eq!(queued, ids);
    assert_eq!(reported, STORM_JOBS as u64, "the sweeps' counts add up to the jobs");
}

/// The embedded stack's sweep: an unfinished job that lost its queue row gets it back.
#[tokio::test]
async fn sqlite_sweep_gives_an_unfinished_job_its_queue_row_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::connect(&SqliteDb::default_url(dir.path())).await.unwrap();
    db.migrate().await.unwrap();
    let repo = SqliteRepository::new(db.clone());
    let t = now() - chrono::Duration::seconds(5);
    let job = repo.create(&new_job("q"), t).await.unwrap();
    let other = repo.create(&new_job("r"), t).await.unwrap();
    assert_eq!(repo.reconcile(&sweep(Duration::from_secs(1), 100)).await.unwrap().total(), 0, "nothing is missing");
    sqlx::query("DELETE FROM queue WHERE job_id = ?1").bind(job.id.0).execute(&db.reads).await.unwrap();
    let swept = repo.reconcile(&sweep(Duration::from_secs(1), 100)).await.unwrap();
    assert_eq!((swept.pending, swept.expired), (1, 0));
    let queued: Vec<i64> =
        sqlx::query_scalar("SELECT job_id FROM queue ORDER BY job_id").fetch_all(&db.reads).await.unwrap();
    assert_eq!(queued, [job.id.0, other.id.0]);
}

/// The announcing wrapper (SQLite's `serve`) remembers the owners of the jobs it holds, and
/// forgets each one whatever ends its hold: an outcome, a release, or a lost lease.
#[tokio::test]
async fn announcing_forgets_jobs_whose_lease_was_lost() {
    let (inner, _dir) = sqlite().await;
    let repo = fileflow::events::Announcing::new(inner, Default::default());
    let t = now();
    let mut ids = Vec::new();
    for key in ["a", "b", "c", "d"] {
        ids.push(repo.create(&new_job(key), t).await.unwrap().id);
    }
    let asked: Vec<_> = ids.iter().map(|id| (*id, short_lease("w", 50))).collect();
    let claims = repo.claim_many(&asked).await.unwrap();
    assert!(claims.iter().all(|c| matches!(c, Claim::Claimed(_))), "{claims:?}");
    assert_eq!(repo.remembered(), 4);
    assert!(repo.settle(ids[0], "w", &Settlement::Completed(stored()), t).await.unwrap());
    assert!(repo.release(ids[1], "w", t).await.unwrap());
    assert_eq!(repo.remembered(), 2);
    // The other two lose their leases to a second worker; the first finds out by renewing
    // one and by reporting progress on the other.
    tokio::time::sleep(Duration::from_millis(80)).await;
    let taken: Vec<_> = ids[2..].iter().map(|id| (*id, lease("v"))).collect();
    repo.claim_many(&taken).await.unwrap();
    assert!(!repo.renew(ids[2], &short_lease("w", 50)).await.unwrap());
    assert_eq!(repo.report_progress(ids[3], "w", 1, Some(5)).await.unwrap(), None);
    // The second worker's claims are remembered; the lost ones were not kept twice.
    assert_eq!(repo.remembered(), 2);
    assert!(repo.settle(ids[2], "v", &Settlement::Cancelled, t).await.unwrap());
    assert!(!repo.settle(ids[3], "w", &Settlement::Cancelled, t).await.unwrap());
    assert!(repo.settle(ids[3], "v", &Settlement::Cancelled, t).await.unwrap());
    assert_eq!(repo.remembered(), 0);
}
