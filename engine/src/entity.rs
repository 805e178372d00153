//! The canonical finance entities: their fields, Arrow schemas and Rust row types. Every
//! source is mapped onto exactly these columns before validation; the warehouse tables add
//! the bookkeeping columns (`source`, `deleted_at`, `loaded_at`, `run_id`, `row_hash`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arrow_schema::{DataType, Field as ArrowField, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{MONEY_PRECISION, MONEY_SCALE};

/// A kind of record sluice loads; one warehouse table each.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    /// People and companies that buy from the tenant.
    Customers,
    /// People and companies the tenant buys from.
    Vendors,
    /// The chart of accounts.
    Accounts,
    /// Accounts receivable documents: invoices and credit notes issued.
    Invoices,
    /// Accounts payable documents: bills and credit notes received.
    Bills,
    /// Money in and out.
    Payments,
}

impl Entity {
    /// Every entity, in load order (counterparties before documents).
    pub const ALL: [Entity; 6] = [
        Entity::Customers,
        Entity::Vendors,
        Entity::Accounts,
        Entity::Invoices,
        Entity::Bills,
        Entity::Payments,
    ];

    /// The table and pipeline-file name (`invoices`).
    pub fn name(self) -> &'static str {
        match self {
            Entity::Customers => "customers",
            Entity::Vendors => "vendors",
            Entity::Accounts => "accounts",
            Entity::Invoices => "invoices",
            Entity::Bills => "bills",
            Entity::Payments => "payments",
        }
    }

    /// The canonical fields, in column order.
    pub fn fields(self) -> &'static [FieldSpec] {
        match self {
            Entity::Customers | Entity::Vendors => COUNTERPARTY_FIELDS,
            Entity::Accounts => ACCOUNT_FIELDS,
            Entity::Invoices => INVOICE_FIELDS,
            Entity::Bills => BILL_FIELDS,
            Entity::Payments => PAYMENT_FIELDS,
        }
    }

    /// The columns of the entity's warehouse table, in load order: the key's `source`, the
    /// canonical fields, then the bookkeeping columns. Both warehouses' migrations are
    /// tested against this list.
    pub fn table_columns(self) -> Vec<&'static str> {
        let mut cols = vec!["source"];
        cols.extend(self.fields().iter().map(|f| f.name));
        cols.extend(["deleted_at", "loaded_at", "run_id", "row_hash"]);
        cols
    }

    /// The canonical field called `name`, if the entity has one.
    pub fn field(self, name: &str) -> Option<&'static FieldSpec> {
        self.fields().iter().find(|f| f.name == name)
    }

    /// The Arrow schema of a mapped batch of this entity.
    pub fn schema(self) -> SchemaRef {
        let fields: Vec<ArrowField> = self
            .fields()
            .iter()
            // Nullable throughout: a mapped batch still holds the rows validation will reject.
            .map(|f| ArrowField::new(f.name, f.kind.arrow_type(), true))
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// Whether this entity's rows are AR/AP documents with totals and balances.
    pub fn is_document(self) -> bool {
        matches!(self, Entity::Invoices | Entity::Bills)
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Entity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Entity::ALL.into_iter().find(|e| e.name() == s).ok_or_else(|| {
            format!(
                "unknown entity '{s}'; expected one of: customers, vendors, accounts, invoices, bills, payments"
            )
        })
    }
}

/// What a canonical field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Free text.
    Text,
    /// A calendar date.
    Date,
    /// A UTC instant.
    Timestamp,
    /// An exact amount, `Decimal128(18, 4)`.
    Money,
    /// An ISO 4217 code, upper case.
    Currency,
    /// One of a fixed set of lower-case words.
    Choice(&'static [&'static str]),
    /// true / false.
    Flag,
    /// A list of external ids, stored as a JSON array of strings.
    IdList,
}

impl FieldKind {
    /// The Arrow type of the mapped column.
    pub fn arrow_type(self) -> DataType {
        match self {
            FieldKind::Text | FieldKind::Currency | FieldKind::Choice(_) | FieldKind::IdList => {
                DataType::Utf8
            }
            FieldKind::Date => DataType::Date32,
            FieldKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            FieldKind::Money => DataType::Decimal128(MONEY_PRECISION, MONEY_SCALE as i8),
            FieldKind::Flag => DataType::Boolean,
        }
    }
}

/// What fills a field when the source has no column for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absent {
    /// The field stays empty (and fails `required` if it is required).
    Null,
    /// A fixed value.
    Value(&'static str),
    /// A document's status follows from its balance: `open` when above zero, else `paid`.
    StatusFromBalance,
}

/// One canonical field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// Column name in the canonical schema and the warehouse.
    pub name: &'static str,
    /// What it holds.
    pub kind: FieldKind,
    /// Whether a row without it is quarantined.
    pub required: bool,
    /// What fills it when the source has no such column or leaves the cell empty.
    pub absent: Absent,
}

impl FieldSpec {
    /// The business key: never null in a loaded row.
    pub fn is_key(&self) -> bool {
        self.name == "external_id"
    }
}

const fn field(name: &'static str, kind: FieldKind, required: bool) -> FieldSpec {
    FieldSpec {
        name,
        kind,
        required,
        absent: Absent::Null,
    }
}

const fn defaulted(name: &'static str, kind: FieldKind, absent: Absent) -> FieldSpec {
    FieldSpec {
        name,
        kind,
        required: true,
        absent,
    }
}

/// Document statuses.
pub const DOCUMENT_STATUSES: &[&str] = &["draft", "open", "paid", "void"];
/// Invoice kinds.
pub const INVOICE_KINDS: &[&str] = &["invoice", "credit_note"];
/// Bill kinds.
pub const BILL_KINDS: &[&str] = &["bill", "credit_note"];
/// Bill categories, which decide where a bill lands in profitability.
pub const BILL_CATEGORIES: &[&str] = &["cogs", "expense"];
/// Account types.
pub const ACCOUNT_TYPES: &[&str] = &[
    "asset",
    "liability",
    "equity",
    "income",
    "cogs",
    "expense",
    "other",
];
/// Payment directions.
pub const PAYMENT_DIRECTIONS: &[&str] = &["in", "out"];

use FieldKind::*;

static INVOICE_FIELDS: &[FieldSpec] = &[
    field("external_id", Text, true),
    field("doc_number", Text, false),
    field("customer_id", Text, false),
    field("customer_name", Text, false),
    field("issue_date", Date, true),
    field("due_date", Date, true),
    field("currency", Currency, true),
    field("total", Money, true),
    field("balance", Money, true),
    defaulted(
        "status",
        Choice(DOCUMENT_STATUSES),
        Absent::StatusFromBalance,
    ),
    defaulted("kind", Choice(INVOICE_KINDS), Absent::Value("invoice")),
    field("updated_at", Timestamp, false),
];

static BILL_FIELDS: &[FieldSpec] = &[
    field("external_id", Text, true),
    field("doc_number", Text, false),
    field("vendor_id", Text, false),
    field("vendor_name", Text, false),
    field("issue_date", Date, true),
    field("due_date", Date, true),
    field("currency", Currency, true),
    field("total", Money, true),
    field("balance", Money, true),
    defaulted(
        "status",
        Choice(DOCUMENT_STATUSES),
        Absent::StatusFromBalance,
    ),
    defaulted("kind", Choice(BILL_KINDS), Absent::Value("bill")),
    defaulted(
        "category",
        Choice(BILL_CATEGORIES),
        Absent::Value("expense"),
    ),
    field("updated_at", Timestamp, false),
];

static COUNTERPARTY_FIELDS: &[FieldSpec] = &[
    field("external_id", Text, true),
    field("name", Text, true),
    field("email", Text, false),
    field("currency", Currency, false),
    defaulted("active", Flag, Absent::Value("true")),
    field("updated_at", Timestamp, false),
];

static ACCOUNT_FIELDS: &[FieldSpec] = &[
    field("external_id", Text, true),
    field("code", Text, false),
    field("name", Text, true),
    field("type", Choice(ACCOUNT_TYPES), true),
    field("updated_at", Timestamp, false),
];

static PAYMENT_FIELDS: &[FieldSpec] = &[
    field("external_id", Text, true),
    field("direction", Choice(PAYMENT_DIRECTIONS), true),
    field("counterparty_id", Text, false),
    field("date", Date, true),
    field("amount", Money, true),
    field("currency", Currency, true),
    field("applied_to", IdList, false),
    field("updated_at", Timestamp, false),
];

/// An AR document as stored in the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// The source's id for the document.
    pub external_id: String,
    /// The number printed on the document.
    pub doc_number: Option<String>,
    /// The source's id for the customer.
    pub customer_id: Option<String>,
    /// The customer's name as the source gives it.
    pub customer_name: Option<String>,
    /// The date the document was issued.
    pub issue_date: NaiveDate,
    /// The date payment is due.
    pub due_date: NaiveDate,
    /// ISO 4217 code of every amount on the document.
    pub currency: String,
    /// Document total, never negative.
    pub total: Decimal,
    /// What is still open, between zero and the total.
    pub balance: Decimal,
    /// draft, open, paid or void.
    pub status: String,
    /// invoice or credit_note.
    pub kind: String,
    /// When the source last changed the document.
    pub updated_at: Option<DateTime<Utc>>,
}

/// An AP document as stored in the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bill {
    /// The source's id for the document.
    pub external_id: String,
    /// The number printed on the document.
    pub doc_number: Option<String>,
    /// The source's id for the vendor.
    pub vendor_id: Option<String>,
    /// The vendor's name as the source gives it.
    pub vendor_name: Option<String>,
    /// The date the document was issued.
    pub issue_date: NaiveDate,
    /// The date payment is due.
    pub due_date: NaiveDate,
    /// ISO 4217 code of every amount on the document.
    pub currency: String,
    /// Document total, never negative.
    pub total: Decimal,
    /// What is still open, between zero and the total.
    pub balance: Decimal,
    /// draft, open, paid or void.
    pub status: String,
    /// bill or credit_note.
    pub kind: String,
    /// cogs or expense.
    pub category: String,
    /// When the source last changed the document.
    pub updated_at: Option<DateTime<Utc>>,
}

/// A customer or vendor as stored in the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counterparty {
    /// The source's id.
    pub external_id: String,
    /// Display name.
    pub name: String,
    /// Contact email.
    pub email: Option<String>,
    /// Default currency, ISO 4217.
    pub currency: Option<String>,
    /// Whether the source still uses it (archived records load as inactive).
    pub active: bool,
    /// When the source last changed it.
    pub updated_at: Option<DateTime<Utc>>,
}

/// A chart-of-accounts entry as stored in the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The source's id.
    pub external_id: String,
    /// The account number.
    pub code: Option<String>,
    /// The account name.
    pub name: String,
    /// asset, liability, equity, income, cogs, expense or other.
    #[serde(rename = "type")]
    pub account_type: String,
    /// When the source last changed it.
    pub updated_at: Option<DateTime<Utc>>,
}

/// A payment as stored in the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// The source's id.
    pub external_id: String,
    /// in (from a customer) or out (to a vendor).
    pub direction: String,
    /// The customer's or vendor's external id.
    pub counterparty_id: Option<String>,
    /// The value date.
    pub date: NaiveDate,
    /// Always greater than zero; `direction` gives the sign.
    pub amount: Decimal,
    /// ISO 4217.
    pub currency: String,
    /// External ids of the documents it settles.
    pub applied_to: Vec<String>,
    /// When the source last changed it.
    pub updated_at: Option<DateTime<Utc>>,
}
