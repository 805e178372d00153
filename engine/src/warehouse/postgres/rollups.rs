//! The finance rollups (`fin_flow`, `fin_profit`, `fin_open`, migration 0005): a load adds
//! the rows it inserts from its own batch; triggers keep updates and deletions; `check`
//! and `rebuild` compare them with and recompute them from the tables. The rules they
//! follow are `crate::finance_rules`.

use super::{PostgresWarehouse, db, schema_of, table};
use crate::entity::Entity;
use crate::error::Result;
use crate::finance_rules::{is_live_document, profit_line, signed_units};
use crate::money::display_decimal;
use crate::tenant::TenantSlug;
use crate::validate::{dates, money, strings};
use crate::warehouse::LoadStore;
use arrow_array::{Array, RecordBatch};
use chrono::NaiveDate;
use rust_decimal::Decimal;
use sqlx::{AssertSqlSafe, Postgres, Transaction};
use std::collections::HashMap;

/// The finance rollups (kept by triggers, see migration 0005) and the key columns of each;
/// `fin_<name>_expected` computes the same sums from the tables.
pub(super) const ROLLUPS: [(&str, &str); 3] = [
    ("fin_flow", "currency, direction, day"),
    ("fin_profit", "currency, day, line"),
    ("fin_open", "side, currency, due"),
];

/// A group whose rollup differs from the tables: its key, the kept sum and count, and the
/// tables' sum and count (none where the group is missing on that side).
pub(super) type DriftRow = (
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

/// The advisory lock that serialises a tenant's writers of finance rows (taken by the
/// rollup triggers; the same key as `fin_begin` in migration 0005).
pub(super) fn finance_lock_key(tenant: &TenantSlug) -> String {
    format!("sluice.finance.{}", schema_of(tenant))
}

impl PostgresWarehouse {
    /// Compares the tenant's finance rollups with the sums of the tables they are kept
    /// from; one line per group that differs (none when they agree).
    pub async fn check_finance_rollups(&self, tenant: &TenantSlug) -> Result<Vec<String>> {
        self.prepare_tenant(tenant).await?;
        let mut drift = Vec::new();
        for (rollup, key) in ROLLUPS {
            // One statement: the rollup and the tables are read in one snapshot.
            let rows: Vec<DriftRow> =
                sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT COALESCE(k.key, e.key), k.amount::text, k.n, e.amount::text, e.n \
                     FROM (SELECT concat_ws('/', {key}) AS key, amount, n FROM {kept}) k \
                     FULL JOIN (SELECT concat_ws('/', {key}) AS key, amount, n FROM {expected}) e ON e.key = k.key \
                     WHERE k.key IS NULL OR e.key IS NULL OR k.amount <> e.amount OR k.n <> e.n \
                     ORDER BY 1",
                    kept = table(tenant, rollup),
                    expected = table(tenant, &format!("{rollup}_expected")),
                )))
                .fetch_all(&self.pool)
                .await
                .map_err(db(format!("checking {rollup}")))?;
            let show = |amount: Option<String>, n: Option<i64>| match (amount, n) {
                (Some(a), Some(n)) => format!("{a} over {n} rows"),
                _ => "nothing".to_string(),
            };
            drift.extend(rows.into_iter().map(|(group, ka, kn, ea, en)| {
                format!(
                    "{rollup} {group}: kept {}, the tables sum to {}",
                    show(ka, kn),
                    show(ea, en)
                )
            }));
        }
        Ok(drift)
    }

    /// Recomputes the tenant's finance rollups from the tables, in one transaction that
    /// holds the tenant's finance lock (no batch changes them meanwhile), and moves the
    /// finance data version on (saved anomaly counts are computed again).
    pub async fn rebuild_finance_rollups(&self, tenant: &TenantSlug) -> Result<()> {
        self.prepare_tenant(tenant).await?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the rebuild"))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(finance_lock_key(tenant))
            .execute(&mut *tx)
            .await
            .map_err(db("taking the finance lock"))?;
        for (rollup, _) in ROLLUPS {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "DELETE FROM {kept}; INSERT INTO {kept} SELECT * FROM {expected}",
                kept = table(tenant, rollup),
                expected = table(tenant, &format!("{rollup}_expected")),
            )))
            .execute(&mut *tx)
            .await
            .map_err(db(format!("rebuilding {rollup}")))?;
        }
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET version = version + 1",
            table(tenant, "fin_state")
        )))
        .execute(&mut *tx)
        .await
        .map_err(db("moving the finance data version on"))?;
        tx.commit().await.map_err(db("committing the rebuild"))
    }
}

/// A rollup group's sum (units of 1/10000) and row count.
pub(super) type Sums = (i128, i64);

/// Rollup groups as bind arrays: the three key columns, the sums, the counts.
pub(super) type GroupColumns<A, B, C> = (Vec<A>, Vec<B>, Vec<C>, Vec<Decimal>, Vec<i64>);

/// What rows inserted by a batch add to the finance rollups: the definitions of migration
/// 0005's `fin_*_expected` views, applied to the batch's own columns, so that a load's
/// inserts need no transition table (updates and deletions are kept by the triggers).
#[derive(Default)]
pub(super) struct RollupDelta<'a> {
    /// (currency, direction, day) of live payments.
    flow: HashMap<(&'a str, &'a str, NaiveDate), Sums>,
    /// (currency, issue day, line) of live, non-void documents; credit notes negative.
    profit: HashMap<(&'a str, NaiveDate, &'a str), Sums>,
    /// (side, currency, due day) of open balances; credit notes negative.
    open: HashMap<(&'static str, &'a str, NaiveDate), Sums>,
}

impl<'a> RollupDelta<'a> {
    /// The sums of the `selection` rows; none for an entity the rollups do not cover or
    /// when no rows were inserted.
    pub(super) fn of_inserts(
        entity: Entity,
        rows: &'a RecordBatch,
        deleted: &[Option<i64>],
        selection: &[(u32, u128)],
    ) -> Option<Self> {
        if selection.is_empty()
            || !matches!(entity, Entity::Payments | Entity::Invoices | Entity::Bills)
        {
            return None;
        }
        let mut delta = RollupDelta::default();
        // A date PostgreSQL holds is always in chrono's range.
        let day = |a: &arrow_array::Date32Array, row: usize| {
            a.is_valid(row)
                .then(|| crate::time::days_to_date(a.value(row)))
                .flatten()
        };
        let text =
            |a: &'a arrow_array::StringArray, row: usize| a.is_valid(row).then(|| a.value(row));
        let live = |row: usize| deleted.get(row).copied().flatten().is_none();
        let add = |sums: &mut Sums, units: i128| {
            sums.0 += units;
            sums.1 += 1;
        };
        match entity {
            Entity::Payments => {
                let (currency, direction) = (strings(rows, "currency"), strings(rows, "direction"));
                let (date, amount) = (dates(rows, "date"), money(rows, "amount"));
                for &(row, _) in selection {
                    let row = row as usize;
                    if !live(row) || !amount.is_valid(row) {
                        continue;
                    }
                    let (Some(c), Some(d), Some(on)) =
                        (text(currency, row), text(direction, row), day(date, row))
                    else {
                        continue;
                    };
                    let sums = delta.flow.entry((c, d, on)).or_default();
                    add(sums, amount.value(row));
                }
            }
            Entity::Invoices | Entity::Bills => {
                let side = if entity == Entity::Invoices {
                    "invoice"
                } else {
                    "bill"
                };
                let (currency, status, kind) = (
                    strings(rows, "currency"),
                    strings(rows, "status"),
                    strings(rows, "kind"),
                );
                let category = (entity == Entity::Bills).then(|| strings(rows, "category"));
                let (issue, due) = (dates(rows, "issue_date"), dates(rows, "due_date"));
                let (total, balance) = (money(rows, "total"), money(rows, "balance"));
                for &(row, _) in selection {
                    let row = row as usize;
                    let counts = is_live_document(!live(row), text(status, row));
                    let Some(c) = text(currency, row).filter(|_| counts) else {
                        continue;
                    };
                    let kind = text(kind, row);
                    let line = profit_line(category.map(|a| text(a, row)));
                    if let (Some(line), Some(on), true) =
                        (line, day(issue, row), total.is_valid(row))
                    {
                        let key = (c, on, line);
                        add(
                            delta.profit.entry(key).or_default(),
                            signed_units(kind, total.value(row)),
                        );
                    }
                    if let (true, Some(on)) = (
                        balance.is_valid(row) && balance.value(row) > 0,
                        day(due, row),
                    ) {
                        let key = (side, c, on);
                        add(
                            delta.open.entry(key).or_default(),
                            signed_units(kind, balance.value(row)),
                        );
                    }
                }
            }
            _ => {}
        }
        Some(delta)
    }

    /// Adds the sums to the rollups, under the tenant's finance lock, and moves the finance
    /// data version on (inserted rows that add nothing, void or deleted ones, still do: the
    /// version stands for every change).
    pub(super) async fn apply(
        self,
        tx: &mut Transaction<'static, Postgres>,
        tenant: &TenantSlug,
    ) -> Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(finance_lock_key(tenant))
            .execute(&mut **tx)
            .await
            .map_err(db("taking the finance lock"))?;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET version = version + 1",
            table(tenant, "fin_state")
        )))
        .execute(&mut **tx)
        .await
        .map_err(db("moving the finance data version on"))?;
        add_groups(
            tx,
            tenant,
            "fin_flow",
            "currency, direction, day",
            "text, text, date",
            self.flow,
        )
        .await?;
        add_groups(
            tx,
            tenant,
            "fin_profit",
            "currency, day, line",
            "text, date, text",
            self.profit,
        )
        .await?;
        add_groups(
            tx,
            tenant,
            "fin_open",
            "side, currency, due",
            "text, text, date",
            self.open,
        )
        .await?;
        Ok(())
    }
}

/// Adds `groups` to `rollup` (key columns `key` of SQL types `types`): one upsert of
/// arrays, nothing when there are none.
pub(super) async fn add_groups<A, B, C>(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantSlug,
    rollup: &str,
    key: &str,
    types: &str,
    groups: HashMap<(A, B, C), Sums>,
) -> Result<()>
where
    Vec<A>: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
    Vec<B>: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
    Vec<C>: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
{
    if groups.is_empty() {
        return Ok(());
    }
    let mut cols: GroupColumns<A, B, C> = Default::default();
    for ((a, b, c), (units, n)) in groups {
        cols.0.push(a);
        cols.1.push(b);
        cols.2.push(c);
        cols.3.push(display_decimal(units));
        cols.4.push(n);
    }
    let casts: Vec<String> = types
        .split(", ")
        .enumerate()
        .map(|(i, t)| format!("${}::{t}[]", i + 1))
        .collect();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} AS f ({key}, amount, n) SELECT * FROM UNNEST({}, $4::numeric[], $5::int8[]) \
         ON CONFLICT ({key}) DO UPDATE SET amount = f.amount + EXCLUDED.amount, n = f.n + EXCLUDED.n",
        table(tenant, rollup),
        casts.join(", ")
    )))
    .bind(cols.0)
    .bind(cols.1)
    .bind(cols.2)
    .bind(cols.3)
    .bind(cols.4)
    .execute(&mut **tx)
    .await
    .map_err(db(format!("adding to {rollup}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::migrate::TENANT_MIGRATIONS;
    use crate::finance_rules::{LIVE_DOCUMENT_SQL, signed_sql};

    /// Applied migrations are history and are never edited: when a rule changes, this
    /// says that the rollups' views and triggers need a new migration stating it.
    #[test]
    fn the_rollup_migration_states_the_finance_rules() {
        let (_, rollups) = TENANT_MIGRATIONS
            .iter()
            .find(|(v, _)| *v == 5)
            .expect("migration 5");
        for rule in [
            LIVE_DOCUMENT_SQL.to_string(),
            signed_sql("total"),
            signed_sql("balance"),
        ] {
            assert!(rollups.contains(&rule), "migration 5 does not state {rule}");
        }
    }
}
