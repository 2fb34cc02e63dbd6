-- The size a caller says the content has (a batch's TSV URL list gives one), verified like
-- the expected checksums.
ALTER TABLE files ADD COLUMN expected_size INTEGER;
