-- The seed's `files` table, grown: checksums, content type, per-job request headers,
-- leases and retry scheduling.
CREATE TABLE files (
    id               BIGSERIAL PRIMARY KEY,
    file_url         TEXT        NOT NULL,
    bucket_name      TEXT        NOT NULL,
    object_name      TEXT        NOT NULL,
    etag             TEXT,
    size             BIGINT,
    status           VARCHAR(20) NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    retry_count      INTEGER     NOT NULL DEFAULT 0,
    last_error       TEXT,
    sha256           TEXT,
    md5              TEXT,
    content_type     TEXT,
    expected_sha256  TEXT,
    expected_md5     TEXT,
    request_headers  TEXT,
    next_attempt_at  TIMESTAMPTZ,
    lease_owner      TEXT,
    lease_expires_at TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX files_status_idx ON files (status, id);

-- The transactional outbox: a message for the queue, written in the same transaction as
-- the job it announces, and deleted by the relay once the broker has acknowledged it.
CREATE TABLE outbox (
    id         BIGSERIAL PRIMARY KEY,
    job_id     BIGINT      NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    attempt    INTEGER     NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
