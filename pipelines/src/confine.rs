//! How far a pipeline's source may reach. The user running `sluice sync` on their own
//! pipeline file reaches what they can reach. A pipeline a tenant's admin defines through
//! the API is confined: it reads files only under the server's files root or among the
//! files uploaded to its tenant, and connects only where the egress policy allows. Both are
//! checked when the pipeline is saved (a 400) and again when it runs (the file resolved,
//! symlinks followed; every resolved address), since a file or a DNS name can change in
//! between. See SECURITY.md.

use std::path::{Component, Path, PathBuf};

use sluice_connectors::egress::EgressPolicy;
use sluice_engine::control::PipelineOrigin;

use crate::error::PipelineError;
use crate::spec::{PipelineSpec, SourceSpec};

/// What one pipeline's source may reach.
#[derive(Debug, Clone)]
pub struct SourceReach {
    egress: EgressPolicy,
    /// Directories (canonical) its files must resolve into; `None`: any file.
    file_roots: Option<Vec<PathBuf>>,
}

impl SourceReach {
    /// Any file, any host: the shell user's own pipelines.
    pub fn unrestricted() -> Self {
        SourceReach {
            egress: EgressPolicy::unrestricted(),
            file_roots: None,
        }
    }

    /// The hosts it may connect to.
    pub fn egress(&self) -> &EgressPolicy {
        &self.egress
    }

    /// `path` resolved (symlinks followed) when it lies inside one of the roots; the
    /// resolved path is what must be opened, so a link swapped later is not followed.
    pub fn file(&self, path: &Path) -> Result<PathBuf, PipelineError> {
        let Some(roots) = &self.file_roots else {
            return Ok(path.to_path_buf());
        };
        let resolved = std::fs::canonicalize(path).map_err(|e| {
            PipelineError::config(format!("cannot open {}", path.display())).with_source(e)
        })?;
        if roots.iter().any(|r| resolved.starts_with(r)) {
            Ok(resolved)
        } else {
            Err(outside(path))
        }
    }
}

fn outside(path: &Path) -> PipelineError {
    PipelineError::config(format!(
        "{} is outside the directories this server reads files from: upload the file (POST /v1/pipelines/<name>/files) or give a path under the server's --files-root",
        path.display()
    ))
}

/// The server's limits on pipelines defined through the API.
#[derive(Debug, Clone)]
pub struct Confinement {
    files_root: Option<PathBuf>,
    upload_dir: PathBuf,
    egress: EgressPolicy,
}

impl Confinement {
    /// Files under `files_root` (when given) and each tenant's uploads under `upload_dir`;
    /// hosts as `egress` allows. Both directories are resolved now.
    pub fn new(
        files_root: Option<&Path>,
        upload_dir: &Path,
        egress: EgressPolicy,
    ) -> Result<Self, PipelineError> {
        let files_root = files_root
            .map(|r| {
                std::fs::canonicalize(r).map_err(|e| {
                    PipelineError::config(format!("--files-root {}", r.display())).with_source(e)
                })
            })
            .transpose()?;
        // The upload directory may not exist yet (it is made by the first upload); a
        // tenant's part of it is resolved when a pipeline's reach is asked for.
        let upload_dir = std::path::absolute(upload_dir).map_err(|e| {
            PipelineError::config(format!("upload directory {}", upload_dir.display()))
                .with_source(e)
        })?;
        Ok(Confinement {
            files_root,
            upload_dir,
            egress,
        })
    }

    /// Where uploaded files are kept: `<dir>/<tenant>/<pipeline>/`.
    pub fn upload_dir(&self) -> &Path {
        &self.upload_dir
    }

    /// The reach of a pipeline of `tenant` defined by `origin`.
    pub fn reach(&self, tenant: &str, origin: PipelineOrigin) -> SourceReach {
        match origin {
            PipelineOrigin::Shell => SourceReach::unrestricted(),
            PipelineOrigin::Api => {
                let uploads = self.upload_dir.join(tenant);
                let uploads = std::fs::canonicalize(&uploads).unwrap_or(uploads);
                let mut roots = vec![uploads];
                roots.extend(self.files_root.clone());
                SourceReach {
                    egress: self.egress.clone(),
                    file_roots: Some(roots),
                }
            }
        }
    }

    /// The save-time check of a pipeline defined through the API: a file path inside the
    /// files root (the file need not exist yet), URLs whose hosts the policy allows.
    /// A relative path is taken relative to the files root and stored so.
    pub fn check_spec(&self, spec: &mut PipelineSpec) -> Result<(), PipelineError> {
        match &mut spec.source {
            SourceSpec::Csv(c) => self.check_and_place(&mut c.path),
            SourceSpec::Xlsx(x) => self.check_and_place(&mut x.path),
            SourceSpec::Postgres(q) | SourceSpec::Mysql(q) => {
                let [host, ..] = sluice_connectors::sql::destination(&q.url)
                    .ok_or_else(|| PipelineError::config("[source] url is not a connection URL"))?;
                let host = if host.is_empty() {
                    // No host: the driver's default, this machine's socket.
                    "/".to_string()
                } else {
                    host
                };
                self.egress.check_host(&host).map_err(egress_error)
            }
            SourceSpec::Quickbooks(q) => {
                for url in [&q.base_url, &q.token_url].into_iter().flatten() {
                    if url.contains("://") {
                        self.egress.check_url(url).map_err(egress_error)?;
                    }
                }
                Ok(())
            }
            SourceSpec::Odoo(o) => self.egress.check_url(&o.url).map_err(egress_error),
        }
    }

    /// Where a path in an API-defined pipeline points, relative paths under the files root.
    pub fn place(&self, path: &Path) -> Option<PathBuf> {
        let root = self.files_root.as_ref()?;
        Some(if path.is_absolute() {
            path.to_path_buf()
        } else {
            root.join(path)
        })
    }

    fn check_and_place(&self, path: &mut Option<PathBuf>) -> Result<(), PipelineError> {
        self.check_path(path.as_deref())?;
        if let Some(p) = path.as_mut()
            && let Some(placed) = self.place(p)
        {
            *p = placed;
        }
        Ok(())
    }

    fn check_path(&self, path: Option<&Path>) -> Result<(), PipelineError> {
        let Some(path) = path else { return Ok(()) };
        let Some(root) = &self.files_root else {
            return Err(PipelineError::config(
                "this server reads no files by path (it was started without --files-root): leave `path` out and upload files to the pipeline",
            ));
        };
        let placed = self.place(path).unwrap_or_default();
        // Judged by where it resolves: the file itself, or (not there yet) its directory.
        let resolved = std::fs::canonicalize(&placed).or_else(|e| {
            match (placed.parent(), placed.file_name()) {
                (Some(dir), Some(name)) => std::fs::canonicalize(dir).map(|d| d.join(name)),
                _ => Err(e),
            }
        });
        let inside = match resolved {
            Ok(resolved) => resolved.starts_with(root),
            Err(_) => {
                placed.starts_with(root) && !placed.components().any(|c| c == Component::ParentDir)
            }
        };
        if inside { Ok(()) } else { Err(outside(path)) }
    }
}

fn egress_error(e: sluice_connectors::SourceError) -> PipelineError {
    PipelineError::config("[source]").with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confinement(root: &Path) -> Confinement {
        Confinement::new(Some(root), &root.join("uploads"), EgressPolicy::default())
            .expect("confinement")
    }

    #[test]
    fn files_outside_the_root_are_refused_before_and_after_resolution() {
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path().join("files");
        std::fs::create_dir_all(&root).expect("root");
        std::fs::write(root.join("in.csv"), "a\n").expect("write");
        #[cfg(unix)]
        std::os::unix::fs::symlink("/etc/hostname", root.join("link.csv")).expect("link");
        let c = confinement(&root);
        let reach = c.reach("acme", PipelineOrigin::Api);
        let root = std::fs::canonicalize(&root).expect("canon");
        assert!(reach.file(&root.join("in.csv")).is_ok());
        assert!(reach.file(Path::new("/etc/hostname")).is_err());
        #[cfg(unix)]
        assert!(reach.file(&root.join("link.csv")).is_err());
        assert!(c.check_path(Some(Path::new("/etc/hostname"))).is_err());
        assert!(c.check_path(Some(Path::new("../../etc/hostname"))).is_err());
        #[cfg(unix)]
        assert!(c.check_path(Some(Path::new("link.csv"))).is_err());
        assert!(c.check_path(Some(Path::new("in.csv"))).is_ok());
        assert!(c.check_path(Some(Path::new("later.csv"))).is_ok());
        let shell = c.reach("acme", PipelineOrigin::Shell);
        assert!(shell.file(Path::new("/etc/hostname")).is_ok());
    }

    #[test]
    fn another_tenants_uploads_are_outside() {
        let dir = tempfile::tempdir().expect("dir");
        let c = Confinement::new(None, &dir.path().join("uploads"), EgressPolicy::default())
            .expect("c");
        let other = dir.path().join("uploads/globex/p");
        std::fs::create_dir_all(&other).expect("mkdir");
        std::fs::write(other.join("f.csv"), "a\n").expect("write");
        let file = std::fs::canonicalize(other.join("f.csv")).expect("canon");
        assert!(c.reach("globex", PipelineOrigin::Api).file(&file).is_ok());
        assert!(c.reach("acme", PipelineOrigin::Api).file(&file).is_err());
        assert!(c.check_path(Some(Path::new("f.csv"))).is_err());
    }
}
