//! OpenAI's files and fine-tuning-jobs routes, backed by the state database and the job runner.
//!
//! Files: `POST /v1/files` (multipart `file` + `purpose`), list, retrieve, content, delete. Files of
//! purpose `fine-tune` are validated on upload (format, every bad line named); other purposes are
//! stored as they are (and refused as training data). Jobs: create, list (cursor pagination),
//! retrieve, cancel, pause, resume, events, checkpoints.

use super::error::ApiError;
use super::AppState;
use crate::jobs::{check_suffix, BadParam, JobRequest};
use crate::runner::JobRunner;
use crate::state::{new_id, now, FileRow, JobRow, StateError};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::Arc;

const PURPOSES: [&str; 6] = [
    "fine-tune",
    "assistants",
    "batch",
    "user_data",
    "vision",
    "evals",
];

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        ApiError::storage_or_internal(e)
    }
}

impl From<BadParam> for ApiError {
    fn from(e: BadParam) -> Self {
        ApiError::invalid(e.message, Some(&e.param))
    }
}

fn runner(st: &AppState) -> Result<&Arc<JobRunner>, ApiError> {
    st.runner.as_ref().ok_or_else(|| {
        ApiError::unavailable(
            "fine-tuning is disabled: start qlorad with --state-dir to enable files and jobs",
        )
    })
}

fn file_json(f: &FileRow) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
        "filename": f.filename, "purpose": f.purpose, "status": "processed",
        "expires_at": null, "status_details": null,
    })
}

fn respond(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/files`.
pub async fn upload(
    State(st): State<AppState>,
    mp: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    respond(
        async {
            let mut mp = mp.map_err(|e| {
                ApiError::invalid(
                    format!("`POST /v1/files` takes a multipart/form-data body with `file` and `purpose`: {e}"),
                    None,
                )
            })?;
            let runner = runner(&st)?.clone();
            let dir = runner.store().dir().join("files");
            let id = new_id("file");
            let (mut purpose, mut filename, mut bytes) = (None, None, 0usize);
            let tmp = dir.join(format!(".{id}.upload"));
            // Removes the partial upload on every early return.
            struct Cleanup(std::path::PathBuf);
            impl Drop for Cleanup {
                fn drop(&mut self) {
                    let _ = std::fs::remove_file(&self.0);
                }
            }
            let _cleanup = Cleanup(tmp.clone());
            let bad_form = |e: axum::extract::multipart::MultipartError| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(st.max_upload_bytes)
                } else if crate::http::is_body_timeout(&e) {
                    ApiError::body_timeout()
                } else {
                    ApiError::invalid(format!("invalid multipart body: {e}"), None)
                }
            };
            while let Some(mut field) = mp.next_field().await.map_err(bad_form)? {
                match field.name() {
                    Some("purpose") => purpose = Some(field.text().await.map_err(bad_form)?),
                    Some("file") => {
                        filename = Some(field.file_name().unwrap_or("upload.jsonl").to_string());
                        let mut out = std::fs::File::create(&tmp)
                            .map_err(ApiError::storage_or_internal)?;
                        while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
                            bytes += chunk.len();
                            if bytes > st.max_upload_bytes {
                                return Err(ApiError::too_large(st.max_upload_bytes));
                            }
                            out.write_all(&chunk)
                                .map_err(ApiError::storage_or_internal)?;
                        }
                        out.sync_all().map_err(ApiError::storage_or_internal)?;
                    }
                    _ => {}
                }
            }
            let purpose = purpose
                .ok_or_else(|| ApiError::invalid("`purpose` is required", Some("purpose")))?;
            if !PURPOSES.contains(&purpose.as_str()) {
                return Err(ApiError::invalid(
                    format!("`purpose` must be one of {}", PURPOSES.join(", ")),
                    Some("purpose"),
                ));
            }
            let filename =
                filename.ok_or_else(|| ApiError::invalid("`file` is required", Some("file")))?;
            if bytes == 0 {
                return Err(ApiError::invalid("the file is empty", Some("file")));
            }
            let ext = match std::path::Path::new(&filename)
                .extension()
                .and_then(|e| e.to_str())
            {
                Some(e @ ("jsonl" | "json" | "parquet")) => e.to_string(),
                _ if purpose == "fine-tune" => "jsonl".to_string(),
                _ => "bin".to_string(),
            };
            let path = dir.join(format!("{id}.{ext}"));
            std::fs::rename(&tmp, &path).map_err(ApiError::storage_or_internal)?;
            if purpose == "fine-tune" {
                let p = path.clone();
                let checked =
                    tokio::task::spawn_blocking(move || qlorad_trainer::validate_file(&p))
                        .await
                        .map_err(ApiError::internal)?;
                if let Err(e) = checked {
                    let _ = std::fs::remove_file(&path);
                    let msg = e
                        .to_string()
                        .replace(&path.display().to_string(), &filename);
                    return Err(ApiError::invalid(
                        format!("invalid fine-tuning file: {msg}"),
                        Some("file"),
                    )
                    .with_code("invalid_file"));
                }
            }
            let row = FileRow {
                id,
                created_at: now(),
                filename,
                purpose,
                bytes: bytes as i64,
                path,
            };
            runner.store().insert_file(&row)?;
            Ok(Json(file_json(&row)).into_response())
        }
        .await
        // An upload refused part-way leaves the rest of its body unread: the connection cannot
        // carry another request, and saying so keeps clients from reusing it (RFC 9112 §9.6).
        .map_err(ApiError::closing),
    )
}

#[derive(serde::Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

pub async fn list_files(State(st): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    respond((|| {
        let files = runner(&st)?.store().files(q.purpose.as_deref())?;
        let data: Vec<Value> = files.iter().map(file_json).collect();
        Ok(Json(json!({"object": "list", "data": data, "has_more": false})).into_response())
    })())
}

fn find_file(st: &AppState, id: &str) -> Result<FileRow, ApiError> {
    runner(st)?
        .store()
        .file(id)?
        .ok_or_else(|| ApiError::not_found(format!("No such File object: {id}")))
}

pub async fn get_file(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    respond(find_file(&st, &id).map(|f| Json(file_json(&f)).into_response()))
}

pub async fn file_content(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    respond(
        async {
            let f = find_file(&st, &id)?;
            let body = tokio::fs::read(&f.path).await.map_err(ApiError::internal)?;
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
        }
        .await,
    )
}

pub async fn delete_file(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    respond((|| {
        let f = find_file(&st, &id)?;
        runner(&st)?.store().delete_file(&id)?;
        let _ = std::fs::remove_file(&f.path);
        Ok(Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
    })())
}

fn opt_json(s: &Option<String>) -> Value {
    s.as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null)
}

/// A job in OpenAI's `fine_tuning.job` shape (plus `qlorad` progress fields).
pub fn job_json(j: &JobRow) -> Value {
    let resolved = opt_json(&j.resolved);
    let req: Value = serde_json::from_str(&j.request).unwrap_or(Value::Null);
    let pick = |k: &str| {
        let r = &resolved[k];
        if r.is_null() {
            if req[k].is_null() {
                json!("auto")
            } else {
                req[k].clone()
            }
        } else {
            r.clone()
        }
    };
    let hp = json!({
        "n_epochs": pick("n_epochs"), "batch_size": pick("batch_size"),
        "learning_rate_multiplier": pick("learning_rate_multiplier"),
    });
    let mut hp_full = hp.clone();
    if let (Some(o), Some(lora)) = (hp_full.as_object_mut(), resolved.get("lora")) {
        o.insert("lora_r".into(), lora["r"].clone());
        o.insert("lora_alpha".into(), lora["alpha"].clone());
        o.insert("lora_dropout".into(), lora["dropout"].clone());
        o.insert("use_rslora".into(), lora["rslora"].clone());
        o.insert("target_modules".into(), lora["targets"].clone());
        o.insert("max_seq_len".into(), resolved["max_seq_len"].clone());
        o.insert(
            "checkpoint_interval".into(),
            resolved["checkpoint_interval"].clone(),
        );
        o.insert(
            "gradient_checkpointing".into(),
            resolved["gradient_checkpointing"].clone(),
        );
        o.insert(
            "paged_optimizer".into(),
            resolved
                .get("paged_optimizer")
                .cloned()
                .unwrap_or(json!(false)),
        );
    }
    json!({
        "id": j.id,
        "object": "fine_tuning.job",
        "created_at": j.created_at,
        "finished_at": j.finished_at,
        "model": j.model,
        "fine_tuned_model": j.fine_tuned_model,
        "organization_id": "org-qlorad",
        "result_files": [],
        "status": j.status,
        "validation_file": j.validation_file,
        "training_file": j.training_file,
        "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp_full}},
        "trained_tokens": j.trained_tokens,
        "error": j.error,
        "seed": j.seed,
        "estimated_finish": j.estimated_finish,
        "integrations": [],
        "metadata": opt_json(&j.metadata),
        "user_provided_suffix": j.suffix,
        "step": j.step,
        "total_steps": j.total_steps,
    })
}

/// Checks a referenced file: it exists and is fine-tuning data.
fn check_file(st: &AppState, id: &str, param: &str) -> Result<(), ApiError> {
    let f = runner(st)?.store().file(id)?.ok_or_else(|| {
        ApiError::invalid(format!("file {id:?} does not exist"), Some(param))
            .with_code("invalid_file")
    })?;
    if f.purpose != "fine-tune" {
        return Err(ApiError::invalid(
            format!(
                "file {id} has purpose {:?}; fine-tuning needs a file uploaded with purpose \"fine-tune\"",
                f.purpose
            ),
            Some(param),
        )
        .with_code("invalid_file_purpose"));
    }
    Ok(())
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create_job(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond((|| {
        let runner = runner(&st)?.clone();
        let body: Value = super::parse(&st, body)?;
        let str_field = |k: &str| -> Result<Option<String>, ApiError> {
            match body.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(ApiError::invalid(
                    format!("`{k}` must be a string"),
                    Some(k),
                )),
            }
        };
        let model = str_field("model")?
            .ok_or_else(|| ApiError::invalid("`model` is required", Some("model")))?;
        if model != runner.base_id() {
            return Err(ApiError::invalid(
                format!(
                    "model {model:?} cannot be fine-tuned here: this daemon trains on its resident base {:?}",
                    runner.base_id()
                ),
                Some("model"),
            )
            .with_code("model_not_available"));
        }
        let training_file = str_field("training_file")?.ok_or_else(|| {
            ApiError::invalid("`training_file` is required", Some("training_file"))
        })?;
        check_file(&st, &training_file, "training_file")?;
        let validation_file = str_field("validation_file")?;
        if let Some(v) = &validation_file {
            check_file(&st, v, "validation_file")?;
        }
        let suffix = str_field("suffix")?;
        if let Some(s) = &suffix {
            check_suffix(s)?;
        }
        let seed = match body.get("seed") {
            None | Some(Value::Null) => rand::random::<u32>() as i64,
            Some(v) => v
                .as_u64()
                .filter(|s| *s <= i64::MAX as u64)
                .map(|s| s as i64)
                .ok_or_else(|| {
                    ApiError::invalid("`seed` must be a non-negative integer", Some("seed"))
                })?,
        };
        let metadata = match body.get("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m))
                if m.len() <= 16
                    && m.iter().all(|(k, v)| {
                        k.len() <= 64 && v.as_str().is_some_and(|s| s.len() <= 512)
                    }) =>
            {
                Some(serde_json::to_string(m).map_err(ApiError::internal)?)
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "`metadata` must be an object of at most 16 string values",
                    Some("metadata"),
                ))
            }
        };
        let req = JobRequest::parse(&body)?;
        let job = JobRow {
            validation_file,
            suffix,
            metadata,
            ..JobRow::new(
                new_id("ftjob"),
                model,
                training_file,
                seed,
                serde_json::to_string(&req).map_err(ApiError::internal)?,
            )
        };
        let store = runner.store();
        store.insert_job(&job)?;
        store.event(
            &job.id,
            "info",
            "message",
            &format!("Created fine-tuning job: {}", job.id),
            None,
        )?;
        runner.clone().spawn_validation(job.id.clone());
        runner.update_gauges();
        Ok(Json(job_json(&job)).into_response())
    })())
}

fn find_job(st: &AppState, id: &str) -> Result<JobRow, ApiError> {
    let runner = runner(st)?;
    let j = runner
        .store()
        .job(id)?
        .ok_or_else(|| ApiError::not_found(format!("No such fine-tuning job: {id}")))?;
    Ok(runner.shown(j))
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(20),
        Some(l) if (1..=100).contains(&l) => Ok(l),
        Some(_) => Err(ApiError::invalid(
            "`limit` must be between 1 and 100",
            Some("limit"),
        )),
    }
}

pub async fn list_jobs(State(st): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    respond((|| {
        let limit = page_limit(q.limit)?;
        let runner = runner(&st)?;
        let mut rows = runner.store().jobs(q.after.as_deref(), limit)?;
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        let data: Vec<Value> = rows
            .into_iter()
            .map(|j| job_json(&runner.shown(j)))
            .collect();
        Ok(Json(json!({"object": "list", "data": data, "has_more": has_more})).into_response())
    })())
}

pub async fn get_job(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    respond(find_job(&st, &id).map(|j| Json(job_json(&j)).into_response()))
}

/// Waits (briefly) for a running job to reach a step boundary and act on a control request.
async fn settle(st: &AppState, id: &str, from: &str) -> Result<JobRow, ApiError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let j = find_job(st, id)?;
        if j.status != from || tokio::time::Instant::now() > deadline {
            return Ok(j);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

const ENDED: [&str; 3] = ["succeeded", "failed", "cancelled"];

pub async fn cancel_job(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    respond(
        async {
            let j = find_job(&st, &id)?;
            if ENDED.contains(&j.status.as_str()) {
                return Err(ApiError::invalid(
                    format!("Job {id} has already {}", j.status),
                    None,
                ));
            }
            runner(&st)?.cancel(&id)?;
            let j = settle(&st, &id, "running").await?;
            Ok(Json(job_json(&j)).into_response())
        }
        .await,
    )
}

pub async fn pause_job(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    respond(
        async {
            let j = find_job(&st, &id)?;
            if !matches!(j.status.as_str(), "queued" | "running") {
                return Err(ApiError::invalid(
                    format!(
                        "Job {id} is {}; only queued or running jobs can be paused",
                        j.status
                    ),
                    None,
                ));
            }
            runner(&st)?.pause(&id)?;
            let j = settle(&st, &id, "running").await?;
            Ok(Json(job_json(&j)).into_response())
        }
        .await,
    )
}

pub async fn resume_job(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    respond((|| {
        let j = find_job(&st, &id)?;
        if !runner(&st)?.resume(&id)? {
            return Err(ApiError::invalid(
                format!("Job {id} is {}; only paused jobs can be resumed", j.status),
                None,
            ));
        }
        Ok(Json(job_json(&find_job(&st, &id)?)).into_response())
    })())
}

fn seq_of(cursor: Option<&str>, prefix: &str) -> Result<Option<i64>, ApiError> {
    cursor
        .map(|c| {
            c.strip_prefix(prefix)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| ApiError::invalid(format!("invalid cursor {c:?}"), Some("after")))
        })
        .transpose()
}

pub async fn job_events(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    respond((|| {
        find_job(&st, &id)?;
        let limit = page_limit(q.limit)?;
        let after = seq_of(q.after.as_deref(), "ftevent-")?;
        let mut rows = runner(&st)?.store().events(&id, after, limit)?;
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        let data: Vec<Value> = rows
            .iter()
            .map(|e| {
                json!({
                    "id": format!("ftevent-{}", e.seq), "object": "fine_tuning.job.event",
                    "created_at": e.created_at, "level": e.level, "message": e.message,
                    "data": e.data, "type": e.kind,
                })
            })
            .collect();
        Ok(Json(json!({"object": "list", "data": data, "has_more": has_more})).into_response())
    })())
}

pub async fn job_checkpoints(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    respond((|| {
        find_job(&st, &id)?;
        let limit = page_limit(q.limit)?;
        let after = seq_of(q.after.as_deref(), "ftckpt-")?;
        let rows = runner(&st)?.store().checkpoints(&id)?;
        let mut rows: Vec<_> = rows
            .into_iter()
            .filter(|c| after.is_none_or(|a| c.seq < a))
            .collect();
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        let data: Vec<Value> = rows
            .iter()
            .map(|c| {
                json!({
                    "id": format!("ftckpt-{}", c.seq), "object": "fine_tuning.job.checkpoint",
                    "created_at": c.created_at, "fine_tuned_model_checkpoint": c.name,
                    "fine_tuning_job_id": c.job_id, "metrics": c.metrics, "step_number": c.step,
                })
            })
            .collect();
        Ok(Json(json!({"object": "list", "data": data, "has_more": has_more})).into_response())
    })())
}
