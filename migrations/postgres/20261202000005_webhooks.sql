-- Webhooks: a job's `notify_url`, and a durable outbox of deliveries written by the same
-- statement that records the job's final outcome (a trigger), so an outcome is never
-- recorded without its notification. Each try is kept, for the job's view.
ALTER TABLE files ADD COLUMN notify_url TEXT;

CREATE TABLE webhook_deliveries (
    id              BIGSERIAL   PRIMARY KEY,
    job_id          BIGINT      NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    event           TEXT        NOT NULL,
    url             TEXT        NOT NULL,
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    claimed_until   TIMESTAMPTZ,
    delivered_at    TIMESTAMPTZ,
    given_up_at     TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
CREATE INDEX webhook_deliveries_job_idx ON webhook_deliveries (job_id);

CREATE TABLE webhook_attempts (
    delivery_id  BIGINT      NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at TIMESTAMPTZ NOT NULL,
    status       INTEGER,
    error        TEXT
);
CREATE INDEX webhook_attempts_delivery_idx ON webhook_attempts (delivery_id);

CREATE FUNCTION files_final_outcome_notifies() RETURNS trigger AS $$
BEGIN
    INSERT INTO webhook_deliveries (job_id, event, url, next_attempt_at)
    VALUES (NEW.id, 'upload.' || NEW.status, NEW.notify_url, now());
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER files_final_outcome_notifies AFTER UPDATE OF status ON files FOR EACH ROW
WHEN (NEW.notify_url IS NOT NULL AND NEW.status IN ('completed', 'failed', 'cancelled')
      AND OLD.status IS DISTINCT FROM NEW.status)
EXECUTE FUNCTION files_final_outcome_notifies();
