-- A job whose outcome is final (completed or failed) has nothing left to deliver: its queue
-- row goes in the same statement that records the outcome, so a worker need not send a
-- separate acknowledgement (one write less per job) and no stale row can outlive the job.
CREATE TRIGGER files_final_outcome_dequeues AFTER UPDATE OF status ON files
WHEN NEW.status IN ('completed', 'failed')
BEGIN
    DELETE FROM queue WHERE job_id = NEW.id;
END;
