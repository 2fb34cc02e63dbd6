-- Who may make an object visible now: a worker takes its key here (in the fence, just
-- before the store commits) and keeps it until the job's outcome is recorded, so writes of
-- one key and their records happen in the same order, and the object always matches the
-- record of the job that finished last. A holder that died lets go when its lease ends.
CREATE TABLE object_writes (
    bucket_name TEXT    NOT NULL,
    object_name TEXT    NOT NULL,
    holder      TEXT    NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (bucket_name, object_name)
);

-- Recording the outcome (or handing the job back) lets go of the key, in the same statement.
CREATE TRIGGER files_leaving_processing_lets_go AFTER UPDATE OF status ON files
WHEN OLD.status = 'processing' AND NEW.status <> 'processing'
BEGIN
    DELETE FROM object_writes
    WHERE bucket_name = OLD.bucket_name AND object_name = OLD.object_name AND holder = OLD.lease_owner;
END;
