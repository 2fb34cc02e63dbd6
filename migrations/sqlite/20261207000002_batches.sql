-- Bulk operations: a batch is a manifest read into jobs. Its counters are kept by the
-- statements that change its jobs (the reader's insert, the trigger below), so reading a
-- batch's progress never counts its jobs.
CREATE TABLE batches (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_key         TEXT,
    -- 'reading' (the manifest is being read), 'running', 'completed', 'cancelled'.
    state             TEXT NOT NULL DEFAULT 'reading',
    paused            INTEGER NOT NULL DEFAULT 0,
    -- The request: where the manifest is and what its rows default to (JSON).
    request           TEXT NOT NULL,
    idempotency_key   TEXT,
    request_sha256    TEXT,
    -- How far the manifest has been read: rows turned into jobs or invalid rows.
    rows_read         INTEGER NOT NULL DEFAULT 0,
    reader            TEXT,
    reader_until      INTEGER,
    read_error        TEXT,
    total             INTEGER NOT NULL DEFAULT 0,
    pending           INTEGER NOT NULL DEFAULT 0,
    processing        INTEGER NOT NULL DEFAULT 0,
    completed         INTEGER NOT NULL DEFAULT 0,
    failed            INTEGER NOT NULL DEFAULT 0,
    cancelled         INTEGER NOT NULL DEFAULT 0,
    invalid           INTEGER NOT NULL DEFAULT 0,
    bytes_done        INTEGER NOT NULL DEFAULT 0,
    report_written_at INTEGER,
    report_error      TEXT,
    ended_at          INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX batches_owner_idx ON batches (owner_key, id);
CREATE INDEX batches_open_idx ON batches (state, id) WHERE ended_at IS NULL;
CREATE UNIQUE INDEX batches_idempotency_idx ON batches (COALESCE(owner_key, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE batch_invalid_rows (
    batch_id INTEGER NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    row      INTEGER NOT NULL,
    file_url TEXT,
    reason   TEXT NOT NULL,
    PRIMARY KEY (batch_id, row)
) WITHOUT ROWID;

ALTER TABLE files ADD COLUMN batch_id INTEGER;
ALTER TABLE files ADD COLUMN batch_row INTEGER;
CREATE INDEX files_batch_idx ON files (batch_id, id) WHERE batch_id IS NOT NULL;

CREATE TRIGGER files_batch_counts AFTER UPDATE OF status ON files
WHEN NEW.batch_id IS NOT NULL AND OLD.status <> NEW.status
BEGIN
    UPDATE batches SET
        pending = pending + (NEW.status = 'pending') - (OLD.status = 'pending'),
        processing = processing + (NEW.status = 'processing') - (OLD.status = 'processing'),
        completed = completed + (NEW.status = 'completed') - (OLD.status = 'completed'),
        failed = failed + (NEW.status = 'failed') - (OLD.status = 'failed'),
        cancelled = cancelled + (NEW.status = 'cancelled') - (OLD.status = 'cancelled'),
        bytes_done = bytes_done + (CASE WHEN NEW.status = 'completed' THEN COALESCE(NEW.size, 0) ELSE 0 END)
                                - (CASE WHEN OLD.status = 'completed' THEN COALESCE(OLD.size, 0) ELSE 0 END)
    WHERE id = NEW.batch_id;
END;
