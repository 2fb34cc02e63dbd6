-- The CRC64/NVME of every stored object (as S3 writes it, base64).
-- Sync (`if_exists: if_changed`): how the origin named the version of the file a job
-- stored, so a later job for the same key and URL can ask whether it changed; and whether
-- a job completed on the origin's `304 Not Modified`, without a transfer. The index finds
-- the last job that stored a key from an origin that named its version.
ALTER TABLE files DROP CONSTRAINT files_if_exists_check,
    ADD CONSTRAINT files_if_exists_check CHECK (if_exists IN ('overwrite', 'skip', 'fail', 'if_changed'));
ALTER TABLE files ADD COLUMN crc64nvme TEXT;
ALTER TABLE files ADD COLUMN origin_etag TEXT;
ALTER TABLE files ADD COLUMN origin_last_modified TEXT;
ALTER TABLE files ADD COLUMN not_modified BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX files_stored_version_idx ON files (bucket_name, object_name, id)
    WHERE status = 'completed' AND (origin_etag IS NOT NULL OR origin_last_modified IS NOT NULL);
