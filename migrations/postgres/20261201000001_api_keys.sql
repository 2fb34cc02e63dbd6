-- API keys: who may call the API and what each may do. The secret itself is never kept,
-- only its SHA-256. `buckets` is a JSON array of grants (`bucket` or `bucket/prefix*`);
-- empty means every bucket. Limits left NULL take the server's defaults.
CREATE TABLE api_keys (
    id             TEXT        PRIMARY KEY,
    name           TEXT        NOT NULL,
    role           TEXT        NOT NULL CHECK (role IN ('admin', 'submitter')),
    buckets        TEXT        NOT NULL,
    secret_sha256  TEXT        NOT NULL,
    rate_limit     INTEGER,
    max_unfinished BIGINT,
    max_file_size  BIGINT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at     TIMESTAMPTZ
);

-- The key that created a job (NULL: created while the API was open), what it allowed the
-- job, and the store's version of the object the job wrote (download links name it).
ALTER TABLE files ADD COLUMN owner_key TEXT;
ALTER TABLE files ADD COLUMN max_file_size BIGINT;
ALTER TABLE files ADD COLUMN may_create_bucket BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE files ADD COLUMN object_version TEXT;
CREATE INDEX files_owner_idx ON files (owner_key, status, id);
