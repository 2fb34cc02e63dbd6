-- The outbox relay bounds how many jobs wait on the jobs topic by counting them here:
-- announced to the broker, still pending, not back in the outbox. This index holds
-- exactly those rows (and retries waiting out their backoff), so the count stays cheap
-- however many jobs wait in the outbox.
CREATE INDEX files_announced_pending ON files (id) WHERE status = 'pending' AND announced_at IS NOT NULL;
