//! Finance aggregates. The warehouse does the heavy part where the data is (filters and
//! per-group sums in SQL, so only small pre-aggregated tables travel); polars assembles
//! them here into the reports. polars is used by this crate only.
//!
//! Every figure is per currency: nothing here adds two currencies together. Amounts travel
//! as integer units of 1/10000 (i128) and become exact decimals at the end.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use polars::prelude::*;
use rust_decimal::Decimal;
use serde::Serialize;
use sluice_engine::finance::{
    AGING_BUCKETS, AgingBuckets, AgingSide, AgingTotal, FlowTotal, ProfitTotal,
};
use sluice_engine::money::display_decimal;
use sluice_engine::{TenantSlug, Warehouse};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FinanceError {
    /// The warehouse failed.
    #[error(transparent)]
    Warehouse(#[from] sluice_engine::EngineError),
    /// The in-process computation failed.
    #[error("computing the report: {0}")]
    Compute(#[from] PolarsError),
    /// The period is empty or reversed.
    #[error("`from` ({from}) is after `to` ({to})")]
    Period {
        /// Start.
        from: NaiveDate,
        /// End.
        to: NaiveDate,
    },
}

/// Money in and out over a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// Payments in.
    pub inflow: Decimal,
    /// Payments out.
    pub outflow: Decimal,
    /// In minus out.
    pub net: Decimal,
}

/// One month of a currency's cash flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MonthFlow {
    /// `YYYY-MM`.
    pub month: String,
    /// Its flow.
    #[serde(flatten)]
    pub flow: Flow,
}

/// A currency's cash flow: the period's total and the months that had payments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CurrencyFlow {
    /// Over the whole period.
    #[serde(flatten)]
    pub total: Flow,
    /// Per month, in order.
    pub monthly: Vec<MonthFlow>,
}

/// Cash flow over `[from, to]`: inflow = payments in, outflow = payments out, net.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CashFlowReport {
    /// First day.
    pub from: NaiveDate,
    /// Last day.
    pub to: NaiveDate,
    /// Per currency.
    pub currencies: BTreeMap<String, CurrencyFlow>,
}

fn units(ca: &Int128Chunked, i: usize) -> i128 {
    ca.get(i).unwrap_or(0)
}

/// Assembles the cash-flow report from the warehouse's monthly sums.
pub fn cash_flow(
    from: NaiveDate,
    to: NaiveDate,
    totals: &[FlowTotal],
) -> Result<CashFlowReport, FinanceError> {
    let mut report = CashFlowReport {
        from,
        to,
        currencies: BTreeMap::new(),
    };
    if totals.is_empty() {
        return Ok(report);
    }
    let df = df!(
        "currency" => totals.iter().map(|t| t.currency.as_str()).collect::<Vec<_>>(),
        "direction" => totals.iter().map(|t| t.direction.as_str()).collect::<Vec<_>>(),
        "month" => totals.iter().map(|t| t.month.as_str()).collect::<Vec<_>>(),
        "amount" => totals.iter().map(|t| t.amount_units).collect::<Vec<i128>>(),
    )?;
    let sum_of = |direction: &str| {
        col("amount")
            .filter(col("direction").eq(lit(direction)))
            .sum()
            .fill_null(lit(0i128))
    };
    let monthly = df
        .lazy()
        .group_by([col("currency"), col("month")])
        .agg([sum_of("in").alias("inflow"), sum_of("out").alias("outflow")])
        .with_column((col("inflow") - col("outflow")).alias("net"))
        .sort(["currency", "month"], SortMultipleOptions::default())
        .collect()?;
    let currency = monthly.column("currency")?.str()?.clone();
    let month = monthly.column("month")?.str()?.clone();
    let (inflow, outflow, net) = (
        monthly.column("inflow")?.i128()?.clone(),
        monthly.column("outflow")?.i128()?.clone(),
        monthly.column("net")?.i128()?.clone(),
    );
    for i in 0..monthly.height() {
        let (Some(c), Some(m)) = (currency.get(i), month.get(i)) else {
            continue;
        };
        let (inn, out, n) = (units(&inflow, i), units(&outflow, i), units(&net, i));
        let entry = report
            .currencies
            .entry(c.to_string())
            .or_insert_with(|| CurrencyFlow {
                total: Flow::default(),
                monthly: Vec::new(),
            });
        entry.monthly.push(MonthFlow {
            month: m.to_string(),
            flow: Flow {
                inflow: display_decimal(inn),
                outflow: display_decimal(out),
                net: display_decimal(n),
            },
        });
    }
    // Period totals: the exact sums of the months, per currency.
    for flow in report.currencies.values_mut() {
        let (mut inn, mut out) = (Decimal::ZERO, Decimal::ZERO);
        for m in &flow.monthly {
            inn += m.flow.inflow;
            out += m.flow.outflow;
        }
        flow.total = Flow {
            inflow: inn,
            outflow: out,
            net: inn - out,
        };
    }
    Ok(report)
}

/// The cash-flow report of a tenant over `[from, to]`.
pub async fn cash_flow_report<W: Warehouse>(
    warehouse: &W,
    tenant: &TenantSlug,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<CashFlowReport, FinanceError> {
    if from > to {
        return Err(FinanceError::Period { from, to });
    }
    let totals = warehouse.cash_flow_totals(tenant, from, to).await?;
    off_the_runtime(move || cash_flow(from, to, &totals)).await
}

/// Runs polars work on a blocking thread: it is CPU work, and polars must not block a
/// runtime worker (it refuses to on a current-thread runtime).
async fn off_the_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FinanceError> + Send + 'static,
) -> Result<T, FinanceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FinanceError::Compute(PolarsError::ComputeError(e.to_string().into())))?
}

/// Profitability over a period (documents by issue date, void ones excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Profit {
    /// Invoice totals minus credit-note totals.
    pub revenue: Decimal,
    /// Bills of category cogs, their credit notes subtracted.
    pub cogs: Decimal,
    /// Revenue minus cogs.
    pub gross_profit: Decimal,
    /// Gross profit / revenue, rounded to 4 decimals (half to even); null when revenue is 0.
    pub gross_margin: Option<Decimal>,
    /// Bills of category expense, their credit notes subtracted.
    pub expenses: Decimal,
    /// Gross profit minus expenses.
    pub net_profit: Decimal,
}

impl Profit {
    /// The derived figures of revenue, cogs and expenses.
    pub fn from_lines(revenue: Decimal, cogs: Decimal, expenses: Decimal) -> Self {
        let gross_profit = revenue - cogs;
        Profit {
            revenue,
            cogs,
            gross_profit,
            gross_margin: (!revenue.is_zero()).then(|| (gross_profit / revenue).round_dp(4)),
            expenses,
            net_profit: gross_profit - expenses,
        }
    }
}

/// One month of a currency's profitability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MonthProfit {
    /// `YYYY-MM`.
    pub month: String,
    /// Its figures.
    #[serde(flatten)]
    pub profit: Profit,
}

/// A currency's profitability: the period's figures and the months that had documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CurrencyProfit {
    /// Over the whole period.
    #[serde(flatten)]
    pub total: Profit,
    /// Per month, in order.
    pub monthly: Vec<MonthProfit>,
}

/// Profitability over `[from, to]`, per currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProfitabilityReport {
    /// First day.
    pub from: NaiveDate,
    /// Last day.
    pub to: NaiveDate,
    /// Per currency.
    pub currencies: BTreeMap<String, CurrencyProfit>,
}

/// Assembles profitability from the warehouse's monthly sums per line.
pub fn profitability(
    from: NaiveDate,
    to: NaiveDate,
    totals: &[ProfitTotal],
) -> Result<ProfitabilityReport, FinanceError> {
    let mut report = ProfitabilityReport {
        from,
        to,
        currencies: BTreeMap::new(),
    };
    if totals.is_empty() {
        return Ok(report);
    }
    let df = df!(
        "currency" => totals.iter().map(|t| t.currency.as_str()).collect::<Vec<_>>(),
        "month" => totals.iter().map(|t| t.month.as_str()).collect::<Vec<_>>(),
        "line" => totals.iter().map(|t| t.line.as_str()).collect::<Vec<_>>(),
        "amount" => totals.iter().map(|t| t.amount_units).collect::<Vec<i128>>(),
    )?;
    let line = |name: &str| {
        col("amount")
            .filter(col("line").eq(lit(name)))
            .sum()
            .fill_null(lit(0i128))
    };
    let monthly = df
        .lazy()
        .group_by([col("currency"), col("month")])
        .agg([
            line("revenue").alias("revenue"),
            line("cogs").alias("cogs"),
            line("expense").alias("expense"),
        ])
        .sort(["currency", "month"], SortMultipleOptions::default())
        .collect()?;
    let currency = monthly.column("currency")?.str()?.clone();
    let month = monthly.column("month")?.str()?.clone();
    let (revenue, cogs, expense) = (
        monthly.column("revenue")?.i128()?.clone(),
        monthly.column("cogs")?.i128()?.clone(),
        monthly.column("expense")?.i128()?.clone(),
    );
    for i in 0..monthly.height() {
        let (Some(c), Some(m)) = (currency.get(i), month.get(i)) else {
            continue;
        };
        let entry = report
            .currencies
            .entry(c.to_string())
            .or_insert_with(|| CurrencyProfit {
                total: Profit::default(),
                monthly: Vec::new(),
            });
        entry.monthly.push(MonthProfit {
            month: m.to_string(),
            profit: Profit::from_lines(
                display_decimal(units(&revenue, i)),
                display_decimal(units(&cogs, i)),
                display_decimal(units(&expense, i)),
            ),
        });
    }
    for p in report.currencies.values_mut() {
        let sum = |f: fn(&Profit) -> Decimal| p.monthly.iter().map(|m| f(&m.profit)).sum();
        p.total = Profit::from_lines(sum(|x| x.revenue), sum(|x| x.cogs), sum(|x| x.expenses));
    }
    Ok(report)
}

/// The profitability report of a tenant over `[from, to]`.
pub async fn profitability_report<W: Warehouse>(
    warehouse: &W,
    tenant: &TenantSlug,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<ProfitabilityReport, FinanceError> {
    if from > to {
        return Err(FinanceError::Period { from, to });
    }
    let totals = warehouse.profit_totals(tenant, from, to).await?;
    off_the_runtime(move || profitability(from, to, &totals)).await
}

/// One counterparty's open balances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterpartyAging {
    /// The customer or vendor id (none when the documents have none).
    pub id: Option<String>,
    /// A name the documents give it.
    pub name: Option<String>,
    /// By bucket.
    #[serde(flatten)]
    pub buckets: AgingBuckets,
    /// All buckets.
    pub total: Decimal,
}

/// A currency's aging: its buckets, their total, and per counterparty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CurrencyAging {
    /// By bucket.
    #[serde(flatten)]
    pub buckets: AgingBuckets,
    /// All buckets.
    pub total: Decimal,
    /// Per customer (AR) or vendor (AP), by id.
    pub counterparties: Vec<CounterpartyAging>,
}

/// AR or AP aging as of a date (see the README's definitions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgingDetail {
    /// The as-of date.
    pub as_of: NaiveDate,
    /// Per currency.
    pub currencies: BTreeMap<String, CurrencyAging>,
}

fn buckets_of(row: &[i128]) -> AgingBuckets {
    let mut b = AgingBuckets::zero();
    for (name, units) in AGING_BUCKETS.iter().zip(row) {
        b.add(name, display_decimal(*units));
    }
    b
}

/// Assembles aging from the warehouse's sums per currency, counterparty and bucket.
pub fn aging(as_of: NaiveDate, totals: &[AgingTotal]) -> Result<AgingDetail, FinanceError> {
    let mut report = AgingDetail {
        as_of,
        currencies: BTreeMap::new(),
    };
    if totals.is_empty() {
        return Ok(report);
    }
    let df = df!(
        "currency" => totals.iter().map(|t| t.currency.as_str()).collect::<Vec<_>>(),
        "id" => totals.iter().map(|t| t.counterparty_id.as_deref()).collect::<Vec<_>>(),
        "name" => totals.iter().map(|t| t.counterparty_name.as_deref()).collect::<Vec<_>>(),
        "bucket" => totals.iter().map(|t| t.bucket.as_str()).collect::<Vec<_>>(),
        "amount" => totals.iter().map(|t| t.amount_units).collect::<Vec<i128>>(),
    )?;
    let per_bucket: Vec<Expr> = AGING_BUCKETS
        .iter()
        .map(|b| {
            col("amount")
                .filter(col("bucket").eq(lit(*b)))
                .sum()
                .fill_null(lit(0i128))
                .alias(*b)
        })
        .collect();
    let mut by_party = per_bucket.clone();
    by_party.push(col("name").max().alias("name"));
    let parties = df
        .clone()
        .lazy()
        .group_by([col("currency"), col("id")])
        .agg(by_party)
        .sort(
            ["currency", "id"],
            SortMultipleOptions::default().with_nulls_last(true),
        )
        .collect()?;
    let currencies = df
        .lazy()
        .group_by([col("currency")])
        .agg(per_bucket)
        .sort(["currency"], SortMultipleOptions::default())
        .collect()?;
    let bucket_cols = |frame: &DataFrame| -> Result<Vec<Int128Chunked>, FinanceError> {
        AGING_BUCKETS
            .iter()
            .map(|b| Ok(frame.column(b)?.i128()?.clone()))
            .collect()
    };
    let cols = bucket_cols(&currencies)?;
    let names = currencies.column("currency")?.str()?.clone();
    for i in 0..currencies.height() {
        let Some(c) = names.get(i) else { continue };
        let row: Vec<i128> = cols.iter().map(|ca| units(ca, i)).collect();
        let buckets = buckets_of(&row);
        report.currencies.insert(
            c.to_string(),
            CurrencyAging {
                total: buckets.total(),
                buckets,
                counterparties: Vec::new(),
            },
        );
    }
    let cols = bucket_cols(&parties)?;
    let (cur, id, name) = (
        parties.column("currency")?.str()?.clone(),
        parties.column("id")?.str()?.clone(),
        parties.column("name")?.str()?.clone(),
    );
    for i in 0..parties.height() {
        let Some(c) = cur.get(i) else { continue };
        let row: Vec<i128> = cols.iter().map(|ca| units(ca, i)).collect();
        let buckets = buckets_of(&row);
        if let Some(entry) = report.currencies.get_mut(c) {
            entry.counterparties.push(CounterpartyAging {
                id: id.get(i).map(str::to_string),
                name: name.get(i).map(str::to_string),
                total: buckets.total(),
                buckets,
            });
        }
    }
    Ok(report)
}

/// AR (`Receivable`) or AP (`Payable`) aging of a tenant as of a date.
pub async fn aging_report<W: Warehouse>(
    warehouse: &W,
    tenant: &TenantSlug,
    side: AgingSide,
    as_of: NaiveDate,
) -> Result<AgingDetail, FinanceError> {
    let totals = warehouse.aging_totals(tenant, side, as_of).await?;
    off_the_runtime(move || aging(as_of, &totals)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(c: &str, d: &str, m: &str, units: i128) -> FlowTotal {
        FlowTotal {
            currency: c.into(),
            direction: d.into(),
            month: m.into(),
            amount_units: units,
            payments: 1,
        }
    }

    #[test]
    fn months_and_totals_per_currency_never_mixed() {
        let from = NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
        let to = NaiveDate::from_ymd_opt(2024, 3, 31).expect("date");
        let r = cash_flow(
            from,
            to,
            &[
                t("USD", "in", "2024-01", 1_000_000),
                t("USD", "out", "2024-01", 250_000),
                t("USD", "out", "2024-03", 5),
                t("EUR", "in", "2024-02", 99_999_999_999_999_999_999),
            ],
        )
        .expect("report");
        let usd = &r.currencies["USD"];
        assert_eq!(usd.monthly.len(), 2);
        assert_eq!(usd.monthly[0].flow.net.to_string(), "75.00");
        assert_eq!(usd.monthly[1].flow.inflow, Decimal::ZERO);
        assert_eq!(usd.total.net.to_string(), "74.9995");
        let eur = &r.currencies["EUR"];
        assert_eq!(eur.total.inflow.to_string(), "9999999999999999.9999");
        assert_eq!(eur.total.outflow, Decimal::ZERO);
    }
}

#[cfg(test)]
mod profit_tests {
    use super::*;

    #[test]
    fn margin_is_null_without_revenue_and_lines_stay_apart() {
        let d = NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
        let t = |c: &str, m: &str, l: &str, u: i128| ProfitTotal {
            currency: c.into(),
            month: m.into(),
            line: l.into(),
            amount_units: u,
        };
        let r = profitability(
            d,
            d,
            &[
                t("USD", "2024-01", "revenue", 3_000_000),
                t("USD", "2024-01", "cogs", 1_000_000),
                t("USD", "2024-01", "expense", 500_000),
                t("USD", "2024-02", "expense", 10_000),
            ],
        )
        .expect("report");
        let usd = &r.currencies["USD"];
        assert_eq!(
            usd.monthly[0].profit.gross_margin.map(|m| m.to_string()),
            Some("0.6667".into())
        );
        assert_eq!(usd.monthly[1].profit.gross_margin, None);
        assert_eq!(usd.total.net_profit.to_string(), "149.00");
    }
}
