-- A job can be cancelled: status `cancelled` (final), and `cancel_requested_at` set when a
-- caller asks while a worker transfers it (the worker stops and records `cancelled`).
ALTER TABLE files DROP CONSTRAINT files_status_check;
ALTER TABLE files ADD CONSTRAINT files_status_check
    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled'));
ALTER TABLE files ADD COLUMN cancel_requested_at TIMESTAMPTZ;
