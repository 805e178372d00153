//! A pipeline definition read and checked whole: the file or TOML parsed, paths resolved
//! against the file's folder, names, mapping, formats and rules checked, and the source's
//! settings checked by building it (no connection is made). Kept apart from `spec`, the
//! plain shape of a definition, so that the source layer builds on the shape without a
//! circle.

use std::path::Path;

use crate::confine::SourceReach;
use crate::error::PipelineError;
use crate::source::PipelineSource;
use crate::spec::{PipelineSpec, SourceSpec, check_pipeline_name};

impl PipelineSpec {
    /// Reads and checks a pipeline file; relative paths in it are resolved against its
    /// directory.
    pub fn from_file(path: &Path) -> Result<Self, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            PipelineError::config(format!("cannot read pipeline file {}", path.display()))
                .with_source(e)
        })?;
        let mut spec = Self::from_toml(&text)
            .map_err(|e| PipelineError::config(path.display().to_string()).with_source(e))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        spec.resolve_paths(base);
        Ok(spec)
    }

    /// Parses and checks pipeline TOML.
    pub fn from_toml(text: &str) -> Result<Self, PipelineError> {
        let _: toml::Table = toml::from_str(text)
            .map_err(|e| PipelineError::config("not valid TOML").with_source(e))?;
        let spec: PipelineSpec =
            toml::from_str(text).map_err(|e| PipelineError::config("").with_source(e))?;
        spec.check()?;
        Ok(spec)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let path = match &mut self.source {
            SourceSpec::Csv(c) => &mut c.path,
            SourceSpec::Xlsx(x) => &mut x.path,
            SourceSpec::Postgres(_)
            | SourceSpec::Mysql(_)
            | SourceSpec::Quickbooks(_)
            | SourceSpec::Odoo(_) => return,
        };
        if let Some(p) = path
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
    }

    /// Checks names, mapping keys, formats and rule overrides.
    pub fn check(&self) -> Result<(), PipelineError> {
        check_pipeline_name(&self.name)?;
        sluice_engine::TenantSlug::parse(&self.tenant)
            .map_err(|e| PipelineError::config(e.message().to_string()))?;
        for field in self.mapping.keys() {
            if self.entity.field(field).is_none() {
                let known: Vec<&str> = self.entity.fields().iter().map(|f| f.name).collect();
                return Err(PipelineError::config(format!(
                    "[mapping] {}: {} have no field '{field}'; fields are: {}",
                    self.name,
                    self.entity,
                    known.join(", ")
                )));
            }
        }
        self.decimal_format()?;
        self.time_format()?;
        sluice_engine::validate::RuleSet::new(self.entity, &self.rules)
            .map_err(|e| PipelineError::config(e.message().to_string()))?;
        match &self.source {
            SourceSpec::Csv(c) => {
                one_byte("delimiter", c.delimiter.as_deref())?;
                one_byte("quote", c.quote.as_deref())?;
            }
            SourceSpec::Postgres(q) | SourceSpec::Mysql(q) => {
                PipelineSource::from_spec(&self.source, None, &SourceReach::unrestricted())?;
                if q.table.is_some() == q.query.is_some() {
                    return Err(PipelineError::config(
                        "[source] give exactly one of `table` or `query`",
                    ));
                }
                if let Some(c) = &q.soft_delete {
                    sluice_connectors::sql::check_identifier("soft_delete column", c)
                        .map_err(|e| PipelineError::config("[source]").with_source(e))?;
                }
            }
            SourceSpec::Quickbooks(_) | SourceSpec::Odoo(_) => {
                let source =
                    PipelineSource::from_spec(&self.source, None, &SourceReach::unrestricted())?;
                let entity = source.api_entity().unwrap_or(self.entity.name());
                if entity != self.entity.name() {
                    return Err(PipelineError::config(format!(
                        "[source] stream of {entity}, but the pipeline's entity is {}",
                        self.entity
                    )));
                }
            }
            SourceSpec::Xlsx(_) => {}
        }
        if let Some(n) = self.batch_rows
            && !(1..=crate::spec::MAX_BATCH_ROWS).contains(&n)
        {
            return Err(PipelineError::config(format!(
                "batch_rows must be between 1 and {} (a batch is held in memory and committed whole), not {n}",
                crate::spec::MAX_BATCH_ROWS
            )));
        }
        if let Some(schedule) = &self.schedule {
            schedule.parse()?;
        }
        Ok(())
    }
}

fn one_byte(what: &str, value: Option<&str>) -> Result<(), PipelineError> {
    match value {
        None => Ok(()),
        Some(v) if v.len() == 1 => Ok(()),
        Some(v) => Err(PipelineError::config(format!(
            "[source] {what} must be one ASCII character, not {v:?}"
        ))),
    }
}
