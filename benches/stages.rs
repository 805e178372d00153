//! Criterion: the CPU stages of a run (map + validate + dedupe + fingerprint) over 1M
//! generated invoice rows, in 8192-row batches, on one thread. Reports rows/s.
//!
//! Run: `cargo bench --bench stages`

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_connectors::SourceBatch;
use sluice_engine::Entity;
use sluice_engine::money::DecimalFormat;
use sluice_engine::time::TimeFormat;
use sluice_engine::validate::{RuleOverrides, RuleSet};
use sluice_pipelines::map::Mapper;
use sluice_pipelines::stages::prepare_batch;

const ROWS: usize = 1_000_000;
const BATCH: usize = 8192;
const COLUMNS: [&str; 12] = [
    "external_id",
    "doc_number",
    "customer_id",
    "customer_name",
    "issue_date",
    "due_date",
    "currency",
    "total",
    "balance",
    "status",
    "kind",
    "updated_at",
];

/// Source batches as the CSV reader produces them: all text, ~2% bad rows, ~5% repeats.
fn source_batches() -> Vec<SourceBatch> {
    let mut batches = Vec::new();
    let mut start = 0;
    while start < ROWS {
        let n = BATCH.min(ROWS - start);
        let mut cols: Vec<Vec<String>> = vec![Vec::with_capacity(n); COLUMNS.len()];
        for i in start..start + n {
            let id = if i % 20 == 0 && i > 0 { i - 1 } else { i };
            let day = 1 + (i % 28);
            let total = 100 + (i * 37) % 100_000;
            let values = [
                format!("INV-{id:08}"),
                format!("{id}"),
                format!("C-{}", i % 5000),
                format!("Customer {}", i % 5000),
                format!("2024-03-{day:02}"),
                format!("2024-04-{day:02}"),
                ["USD", "EUR", "GBP"][i % 3].to_string(),
                format!("{total}.50"),
                if i % 50 == 7 {
                    format!("{}.00", total + 10)
                } else {
                    format!("{}.25", total / 2)
                },
                "open".to_string(),
                "invoice".to_string(),
                format!("2024-05-{day:02}T10:{:02}:00Z", i % 60),
            ];
            for (c, v) in values.into_iter().enumerate() {
                cols[c].push(v);
            }
        }
        let arrays: Vec<ArrayRef> = cols
            .into_iter()
            .map(|c| Arc::new(StringArray::from(c)) as ArrayRef)
            .collect();
        let schema = Arc::new(arrow_schema_of());
        let records = RecordBatch::try_new(schema, arrays).expect("batch");
        batches.push(SourceBatch {
            deletions: Vec::new(),
            records,
            positions: (start as u64 + 2..(start + n) as u64 + 2).collect(),
            rejects: Vec::new(),
            cursor: serde_json::json!({ "record": start + n }),
            location: "bench.csv".into(),
            sheet: None,
        });
        start += n;
    }
    batches
}

fn arrow_schema_of() -> arrow_schema::Schema {
    arrow_schema::Schema::new(
        COLUMNS
            .iter()
            .map(|c| arrow_schema::Field::new(*c, arrow_schema::DataType::Utf8, true))
            .collect::<Vec<_>>(),
    )
}

fn stages(c: &mut Criterion) {
    let batches = source_batches();
    let schema = arrow_schema_of();
    let mapper = Mapper::new(
        Entity::Invoices,
        &BTreeMap::new(),
        &[],
        &schema,
        DecimalFormat::default(),
        TimeFormat::default(),
    )
    .expect("mapper");
    let rules = RuleSet::new(Entity::Invoices, &RuleOverrides::default()).expect("rules");
    let mut group = c.benchmark_group("stages");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("map+validate+dedupe 1M invoices", |b| {
        b.iter(|| {
            let mut loaded = 0usize;
            for batch in &batches {
                loaded += prepare_batch(&mapper, &rules, Entity::Invoices, batch.clone())
                    .load
                    .len();
            }
            loaded
        })
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
