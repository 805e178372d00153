-- A replayed quarantine row records the run that loaded it, and when.
ALTER TABLE __SCHEMA__.quarantine ADD COLUMN replay_run text, ADD COLUMN replayed_at timestamptz;
