-- A job can be cancelled: status `cancelled` (final), and `cancel_requested_at` set when a
-- caller asks while a worker transfers it (the worker stops and records `cancelled`).
--
-- SQLite cannot change a CHECK constraint in place, so the table is rebuilt. Dropping
-- `files` would take the queue rows with it (ON DELETE CASCADE), so they are kept aside and
-- put back; the triggers and indexes on `files` are made again.
CREATE TEMP TABLE queue_kept AS SELECT * FROM queue;

CREATE TABLE files_next (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    file_url            TEXT    NOT NULL,
    bucket_name         TEXT    NOT NULL,
    object_name         TEXT    NOT NULL,
    etag                TEXT,
    size                INTEGER,
    status              TEXT    NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    retry_count         INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    sha256              TEXT,
    md5                 TEXT,
    content_type        TEXT,
    expected_sha256     TEXT,
    expected_md5        TEXT,
    next_attempt_at     INTEGER,
    lease_owner         TEXT,
    lease_expires_at    INTEGER,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    request_headers     TEXT,
    owner_key           TEXT,
    max_file_size       INTEGER,
    may_create_bucket   INTEGER NOT NULL DEFAULT 1,
    object_version      TEXT,
    cancel_requested_at INTEGER
);

INSERT INTO files_next (id, file_url, bucket_name, object_name, etag, size, status, retry_count, last_error,
    sha256, md5, content_type, expected_sha256, expected_md5, next_attempt_at, lease_owner, lease_expires_at,
    created_at, updated_at, request_headers, owner_key, max_file_size, may_create_bucket, object_version)
SELECT id, file_url, bucket_name, object_name, etag, size, status, retry_count, last_error,
    sha256, md5, content_type, expected_sha256, expected_md5, next_attempt_at, lease_owner, lease_expires_at,
    created_at, updated_at, request_headers, owner_key, max_file_size, may_create_bucket, object_version
FROM files;

DROP TABLE files;
ALTER TABLE files_next RENAME TO files;

CREATE INDEX files_status_idx ON files (status, id);
CREATE INDEX files_owner_idx ON files (owner_key, status, id);

CREATE TRIGGER files_new_job_enqueues AFTER INSERT ON files
BEGIN
    INSERT INTO queue (job_id, attempt, due_at) VALUES (NEW.id, 1, NEW.created_at);
END;

-- A job whose outcome is final has nothing left to deliver.
CREATE TRIGGER files_final_outcome_dequeues AFTER UPDATE OF status ON files
WHEN NEW.status IN ('completed', 'failed', 'cancelled')
BEGIN
    DELETE FROM queue WHERE job_id = NEW.id;
END;

INSERT INTO queue SELECT * FROM queue_kept;
DROP TABLE queue_kept;
