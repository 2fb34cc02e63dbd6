-- The W3C trace context of the request that created the job (`00-<trace id>-<span id>-01`),
-- carried to the worker with the job's message, so a job's lines share the request's trace id.
ALTER TABLE files ADD COLUMN traceparent TEXT;
