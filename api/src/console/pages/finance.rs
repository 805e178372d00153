//! Finance: for an as-of date and a period, per currency (never added across currencies):
//! the dashboard's figures (the same as `GET /v1/finance/dashboard`), AR and AP aging as
//! bars and tables with a drill-down to counterparties, cash flow by month, profitability
//! by month, and the anomalies.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use chrono::{Datelike, NaiveDate, Utc};
use maud::{Markup, html};
use serde::Deserialize;
use sluice_engine::Store;
use sluice_engine::finance_rules::{AgingBuckets, AgingSide};

use crate::console::charts::{Bar, MonthBars, bars, months};
use crate::console::session::SignedIn;
use crate::console::{PageResult, layout, url_encode};
use crate::error::ApiError;
use crate::routes::{anomaly_list, finance_error};
use crate::state::AppState;

/// The page's dates (defaults: today; the twelve months up to today).
#[derive(Debug, Default, Deserialize)]
pub struct FinanceQuery {
    as_of: Option<NaiveDate>,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    currency: Option<String>,
}

impl FinanceQuery {
    fn dates(&self) -> (NaiveDate, NaiveDate, NaiveDate) {
        let today = Utc::now().date_naive();
        let as_of = self.as_of.unwrap_or(today);
        let to = self.to.unwrap_or(as_of);
        let from = self.from.unwrap_or_else(|| {
            NaiveDate::from_ymd_opt(to.year() - 1, to.month(), 1)
                .and_then(|d| d.checked_add_months(chrono::Months::new(1)))
                .unwrap_or(to)
        });
        (as_of, from, to)
    }
}

const BUCKETS: [&str; 5] = ["current", "1_30", "31_60", "61_90", "over_90"];

fn bucket_values(b: &AgingBuckets) -> [rust_decimal::Decimal; 5] {
    [b.current, b.d1_30, b.d31_60, b.d61_90, b.over_90]
}

fn aging_block(
    title: &str,
    side: &str,
    currency: &str,
    as_of: NaiveDate,
    b: &AgingBuckets,
) -> Markup {
    let values = bucket_values(b);
    let chart: Vec<Bar> = BUCKETS
        .iter()
        .zip(values)
        .map(|(l, v)| Bar {
            label: (*l).to_string(),
            value: v,
        })
        .collect();
    html! {
        section class="card" {
            h3 { (title) }
            (bars(&format!("{title} {currency} as of {as_of}"), &chart))
            table class="data compact" {
                caption class="sr-only" { (title) " " (currency) }
                thead { tr { @for l in BUCKETS { th scope="col" class="num" { (l) } } th scope="col" class="num" { "total" } } }
                tbody { tr { @for v in values { td class="num" { (v) } } td class="num" { strong { (b.total()) } } } }
            }
            p { a href={ "/finance/aging/" (side) "?as_of=" (as_of) "&currency=" (url_encode(currency)) } { "By " @if side == "ar" { "customer" } @else { "vendor" } " →" } }
        }
    }
}

/// `GET /finance`
pub async fn page<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Query(q): Query<FinanceQuery>,
) -> PageResult {
    let (as_of, from, to) = q.dates();
    if from > to {
        return Err(ApiError::bad_request(format!(
            "the period starts ({from}) after it ends ({to})"
        ))
        .into());
    }
    let tenant = &user.tenant;
    let w = &*s.warehouse;
    let (dash, flow, profit) = tokio::try_join!(
        sluice_finance::dashboard(
            w,
            tenant,
            as_of,
            from,
            to,
            sluice_finance::AnomalyOptions::default()
        ),
        sluice_finance::cash_flow_report(w, tenant, from, to),
        sluice_finance::profitability_report(w, tenant, from, to),
    )
    .map_err(finance_error)?;
    let anomalies = anomaly_list(&s, tenant, sluice_finance::AnomalyOptions::default()).await?;
    let body = html! {
        h1 { "Finance" }
        form method="get" action="/finance" class="filters" {
            label { "As of " input type="date" name="as_of" value=(as_of); }
            label { "From " input type="date" name="from" value=(from); }
            label { "To " input type="date" name="to" value=(to); }
            button type="submit" { "Show" }
        }
        @if dash.currencies.is_empty() { p class="empty" { "No invoices, bills or payments loaded yet." } }
        @for (currency, d) in &dash.currencies {
            section class="currency" data-currency=(currency) {
                h2 { (currency) }
                div class="kpis" {
                    div class="kpi" { div class="k" { "Cash in" } div class="v" data-figure="cash_flow.inflow" { (d.cash_flow.inflow) } }
                    div class="kpi" { div class="k" { "Cash out" } div class="v" data-figure="cash_flow.outflow" { (d.cash_flow.outflow) } }
                    div class="kpi" { div class="k" { "Net cash" } div class="v" data-figure="cash_flow.net" { (d.cash_flow.net) } }
                    div class="kpi" { div class="k" { "Receivable" } div class="v" data-figure="ar_aging.total" { (d.ar_aging.total()) } }
                    div class="kpi" { div class="k" { "Payable" } div class="v" data-figure="ap_aging.total" { (d.ap_aging.total()) } }
                    div class="kpi" { div class="k" { "Revenue" } div class="v" data-figure="profitability.revenue" { (d.profitability.revenue) } }
                    div class="kpi" { div class="k" { "Net profit" } div class="v" data-figure="profitability.net_profit" { (d.profitability.net_profit) } }
                    div class="kpi" { div class="k" { "Anomalies" } div class="v" data-figure="anomalies_count" { (d.anomalies_count) } }
                }
                div class="grid2" {
                    (aging_block("AR aging", "ar", currency, as_of, &d.ar_aging))
                    (aging_block("AP aging", "ap", currency, as_of, &d.ap_aging))
                }
                @if flow.currencies.get(currency).is_none_or(|f| f.monthly.is_empty()) {
                    section class="card" { h3 { "Cash flow by month" } p class="empty" { "No payments in " (currency) " from " (from) " to " (to) "." } }
                }
                @if let Some(f) = flow.currencies.get(currency).filter(|f| !f.monthly.is_empty()) {
                    section class="card" {
                        h3 { "Cash flow by month" }
                        (months(&format!("Cash flow {currency} by month, in above and out below the axis"),
                            &f.monthly.iter().map(|m| MonthBars { month: m.month.clone(), inflow: m.flow.inflow, outflow: m.flow.outflow }).collect::<Vec<_>>()))
                        details {
                            summary { "Table" }
                            table class="data compact" {
                                thead { tr { th scope="col" { "Month" } th scope="col" class="num" { "In" } th scope="col" class="num" { "Out" } th scope="col" class="num" { "Net" } } }
                                tbody {
                                    @for m in &f.monthly { tr { td { (m.month) } td class="num" { (m.flow.inflow) } td class="num" { (m.flow.outflow) } td class="num" { (m.flow.net) } } }
                                    tr class="total" { th scope="row" { "Total" } td class="num" { (f.total.inflow) } td class="num" { (f.total.outflow) } td class="num" { (f.total.net) } }
                                }
                            }
                        }
                    }
                }
                @if let Some(p) = profit.currencies.get(currency) {
                    section class="card" {
                        h3 { "Profitability" }
                        table class="data compact" {
                            thead { tr {
                                th scope="col" { "Month" } th scope="col" class="num" { "Revenue" } th scope="col" class="num" { "COGS" }
                                th scope="col" class="num" { "Gross profit" } th scope="col" class="num" { "Margin" }
                                th scope="col" class="num" { "Expenses" } th scope="col" class="num" { "Net profit" }
                            } }
                            tbody {
                                @for m in &p.monthly {
                                    tr { td { (m.month) } td class="num" { (m.profit.revenue) } td class="num" { (m.profit.cogs) }
                                         td class="num" { (m.profit.gross_profit) } td class="num" { (m.profit.gross_margin.map(|g| g.to_string()).unwrap_or_default()) }
                                         td class="num" { (m.profit.expenses) } td class="num" { (m.profit.net_profit) } }
                                }
                                tr class="total" { th scope="row" { "Period" } td class="num" { (p.total.revenue) } td class="num" { (p.total.cogs) }
                                     td class="num" { (p.total.gross_profit) } td class="num" { (p.total.gross_margin.map(|g| g.to_string()).unwrap_or_default()) }
                                     td class="num" { (p.total.expenses) } td class="num" { (p.total.net_profit) } }
                            }
                        }
                    }
                }
                @let found: Vec<_> = anomalies.iter().filter(|a| &a.currency == currency).collect();
                section class="card" {
                    h3 { "Anomalies (" (found.len()) ")" }
                    @if found.is_empty() { p class="empty" { "None found." } }
                    @else {
                        table class="data compact" {
                            thead { tr { th scope="col" { "Kind" } th scope="col" { "Document" } th scope="col" { "Counterparty" } th scope="col" class="num" { "Amount" } th scope="col" { "Why" } } }
                            tbody {
                                @for a in found.iter().take(200) {
                                    tr {
                                        td { span class="rule" { (a.kind) } }
                                        td { a class="mono" href={ "/finance/documents/" (a.side) "/" (url_encode(&a.document)) } { (a.side) " " (a.document) } }
                                        td { (a.counterparty_id.clone().unwrap_or_default()) }
                                        td class="num" { (a.amount) }
                                        td class="small" { (a.why) }
                                    }
                                }
                            }
                        }
                        @if found.len() > 200 { p class="muted small" { "The first 200 of " (found.len()) "; all of them: " code { "GET /v1/finance/anomalies" } "." } }
                    }
                }
            }
        }
    };
    Ok(layout(&user, "Finance", "/finance", None, body))
}

/// `GET /finance/aging/{side}`: one currency's open balances by counterparty.
pub async fn aging<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(side): Path<String>,
    Query(q): Query<FinanceQuery>,
) -> PageResult {
    let (aging_side, title, who) = match side.as_str() {
        "ar" => (AgingSide::Receivable, "AR aging", "Customer"),
        "ap" => (AgingSide::Payable, "AP aging", "Vendor"),
        _ => return Err(ApiError::not_found(format!("aging side {side:?} (ar or ap)")).into()),
    };
    let (as_of, _, _) = q.dates();
    let report = sluice_finance::aging_report(&*s.warehouse, &user.tenant, aging_side, as_of)
        .await
        .map_err(finance_error)?;
    let body = html! {
        p { a href={ "/finance?as_of=" (as_of) } { "← Finance" } }
        h1 { (title) " as of " (as_of) }
        @for (currency, c) in report.currencies.iter().filter(|(c, _)| q.currency.as_deref().is_none_or(|want| want == c.as_str())) {
            h2 { (currency) }
            div class="table-wrap" {
            table class="data" {
                thead { tr { th scope="col" { (who) } @for l in BUCKETS { th scope="col" class="num" { (l) } } th scope="col" class="num" { "total" } } }
                tbody {
                    @for cp in &c.counterparties {
                        tr id={ "cp-" (cp.id.clone().unwrap_or_default()) } {
                            th scope="row" { (cp.name.clone().or_else(|| cp.id.clone()).unwrap_or_else(|| "(none)".into())) @if let Some(id) = &cp.id { " " span class="muted small mono" { (id) } } }
                            @for v in bucket_values(&cp.buckets) { td class="num" { (v) } }
                            td class="num" { strong { (cp.total) } }
                        }
                    }
                    tr class="total" {
                        th scope="row" { "Total" }
                        @for v in bucket_values(&c.buckets) { td class="num" { (v) } }
                        td class="num" { strong { (c.total) } }
                    }
                }
            }
            }
        }
    };
    Ok(layout(&user, title, "/finance", None, body))
}

/// `GET /finance/documents/{kind}/{id}`: an invoice, bill or payment as loaded (from every
/// source that has one with this id), and what the anomaly check says of it.
pub async fn document<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path((kind, id)): Path<(String, String)>,
) -> PageResult {
    if !matches!(kind.as_str(), "invoice" | "bill" | "payment") {
        return Err(ApiError::not_found(format!(
            "document kind {kind:?} (invoice, bill or payment)"
        ))
        .into());
    }
    let docs = s
        .warehouse
        .finance_document(&user.tenant, &kind, &id)
        .await?;
    if docs.is_empty() {
        return Err(ApiError::not_found(format!("{kind} {id}")).into());
    }
    let anomalies =
        anomaly_list(&s, &user.tenant, sluice_finance::AnomalyOptions::default()).await?;
    let flagged: Vec<_> = anomalies
        .iter()
        .filter(|a| a.side == kind && a.document == id)
        .collect();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    };
    let body = html! {
        p { a href="/finance" { "← Finance" } }
        h1 { (kind) " " span class="mono" { (id) } }
        @if !flagged.is_empty() {
            div class="problem" role="alert" {
                @for a in &flagged { p { span class="rule" { (a.kind) } ": " (a.why) } }
            }
        }
        @for d in &docs {
            dl class="facts card" {
                @if let Some(fields) = d.as_object() {
                    @for (k, v) in fields {
                        dt { (k) }
                        dd class=[matches!(k.as_str(), "total" | "balance" | "amount").then_some("num-left")] {
                            @if k == "applied_to" {
                                @for target in v.as_array().into_iter().flatten() {
                                    a class="mono" href={ "/finance/documents/invoice/" (url_encode(&text(target))) } { (text(target)) } " "
                                }
                            } @else { (text(v)) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&user, "Document", "/finance", None, body))
}
