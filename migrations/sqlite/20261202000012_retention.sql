-- Retention (`--retention`): finished jobs are deleted oldest first, in bounded batches,
-- found through this index rather than by reading the whole table.
CREATE INDEX files_finished_updated_idx ON files (updated_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
