-- Why an admin set a quarantined row aside.
ALTER TABLE quarantine ADD COLUMN ignore_reason TEXT;
