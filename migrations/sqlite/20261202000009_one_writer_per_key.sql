-- One job at a time writes a bucket and key: a job is claimed only while no other job
-- for the same object is `processing`, so two jobs for one key run one after the other
-- and the object ends as the job that finished last stored it. The index keeps that rule
-- and serves the claim's lookup. Jobs already processing side by side are handed back,
-- all but the oldest, before it is built (the reconciler queues them again).
UPDATE files SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL,
    updated_at = CAST(unixepoch('subsec') * 1000 AS INTEGER)
WHERE status = 'processing'
  AND id NOT IN (SELECT min(id) FROM files WHERE status = 'processing' GROUP BY bucket_name, object_name);
CREATE UNIQUE INDEX files_one_writer_per_key_idx ON files (bucket_name, object_name) WHERE status = 'processing';
