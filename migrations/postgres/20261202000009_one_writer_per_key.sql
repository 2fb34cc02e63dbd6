-- One job at a time writes a bucket and key: a job is claimed only while no other job
-- for the same object is `processing`, so two jobs for one key run one after the other
-- and the object ends as the job that finished last stored it. The index makes that rule
-- hold under concurrent claims (a claim that would break it fails and is tried again) and
-- serves the claim's lookup. Jobs already processing side by side are handed back, all
-- but the oldest, before it is built.
UPDATE files SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE status = 'processing'
  AND id NOT IN (SELECT min(id) FROM files WHERE status = 'processing' GROUP BY bucket_name, object_name);
CREATE UNIQUE INDEX files_one_writer_per_key_idx ON files (bucket_name, object_name) WHERE status = 'processing';
