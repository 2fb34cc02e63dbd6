-- The outbox relay bounds how many jobs wait on the jobs topic by counting them here:
-- announced to the broker, still pending, not back in the outbox. This index holds
-- those rows (and retries waiting out their backoff, which the count reads and skips), so
-- the count does not read the jobs waiting in the outbox, however many.
CREATE INDEX files_announced_pending ON files (id) WHERE status = 'pending' AND announced_at IS NOT NULL;
