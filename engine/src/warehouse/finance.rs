//! Finance reads: the sums the aggregates are built from, per currency (two currencies are
//! never added), and the anomaly counts saved per finance data version. The rules these
//! sums follow are stated once, in [`crate::finance_rules`].

use std::collections::BTreeMap;
use std::future::Future;

use chrono::NaiveDate;

use crate::entity::{Bill, Invoice, Payment};
use crate::error::{EngineError, ErrorKind, Result};
use crate::finance_rules::{
    AgingBuckets, AgingReport, AgingSide, AgingTotal, AnomalyDocument, FlowTotal, ProfitTotal,
};
use crate::money::display_decimal;
use crate::tenant::TenantSlug;

/// An aging sum as the warehouses read it: currency, counterparty id and name, bucket, and
/// the sum (text or integer units, per warehouse).
pub(crate) type AgingRow<Sum> = (String, Option<String>, Option<String>, String, Sum);

/// An anomaly document as the warehouses read it: side, external id, doc number,
/// counterparty, currency, total (text or integer units), issue date.
pub(crate) type DocumentRow<Sum, Day> = (
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    Sum,
    Day,
);

/// Saved anomaly counts as the warehouses store them (a JSON object, currency -> count).
pub(crate) fn encode_counts(counts: &BTreeMap<String, u64>) -> Result<String> {
    serde_json::to_string(counts).map_err(|e| {
        EngineError::new(
            ErrorKind::Warehouse,
            format!("encoding anomaly counts: {e}"),
        )
    })
}

/// Saved anomaly counts read back (see [`encode_counts`]).
pub(crate) fn decode_counts(text: Option<String>) -> Result<Option<BTreeMap<String, u64>>> {
    text.map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| {
            crate::EngineError::new(
                crate::ErrorKind::Warehouse,
                format!("saved anomaly counts are unreadable: {e}"),
            )
        })
}

/// The tenant's finance data as the aggregates read it.
pub trait FinanceStore: Send + Sync {
    /// Live payments dated within `[from, to]`, summed per currency, direction and month.
    fn cash_flow_totals(
        &self,
        tenant: &TenantSlug,
        from: NaiveDate,
        to: NaiveDate,
    ) -> impl Future<Output = Result<Vec<FlowTotal>>> + Send;

    /// Live, non-void invoices and bills issued within `[from, to]`, summed per currency,
    /// month and profitability line (see [`ProfitTotal`]).
    fn profit_totals(
        &self,
        tenant: &TenantSlug,
        from: NaiveDate,
        to: NaiveDate,
    ) -> impl Future<Output = Result<Vec<ProfitTotal>>> + Send;

    /// Open balances as of `as_of` summed per currency, counterparty and aging bucket.
    fn aging_totals(
        &self,
        tenant: &TenantSlug,
        side: AgingSide,
        as_of: NaiveDate,
    ) -> impl Future<Output = Result<Vec<AgingTotal>>> + Send;

    /// Open balances by currency and aging bucket (see [`crate::finance`]): the sums of
    /// [`Warehouse::aging_totals`] over counterparties.
    fn aging(
        &self,
        tenant: &TenantSlug,
        side: AgingSide,
        as_of: NaiveDate,
    ) -> impl Future<Output = Result<AgingReport>> + Send {
        async move {
            let mut report = AgingReport {
                as_of,
                currencies: Default::default(),
            };
            for t in self.aging_totals(tenant, side, as_of).await? {
                report
                    .currencies
                    .entry(t.currency)
                    .or_insert_with(AgingBuckets::zero)
                    .add(&t.bucket, display_decimal(t.amount_units));
            }
            Ok(report)
        }
    }

    /// Live, non-void invoices and bills (not credit notes), with only the columns the
    /// anomaly checks read.
    fn anomaly_documents(
        &self,
        tenant: &TenantSlug,
    ) -> impl Future<Output = Result<Vec<AnomalyDocument>>> + Send;

    /// The version of the tenant's finance data, and the anomaly counts per currency saved
    /// under `options` for exactly that version, if any. The version moves on in the same
    /// transaction as any change to an invoice, bill or payment; counts to be saved under
    /// it must be computed from data read after it was read.
    fn anomaly_counts(
        &self,
        tenant: &TenantSlug,
        options: &str,
    ) -> impl Future<Output = Result<(i64, Option<BTreeMap<String, u64>>)>> + Send;

    /// Saves anomaly counts per currency computed at data `version` under `options` (a
    /// snapshot of a newer version is kept; snapshots of older versions are dropped).
    fn save_anomaly_counts(
        &self,
        tenant: &TenantSlug,
        options: &str,
        version: i64,
        counts: &BTreeMap<String, u64>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The loaded invoices of the tenant (only those whose external id is `only`, when
    /// given), ordered by source and external id.
    fn invoices_matching(
        &self,
        tenant: &TenantSlug,
        only: Option<&str>,
    ) -> impl Future<Output = Result<Vec<Invoice>>> + Send;

    /// The loaded bills, as [`FinanceStore::invoices_matching`].
    fn bills_matching(
        &self,
        tenant: &TenantSlug,
        only: Option<&str>,
    ) -> impl Future<Output = Result<Vec<Bill>>> + Send;

    /// The loaded payments, as [`FinanceStore::invoices_matching`].
    fn payments_matching(
        &self,
        tenant: &TenantSlug,
        only: Option<&str>,
    ) -> impl Future<Output = Result<Vec<Payment>>> + Send;

    /// Every loaded invoice of the tenant, ordered by source and external id.
    fn invoices(&self, tenant: &TenantSlug) -> impl Future<Output = Result<Vec<Invoice>>> + Send {
        self.invoices_matching(tenant, None)
    }

    /// Every loaded bill of the tenant, ordered by source and external id.
    fn bills(&self, tenant: &TenantSlug) -> impl Future<Output = Result<Vec<Bill>>> + Send {
        self.bills_matching(tenant, None)
    }

    /// Every loaded payment of the tenant, ordered by source and external id.
    fn payments(&self, tenant: &TenantSlug) -> impl Future<Output = Result<Vec<Payment>>> + Send {
        self.payments_matching(tenant, None)
    }

    /// The loaded `kind` (`invoice`, `bill` or `payment`) documents whose external id is
    /// `external_id`, from every source, as JSON (amounts as decimal strings).
    fn finance_document(
        &self,
        tenant: &TenantSlug,
        kind: &str,
        external_id: &str,
    ) -> impl Future<Output = Result<Vec<serde_json::Value>>> + Send {
        async move {
            let only = Some(external_id);
            let docs = match kind {
                "invoice" => serde_json::to_value(self.invoices_matching(tenant, only).await?),
                "bill" => serde_json::to_value(self.bills_matching(tenant, only).await?),
                "payment" => serde_json::to_value(self.payments_matching(tenant, only).await?),
                _ => {
                    return Err(crate::EngineError::new(
                        crate::ErrorKind::Input,
                        format!("no documents of kind {kind:?}: invoice, bill or payment"),
                    ));
                }
            }
            .map_err(|e| {
                crate::EngineError::new(
                    crate::ErrorKind::Warehouse,
                    "a document does not serialise",
                )
                .with_source(e)
            })?;
            Ok(match docs {
                serde_json::Value::Array(items) => items,
                _ => Vec::new(),
            })
        }
    }
}
