-- Progress of the transfer under way: bytes received so far and the size the origin
-- declared (NULL when it did not), written about once a second by the worker.
ALTER TABLE files ADD COLUMN bytes_done BIGINT;
ALTER TABLE files ADD COLUMN bytes_total BIGINT;
