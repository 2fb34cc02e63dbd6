-- Every change of a job's status or progress is announced on channel `fileflow_jobs`
-- (one JSON per change: id, status, bytes_done, bytes_total, owner), so an API process
-- streams the changes workers in other processes make (GET /api/v1/events).
CREATE FUNCTION files_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fileflow_jobs', json_build_object(
        'id', NEW.id::text, 'status', NEW.status, 'bytes_done', NEW.bytes_done,
        'bytes_total', NEW.bytes_total, 'owner', NEW.owner_key)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER files_insert_notifies AFTER INSERT ON files
    FOR EACH ROW EXECUTE FUNCTION files_notify_change();
CREATE TRIGGER files_change_notifies AFTER UPDATE ON files
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.bytes_done IS DISTINCT FROM NEW.bytes_done)
    EXECUTE FUNCTION files_notify_change();
