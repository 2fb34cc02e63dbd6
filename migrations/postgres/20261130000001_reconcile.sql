-- When a job was last handed to the broker (by the relay, or again by the reconciler), so
-- the reconciler can tell a job the queue lost from one still on its way.
ALTER TABLE files ADD COLUMN announced_at TIMESTAMPTZ;
-- A token the accepting process gives each new job, so a group insert retried after an
-- ambiguous commit finds the jobs it already wrote instead of writing them twice.
ALTER TABLE files ADD COLUMN accept_token TEXT;
CREATE UNIQUE INDEX files_accept_token_idx ON files (accept_token);
-- The reconciler's sweep reads only unfinished jobs.
CREATE INDEX files_unfinished_idx ON files (id) WHERE status IN ('pending', 'processing');
CREATE INDEX outbox_job_idx ON outbox (job_id);
