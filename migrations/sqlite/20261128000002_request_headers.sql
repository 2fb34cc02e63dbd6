-- Extra origin request headers a caller supplied (JSON array of [name, value]); secret.
ALTER TABLE files ADD COLUMN request_headers TEXT;
