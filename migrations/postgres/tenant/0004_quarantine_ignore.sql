-- Why an admin set a quarantined row aside.
ALTER TABLE __SCHEMA__.quarantine ADD COLUMN ignore_reason text;
