//! `sluice pipeline init FILE --entity E`: reads a sample of a CSV or spreadsheet file,
//! proposes the mapping and the formats, writes a commented pipeline file, and prints a
//! dry run of it.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use sluice_engine::entity::Entity;
use sluice_pipelines::infer::{Proposal, propose, sample, sniff_delimiter};
use sluice_pipelines::spec::{CsvSpec, SourceSpec, SpreadsheetSpec};
use sluice_pipelines::{PipelineSource, SourceReach};
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub(super) enum PipelineCommand {
    /// Propose a pipeline for a CSV or spreadsheet file: the mapping (column names matched
    /// to the entity's fields, synonyms included), the delimiter, the date format and the
    /// decimal and thousands separators, decided by a sample of the data. Writes a
    /// commented pipeline file next to the data and prints a dry run of it.
    #[command(
        after_help = "Example:\n  sluice pipeline init exports/invoices-2024.csv --entity invoices --tenant acme\n  sluice sync exports/invoices-2024.toml --dry-run"
    )]
    Init(InitArgs),
}

#[derive(Args)]
pub(super) struct InitArgs {
    /// The file: .csv / .tsv / .txt, or .xlsx / .xlsm / .xls / .xlsb / .ods.
    file: PathBuf,
    /// invoices, bills, payments, customers, vendors or accounts.
    #[arg(long)]
    entity: String,
    /// The tenant the pipeline loads into.
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// The pipeline's name (default: the file's name).
    #[arg(long)]
    name: Option<String>,
    /// Where to write the pipeline file (default: the file's path with .toml).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Replace an existing pipeline file.
    #[arg(long)]
    force: bool,
    /// Records to sample.
    #[arg(long, default_value_t = 1000)]
    sample: usize,
}

pub(super) async fn pipeline_command(cmd: PipelineCommand) -> Result<(ExitCode, Option<PathBuf>)> {
    match cmd {
        PipelineCommand::Init(args) => init(&args).await,
    }
}

/// Writes the proposed pipeline file; returns it for the dry run.
async fn init(args: &InitArgs) -> Result<(ExitCode, Option<PathBuf>)> {
    let entity: Entity = args.entity.parse().map_err(|_| {
        anyhow::anyhow!(
            "unknown entity {:?}: invoices, bills, payments, customers, vendors or accounts",
            args.entity
        )
    })?;
    let file = std::fs::canonicalize(&args.file)
        .with_context(|| format!("file not found: {}", args.file.display()))?;
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let spreadsheet = matches!(ext.as_str(), "xlsx" | "xlsm" | "xls" | "xlsb" | "ods");
    let delimiter = if spreadsheet {
        None
    } else {
        let mut head = Vec::new();
        std::fs::File::open(&file)?
            .take(64 * 1024)
            .read_to_end(&mut head)?;
        Some(sniff_delimiter(&String::from_utf8_lossy(&head)))
    };
    let source_spec = match delimiter {
        None => SourceSpec::Xlsx(SpreadsheetSpec {
            path: Some(file.clone()),
            sheet: None,
            header_row: None,
        }),
        Some(d) => SourceSpec::Csv(CsvSpec {
            path: Some(file.clone()),
            delimiter: (d != ',').then(|| d.to_string()),
            quote: None,
            has_header: None,
        }),
    };
    let source = PipelineSource::from_spec(&source_spec, None, &SourceReach::unrestricted())?;
    let (headers, rows) = sample(&source, args.sample.max(1)).await?;
    if headers.is_empty() {
        bail!("{} has no header row to map", file.display());
    }
    let proposal = propose(entity, &headers, &rows);
    let name = match &args.name {
        Some(n) => n.clone(),
        None => file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("pipeline")
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect(),
    };
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| file.with_extension("toml"));
    if output.exists() && !args.force {
        bail!(
            "{} exists: pass --force to replace it, or --output elsewhere",
            output.display()
        );
    }
    let text = pipeline_toml(
        &name,
        &args.tenant,
        entity,
        &file,
        &output,
        delimiter,
        rows.len(),
        &proposal,
    );
    // Checked like any pipeline file before it is written.
    sluice_pipelines::PipelineSpec::from_toml(&text)
        .with_context(|| format!("the proposed pipeline does not check:\n{text}"))?;
    std::fs::write(&output, &text).with_context(|| format!("writing {}", output.display()))?;
    println!("wrote {}", output.display());
    for (field, column) in &proposal.mapping {
        println!("  {field:<16} <- {column}");
    }
    if !proposal.unmapped.is_empty() {
        println!("  not mapped: {}", proposal.unmapped.join(", "));
    }
    if !proposal.missing.is_empty() {
        println!(
            "  no column found for required field(s) {}: name their columns under [mapping], then\n  sluice sync {} --dry-run",
            proposal.missing.join(", "),
            output.display()
        );
        return Ok((ExitCode::SUCCESS, None));
    }
    if proposal.date_ambiguous {
        println!(
            "  the dates fit day-first and month-first alike: {} was chosen; check [format]",
            proposal.date_format.as_deref().unwrap_or_default()
        );
    }
    Ok((ExitCode::SUCCESS, Some(output)))
}

#[allow(clippy::too_many_arguments)]
fn pipeline_toml(
    name: &str,
    tenant: &str,
    entity: Entity,
    file: &Path,
    output: &Path,
    delimiter: Option<char>,
    sampled: usize,
    p: &Proposal,
) -> String {
    let relative = match (file.parent(), output.parent()) {
        (Some(a), Some(b)) if a == std::fs::canonicalize(b).unwrap_or_default() => file
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| file.to_path_buf()),
        _ => file.to_path_buf(),
    };
    // A TOML basic string: Rust's escaping of quotes, backslashes and control characters.
    let quote = |s: &str| format!("{s:?}");
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Proposed by `sluice pipeline init` from {sampled} sampled record(s) of {}.\n# Check it, then: sluice sync <this file> --dry-run",
        file.display()
    );
    let _ = writeln!(t, "name = {}", quote(name));
    let _ = writeln!(t, "tenant = {}", quote(tenant));
    let _ = writeln!(t, "entity = {}", quote(entity.name()));
    let _ = writeln!(t, "\n[source]");
    match delimiter {
        None => {
            let _ = writeln!(t, "kind = \"xlsx\"");
        }
        Some(d) => {
            let _ = writeln!(t, "kind = \"csv\"");
            if d != ',' {
                let _ = writeln!(
                    t,
                    "delimiter = {}   # sniffed from the first lines",
                    quote(&d.to_string())
                );
            }
        }
    }
    let _ = writeln!(t, "path = {}", quote(&relative.to_string_lossy()));
    let _ = writeln!(
        t,
        "\n[mapping]                # canonical field = source column"
    );
    for (field, column) in &p.mapping {
        let _ = writeln!(t, "{field} = {}", quote(column));
    }
    for field in &p.missing {
        let _ = writeln!(
            t,
            "# {field} = \"?\"          # required: no column matched"
        );
    }
    if !p.unmapped.is_empty() {
        let _ = writeln!(t, "# not mapped: {}", p.unmapped.join(", "));
    }
    if p.date_format.is_some() || p.decimal_separator.is_some() || p.thousands_separator.is_some() {
        let _ = writeln!(t, "\n[format]");
        if let Some(f) = &p.date_format {
            let why = if p.date_ambiguous {
                "every sampled day is 12 or less: day-first and month-first both fit; check"
            } else {
                "the only format every sampled date fits"
            };
            let _ = writeln!(t, "date_formats = [{}]   # {why}", quote(f));
        }
        if let Some(d) = &p.decimal_separator {
            let _ = writeln!(
                t,
                "decimal_separator = {}   # amounts use a decimal comma",
                quote(d)
            );
        }
        if let Some(g) = &p.thousands_separator {
            let _ = writeln!(
                t,
                "thousands_separator = {}   # digit groups seen in amounts",
                quote(g)
            );
        }
    }
    t
}
