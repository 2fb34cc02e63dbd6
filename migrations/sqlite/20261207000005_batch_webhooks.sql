-- Batch webhooks: a delivery announces a job's end or a batch's end (`batch.completed`,
-- `batch.cancelled`), so `job_id` may be null and `batch_id` names the batch. A batch's
-- delivery carries its body (`payload`, the batch's view when it ended), written in the
-- transaction that closes the batch; the unique index allows one per batch.
--
-- SQLite cannot make a column nullable in place: the table is copied, dropped and made
-- again under its own name (no RENAME, which would re-check every trigger that names it),
-- its tries set aside meanwhile so the drop does not cascade to them, and its id sequence
-- kept, so a `webhook-id` is never handed out twice.
CREATE TABLE webhook_deliveries_old AS SELECT * FROM webhook_deliveries;
CREATE TABLE webhook_attempts_old AS SELECT * FROM webhook_attempts;
CREATE TABLE webhook_deliveries_seq AS
    SELECT seq FROM sqlite_sequence WHERE name = 'webhook_deliveries';
DROP TABLE webhook_attempts;
DROP TABLE webhook_deliveries;

CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          INTEGER REFERENCES files (id) ON DELETE CASCADE,
    batch_id        INTEGER REFERENCES batches (id) ON DELETE CASCADE,
    event           TEXT    NOT NULL,
    url             TEXT    NOT NULL,
    -- The body's `data` as written when it was enqueued (batches); a job's is read when sent.
    payload         TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    claimed_until   INTEGER,
    delivered_at    INTEGER,
    given_up_at     INTEGER,
    created_at      INTEGER NOT NULL,
    CHECK ((job_id IS NULL) <> (batch_id IS NULL))
);
INSERT INTO webhook_deliveries (id, job_id, event, url, attempts, next_attempt_at, claimed_until, delivered_at,
                                given_up_at, created_at)
    SELECT id, job_id, event, url, attempts, next_attempt_at, claimed_until, delivered_at, given_up_at, created_at
    FROM webhook_deliveries_old;
DELETE FROM sqlite_sequence WHERE name = 'webhook_deliveries';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'webhook_deliveries', max(seq) FROM
        (SELECT seq FROM webhook_deliveries_seq UNION ALL SELECT max(id) FROM webhook_deliveries)
    HAVING max(seq) IS NOT NULL;
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
CREATE INDEX webhook_deliveries_job_idx ON webhook_deliveries (job_id);
CREATE UNIQUE INDEX webhook_deliveries_batch_idx ON webhook_deliveries (batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE webhook_attempts (
    delivery_id  INTEGER NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at INTEGER NOT NULL,
    status       INTEGER,
    error        TEXT
);
INSERT INTO webhook_attempts (delivery_id, attempted_at, status, error)
    SELECT delivery_id, attempted_at, status, error FROM webhook_attempts_old;
CREATE INDEX webhook_attempts_delivery_idx ON webhook_attempts (delivery_id);

DROP TABLE webhook_deliveries_old;
DROP TABLE webhook_attempts_old;
DROP TABLE webhook_deliveries_seq;
