-- Where a large transfer stands (bytes stored, hash states, the store's partial write),
-- saved after each part so the next attempt, in any worker, goes on from there.
-- Written by the worker holding the job's lease; removed when the job ends.
CREATE TABLE checkpoints (
    job_id   INTEGER PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE,
    body     TEXT NOT NULL,
    saved_at INTEGER NOT NULL -- unix milliseconds
);
