//! Finance aggregates. The warehouse does the heavy part where the data is (filters and
//! per-group sums in SQL, so only small pre-aggregated tables travel); polars assembles
//! them here into the reports. polars is used by this crate only.
//!
//! Every figure is per currency: nothing here adds two currencies together. Amounts travel
//! as integer units of 1/10000 (i128) and become exact decimals at the end.

use std::collections::{BTreeMap, HashMap};

use chrono::NaiveDate;
use polars::prelude::*;
use rust_decimal::Decimal;
use serde::Serialize;
use sluice_engine::entity::Payment;
use sluice_engine::finance_rules::{
    AGING_BUCKETS, AgingBuckets, AgingSide, AgingTotal, AnomalyDocument, FlowTotal, ProfitTotal,
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Flow {
    /// Payments in.
    pub inflow: Decimal,
    /// Payments out.
    pub outflow: Decimal,
    /// In minus out.
    pub net: Decimal,
}

/// One month of a currency's cash flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct MonthFlow {
    /// `YYYY-MM`.
    pub month: String,
    /// Its flow.
    #[serde(flatten)]
    pub flow: Flow,
}

/// A currency's cash flow: the period's total and the months that had payments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CurrencyFlow {
    /// Over the whole period.
    #[serde(flatten)]
    pub total: Flow,
    /// Per month, in order.
    pub monthly: Vec<MonthFlow>,
}

/// Cash flow over `[from, to]`: inflow = payments in, outflow = payments out, net.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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

/// The sum of `amount` over the group's rows whose `key` is `value` (0 when none).
fn amount_where(key: &str, value: &str) -> Expr {
    col("amount")
        .filter(col(key).eq(lit(value)))
        .sum()
        .fill_null(lit(0i128))
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
    let monthly = df
        .lazy()
        .group_by([col("currency"), col("month")])
        .agg([
            amount_where("direction", "in").alias("inflow"),
            amount_where("direction", "out").alias("outflow"),
        ])
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct MonthProfit {
    /// `YYYY-MM`.
    pub month: String,
    /// Its figures.
    #[serde(flatten)]
    pub profit: Profit,
}

/// A currency's profitability: the period's figures and the months that had documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CurrencyProfit {
    /// Over the whole period.
    #[serde(flatten)]
    pub total: Profit,
    /// Per month, in order.
    pub monthly: Vec<MonthProfit>,
}

/// Profitability over `[from, to]`, per currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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
    let monthly = df
        .lazy()
        .group_by([col("currency"), col("month")])
        .agg([
            amount_where("line", "revenue").alias("revenue"),
            amount_where("line", "cogs").alias("cogs"),
            amount_where("line", "expense").alias("expense"),
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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
        .map(|b| amount_where("bucket", b).alias(*b))
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

/// Settings of the anomaly checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnomalyOptions {
    /// |robust z| above this is an outlier (default 3.5).
    pub threshold: f64,
    /// Documents a counterparty needs in a currency before its amounts are judged
    /// (default 5).
    pub min_history: usize,
}

impl AnomalyOptions {
    /// The settings as a key for saved results (`threshold=3.5;min_history=5`).
    pub fn key(&self) -> String {
        format!(
            "threshold={};min_history={}",
            self.threshold, self.min_history
        )
    }
}

impl Default for AnomalyOptions {
    fn default() -> Self {
        AnomalyOptions {
            threshold: 3.5,
            min_history: 5,
        }
    }
}

/// Something that looks wrong, with the document and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Anomaly {
    /// `amount_outlier`, `duplicate_doc_number` or `overpayment`.
    pub kind: String,
    /// `invoice`, `bill` or `payment`.
    pub side: String,
    /// The document's (or payment's) external id.
    pub document: String,
    /// Its currency.
    pub currency: String,
    /// Its customer or vendor.
    pub counterparty_id: Option<String>,
    /// Its amount.
    pub amount: Decimal,
    /// Why it is flagged.
    pub why: String,
}

/// A document number as one counterparty's: side, counterparty id, doc_number.
type NumberKey<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>);

fn group() -> [Expr; 3] {
    [col("side"), col("cp"), col("currency")]
}

/// Amount outliers and duplicate document numbers (polars), and overpayments.
///
/// - amount_outlier: per side, counterparty and currency with at least `min_history`
///   documents: robust z = 0.6745 (x - median) / MAD, MAD the median absolute deviation;
///   flagged when |z| > threshold. A group whose MAD is 0 is not judged.
/// - duplicate_doc_number: one counterparty's doc_number on documents with different
///   external ids (each of them is listed).
/// - overpayment: a payment larger than the open balance of the documents it is applied
///   to, that open balance being their totals minus the payments applied to them before it
///   (by date, then id); payments in go to invoices, payments out to bills, same currency.
pub fn anomalies(
    docs: &[AnomalyDocument],
    payments: &[Payment],
    options: AnomalyOptions,
) -> Result<Vec<Anomaly>, FinanceError> {
    let mut out = Vec::new();
    if !docs.is_empty() {
        let df = df!(
            "side" => docs.iter().map(|d| d.side.as_str()).collect::<Vec<_>>(),
            "id" => docs.iter().map(|d| d.external_id.as_str()).collect::<Vec<_>>(),
            "doc" => docs.iter().map(|d| d.doc_number.as_deref()).collect::<Vec<_>>(),
            "cp" => docs.iter().map(|d| d.counterparty_id.as_deref()).collect::<Vec<_>>(),
            "currency" => docs.iter().map(|d| d.currency.as_str()).collect::<Vec<_>>(),
            "amount" => docs.iter().map(|d| d.total_units as f64 / 10_000.0).collect::<Vec<f64>>(),
            "units" => docs.iter().map(|d| d.total_units).collect::<Vec<i128>>(),
        )?;
        let deviation = col("amount") - col("median");
        let outliers = df
            .clone()
            .lazy()
            .filter(col("cp").is_not_null())
            .with_columns([
                col("amount").median().over(group())?.alias("median"),
                col("amount").count().over(group())?.alias("n"),
            ])
            .with_column(
                when(deviation.clone().lt(lit(0.0)))
                    .then(lit(0.0) - deviation.clone())
                    .otherwise(deviation.clone())
                    .alias("dev"),
            )
            .with_column(col("dev").median().over(group())?.alias("mad"))
            .filter(
                col("n")
                    .gt_eq(lit(options.min_history as u32))
                    .and(col("mad").gt(lit(0.0))),
            )
            .with_column((lit(0.6745) * deviation / col("mad")).alias("z"))
            .filter(
                col("z")
                    .gt(lit(options.threshold))
                    .or(col("z").lt(lit(-options.threshold))),
            )
            .sort(
                ["side", "cp", "currency", "id"],
                SortMultipleOptions::default(),
            )
            .collect()?;
        let (side, id, cp, cur) = (
            outliers.column("side")?.str()?.clone(),
            outliers.column("id")?.str()?.clone(),
            outliers.column("cp")?.str()?.clone(),
            outliers.column("currency")?.str()?.clone(),
        );
        let (units_col, median, z, n) = (
            outliers.column("units")?.i128()?.clone(),
            outliers.column("median")?.f64()?.clone(),
            outliers.column("z")?.f64()?.clone(),
            outliers
                .column("n")?
                .cast(&DataType::UInt64)?
                .u64()?
                .clone(),
        );
        for i in 0..outliers.height() {
            let side = side.get(i).unwrap_or_default();
            out.push(Anomaly {
                kind: "amount_outlier".into(),
                side: side.to_string(),
                document: id.get(i).unwrap_or_default().to_string(),
                currency: cur.get(i).unwrap_or_default().to_string(),
                counterparty_id: cp.get(i).map(str::to_string),
                amount: display_decimal(units(&units_col, i)),
                why: format!(
                    "robust z-score {:.1} against the median {:.2} of {} {side}s of this counterparty (threshold {})",
                    z.get(i).unwrap_or_default(),
                    median.get(i).unwrap_or_default(),
                    n.get(i).unwrap_or_default(),
                    options.threshold
                ),
            });
        }
        let dups = df
            .lazy()
            .filter(col("doc").is_not_null().and(col("cp").is_not_null()))
            .with_column(
                col("id")
                    .n_unique()
                    .over([col("side"), col("cp"), col("doc")])?
                    .alias("k"),
            )
            .filter(col("k").gt(lit(1u32)))
            .sort(["side", "cp", "doc", "id"], SortMultipleOptions::default())
            .collect()?;
        let (side, id, cp, cur, doc) = (
            dups.column("side")?.str()?.clone(),
            dups.column("id")?.str()?.clone(),
            dups.column("cp")?.str()?.clone(),
            dups.column("currency")?.str()?.clone(),
            dups.column("doc")?.str()?.clone(),
        );
        let units_col = dups.column("units")?.i128()?.clone();
        // The ids sharing each (side, counterparty, doc_number), in the frame's order.
        let mut sharing: BTreeMap<NumberKey, Vec<&str>> = BTreeMap::new();
        for i in 0..dups.height() {
            sharing
                .entry((side.get(i), cp.get(i), doc.get(i)))
                .or_default()
                .extend(id.get(i));
        }
        for i in 0..dups.height() {
            let number = doc.get(i).unwrap_or_default();
            let this = id.get(i).unwrap_or_default();
            let others: Vec<&str> = sharing
                .get(&(side.get(i), cp.get(i), doc.get(i)))
                .map(|ids| ids.iter().copied().filter(|&o| o != this).collect())
                .unwrap_or_default();
            out.push(Anomaly {
                kind: "duplicate_doc_number".into(),
                side: side.get(i).unwrap_or_default().to_string(),
                document: id.get(i).unwrap_or_default().to_string(),
                currency: cur.get(i).unwrap_or_default().to_string(),
                counterparty_id: cp.get(i).map(str::to_string),
                amount: display_decimal(units(&units_col, i)),
                why: format!(
                    "doc_number {number} is also on {} of the same counterparty",
                    others.join(", ")
                ),
            });
        }
    }
    out.extend(overpayments(docs, payments));
    Ok(out)
}

fn overpayments(docs: &[AnomalyDocument], payments: &[Payment]) -> Vec<Anomaly> {
    let by_id: HashMap<(&str, &str), usize> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| ((d.side.as_str(), d.external_id.as_str()), i))
        .collect();
    let mut ordered: Vec<&Payment> = payments
        .iter()
        .filter(|p| !p.applied_to.is_empty())
        .collect();
    ordered.sort_by(|a, b| (a.date, &a.external_id).cmp(&(b.date, &b.external_id)));
    let targets_of = |p: &Payment| -> Vec<usize> {
        let side = if p.direction == "in" {
            "invoice"
        } else {
            "bill"
        };
        let mut targets: Vec<usize> = p
            .applied_to
            .iter()
            .filter_map(|id| by_id.get(&(side, id.as_str())).copied())
            .filter(|&d| docs[d].currency == p.currency)
            .collect();
        targets.sort_unstable();
        targets.dedup();
        targets
    };
    let targets: Vec<Vec<usize>> = ordered.iter().map(|p| targets_of(p)).collect();
    // Per document: what the payments so far paid on it; and, for the documents a payment
    // shares with others, which payments those were (such a payment counts once against
    // all of its documents).
    let shared: std::collections::HashSet<usize> = targets
        .iter()
        .filter(|t| t.len() > 1)
        .flatten()
        .copied()
        .collect();
    let mut paid_sum: HashMap<usize, Decimal> = HashMap::new();
    let mut paid_by: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut out = Vec::new();
    for (n, (p, targets)) in ordered.iter().zip(&targets).enumerate() {
        if targets.is_empty() {
            continue;
        }
        let total: Decimal = targets
            .iter()
            .map(|&d| display_decimal(docs[d].total_units))
            .sum();
        let before: Decimal = if let [only] = targets[..] {
            paid_sum.get(&only).copied().unwrap_or_default()
        } else {
            let mut earlier: Vec<usize> = targets
                .iter()
                .filter_map(|d| paid_by.get(d))
                .flatten()
                .copied()
                .collect();
            earlier.sort_unstable();
            earlier.dedup();
            earlier.iter().map(|&i| ordered[i].amount).sum()
        };
        let open = total - before;
        if p.amount > open {
            out.push(Anomaly {
                kind: "overpayment".into(),
                side: "payment".into(),
                document: p.external_id.clone(),
                currency: p.currency.clone(),
                counterparty_id: p.counterparty_id.clone(),
                amount: p.amount,
                why: format!(
                    "pays {} against an open balance of {open} on {}",
                    p.amount,
                    targets
                        .iter()
                        .map(|&d| docs[d].external_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        for &d in targets {
            *paid_sum.entry(d).or_default() += p.amount;
            if shared.contains(&d) {
                paid_by.entry(d).or_default().push(n);
            }
        }
    }
    out
}

/// The anomalies of a tenant.
pub async fn anomalies_report<W: Warehouse>(
    warehouse: &W,
    tenant: &TenantSlug,
    options: AnomalyOptions,
) -> Result<Vec<Anomaly>, FinanceError> {
    let (docs, payments) = tokio::try_join!(
        warehouse.anomaly_documents(tenant),
        warehouse.payments(tenant)
    )?;
    off_the_runtime(move || anomalies(&docs, &payments, options)).await
}

/// One currency's line of the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DashboardCurrency {
    /// Over [from, to].
    pub cash_flow: Flow,
    /// As of `as_of`.
    pub ar_aging: AgingBuckets,
    /// As of `as_of`.
    pub ap_aging: AgingBuckets,
    /// Over [from, to].
    pub profitability: Profit,
    /// Anomalies in this currency.
    pub anomalies_count: u64,
}

/// Cash flow, AR/AP aging, profitability and the anomaly count, per currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Dashboard {
    /// The aging date.
    pub as_of: NaiveDate,
    /// First day of the period.
    pub from: NaiveDate,
    /// Last day of the period.
    pub to: NaiveDate,
    /// Per currency.
    pub currencies: BTreeMap<String, DashboardCurrency>,
}

/// Anomalies per currency, as the dashboard counts them: the counts saved in the warehouse
/// for the current version of the tenant's data when there are some, otherwise computed
/// (the whole [`anomalies_report`]) and saved for that version. Any change to an invoice,
/// bill or payment moves the version on in the same transaction, so a saved count is
/// never stale.
pub async fn anomaly_counts<W: Warehouse>(
    warehouse: &W,
    tenant: &TenantSlug,
    options: AnomalyOptions,
) -> Result<BTreeMap<String, u64>, FinanceError> {
    let key = options.key();
    let (version, saved) = warehouse.anomaly_counts(tenant, &key).await?;
    if let Some(counts) = saved {
        return Ok(counts);
    }
    // Read after the version: if the data moves on meanwhile, these counts are saved under
    // the older version and the next caller computes again.
    let mut counts = BTreeMap::new();
    for a in anomalies_report(warehouse, tenant, options).await? {
        *counts.entry(a.currency).or_insert(0) += 1;
    }
    warehouse
        .save_anomaly_counts(tenant, &key, version, &counts)
        .await?;
    Ok(counts)
}

/// The dashboard of a tenant. Its parts are read concurrently: cash flow and profitability
/// from the warehouse's monthly sums, aging per currency, and the anomaly counts (see
/// [`anomaly_counts`]).
pub async fn dashboard<W: Warehouse>(
    warehouse: &W,
    tenant: &TenantSlug,
    as_of: NaiveDate,
    from: NaiveDate,
    to: NaiveDate,
    options: AnomalyOptions,
) -> Result<Dashboard, FinanceError> {
    let (flow, ar, ap, profit, anomalies) = tokio::try_join!(
        cash_flow_report(warehouse, tenant, from, to),
        async {
            Ok::<_, FinanceError>(
                warehouse
                    .aging(tenant, AgingSide::Receivable, as_of)
                    .await?,
            )
        },
        async { Ok(warehouse.aging(tenant, AgingSide::Payable, as_of).await?) },
        profitability_report(warehouse, tenant, from, to),
        anomaly_counts(warehouse, tenant, options),
    )?;
    let mut out: BTreeMap<String, DashboardCurrency> = BTreeMap::new();
    fn slot<'a>(
        out: &'a mut BTreeMap<String, DashboardCurrency>,
        currency: &str,
    ) -> &'a mut DashboardCurrency {
        out.entry(currency.to_string())
            .or_insert_with(|| DashboardCurrency {
                cash_flow: Flow::default(),
                ar_aging: AgingBuckets::zero(),
                ap_aging: AgingBuckets::zero(),
                profitability: Profit::default(),
                anomalies_count: 0,
            })
    }
    for (c, f) in &flow.currencies {
        slot(&mut out, c).cash_flow = f.total;
    }
    for (c, buckets) in ar.currencies {
        slot(&mut out, &c).ar_aging = buckets;
    }
    for (c, buckets) in ap.currencies {
        slot(&mut out, &c).ap_aging = buckets;
    }
    for (c, p) in &profit.currencies {
        slot(&mut out, c).profitability = p.total;
    }
    for (c, n) in anomalies {
        slot(&mut out, &c).anomalies_count = n;
    }
    Ok(Dashboard {
        as_of,
        from,
        to,
        currencies: out,
    })
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

#[cfg(test)]
mod anomaly_tests {
    use super::*;

    fn doc(id: &str, number: &str, cp: &str, units: i128) -> AnomalyDocument {
        AnomalyDocument {
            side: "invoice".into(),
            external_id: id.into(),
            doc_number: Some(number.into()),
            counterparty_id: Some(cp.into()),
            currency: "USD".into(),
            total_units: units,
            issue_date: NaiveDate::from_ymd_opt(2024, 1, 1).expect("date"),
        }
    }

    fn pay(id: &str, day: u32, cents: i64, to: &[&str]) -> Payment {
        Payment {
            external_id: id.into(),
            direction: "in".into(),
            counterparty_id: Some("C1".into()),
            date: NaiveDate::from_ymd_opt(2024, 2, day).expect("date"),
            amount: Decimal::new(cents, 2),
            currency: "USD".into(),
            applied_to: to.iter().map(|s| s.to_string()).collect(),
            updated_at: None,
        }
    }

    #[test]
    fn outliers_duplicates_and_overpayments_are_found_and_nothing_else() {
        let mut docs: Vec<AnomalyDocument> = (0..10)
            .map(|i| {
                doc(
                    &format!("I{i}"),
                    &format!("N{i}"),
                    "C1",
                    1_000_000 + i * 10_000,
                )
            })
            .collect();
        docs.push(doc("BIG", "N99", "C1", 100_000_000));
        // Too little history to judge: C2's one large invoice is fine.
        docs.push(doc("C2A", "M1", "C2", 10_000));
        docs.push(doc("C2B", "M2", "C2", 90_000_000));
        // The same number under two ids of one counterparty; another counterparty's N1 is fine.
        docs.push(doc("DUP", "N1", "C1", 1_000_000));
        docs.push(doc("X1", "N1", "C3", 1_000_000));
        let payments = [
            pay("P1", 1, 6_000, &["I0"]),  // 60.00 of 100.00
            pay("P2", 2, 6_000, &["I0"]),  // another 60.00: 20.00 too much
            pay("P3", 3, 10_100, &["I1"]), // 101.00 of 101.00: fine
            pay("P4", 4, 5_000, &["I9", "BIG"]),
        ];
        let found = anomalies(&docs, &payments, AnomalyOptions::default()).expect("anomalies");
        let kinds: Vec<(String, String)> = found
            .iter()
            .map(|a| (a.kind.clone(), a.document.clone()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("amount_outlier".to_string(), "BIG".to_string()),
                ("duplicate_doc_number".to_string(), "DUP".to_string()),
                ("duplicate_doc_number".to_string(), "I1".to_string()),
                ("overpayment".to_string(), "P2".to_string()),
            ]
        );
        assert!(
            found[3].why.contains("open balance of 40.00"),
            "{}",
            found[3].why
        );
        assert!(found[1].why.contains("I1"), "{}", found[1].why);
    }
}
