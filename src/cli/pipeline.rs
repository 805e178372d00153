//! `sluice pipeline init FILE --entity E` (or `--url URL --table T`): reads a sample of a
//! CSV file, a spreadsheet or a database table, proposes the mapping and the formats,
//! writes a commented pipeline file, and prints a dry run of it.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use sluice_engine::entity::Entity;
use sluice_pipelines::infer::{Proposal, propose, sample, sniff_delimiter};
use sluice_pipelines::spec::{CsvSpec, SourceSpec, SpreadsheetSpec, SqlSpec};
use sluice_pipelines::{PipelineSource, SourceReach};
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub(super) enum PipelineCommand {
    /// Propose a pipeline for a CSV or spreadsheet file, or a database table: the mapping
    /// (column names matched to the entity's fields, synonyms included), and for files the
    /// delimiter, the date format and the decimal and thousands separators, decided by a
    /// sample of the data. Writes a commented pipeline file and prints a dry run of it.
    #[command(
        after_help = "Example:\n  sluice pipeline init exports/invoices-2024.csv --entity invoices --tenant acme\n  sluice pipeline init --url postgres://erp@db/erp --table public.invoices --entity invoices\n  sluice sync exports/invoices-2024.toml --dry-run"
    )]
    Init(InitArgs),
}

#[derive(Args)]
pub(super) struct InitArgs {
    /// The file: .csv / .tsv / .txt, or .xlsx / .xlsm / .xls / .xlsb / .ods. Or give
    /// --url and --table for a database table.
    #[arg(required_unless_present = "url")]
    file: Option<PathBuf>,
    /// A PostgreSQL or MySQL/MariaDB URL (postgres://..., mysql://...) to read --table from.
    #[arg(long, requires = "table", conflicts_with = "file")]
    url: Option<String>,
    /// The table (`name` or `schema.name`).
    #[arg(long, requires = "url")]
    table: Option<String>,
    /// invoices, bills, payments, customers, vendors or accounts.
    #[arg(long)]
    entity: String,
    /// The tenant the pipeline loads into.
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// The pipeline's name (default: the file's or the table's name).
    #[arg(long)]
    name: Option<String>,
    /// Where to write the pipeline file (default: next to the file, with .toml; for a
    /// table, `<table>.toml` here).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Replace an existing pipeline file.
    #[arg(long)]
    force: bool,
    /// Records to sample.
    #[arg(long, default_value_t = 1000)]
    sample: usize,
}

/// Runs the command; returns the written file and the source to dry-run it with (a
/// database URL's password stays out of the file), when the proposal is complete.
pub(super) async fn pipeline_command(
    cmd: PipelineCommand,
) -> Result<(ExitCode, Option<(PathBuf, SourceSpec)>)> {
    match cmd {
        PipelineCommand::Init(args) => init(&args).await,
    }
}

async fn init(args: &InitArgs) -> Result<(ExitCode, Option<(PathBuf, SourceSpec)>)> {
    let entity: Entity = args.entity.parse().map_err(|_| {
        anyhow::anyhow!(
            "unknown entity {:?}: invoices, bills, payments, customers, vendors or accounts",
            args.entity
        )
    })?;
    let origin = match (&args.file, &args.url, &args.table) {
        (_, Some(url), Some(table)) => table_source(url, table)?,
        (Some(file), _, _) => file_source(file)?,
        _ => bail!("give a file, or --url and --table"),
    };
    let source = PipelineSource::from_spec(&origin.read, None, &SourceReach::unrestricted())?;
    let (headers, rows) = sample(&source, args.sample.max(1)).await?;
    if headers.is_empty() {
        bail!("{} has no columns to map", origin.what);
    }
    let proposal = propose(entity, &headers, &rows);
    let name = args.name.clone().unwrap_or_else(|| {
        origin
            .name
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    });
    let output = args.output.clone().unwrap_or_else(|| origin.output.clone());
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
        &origin,
        &output,
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
    if origin.password_left_out {
        println!(
            "  the URL's password was not written: add `password = \"...\"` under [source] (it is sealed when the pipeline is registered)"
        );
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
    Ok((ExitCode::SUCCESS, Some((output, origin.read))))
}

/// Where a proposal reads from.
struct Origin {
    /// The source as read (a database URL with its password).
    read: SourceSpec,
    /// The source as written to the file (the URL without it).
    written: SourceSpec,
    password_left_out: bool,
    /// "the file ..." or "table ...", for messages.
    what: String,
    /// A default pipeline name.
    name: String,
    /// The default pipeline file.
    output: PathBuf,
}

fn file_source(file: &Path) -> Result<Origin> {
    let file = std::fs::canonicalize(file)
        .with_context(|| format!("file not found: {}", file.display()))?;
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let spec = if matches!(ext.as_str(), "xlsx" | "xlsm" | "xls" | "xlsb" | "ods") {
        SourceSpec::Xlsx(SpreadsheetSpec {
            path: Some(file.clone()),
            sheet: None,
            header_row: None,
        })
    } else {
        let mut head = Vec::new();
        std::fs::File::open(&file)?
            .take(64 * 1024)
            .read_to_end(&mut head)?;
        let d = sniff_delimiter(&String::from_utf8_lossy(&head));
        SourceSpec::Csv(CsvSpec {
            path: Some(file.clone()),
            delimiter: (d != ',').then(|| d.to_string()),
            quote: None,
            has_header: None,
        })
    };
    Ok(Origin {
        read: spec.clone(),
        written: spec,
        password_left_out: false,
        what: file.display().to_string(),
        name: file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("pipeline")
            .to_string(),
        output: file.with_extension("toml"),
    })
}

fn table_source(url: &str, table: &str) -> Result<Origin> {
    let sql = SqlSpec {
        url: url.to_string(),
        password: None,
        table: Some(table.to_string()),
        query: None,
        cursor: Vec::new(),
        tls: None,
        soft_delete: None,
        statement_timeout_secs: None,
    };
    let bare = without_password(url);
    let written = SqlSpec {
        url: bare.clone(),
        ..sql.clone()
    };
    let (read, written) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        (SourceSpec::Postgres(sql), SourceSpec::Postgres(written))
    } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        (SourceSpec::Mysql(sql), SourceSpec::Mysql(written))
    } else {
        bail!("--url must be a postgres:// or mysql:// URL");
    };
    let short = table.rsplit('.').next().unwrap_or(table).to_string();
    Ok(Origin {
        read,
        written,
        password_left_out: bare != url,
        what: format!("table {table}"),
        output: PathBuf::from(format!("{short}.toml")),
        name: short,
    })
}

/// `url` without the password of its user part.
fn without_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            let user = user.split(':').next().unwrap_or_default();
            format!(
                "{}{user}@{host}{}",
                &url[..scheme_end + 3],
                &rest[authority_end..]
            )
        }
        _ => url.to_string(),
    }
}

fn pipeline_toml(
    name: &str,
    tenant: &str,
    entity: Entity,
    origin: &Origin,
    output: &Path,
    sampled: usize,
    p: &Proposal,
) -> String {
    // A file next to the pipeline file is named relative to it.
    let relative = |file: &Path| match (file.parent(), output.parent()) {
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
        origin.what
    );
    let _ = writeln!(t, "name = {}", quote(name));
    let _ = writeln!(t, "tenant = {}", quote(tenant));
    let _ = writeln!(t, "entity = {}", quote(entity.name()));
    let _ = writeln!(t, "\n[source]");
    let column = |field: &str| {
        p.mapping
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, c)| c.clone())
    };
    match &origin.written {
        SourceSpec::Xlsx(x) => {
            let _ = writeln!(t, "kind = \"xlsx\"");
            if let Some(path) = &x.path {
                let _ = writeln!(t, "path = {}", quote(&relative(path).to_string_lossy()));
            }
        }
        SourceSpec::Csv(c) => {
            let _ = writeln!(t, "kind = \"csv\"");
            if let Some(d) = &c.delimiter {
                let _ = writeln!(
                    t,
                    "delimiter = {}   # sniffed from the first lines",
                    quote(d)
                );
            }
            if let Some(path) = &c.path {
                let _ = writeln!(t, "path = {}", quote(&relative(path).to_string_lossy()));
            }
        }
        SourceSpec::Postgres(s) | SourceSpec::Mysql(s) => {
            let kind = if matches!(origin.written, SourceSpec::Postgres(_)) {
                "postgres"
            } else {
                "mysql"
            };
            let _ = writeln!(t, "kind = \"{kind}\"");
            let _ = writeln!(t, "url = {}", quote(&s.url));
            let _ = writeln!(
                t,
                "table = {}",
                quote(s.table.as_deref().unwrap_or_default())
            );
            match (column("updated_at"), column("external_id")) {
                (Some(updated), Some(id)) => {
                    let _ = writeln!(
                        t,
                        "cursor = [{}, {}]   # incremental: rows changed since the last run",
                        quote(&updated),
                        quote(&id)
                    );
                }
                _ => {
                    let _ = writeln!(
                        t,
                        "# cursor = [\"updated_at\", \"id\"]   # absent: every run reads the whole table"
                    );
                }
            }
        }
        _ => {}
    }
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

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn a_url_loses_only_its_password() {
        assert_eq!(
            without_password("postgres://erp:s3cret@db:5432/erp?sslmode=require"),
            "postgres://erp@db:5432/erp?sslmode=require"
        );
        assert_eq!(
            without_password("mysql://root:p%40ss@127.0.0.1:3306/test"),
            "mysql://root@127.0.0.1:3306/test"
        );
        assert_eq!(
            without_password("postgres://erp@db/erp"),
            "postgres://erp@db/erp"
        );
        assert_eq!(without_password("postgres://db/erp"), "postgres://db/erp");
    }
}
