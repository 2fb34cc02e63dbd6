-- Fair share: the relay publishes waiting jobs in turns across the keys that have work
-- (weighted by each key's `weight`), then by the job's `priority` (higher first), then
-- by age; it holds them here while the workers' backlog in Kafka is long.
ALTER TABLE files ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN weight INTEGER NOT NULL DEFAULT 1 CHECK (weight >= 1);

ALTER TABLE outbox ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
UPDATE outbox SET owner = COALESCE(f.owner_key, ''), priority = f.priority FROM files f WHERE f.id = outbox.job_id;
CREATE INDEX outbox_turn_idx ON outbox (owner, priority DESC, id);

-- Where each owner is in the turns (stride scheduling: `pass` grows by 1/weight per job
-- published); `outbox_clock` holds the pass of the last job published.
CREATE TABLE outbox_turns (
    owner TEXT PRIMARY KEY,
    pass  DOUBLE PRECISION NOT NULL DEFAULT 0
);
INSERT INTO outbox_turns (owner) SELECT DISTINCT COALESCE(owner_key, '') FROM files ON CONFLICT DO NOTHING;
CREATE TABLE outbox_clock (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    now DOUBLE PRECISION NOT NULL
);
INSERT INTO outbox_clock (id, now) VALUES (1, 0);
