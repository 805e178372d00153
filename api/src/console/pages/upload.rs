//! Upload: a CSV or XLSX file dropped on a file pipeline. The script sends it to
//! `POST /v1/pipelines/{name}/files` with the session and its CSRF token, shows the upload's
//! progress, then opens the run it queued.

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use maud::html;
use sluice_engine::Store;

use crate::console::session::SignedIn;
use crate::console::{PageResult, layout};
use crate::state::AppState;

/// `GET /upload`
pub async fn page<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
) -> PageResult {
    let files: Vec<(String, String)> = s
        .warehouse
        .pipelines(&user.tenant)
        .await?
        .into_iter()
        .filter_map(|p| {
            let kind = p.spec["source"]["kind"].as_str()?.to_string();
            matches!(kind.as_str(), "csv" | "xlsx").then_some((p.name, kind))
        })
        .collect();
    let limit_mb = s.upload_limit / 1_000_000;
    let body = html! {
        h1 { "Upload a file" }
        @if files.is_empty() {
            p class="empty" { "No CSV or XLSX pipeline yet: an admin registers one first." }
        } @else {
            form id="upload" class="upload" data-csrf=(user.csrf) {
                label for="pipeline" { "Pipeline" }
                select id="pipeline" name="pipeline" required {
                    @for (name, kind) in &files { option value=(name) { (name) " (" (kind) ")" } }
                }
                div class="drop" data-drop {
                    label for="file" { "File" }
                    input id="file" name="file" type="file" accept=".csv,.xlsx,text/csv,application/vnd.openxmlformats-officedocument.spreadsheetml.sheet" required;
                    p class="muted small" { "Or drop a CSV or XLSX file here. Up to " (limit_mb) " MB; the same file twice is loaded once." }
                }
                button type="submit" class="primary" { "Upload and sync" }
                progress id="upload-progress" max="100" value="0" hidden aria-label="Upload progress" {}
                p id="upload-status" role="status" aria-live="polite" {}
            }
        }
    };
    Ok(layout(&user, "Upload", "/upload", None, body))
}
