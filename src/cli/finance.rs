//! `sluice finance ...`: aging, cash flow, profitability, anomalies, the dashboard, and the
//! check of PostgreSQL's rollups.

use super::output::OutputArgs;
use anyhow::{Result, bail};
use chrono::NaiveDate;
use clap::{Args, Subcommand};
use sluice_api::export;
use sluice_engine::finance_rules::{AGING_BUCKETS, AgingSide};
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_engine::{TenantSlug, Warehouse};
use std::process::ExitCode;

#[derive(Subcommand)]
pub(super) enum FinanceCommand {
    /// Accounts receivable aging: open invoice balances per currency by days past due.
    #[command(
        name = "ar-aging",
        after_help = "Example:\n  sluice finance ar-aging --tenant acme --as-of 2024-06-30 --json"
    )]
    ArAging(AgingArgs),
    /// Accounts payable aging: open bill balances per currency by days past due.
    #[command(
        name = "ap-aging",
        after_help = "Example:\n  sluice finance ap-aging --tenant acme --as-of 2024-06-30"
    )]
    ApAging(AgingArgs),
    /// Cash flow over a period: payments in and out, net, per currency and month.
    #[command(
        name = "cash-flow",
        after_help = "Example:\n  sluice finance cash-flow --tenant acme --from 2024-01-01 --to 2024-06-30 --json"
    )]
    CashFlow(PeriodArgs),
    /// Profitability over a period: revenue, cogs, gross profit and margin, expenses, net
    /// profit, per currency and month.
    #[command(
        after_help = "Example:\n  sluice finance profitability --tenant acme --from 2024-01-01 --to 2024-12-31 --json"
    )]
    Profitability(PeriodArgs),
    /// Anomalies: amount outliers per counterparty, doc numbers used twice, overpayments.
    #[command(after_help = "Example:\n  sluice finance anomalies --tenant acme --json")]
    Anomalies(AnomalyArgs),
    /// Cash flow, AR/AP aging, profitability and the anomaly count, per currency.
    #[command(
        after_help = "Example:\n  sluice finance dashboard --tenant acme --as-of 2024-06-30 --from 2024-01-01 --to 2024-06-30 --json"
    )]
    Dashboard(DashboardArgs),
    /// PostgreSQL only: compares the rollups the dashboard reads with the sums of the tables
    /// they are kept from, and with --repair rebuilds them from the tables.
    #[command(after_help = "Example:\n  sluice finance check --tenant acme --repair")]
    Check(CheckArgs),
}

#[derive(Args)]
pub(super) struct CheckArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// Rebuild the rollups from the tables when they differ.
    #[arg(long)]
    repair: bool,
}

#[derive(Args)]
pub(super) struct AnomalyArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// |robust z-score| above which an amount is an outlier.
    #[arg(long, default_value_t = 3.5)]
    threshold: f64,
    /// Documents a counterparty needs in a currency before its amounts are judged.
    #[arg(long, default_value_t = 5)]
    min_history: usize,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args)]
pub(super) struct DashboardArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// The aging date (YYYY-MM-DD).
    #[arg(long)]
    as_of: NaiveDate,
    /// First day of the period (YYYY-MM-DD).
    #[arg(long)]
    from: NaiveDate,
    /// Last day of the period (YYYY-MM-DD).
    #[arg(long)]
    to: NaiveDate,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct PeriodArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// First day (YYYY-MM-DD).
    #[arg(long)]
    from: NaiveDate,
    /// Last day (YYYY-MM-DD).
    #[arg(long)]
    to: NaiveDate,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args)]
pub(super) struct AgingArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// The date to age balances at (YYYY-MM-DD).
    #[arg(long)]
    as_of: NaiveDate,
    #[command(flatten)]
    out: OutputArgs,
}

pub(super) async fn finance_check(
    warehouse: &PostgresWarehouse,
    args: &CheckArgs,
) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let drift = warehouse.check_finance_rollups(&tenant).await?;
    if drift.is_empty() {
        println!("tenant '{tenant}': the finance rollups equal the tables' sums");
        return Ok(ExitCode::SUCCESS);
    }
    for line in &drift {
        println!("{line}");
    }
    if !args.repair {
        println!(
            "tenant '{tenant}': {} rollup group(s) differ from the tables; run again with --repair to rebuild them",
            drift.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    warehouse.rebuild_finance_rollups(&tenant).await?;
    let left = warehouse.check_finance_rollups(&tenant).await?;
    if !left.is_empty() {
        bail!(
            "tenant '{tenant}': {} rollup group(s) still differ after the rebuild",
            left.len()
        );
    }
    println!(
        "tenant '{tenant}': {} rollup group(s) differed; rebuilt from the tables, now equal",
        drift.len()
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn cash_flow<W: Warehouse>(warehouse: &W, args: &PeriodArgs) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let report = sluice_finance::cash_flow_report(warehouse, &tenant, args.from, args.to).await?;
    if args.out.table(|| export::cash_flow_table(&report))? {
        return Ok(ExitCode::SUCCESS);
    }
    if args.out.is_json() {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "cash flow for tenant {tenant}, {} to {}",
        args.from, args.to
    );
    if report.currencies.is_empty() {
        println!("no payments in the period");
    }
    for (currency, flow) in &report.currencies {
        println!(
            "{currency:<8}{:>8} {:>18} {:>18} {:>18}",
            "month", "inflow", "outflow", "net"
        );
        for m in &flow.monthly {
            println!(
                "{:<8}{:>8} {:>18} {:>18} {:>18}",
                "", m.month, m.flow.inflow, m.flow.outflow, m.flow.net
            );
        }
        println!(
            "{:<8}{:>8} {:>18} {:>18} {:>18}",
            "", "total", flow.total.inflow, flow.total.outflow, flow.total.net
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn profitability<W: Warehouse>(
    warehouse: &W,
    args: &PeriodArgs,
) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let report =
        sluice_finance::profitability_report(warehouse, &tenant, args.from, args.to).await?;
    if args.out.table(|| export::profitability_table(&report))? {
        return Ok(ExitCode::SUCCESS);
    }
    if args.out.is_json() {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "profitability for tenant {tenant}, {} to {}",
        args.from, args.to
    );
    if report.currencies.is_empty() {
        println!("no documents in the period");
    }
    let margin =
        |m: Option<rust_decimal::Decimal>| m.map_or_else(|| "-".to_string(), |m| m.to_string());
    for (currency, p) in &report.currencies {
        println!(
            "{currency:<8}{:>8} {:>16} {:>16} {:>16} {:>8} {:>16} {:>16}",
            "month", "revenue", "cogs", "gross profit", "margin", "expenses", "net profit"
        );
        let rows = p.monthly.iter().map(|m| (m.month.as_str(), &m.profit));
        for (label, x) in rows.chain(std::iter::once(("total", &p.total))) {
            println!(
                "{:<8}{label:>8} {:>16} {:>16} {:>16} {:>8} {:>16} {:>16}",
                "",
                x.revenue,
                x.cogs,
                x.gross_profit,
                margin(x.gross_margin),
                x.expenses,
                x.net_profit
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn anomalies<W: Warehouse>(warehouse: &W, args: &AnomalyArgs) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let options = sluice_finance::AnomalyOptions {
        threshold: args.threshold,
        min_history: args.min_history,
    };
    let found = sluice_finance::anomalies_report(warehouse, &tenant, options).await?;
    if args.out.table(|| export::anomalies_table(&found))? {
        return Ok(ExitCode::SUCCESS);
    }
    if args.out.is_json() {
        println!("{}", serde_json::to_string(&found)?);
        return Ok(ExitCode::SUCCESS);
    }
    for a in &found {
        println!(
            "{:<21} {:<8} {:<24} {:>16} {}  {}",
            a.kind, a.side, a.document, a.amount, a.currency, a.why
        );
    }
    println!(
        "{} anomal{}",
        found.len(),
        if found.len() == 1 { "y" } else { "ies" }
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn dashboard<W: Warehouse>(
    warehouse: &W,
    args: &DashboardArgs,
) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let d = sluice_finance::dashboard(
        warehouse,
        &tenant,
        args.as_of,
        args.from,
        args.to,
        sluice_finance::AnomalyOptions::default(),
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "dashboard for tenant {tenant}: aging as of {}, period {} to {}",
        d.as_of, d.from, d.to
    );
    for (c, x) in &d.currencies {
        println!("{c}");
        println!(
            "  cash flow      in {}  out {}  net {}",
            x.cash_flow.inflow, x.cash_flow.outflow, x.cash_flow.net
        );
        println!("  AR open        {}", x.ar_aging.total());
        println!("  AP open        {}", x.ap_aging.total());
        println!(
            "  profitability  revenue {}  gross profit {}  net profit {}",
            x.profitability.revenue, x.profitability.gross_profit, x.profitability.net_profit
        );
        println!("  anomalies      {}", x.anomalies_count);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn aging<W: Warehouse>(
    warehouse: &W,
    side: AgingSide,
    args: &AgingArgs,
) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let report = sluice_finance::aging_report(warehouse, &tenant, side, args.as_of).await?;
    let sheet = match side {
        AgingSide::Receivable => "AR aging",
        AgingSide::Payable => "AP aging",
    };
    if args.out.table(|| export::aging_table(&report, sheet))? {
        return Ok(ExitCode::SUCCESS);
    }
    if args.out.is_json() {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let title = match side {
        AgingSide::Receivable => "AR aging",
        AgingSide::Payable => "AP aging",
    };
    println!("{title} for tenant {} as of {}", tenant, args.as_of);
    if report.currencies.is_empty() {
        println!("no open balances");
        return Ok(ExitCode::SUCCESS);
    }
    print!("{:<8}{:<24}", "currency", "counterparty");
    for b in AGING_BUCKETS {
        print!("{b:>16}");
    }
    println!("{:>16}", "total");
    let line = |currency: &str,
                who: &str,
                buckets: &sluice_engine::finance_rules::AgingBuckets,
                total|
     -> Result<()> {
        let values = serde_json::to_value(buckets)?;
        print!("{currency:<8}{who:<24}");
        for b in AGING_BUCKETS {
            print!(
                "{:>16}",
                values.get(b).and_then(|v| v.as_str()).unwrap_or("0")
            );
        }
        println!("{total:>16}");
        Ok(())
    };
    for (currency, a) in &report.currencies {
        for c in &a.counterparties {
            let who = c.name.as_deref().or(c.id.as_deref()).unwrap_or("(none)");
            line(currency, who, &c.buckets, c.total)?;
        }
        line(currency, "all", &a.buckets, a.total)?;
    }
    Ok(ExitCode::SUCCESS)
}
