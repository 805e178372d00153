-- A replayed quarantine row records the run that loaded it, and when.
ALTER TABLE quarantine ADD COLUMN replay_run TEXT;
ALTER TABLE quarantine ADD COLUMN replayed_at TEXT;
