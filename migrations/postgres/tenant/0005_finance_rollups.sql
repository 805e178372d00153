-- Finance rollups: the sums the dashboard reads, kept in the same transaction as the rows
-- they sum, so a batch counts in them as soon as it commits. Rows a load inserts are summed
-- by the load itself from its batch (the warehouse's commit, under the lock `fin_begin`
-- takes: capturing every inserted row for a trigger cost a first load about half its time
-- again); statement-level triggers keep every update and deletion, whoever makes it. A row
-- inserted by other means than a load is not summed until `sluice finance check --repair`.
--
-- - fin_flow:   live payments per currency, direction and day (cash flow).
-- - fin_profit: live, non-void documents per currency, issue day and line: `revenue` for
--               invoices, the category (`cogs`, `expense`) for bills; credit notes negative.
-- - fin_open:   open balances (balance > 0, not void, live, with a due date) per side,
--               currency and due day; credit notes negative (aging buckets as of any date).
-- `n` counts the rows in a group; a group whose rows are all gone is deleted. The views
-- fin_*_expected compute the same sums from the tables: the definition the loads and the
-- triggers keep, used to fill the rollups here and to check them (`sluice finance check`).
--
-- fin_state.version changes whenever a load inserts invoices, bills or payments, any of
-- them is updated or deleted (not when a re-read only stamps its run id), or the rollups
-- are rebuilt: saved anomaly counts are valid for one version.

CREATE TABLE __SCHEMA__.fin_state (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint NOT NULL
);
INSERT INTO __SCHEMA__.fin_state (version) VALUES (1);

CREATE TABLE __SCHEMA__.fin_flow (
    currency text NOT NULL, direction text NOT NULL, day date NOT NULL,
    amount numeric NOT NULL, n bigint NOT NULL,
    PRIMARY KEY (currency, direction, day)
);
CREATE INDEX fin_flow_empty ON __SCHEMA__.fin_flow (currency) WHERE n = 0;

CREATE TABLE __SCHEMA__.fin_profit (
    currency text NOT NULL, day date NOT NULL, line text NOT NULL,
    amount numeric NOT NULL, n bigint NOT NULL,
    PRIMARY KEY (currency, day, line)
);
CREATE INDEX fin_profit_empty ON __SCHEMA__.fin_profit (currency) WHERE n = 0;

CREATE TABLE __SCHEMA__.fin_open (
    side text NOT NULL, currency text NOT NULL, due date NOT NULL,
    amount numeric NOT NULL, n bigint NOT NULL,
    PRIMARY KEY (side, currency, due)
);
CREATE INDEX fin_open_empty ON __SCHEMA__.fin_open (currency) WHERE n = 0;

CREATE TABLE __SCHEMA__.fin_anomaly_snapshots (
    options     text PRIMARY KEY,
    version     bigint NOT NULL,
    counts      jsonb NOT NULL,
    computed_at timestamptz NOT NULL
);

CREATE VIEW __SCHEMA__.fin_flow_expected AS
    SELECT currency, direction, "date" AS day, SUM(amount) AS amount, COUNT(*) AS n
    FROM __SCHEMA__.payments
    WHERE deleted_at IS NULL AND currency IS NOT NULL AND direction IS NOT NULL
      AND "date" IS NOT NULL AND amount IS NOT NULL
    GROUP BY 1, 2, 3;

CREATE VIEW __SCHEMA__.fin_profit_expected AS
    SELECT currency, issue_date AS day, line,
           SUM(CASE WHEN kind = 'credit_note' THEN -total ELSE total END) AS amount, COUNT(*) AS n
    FROM (SELECT currency, issue_date, 'revenue' AS line, kind, total, status, deleted_at FROM __SCHEMA__.invoices
          UNION ALL
          SELECT currency, issue_date, category, kind, total, status, deleted_at FROM __SCHEMA__.bills) d
    WHERE deleted_at IS NULL AND status <> 'void' AND currency IS NOT NULL AND issue_date IS NOT NULL
      AND line IS NOT NULL AND total IS NOT NULL
    GROUP BY 1, 2, 3;

CREATE VIEW __SCHEMA__.fin_open_expected AS
    SELECT side, currency, due_date AS due,
           SUM(CASE WHEN kind = 'credit_note' THEN -balance ELSE balance END) AS amount, COUNT(*) AS n
    FROM (SELECT 'invoice' AS side, currency, due_date, kind, balance, status, deleted_at FROM __SCHEMA__.invoices
          UNION ALL
          SELECT 'bill', currency, due_date, kind, balance, status, deleted_at FROM __SCHEMA__.bills) d
    WHERE balance > 0 AND status <> 'void' AND deleted_at IS NULL AND due_date IS NOT NULL
      AND currency IS NOT NULL
    GROUP BY 1, 2, 3;

INSERT INTO __SCHEMA__.fin_flow SELECT * FROM __SCHEMA__.fin_flow_expected;
INSERT INTO __SCHEMA__.fin_profit SELECT * FROM __SCHEMA__.fin_profit_expected;
INSERT INTO __SCHEMA__.fin_open SELECT * FROM __SCHEMA__.fin_open_expected;

-- The changed rows of the firing statement, signed: +1 for new versions, -1 for old ones.
CREATE FUNCTION __SCHEMA__.fin_delta(op text) RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
    SELECT CASE op
        WHEN 'DELETE' THEN 'SELECT -1 AS sign, * FROM old_rows'
        ELSE 'SELECT 1 AS sign, * FROM new_rows UNION ALL SELECT -1 AS sign, * FROM old_rows'
    END
$fn$;

-- Whether the firing statement changed what the anomaly checks read (a re-read that only
-- stamps run ids changes nothing).
CREATE FUNCTION __SCHEMA__.fin_changed(op text) RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
    SELECT CASE op
        WHEN 'DELETE' THEN 'SELECT EXISTS (SELECT 1 FROM old_rows)'
        ELSE 'SELECT EXISTS (SELECT source, external_id, row_hash, deleted_at FROM new_rows '
             'EXCEPT SELECT source, external_id, row_hash, deleted_at FROM old_rows)'
    END
$fn$;

-- Serialises the tenant's writers of finance rows from their first change to their commit
-- (the rollups' rows and the version are shared: one lock, always taken first, cannot
-- deadlock), and moves the version on when `changed`. (Transition tables are visible to
-- the trigger function only, so the trigger computes `changed`.)
CREATE FUNCTION __SCHEMA__.fin_begin(changed boolean) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('sluice.finance.__SCHEMA__', 0));
    IF changed THEN
        UPDATE __SCHEMA__.fin_state SET version = version + 1;
    END IF;
END
$fn$;

CREATE FUNCTION __SCHEMA__.fin_payments_changed() RETURNS trigger LANGUAGE plpgsql
-- Transition tables carry no statistics: without this the planner may sort a whole batch
-- (spilling to disk) where hashing its few groups is what pays.
SET enable_sort = off AS $fn$
DECLARE
    changed boolean;
BEGIN
    EXECUTE __SCHEMA__.fin_changed(TG_OP) INTO changed;
    PERFORM __SCHEMA__.fin_begin(changed);
    EXECUTE format($q$
        WITH delta AS (%s)
        INSERT INTO __SCHEMA__.fin_flow AS f (currency, direction, day, amount, n)
        SELECT currency, direction, "date", SUM(sign * amount), SUM(sign) FROM delta
        WHERE deleted_at IS NULL AND currency IS NOT NULL AND direction IS NOT NULL
          AND "date" IS NOT NULL AND amount IS NOT NULL
        GROUP BY 1, 2, 3 HAVING SUM(sign) <> 0 OR SUM(sign * amount) <> 0
        ON CONFLICT (currency, direction, day)
        DO UPDATE SET amount = f.amount + EXCLUDED.amount, n = f.n + EXCLUDED.n
    $q$, __SCHEMA__.fin_delta(TG_OP));
    DELETE FROM __SCHEMA__.fin_flow WHERE n = 0;
    RETURN NULL;
END
$fn$;

-- TG_ARGV[0]: `invoice` or `bill`.
CREATE FUNCTION __SCHEMA__.fin_documents_changed() RETURNS trigger LANGUAGE plpgsql
-- Transition tables carry no statistics: without this the planner may sort a whole batch
-- (spilling to disk) where hashing its few groups is what pays.
SET enable_sort = off AS $fn$
DECLARE
    delta text := __SCHEMA__.fin_delta(TG_OP);
    line text := CASE TG_ARGV[0] WHEN 'invoice' THEN quote_literal('revenue') ELSE 'category' END;
    changed boolean;
BEGIN
    EXECUTE __SCHEMA__.fin_changed(TG_OP) INTO changed;
    PERFORM __SCHEMA__.fin_begin(changed);
    EXECUTE format($q$
        WITH delta AS (%s)
        INSERT INTO __SCHEMA__.fin_profit AS f (currency, day, line, amount, n)
        SELECT currency, issue_date, %s, SUM(sign * CASE WHEN kind = 'credit_note' THEN -total ELSE total END), SUM(sign)
        FROM delta
        WHERE deleted_at IS NULL AND status <> 'void' AND currency IS NOT NULL AND issue_date IS NOT NULL
          AND %2$s IS NOT NULL AND total IS NOT NULL
        GROUP BY 1, 2, 3
        HAVING SUM(sign) <> 0 OR SUM(sign * CASE WHEN kind = 'credit_note' THEN -total ELSE total END) <> 0
        ON CONFLICT (currency, day, line)
        DO UPDATE SET amount = f.amount + EXCLUDED.amount, n = f.n + EXCLUDED.n
    $q$, delta, line);
    EXECUTE format($q$
        WITH delta AS (%s)
        INSERT INTO __SCHEMA__.fin_open AS f (side, currency, due, amount, n)
        SELECT %L, currency, due_date, SUM(sign * CASE WHEN kind = 'credit_note' THEN -balance ELSE balance END), SUM(sign)
        FROM delta
        WHERE balance > 0 AND status <> 'void' AND deleted_at IS NULL AND due_date IS NOT NULL
          AND currency IS NOT NULL
        GROUP BY 1, 2, 3
        HAVING SUM(sign) <> 0 OR SUM(sign * CASE WHEN kind = 'credit_note' THEN -balance ELSE balance END) <> 0
        ON CONFLICT (side, currency, due)
        DO UPDATE SET amount = f.amount + EXCLUDED.amount, n = f.n + EXCLUDED.n
    $q$, delta, TG_ARGV[0]);
    DELETE FROM __SCHEMA__.fin_profit WHERE n = 0;
    DELETE FROM __SCHEMA__.fin_open WHERE n = 0;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER fin_update AFTER UPDATE ON __SCHEMA__.payments REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.fin_payments_changed();
CREATE TRIGGER fin_delete AFTER DELETE ON __SCHEMA__.payments REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.fin_payments_changed();

CREATE TRIGGER fin_update AFTER UPDATE ON __SCHEMA__.invoices REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.fin_documents_changed('invoice');
CREATE TRIGGER fin_delete AFTER DELETE ON __SCHEMA__.invoices REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.fin_documents_changed('invoice');

CREATE TRIGGER fin_update AFTER UPDATE ON __SCHEMA__.bills REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.fin_documents_changed('bill');
CREATE TRIGGER fin_delete AFTER DELETE ON __SCHEMA__.bills REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.fin_documents_changed('bill');
