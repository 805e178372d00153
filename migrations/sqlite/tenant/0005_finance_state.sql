-- The finance data version: moved on whenever an invoice, bill or payment changes (a
-- re-read that only stamps its run id changes nothing), in the same transaction. Saved
-- anomaly counts are valid for one version. (PostgreSQL also keeps rollups of the sums;
-- the embedded warehouse sums its tables.)

CREATE TABLE fin_state (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    version INTEGER NOT NULL
);
INSERT INTO fin_state (one, version) VALUES (1, 1);

CREATE TABLE fin_anomaly_snapshots (
    options     TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    counts      TEXT NOT NULL,
    computed_at TEXT NOT NULL
);

CREATE TRIGGER fin_invoices_insert AFTER INSERT ON invoices
BEGIN UPDATE fin_state SET version = version + 1; END;
CREATE TRIGGER fin_invoices_update AFTER UPDATE ON invoices
WHEN OLD.row_hash IS NOT NEW.row_hash OR OLD.deleted_at IS NOT NEW.deleted_at
  OR OLD.source IS NOT NEW.source OR OLD.external_id IS NOT NEW.external_id
BEGIN UPDATE fin_state SET version = version + 1; END;
CREATE TRIGGER fin_invoices_delete AFTER DELETE ON invoices
BEGIN UPDATE fin_state SET version = version + 1; END;

CREATE TRIGGER fin_bills_insert AFTER INSERT ON bills
BEGIN UPDATE fin_state SET version = version + 1; END;
CREATE TRIGGER fin_bills_update AFTER UPDATE ON bills
WHEN OLD.row_hash IS NOT NEW.row_hash OR OLD.deleted_at IS NOT NEW.deleted_at
  OR OLD.source IS NOT NEW.source OR OLD.external_id IS NOT NEW.external_id
BEGIN UPDATE fin_state SET version = version + 1; END;
CREATE TRIGGER fin_bills_delete AFTER DELETE ON bills
BEGIN UPDATE fin_state SET version = version + 1; END;

CREATE TRIGGER fin_payments_insert AFTER INSERT ON payments
BEGIN UPDATE fin_state SET version = version + 1; END;
CREATE TRIGGER fin_payments_update AFTER UPDATE ON payments
WHEN OLD.row_hash IS NOT NEW.row_hash OR OLD.deleted_at IS NOT NEW.deleted_at
  OR OLD.source IS NOT NEW.source OR OLD.external_id IS NOT NEW.external_id
BEGIN UPDATE fin_state SET version = version + 1; END;
CREATE TRIGGER fin_payments_delete AFTER DELETE ON payments
BEGIN UPDATE fin_state SET version = version + 1; END;
