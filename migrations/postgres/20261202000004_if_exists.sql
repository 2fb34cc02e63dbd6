-- What a job does when its object already exists: `overwrite` it (the default), `skip` the
-- fetch and complete, or `fail`.
ALTER TABLE files ADD COLUMN if_exists TEXT NOT NULL DEFAULT 'overwrite'
    CHECK (if_exists IN ('overwrite', 'skip', 'fail'));
