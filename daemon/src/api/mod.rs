//! The HTTP API: OpenAI-compatible routes plus health, readiness and metrics.

pub mod error;
pub mod exports;
pub mod fine_tuning;
pub mod openai;
pub mod openapi;

use crate::adapters::{AdapterRegistry, Lookup};
use crate::engine::{Event, Request, SubmitError};
use crate::metrics::Metrics;
use crate::shards::Shards;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use error::ApiError;
use openai::{ChatRequest, CompletionRequest, ModelCard, Sampling, Usage};
use qlorad_model::{FinishReason, LoraAdapter, Tokenizer};
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::Instrument;

/// Shared state of the handlers: cheap to clone (all `Arc`s).
#[derive(Clone)]
pub struct AppState {
    /// One engine per serving device; requests are routed among them ([`crate::shards`]).
    pub shards: Shards,
    /// One registry over all devices (device index = shard index).
    pub adapters: Arc<AdapterRegistry>,
    pub keys: Arc<crate::auth::ApiKeys>,
    pub tok: Arc<Tokenizer>,
    pub model_id: Arc<str>,
    pub context_len: usize,
    pub metrics: Arc<Metrics>,
    pub created: u64,
    pub max_body_bytes: usize,
    pub ids: Arc<AtomicU64>,
    /// Files and fine-tuning jobs (`None` without `--state-dir`: those routes answer 503).
    pub runner: Option<Arc<crate::runner::JobRunner>>,
    /// Promote (merge + export) jobs; `None` without `--state-dir`.
    pub exports: Option<Arc<crate::exports::ExportRunner>>,
    pub max_upload_bytes: usize,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    // Uploads get their own, larger limit (the multipart framing adds a little).
    let upload_limit = state.max_upload_bytes.saturating_add(64 << 10);
    use fine_tuning as ft;
    let uploads = Router::new()
        .route("/v1/files", post(ft::upload).get(ft::list_files))
        .layer(DefaultBodyLimit::max(upload_limit));
    Router::new()
        .merge(uploads)
        .route("/v1/files/{id}", get(ft::get_file).delete(ft::delete_file))
        .route("/v1/files/{id}/content", get(ft::file_content))
        .route(
            "/v1/fine_tuning/jobs",
            post(ft::create_job).get(ft::list_jobs),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(ft::get_job))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(ft::cancel_job))
        .route("/v1/fine_tuning/jobs/{id}/pause", post(ft::pause_job))
        .route("/v1/fine_tuning/jobs/{id}/resume", post(ft::resume_job))
        .route("/v1/fine_tuning/jobs/{id}/events", get(ft::job_events))
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(ft::job_checkpoints),
        )
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/adapters", get(list_adapters).post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route("/v1/adapters/{name}/pin", post(pin_adapter))
        .route("/v1/adapters/{name}/unpin", post(unpin_adapter))
        .route("/v1/adapters/{name}/promote", post(exports::promote))
        .route("/v1/exports", get(exports::list))
        .route("/v1/exports/{id}", get(exports::get))
        .route("/v1/exports/{id}/cancel", post(exports::cancel))
        .route("/v1/exports/{id}/events", get(exports::events))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { Json(openapi::spec(env!("CARGO_PKG_VERSION"))) }),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authorize,
        ))
        .with_state(state)
}

/// Ready while every engine runs: a stopped one would fail the requests routed to it.
async fn ready(State(st): State<AppState>) -> Response {
    if st.shards.all_alive() {
        Json(json!({
            "status": "ready",
            "model": &*st.model_id,
            "engines": st.shards.len(),
            "inflight": st.shards.inflight(),
        }))
        .into_response()
    } else {
        let stopped: Vec<&str> = st
            .shards
            .iter()
            .filter(|s| !s.engine.is_alive())
            .map(|s| s.device.as_str())
            .collect();
        ApiError::unavailable(format!(
            "the inference engine is not running on {}",
            stopped.join(", ")
        ))
        .into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

fn card(st: &AppState, id: &str, parent: Option<&str>) -> ModelCard {
    ModelCard {
        id: id.to_string(),
        object: "model",
        created: st.created,
        owned_by: "qlorad",
        parent: parent.map(String::from),
    }
}

async fn models(State(st): State<AppState>) -> Response {
    let mut data = vec![card(&st, &st.model_id, None)];
    data.extend(
        st.adapters
            .list()
            .iter()
            .map(|a| card(&st, &a.name, Some(&st.model_id))),
    );
    let resp = Json(json!({"object": "list", "data": data})).into_response();
    record(&st, "/v1/models", resp.status(), Instant::now());
    resp
}

async fn model(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let resp = if id == *st.model_id {
        Json(card(&st, &id, None)).into_response()
    } else if st.adapters.contains(&id) {
        Json(card(&st, &id, Some(&st.model_id))).into_response()
    } else {
        ApiError::model_not_found(&id).into_response()
    };
    record(&st, "/v1/models/{id}", resp.status(), Instant::now());
    resp
}

fn record(st: &AppState, route: &str, status: StatusCode, started: Instant) {
    st.metrics
        .http_requests
        .with_label_values(&[route, status.as_str()])
        .inc();
    st.metrics
        .http_latency
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
}

/// Parses a JSON body, mapping every failure to an OpenAI error.
fn parse<T: serde::de::DeserializeOwned>(
    st: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(st.max_body_bytes)
        } else if crate::http::is_body_timeout(&rej) {
            ApiError::body_timeout()
        } else {
            ApiError::invalid(format!("could not read the request body: {rej}"), None)
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

/// Where a request runs: a shard, and the adapter its `model` names as placed on that shard's
/// device (`None` for the base model).
struct Target {
    shard: usize,
    adapter: Option<Arc<LoraAdapter>>,
}

/// Routes a request for `model` to a shard ([`crate::shards`]: least loaded, adapter affinity,
/// away from a training GPU) and resolves its adapter there. An adapter not on that device is
/// placed here — an upload from its host copy, or a read from disk — blocking, so moved off the
/// async workers with `block_in_place`.
fn select(st: &AppState, model: &str) -> Result<Target, ApiError> {
    let base = model == &*st.model_id;
    if !base && !st.adapters.contains(model) {
        return Err(ApiError::model_not_found(model));
    }
    let training = st.runner.as_ref().is_some_and(|r| r.is_training());
    let shard = st.shards.route(
        model,
        |dev| base || st.adapters.is_resident(model, dev),
        training,
    );
    tracing::debug!(model, shard, "routed");
    let adapter = if base {
        None
    } else {
        match st.adapters.lookup(model, shard) {
            Lookup::Resident(a) => Some(a),
            Lookup::Evicted => Some(tokio::task::block_in_place(|| {
                st.adapters.reload(model, shard)
            })?),
            Lookup::Unknown => return Err(ApiError::model_not_found(model)),
        }
    };
    st.metrics
        .adapter_requests
        .with_label_values(&[model])
        .inc();
    Ok(Target { shard, adapter })
}

async fn list_adapters(State(st): State<AppState>) -> Response {
    Json(json!({"object": "list", "data": st.adapters.list()})).into_response()
}

#[derive(serde::Deserialize)]
struct LoadAdapter {
    name: String,
    path: String,
}

/// Loads (or replaces) an adapter from a folder under the adapter root.
async fn load_adapter(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let resp = async {
        let req: LoadAdapter = parse(&st, body)?;
        let dir = st.adapters.resolve(&req.path)?;
        let reg = st.adapters.clone();
        let name = req.name.clone();
        let loaded_dir = dir.clone();
        let info = tokio::task::spawn_blocking(move || reg.load(&req.name, &dir))
            .await
            .map_err(ApiError::internal)??;
        // Recorded so that it comes back after a restart; an adapter the state store cannot
        // record is not kept either (the API must not acknowledge what a restart would lose).
        if let Some(store) = store(&st) {
            if let Err(e) = store.record_adapter(&name, &loaded_dir) {
                let _ = st.adapters.unload(&name);
                return Err(ApiError::internal(e));
            }
        }
        Ok::<_, ApiError>((StatusCode::CREATED, Json(info)).into_response())
    }
    .await
    .unwrap_or_else(|e| e.into_response());
    record(&st, "/v1/adapters", resp.status(), started);
    resp
}

/// The durable state, when the daemon has one (`--state-dir`).
fn store(st: &AppState) -> Option<&crate::state::Store> {
    st.runner.as_ref().map(|r| r.store())
}

async fn pin_adapter(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    set_pinned(&st, &name, true)
}

async fn unpin_adapter(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    set_pinned(&st, &name, false)
}

fn set_pinned(st: &AppState, name: &str, pinned: bool) -> Response {
    let r = (|| {
        let info = st.adapters.set_pinned(name, pinned)?;
        if let Some(store) = store(st) {
            store.record_pin(name, pinned)?;
        }
        Ok::<_, ApiError>(Json(info).into_response())
    })();
    r.unwrap_or_else(|e| e.into_response())
}

async fn unload_adapter(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    let r = (|| {
        st.adapters.unload(&name)?;
        if let Some(store) = store(&st) {
            store.forget_adapter(&name)?;
        }
        Ok::<_, ApiError>(
            Json(json!({"id": name, "object": "adapter", "deleted": true})).into_response(),
        )
    })();
    r.unwrap_or_else(|e| e.into_response())
}

/// Validates limits against the context and submits to the target's engine; returns the event
/// stream.
fn submit(
    st: &AppState,
    prompt: Vec<u32>,
    sampling: &Sampling,
    default_max: Option<usize>,
    target: Target,
) -> Result<(UnboundedReceiver<Event>, usize), ApiError> {
    let n = prompt.len();
    if n == 0 {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    let room = st.context_len.saturating_sub(n);
    let mut params = sampling.to_params(default_max.unwrap_or(room).max(1))?;
    params.adapter = target.adapter;
    if n + params.max_tokens > st.context_len {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({n} in the prompt, {} in the completion).",
                st.context_len,
                n + params.max_tokens,
                params.max_tokens
            ),
            Some("max_tokens"),
        )
        .with_code("context_length_exceeded"));
    }
    let shard = st
        .shards
        .get(target.shard)
        .ok_or_else(|| ApiError::internal(format!("no shard {}", target.shard)))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    shard
        .engine
        .submit(Request {
            prompt,
            params,
            events: tx,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError::overloaded(e.to_string()),
            SubmitError::Stopped => ApiError::unavailable(e.to_string()),
        })?;
    shard.requests.inc();
    Ok((rx, n))
}

fn new_id(st: &AppState, prefix: &str) -> String {
    let n = st.ids.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{t:x}{n:04x}")
}

/// The two completion routes differ only in how the prompt is built and how chunks look.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// One tracing span per request (the engine adds one per batch).
fn request_span(st: &AppState, route: &'static str) -> tracing::Span {
    let n = st.ids.load(Ordering::Relaxed);
    tracing::info_span!("request", route, seq = n)
}

async fn chat(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let span = request_span(&st, "/v1/chat/completions");
    chat_traced(st, body).instrument(span).await
}

async fn chat_traced(st: AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let resp = match chat_inner(&st, body) {
        Ok((rx, n, req)) => respond(&st, Kind::Chat, rx, n, req.model, &req.sampling).await,
        Err(e) => e.into_response(),
    };
    record(&st, "/v1/chat/completions", resp.status(), started);
    resp
}

fn chat_inner(
    st: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<(UnboundedReceiver<Event>, usize, ChatRequest), ApiError> {
    let req: ChatRequest = parse(st, body)?;
    let target = select(st, &req.model)?;
    let msgs = req.messages()?;
    let text = st
        .tok
        .apply_chat_template(&msgs, true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let ids = st.tok.encode(&text, false).map_err(ApiError::internal)?;
    let (rx, n) = submit(st, ids, &req.sampling, None, target)?;
    Ok((rx, n, req))
}

async fn completions(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let span = request_span(&st, "/v1/completions");
    completions_traced(st, body).instrument(span).await
}

async fn completions_traced(st: AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let inner = || -> Result<_, ApiError> {
        let req: CompletionRequest = parse(&st, body)?;
        let target = select(&st, &req.model)?;
        let ids = st
            .tok
            .encode(req.prompt()?, true)
            .map_err(ApiError::internal)?;
        // OpenAI's legacy completions default to 16 tokens.
        let (rx, n) = submit(&st, ids, &req.sampling, Some(16), target)?;
        Ok((rx, n, req))
    };
    let resp = match inner() {
        Ok((rx, n, req)) => respond(&st, Kind::Text, rx, n, req.model, &req.sampling).await,
        Err(e) => e.into_response(),
    };
    record(&st, "/v1/completions", resp.status(), started);
    resp
}

async fn respond(
    st: &AppState,
    kind: Kind,
    rx: UnboundedReceiver<Event>,
    n: usize,
    model: String,
    s: &Sampling,
) -> Response {
    let id = new_id(
        st,
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
    );
    if s.stream {
        stream(kind, rx, id, model, s.include_usage()).into_response()
    } else {
        collect(kind, rx, id, model, n).await
    }
}

async fn collect(
    kind: Kind,
    mut rx: UnboundedReceiver<Event>,
    id: String,
    model: String,
    n: usize,
) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Error(e) => return ApiError::internal(e).into_response(),
            Event::OutOfMemory(e) => return ApiError::unavailable(e).into_response(),
            Event::Finish {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let usage = Usage::new(prompt_tokens, completion_tokens);
                let choice = match kind {
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": null, "finish_reason": reason.as_str()})
                    }
                    Kind::Text => {
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason.as_str()})
                    }
                };
                let object = if kind == Kind::Chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Json(
                    json!({"id": id, "object": object, "created": unix_now(), "model": model,
                    "choices": [choice], "usage": usage}),
                )
                .into_response();
            }
        }
    }
    let _ = n;
    ApiError::internal("the engine dropped the request").into_response()
}

fn chunk(
    kind: Kind,
    id: &str,
    model: &str,
    created: u64,
    delta: Option<&str>,
    role: bool,
    finish: Option<FinishReason>,
) -> serde_json::Value {
    let reason = finish.map(|f| f.as_str());
    match kind {
        Kind::Chat => {
            let mut d = serde_json::Map::new();
            if role {
                d.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = delta {
                d.insert("content".into(), json!(t));
            }
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": d, "logprobs": null, "finish_reason": reason}]})
        }
        Kind::Text => {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": reason}]})
        }
    }
}

/// Server-sent events: content deltas, a final chunk with `finish_reason`, optionally a usage chunk,
/// then `data: [DONE]`. Dropping the stream (client gone) closes the channel, which cancels the work.
fn stream(
    kind: Kind,
    mut rx: UnboundedReceiver<Event>,
    id: String,
    model: String,
    include_usage: bool,
) -> impl IntoResponse {
    let created = unix_now();
    let s = async_stream::stream! {
        if kind == Kind::Chat {
            yield Ok::<_, Infallible>(SseEvent::default().data(chunk(kind, &id, &model, created, Some(""), true, None).to_string()));
        }
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => {
                    yield Ok(SseEvent::default().data(chunk(kind, &id, &model, created, Some(&t), false, None).to_string()));
                }
                Event::Error(e) => {
                    yield Ok(SseEvent::default().data(ApiError::internal(e).body().to_string()));
                    break;
                }
                Event::OutOfMemory(e) => {
                    yield Ok(SseEvent::default().data(ApiError::unavailable(e).body().to_string()));
                    break;
                }
                Event::Finish { reason, prompt_tokens, completion_tokens } => {
                    let mut last = chunk(kind, &id, &model, created, None, false, Some(reason));
                    if kind == Kind::Text {
                        last["choices"][0]["text"] = json!("");
                    }
                    yield Ok(SseEvent::default().data(last.to_string()));
                    if include_usage {
                        let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
                        let u = json!({"id": id, "object": object, "created": created, "model": model,
                            "choices": [], "usage": Usage::new(prompt_tokens, completion_tokens)});
                        yield Ok(SseEvent::default().data(u.to_string()));
                    }
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    Sse::new(s).keep_alive(KeepAlive::default())
}
