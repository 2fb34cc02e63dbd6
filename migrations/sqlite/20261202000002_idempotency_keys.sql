-- `Idempotency-Key`: the job a key (per API key; '' while the API is open) created, and the
-- SHA-256 of the request that created it. Kept 24 hours.
CREATE TABLE idempotency_keys (
    owner          TEXT    NOT NULL,
    key            TEXT    NOT NULL,
    request_sha256 TEXT    NOT NULL,
    job_id         INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
