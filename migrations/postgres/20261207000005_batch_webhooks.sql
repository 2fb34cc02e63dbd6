-- Batch webhooks: a delivery announces a job's end or a batch's end (`batch.completed`,
-- `batch.cancelled`), so `job_id` may be null and `batch_id` names the batch. A batch's
-- delivery carries its body (`payload`, the batch's view when it ended), written in the
-- transaction that closes the batch; the unique index allows one per batch.
ALTER TABLE webhook_deliveries
    ALTER COLUMN job_id DROP NOT NULL,
    ADD COLUMN batch_id BIGINT REFERENCES batches (id) ON DELETE CASCADE,
    ADD COLUMN payload TEXT,
    ADD CONSTRAINT webhook_deliveries_one_subject CHECK ((job_id IS NULL) <> (batch_id IS NULL));
CREATE UNIQUE INDEX webhook_deliveries_batch_idx ON webhook_deliveries (batch_id) WHERE batch_id IS NOT NULL;
