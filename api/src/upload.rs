//! `POST /v1/pipelines/{name}/files`: a CSV or XLSX file for a file pipeline, as multipart
//! field `file`. The file streams to disk while it is hashed; over the size limit it is 413;
//! its type is judged by its content (a ZIP container for XLSX, UTF-8 text without NUL bytes
//! for CSV), and one that does not fit the pipeline is 415. The same content for the same
//! pipeline is not loaded twice: the answer names the earlier run. Otherwise a sync of the
//! file is queued (202).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;
use sha2::{Digest, Sha256};
use sluice_engine::RunTrigger;
use sluice_engine::control::Role;
use sluice_pipelines::PipelineSpec;
use sluice_workers::TriggerRequest;
use tokio::io::AsyncWriteExt;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::UploadQueued;
use crate::request_id::RequestId;
use crate::state::AppState;
use sluice_engine::Store;

/// A temporary upload, removed when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bytes of the files under `dir` (0 when it does not exist).
async fn dir_size(dir: std::path::PathBuf) -> u64 {
    tokio::task::spawn_blocking(move || {
        let mut total = 0u64;
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for entry in entries.flatten() {
                match entry.metadata() {
                    Ok(m) if m.is_dir() => stack.push(entry.path()),
                    Ok(m) => total += m.len(),
                    Err(_) => {}
                }
            }
        }
        total
    })
    .await
    .unwrap_or(0)
}

fn over_quota(quota: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the tenant's uploaded files would exceed its quota of {quota} bytes"),
    )
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the file is larger than the limit of {limit} bytes"),
    )
}

/// What the first bytes say the file is.
fn sniff(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"PK\x03\x04") {
        return Some("xlsx");
    }
    if head.contains(&0) {
        return None;
    }
    // A multi-byte character may be cut at the end of the sample.
    match std::str::from_utf8(head) {
        Ok(_) => Some("csv"),
        Err(e) if e.error_len().is_none() => Some("csv"),
        Err(_) => None,
    }
}

/// The handler.
#[utoipa::path(
    post,
    path = "/v1/pipelines/{name}/files",
    tag = "pipelines",
    summary = "Upload a CSV/XLSX file (multipart field `file`, up to the upload limit) and queue its sync: 202; the same file again names the earlier run",
    security(("bearer" = ["operator"])),
    params(("name" = String, Path, description = "The pipeline's name", example = "invoices")),
    request_body(content = crate::openapi::Upload, content_type = "multipart/form-data"),
    responses((status = 202, description = "Queued", body = UploadQueued), (status = 200, description = "The same file was uploaded before: its earlier run", body = UploadQueued))
)]
pub async fn upload_file<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    caller: Caller,
    Path(name): Path<String>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    mut form: Multipart,
) -> Result<axum::response::Response, ApiError> {
    let tenant = caller.tenant_with(Role::Operator)?.clone();
    let stored = s
        .warehouse
        .pipeline(&tenant, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("pipeline '{name}'")))?;
    let spec = PipelineSpec::from_stored(&stored.spec, &stored.secrets)?;
    let kind = spec.source.file_kind().ok_or_else(|| {
        ApiError::bad_request(format!("pipeline '{name}' reads a database, not files"))
    })?;
    let used = dir_size(s.upload_dir.join(tenant.as_str())).await;
    let room = s.upload_quota.saturating_sub(used);
    let limit = s
        .upload_limit
        .min(usize::try_from(room).unwrap_or(usize::MAX));
    if limit == 0 {
        return Err(over_quota(s.upload_quota));
    }
    let dir = s.upload_dir.join(tenant.as_str()).join(&name);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(ApiError::internal)?;
    // Removed when the handler ends without keeping it, a client's disconnect included
    // (the handler's future is dropped then).
    let guard = TempFile(dir.join(format!(".upload-{}", uuid::Uuid::now_v7())));
    let temp = guard.0.clone();
    let mut field = loop {
        let next = form
            .next_field()
            .await
            .map_err(|e| multipart_error(&e, limit))?;
        match next {
            Some(f) if f.name() == Some("file") => break f,
            Some(_) => continue,
            None => return Err(ApiError::bad_request("no multipart field named `file`")),
        }
    };
    let mut out = tokio::fs::File::create(&temp)
        .await
        .map_err(ApiError::internal)?;
    let (mut hasher, mut size, mut head) = (Sha256::new(), 0usize, Vec::new());
    let written: Result<(), ApiError> = async {
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| multipart_error(&e, limit))?
        {
            size += chunk.len();
            if size > limit {
                return Err(if limit < s.upload_limit {
                    over_quota(s.upload_quota)
                } else {
                    too_large(limit)
                });
            }
            if head.len() < 8192 {
                head.extend_from_slice(&chunk[..chunk.len().min(8192 - head.len())]);
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(ApiError::internal)?;
        }
        out.flush().await.map_err(ApiError::internal)
    }
    .await;
    drop(out);
    written?;
    if size == 0 {
        return Err(ApiError::bad_request("the file is empty"));
    }
    match sniff(&head) {
        Some(found) if found == kind => {}
        found => {
            let what = found.map_or("neither CSV text nor an XLSX workbook", |f| f);
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("pipeline '{name}' reads {kind} files; this file is {what}"),
            ));
        }
    }
    let sha: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Some(run) = s.warehouse.upload_run(&tenant, &name, &sha).await? {
        drop(guard);
        return Ok(Json(UploadQueued {
            url: format!("/v1/runs/{run}"),
            run_id: run,
            sha256: sha,
            size: None,
            duplicate: true,
        })
        .into_response());
    }
    let path = dir.join(format!("{sha}.{kind}"));
    tokio::fs::rename(&temp, &path)
        .await
        .map_err(ApiError::internal)?;
    let triggered = s
        .queues
        .trigger(&TriggerRequest {
            tenant: tenant.to_string(),
            pipeline: name.clone(),
            trigger: RunTrigger::Api,
            idempotency_key: None,
            correlation_id: Some(request_id),
            file: Some(path),
        })
        .await?;
    let run = s
        .warehouse
        .record_upload(&tenant, &name, &sha, size as u64, &triggered.run_id)
        .await?;
    s.warehouse
        .record_audit(
            &caller.key_id,
            "pipeline.upload",
            Some(&tenant),
            &name,
            &json!({ "sha256": sha, "size": size, "run_id": run }),
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(UploadQueued {
            url: format!("/v1/runs/{run}"),
            run_id: run,
            sha256: sha,
            size: Some(size as u64),
            duplicate: false,
        }),
    )
        .into_response())
}

fn multipart_error(e: &axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
    } else {
        ApiError::bad_request(format!("not a valid multipart body: {}", e.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::sniff;

    #[test]
    fn files_are_judged_by_content() {
        assert_eq!(sniff(b"PK\x03\x04rest"), Some("xlsx"));
        assert_eq!(sniff(b"a,b\n1,2\n"), Some("csv"));
        assert_eq!(sniff("é,ü\n".as_bytes()), Some("csv"));
        assert_eq!(
            sniff(&"é".as_bytes()[..1]),
            Some("csv"),
            "cut character at the end"
        );
        assert_eq!(sniff(b"\x7fELF\x02\x01\x01\0\0"), None);
        assert_eq!(sniff(&[0xff, 0xfe, b'a', 0]), None);
    }
}
