-- A key's default webhook: jobs it creates without a `notify_url` of their own use this one.
ALTER TABLE api_keys ADD COLUMN notify_url TEXT;
