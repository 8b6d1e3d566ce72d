//! Promotion routes: `POST /v1/adapters/{name}/promote` starts an export job (merge the adapter
//! into a full-precision base, write a Hugging Face folder under the export root);
//! `GET /v1/exports[/{id}[/events]]` and `POST /v1/exports/{id}/cancel` follow it.

use super::error::ApiError;
use super::AppState;
use crate::exports::{ExportRequest, ExportRunner, Refused};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

fn runner(st: &AppState) -> Result<&Arc<ExportRunner>, ApiError> {
    st.exports.as_ref().ok_or_else(|| {
        ApiError::unavailable("exports are disabled: start qlorad with --state-dir to enable them")
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Promote {
    out: String,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    merge_into: Option<String>,
    #[serde(default)]
    overwrite: bool,
}

pub async fn promote(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| {
        let runner = runner(&st)?;
        let p: Promote = super::parse(&st, body)?;
        let dtype = p
            .dtype
            .as_deref()
            .unwrap_or("bf16")
            .parse()
            .map_err(|e: String| ApiError::invalid(e, Some("dtype")))?;
        let merge_into = p
            .merge_into
            .as_deref()
            .unwrap_or("original")
            .parse()
            .map_err(|e: String| ApiError::invalid(e, Some("merge_into")))?;
        let req = ExportRequest {
            adapter: name.clone(),
            out_name: p.out,
            dtype,
            merge_into,
            overwrite: p.overwrite,
        };
        match runner.submit(&req) {
            Ok(v) => Ok((StatusCode::ACCEPTED, Json(v)).into_response()),
            Err(Refused::NoAdapter(n)) => Err(ApiError::model_not_found(&n)),
            Err(Refused::Invalid(m, param)) => Err(ApiError::invalid(m, Some(param))),
            Err(Refused::Store(e)) => Err(ApiError::from(e)),
        }
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

fn found(v: Option<Value>, id: &str) -> Result<Value, ApiError> {
    v.ok_or_else(|| ApiError::not_found(format!("No such export: {id}")))
}

pub async fn list(State(st): State<AppState>) -> Response {
    let r = (|| {
        let data = runner(&st)?.list()?;
        Ok::<_, ApiError>(Json(
            json!({"object": "list", "data": data, "has_more": false}),
        ))
    })();
    r.map(IntoResponse::into_response)
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn get(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let r = (|| Ok::<_, ApiError>(Json(found(runner(&st)?.get(&id)?, &id)?)))();
    r.map(IntoResponse::into_response)
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn cancel(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let r = async {
        let runner = runner(&st)?;
        let cur = found(runner.get(&id)?, &id)?;
        if !matches!(cur["status"].as_str(), Some("queued" | "running")) {
            return Err(ApiError::invalid(
                format!(
                    "export {id} has already {}",
                    cur["status"].as_str().unwrap_or("ended")
                ),
                None,
            ));
        }
        runner.cancel(&id)?;
        // A running export stops between two tensors: wait briefly to report the outcome.
        for _ in 0..100 {
            let v = found(runner.get(&id)?, &id)?;
            if v["status"] != "running" {
                return Ok(Json(v));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(Json(found(runner.get(&id)?, &id)?))
    }
    .await;
    r.map(IntoResponse::into_response)
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn events(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let r = (|| {
        let runner = runner(&st)?;
        found(runner.get(&id)?, &id)?;
        let rows = runner.events(&id)?;
        let data: Vec<Value> = rows
            .iter()
            .map(|e| {
                json!({"id": format!("exevent-{}", e.seq), "object": "export.event",
                       "created_at": e.created_at, "level": e.level, "message": e.message,
                       "data": e.data})
            })
            .collect();
        Ok::<_, ApiError>(Json(
            json!({"object": "list", "data": data, "has_more": false}),
        ))
    })();
    r.map(IntoResponse::into_response)
        .unwrap_or_else(IntoResponse::into_response)
}
