-- The CRC64/NVME of every stored object (as S3 writes it, base64).
-- Sync (`if_exists: if_changed`): how the origin named the version of the file a job
-- stored, so a later job for the same key and URL can ask whether it changed; and whether
-- a job completed on the origin's `304 Not Modified`, without a transfer. The index finds
-- the last job that stored a key from an origin that named its version.
--
-- `if_exists` takes a fourth value. Its CHECK constraint is widened in place, as SQLite's
-- ALTER TABLE documentation describes for changes that leave the stored content as it is
-- (every existing row still passes): the table's SQL text is edited under
-- `writable_schema` and the connection's schema reloaded (RESET); the index created below
-- bumps the schema version, so other connections reload it too.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
SET sql = replace(sql, '''overwrite'', ''skip'', ''fail'')', '''overwrite'', ''skip'', ''fail'', ''if_changed'')')
WHERE type = 'table' AND name = 'files';
PRAGMA writable_schema = RESET;
-- The edit must have found the constraint: otherwise stop here (the CHECK below fails and
-- the migration with it) rather than accept `if_changed` and refuse every such job.
CREATE TEMP TABLE if_changed_allowed (widened INTEGER CHECK (widened));
INSERT INTO if_changed_allowed
SELECT sql LIKE '%''overwrite'', ''skip'', ''fail'', ''if_changed''%' FROM sqlite_schema
WHERE type = 'table' AND name = 'files';
DROP TABLE if_changed_allowed;
ALTER TABLE files ADD COLUMN crc64nvme TEXT;
ALTER TABLE files ADD COLUMN origin_etag TEXT;
ALTER TABLE files ADD COLUMN origin_last_modified TEXT;
ALTER TABLE files ADD COLUMN not_modified INTEGER NOT NULL DEFAULT 0;
CREATE INDEX files_stored_version_idx ON files (bucket_name, object_name, id)
    WHERE status = 'completed' AND (origin_etag IS NOT NULL OR origin_last_modified IS NOT NULL);
