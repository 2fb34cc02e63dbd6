-- The seed's `files` table, grown: checksums, content type, leases and retry scheduling.
-- Times are milliseconds since the Unix epoch.
CREATE TABLE files (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    file_url         TEXT    NOT NULL,
    bucket_name      TEXT    NOT NULL,
    object_name      TEXT    NOT NULL,
    etag             TEXT,
    size             INTEGER,
    status           TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    retry_count      INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    sha256           TEXT,
    md5              TEXT,
    content_type     TEXT,
    expected_sha256  TEXT,
    expected_md5     TEXT,
    next_attempt_at  INTEGER,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

CREATE INDEX files_status_idx ON files (status, id);

-- The embedded queue: one row per job that is waiting to be (re)delivered to a worker.
-- A row is written in the same transaction as the job it points at, and deleted only once
-- the job's outcome is recorded.
CREATE TABLE queue (
    job_id       INTEGER PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    due_at       INTEGER NOT NULL,
    locked_by    TEXT,
    locked_until INTEGER
);

CREATE INDEX queue_due_idx ON queue (due_at);
