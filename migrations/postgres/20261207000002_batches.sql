-- Bulk operations: a batch is a manifest read into jobs. Its counters are kept by the
-- statements that change its jobs (the reader's insert, the trigger below), so reading a
-- batch's progress never counts its jobs.
CREATE TABLE batches (
    id                BIGSERIAL PRIMARY KEY,
    owner_key         TEXT,
    -- 'reading' (the manifest is being read), 'running', 'completed', 'cancelled'.
    state             TEXT NOT NULL DEFAULT 'reading',
    paused            BOOLEAN NOT NULL DEFAULT FALSE,
    request           TEXT NOT NULL,
    idempotency_key   TEXT,
    request_sha256    TEXT,
    rows_read         BIGINT NOT NULL DEFAULT 0,
    reader            TEXT,
    reader_until      TIMESTAMPTZ,
    read_error        TEXT,
    total             BIGINT NOT NULL DEFAULT 0,
    pending           BIGINT NOT NULL DEFAULT 0,
    processing        BIGINT NOT NULL DEFAULT 0,
    completed         BIGINT NOT NULL DEFAULT 0,
    failed            BIGINT NOT NULL DEFAULT 0,
    cancelled         BIGINT NOT NULL DEFAULT 0,
    invalid           BIGINT NOT NULL DEFAULT 0,
    bytes_done        BIGINT NOT NULL DEFAULT 0,
    report_written_at TIMESTAMPTZ,
    report_error      TEXT,
    ended_at          TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX batches_owner_idx ON batches (owner_key, id);
CREATE INDEX batches_open_idx ON batches (state, id) WHERE ended_at IS NULL;
CREATE UNIQUE INDEX batches_idempotency_idx ON batches (COALESCE(owner_key, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE batch_invalid_rows (
    batch_id BIGINT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    row      BIGINT NOT NULL,
    file_url TEXT,
    reason   TEXT NOT NULL,
    PRIMARY KEY (batch_id, row)
);

ALTER TABLE files ADD COLUMN batch_id BIGINT;
ALTER TABLE files ADD COLUMN batch_row BIGINT;
CREATE INDEX files_batch_idx ON files (batch_id, id) WHERE batch_id IS NOT NULL;

CREATE FUNCTION files_batch_counts() RETURNS trigger AS $$
BEGIN
    UPDATE batches SET
        pending = pending + (NEW.status = 'pending')::int - (OLD.status = 'pending')::int,
        processing = processing + (NEW.status = 'processing')::int - (OLD.status = 'processing')::int,
        completed = completed + (NEW.status = 'completed')::int - (OLD.status = 'completed')::int,
        failed = failed + (NEW.status = 'failed')::int - (OLD.status = 'failed')::int,
        cancelled = cancelled + (NEW.status = 'cancelled')::int - (OLD.status = 'cancelled')::int,
        bytes_done = bytes_done
            + (CASE WHEN NEW.status = 'completed' THEN COALESCE(NEW.size, 0) ELSE 0 END)
            - (CASE WHEN OLD.status = 'completed' THEN COALESCE(OLD.size, 0) ELSE 0 END)
    WHERE id = NEW.batch_id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER files_batch_counts AFTER UPDATE OF status ON files
FOR EACH ROW WHEN (NEW.batch_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status)
EXECUTE FUNCTION files_batch_counts();
