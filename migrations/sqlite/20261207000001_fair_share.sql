-- Fair share: waiting jobs are claimed in turns across the keys that have work (weighted
-- by each key's `weight`), then by the job's `priority` (higher first), then by age.
ALTER TABLE files ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN weight INTEGER NOT NULL DEFAULT 1 CHECK (weight >= 1);

-- Each queue row carries its job's owner ('' for jobs of the open API) and priority, so a
-- key's next job is one index probe away.
ALTER TABLE queue ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE queue ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
UPDATE queue SET owner = COALESCE((SELECT owner_key FROM files WHERE files.id = queue.job_id), '');
CREATE INDEX queue_turn_idx ON queue (owner, priority DESC, due_at, job_id);

-- Where each owner is in the turns: `pass` grows by 1/weight for each job of it claimed
-- (stride scheduling); the next job goes to the owner with work whose pass is lowest.
CREATE TABLE queue_turns (
    owner TEXT PRIMARY KEY,
    pass  REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT OR IGNORE INTO queue_turns (owner) SELECT DISTINCT COALESCE(owner_key, '') FROM files;
-- The turns' clock: the pass of the last job claimed. An owner that comes back after an
-- idle spell starts from it, not from where it stopped (no burst to "catch up").
CREATE TABLE queue_clock (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    now REAL NOT NULL
);
INSERT INTO queue_clock (id, now) VALUES (1, 0);

DROP TRIGGER files_new_job_enqueues;
CREATE TRIGGER files_new_job_enqueues AFTER INSERT ON files
BEGIN
    INSERT INTO queue (job_id, attempt, due_at, owner, priority)
        VALUES (NEW.id, 1, NEW.created_at, COALESCE(NEW.owner_key, ''), NEW.priority);
    INSERT OR IGNORE INTO queue_turns (owner) VALUES (COALESCE(NEW.owner_key, ''));
END;
