-- A new job is deliverable from the statement that records it: its queue row is written by
-- the same INSERT (one write to the database instead of a transaction of two).
CREATE TRIGGER files_new_job_enqueues AFTER INSERT ON files
BEGIN
    INSERT INTO queue (job_id, attempt, due_at) VALUES (NEW.id, 1, NEW.created_at);
END;
