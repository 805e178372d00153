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
use sluice_engine::finance::FlowTotal;
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
