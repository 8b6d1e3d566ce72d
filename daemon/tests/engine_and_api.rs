//! The engine batches concurrent requests without changing their results, cancels work whose client
//! left, and the HTTP layer answers every failure in OpenAI's error shape (router driven with
//! `oneshot`, no socket).

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use http_body_util::BodyExt;
use qlorad::api::{router, AppState};
use qlorad::engine::{EngineConfig, EngineHandle, Event, Request};
use qlorad::metrics::Metrics;
use qlorad_model::generate::GenerateParams;
use qlorad_model::{ChatMessage, Llama, Quant, SamplingParams, Tokenizer};
use qlorad_tests::smollm2;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tower::ServiceExt;

fn load() -> Option<(Arc<Llama>, Arc<Tokenizer>)> {
    let dir = smollm2()?;
    let (m, t) = qlorad_model::load_model(&dir, Quant::Nf4(Default::default())).unwrap();
    Some((Arc::new(m), Arc::new(t)))
}

fn prompt(tok: &Tokenizer, q: &str) -> Vec<u32> {
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", q)], true)
        .unwrap();
    tok.encode(&text, false).unwrap()
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: vec![],
        adapter: None,
    }
}

async fn drain(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (String, usize) {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Finish {
                completion_tokens, ..
            } => return (text, completion_tokens),
            Event::Error(e) | Event::OutOfMemory(e) => panic!("engine error: {e}"),
        }
    }
    panic!("stream ended without Finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_equal_running_alone() {
    let Some((model, tok)) = load() else { return };
    let questions = [
        "What is the capital of France?",
        "Name three colors.",
        "What is 2+2?",
        "Say hello in Spanish.",
    ];
    let lens = [20usize, 12, 7, 16];
    let engine = EngineHandle::start(
        model.clone(),
        tok.clone(),
        EngineConfig::default(),
        Arc::new(Metrics::new().unwrap()),
    );
    let mut rxs = Vec::new();
    for (q, n) in questions.iter().zip(lens) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .submit(Request {
                prompt: prompt(&tok, q),
                params: greedy(n),
                events: tx,
            })
            .unwrap();
        rxs.push(rx);
    }
    for ((rx, q), n) in rxs.into_iter().zip(questions).zip(lens) {
        let (batched, count) = drain(rx).await;
        let alone =
            qlorad_model::generate(&model, &tok, &prompt(&tok, q), &greedy(n), |_| {}).unwrap();
        assert_eq!(batched, alone.text, "{q}");
        assert_eq!(count, alone.tokens.len(), "{q}");
    }
    assert_eq!(engine.inflight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_client_is_cancelled() {
    let Some((model, tok)) = load() else { return };
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = EngineHandle::start(model, tok.clone(), EngineConfig::default(), metrics.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine
        .submit(Request {
            prompt: prompt(&tok, "Tell me a long story."),
            params: greedy(4000),
            events: tx,
        })
        .unwrap();
    let first = rx.recv().await; // generation has started
    assert!(matches!(first, Some(Event::Text(_))), "{first:?}");
    drop(rx);
    for _ in 0..200 {
        if engine.inflight() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(engine.inflight(), 0, "cancelled request still in flight");
    assert_eq!(metrics.cancelled.get(), 1);
}

/// Regression (found by tests/reliability/load.py): once the last sequence finished, the engine
/// went idle without updating its gauges, so `qlorad_batch_running_requests` kept showing the final
/// batch (e.g. 5) until the next request arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_gauges_read_zero_once_idle() {
    let Some((model, tok)) = load() else { return };
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = EngineHandle::start(model, tok.clone(), EngineConfig::default(), metrics.clone());
    let mut rxs = Vec::new();
    for q in ["Name three colors.", "What is 2+2?"] {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .submit(Request {
                prompt: prompt(&tok, q),
                params: greedy(3),
                events: tx,
            })
            .unwrap();
        rxs.push(rx);
    }
    for rx in rxs {
        drain(rx).await;
    }
    for _ in 0..200 {
        if engine.inflight() == 0 && metrics.batch_running.get() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(engine.inflight(), 0);
    assert_eq!(
        metrics.batch_running.get(),
        0,
        "running gauge stale when idle"
    );
    assert_eq!(metrics.queue_waiting.get(), 0);
}

fn state(model: Arc<Llama>, tok: Arc<Tokenizer>, cfg: EngineConfig, max_body: usize) -> AppState {
    let metrics = Arc::new(Metrics::new().unwrap());
    let context_len = model.config().max_position_embeddings;
    let adapters = Arc::new(qlorad::adapters::AdapterRegistry::new(
        Some(qlorad_tests::fixture("lora")),
        "smollm2",
        model.config().clone(),
        usize::MAX,
        Some(metrics.adapters.clone()),
    ));
    AppState {
        adapters,
        keys: Arc::new(qlorad::auth::ApiKeys::default()),
        shards: qlorad::shards::Shards::single(
            EngineHandle::start(model, tok.clone(), cfg, metrics.clone()),
            "cpu",
            &metrics,
        ),
        tok,
        model_id: "smollm2".into(),
        context_len,
        metrics,
        created: 0,
        max_body_bytes: max_body,
        ids: Arc::new(AtomicU64::new(0)),
        runner: None,
        exports: None,
        max_upload_bytes: 1 << 20,
    }
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, serde_json::Value, Option<String>) {
    let req = HttpRequest::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        retry,
    )
}

fn assert_error(v: &serde_json::Value, kind: &str, param: Option<&str>) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(e["type"], kind, "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_the_openai_shape() {
    let Some((model, tok)) = load() else { return };
    let app = router(state(
        model.clone(),
        tok.clone(),
        EngineConfig::default(),
        4096,
    ));
    let ok_msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
    let (s, v, _) = call(&app, "POST", "/v1/chat/completions", "{not json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "invalid_request_error", None);
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        &format!(r#"{{"model":"other",{ok_msgs}}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "model_not_found");
    for (body, param) in [
        (
            format!(r#"{{"model":"smollm2",{ok_msgs},"temperature":2.5}}"#),
            "temperature",
        ),
        (
            format!(r#"{{"model":"smollm2",{ok_msgs},"top_p":0}}"#),
            "top_p",
        ),
        (
            format!(r#"{{"model":"smollm2",{ok_msgs},"max_tokens":0}}"#),
            "max_tokens",
        ),
        (
            format!(r#"{{"model":"smollm2",{ok_msgs},"max_completion_tokens":-3}}"#),
            "max_completion_tokens",
        ),
        (format!(r#"{{"model":"smollm2",{ok_msgs},"n":2}}"#), "n"),
        (
            format!(r#"{{"model":"smollm2",{ok_msgs},"stop":["a","b","c","d","e"]}}"#),
            "stop",
        ),
        (
            r#"{"model":"smollm2","messages":[]}"#.to_string(),
            "messages",
        ),
        (
            r#"{"model":"smollm2","messages":[{"role":"wizard","content":"x"}]}"#.to_string(),
            "messages[0].role",
        ),
        (
            format!(r#"{{"model":"smollm2",{ok_msgs},"max_tokens":100000}}"#),
            "max_tokens",
        ),
    ] {
        let (s, v, _) = call(&app, "POST", "/v1/chat/completions", &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_error(&v, "invalid_request_error", Some(param));
    }
    let big = format!(
        r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(5000)
    );
    let (s, v, _) = call(&app, "POST", "/v1/chat/completions", &big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_error(&v, "invalid_request_error", None);
    let (s, v, _) = call(&app, "GET", "/v1/nothing", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "invalid_request_error", None);
    let (s, v, _) = call(&app, "GET", "/v1/models/other", "").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
    let (s, v, _) = call(&app, "GET", "/v1/models", "").await;
    assert_eq!(
        (s, v["data"][0]["id"].as_str()),
        (StatusCode::OK, Some("smollm2"))
    );

    // A full engine answers 429 with Retry-After.
    let full = router(state(
        model,
        tok,
        EngineConfig {
            max_inflight: 0,
            ..Default::default()
        },
        4096,
    ));
    let (s, v, retry) = call(
        &full,
        "POST",
        "/v1/chat/completions",
        &format!(r#"{{"model":"smollm2",{ok_msgs}}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_error(&v, "rate_limit_error", None);
    assert!(retry.is_some(), "Retry-After header");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_metrics() {
    let Some((model, tok)) = load() else { return };
    let app = router(state(model, tok, EngineConfig::default(), 1 << 20));
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/completions",
        r#"{"model":"smollm2","prompt":"The capital of France is","temperature":0,"max_tokens":5}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert!(
        v["choices"][0]["text"].as_str().unwrap().contains("Paris"),
        "{v}"
    );
    let req = HttpRequest::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let body = app
        .clone()
        .oneshot(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    for m in [
        "qlorad_http_requests_total",
        "qlorad_tokens_generated_total",
        "qlorad_time_to_first_token_seconds",
        "qlorad_model_weight_bytes",
    ] {
        assert!(text.contains(m), "metrics lack {m}");
    }
    assert!(
        text.contains(r#"route="/v1/completions",status="200""#),
        "{text}"
    );
    // A CPU model captures no decode steps: both kinds exported, at zero.
    for kind in ["replayed", "captured"] {
        let line = format!("qlorad_decode_graph_steps_total{{kind=\"{kind}\"}} 0");
        assert!(text.contains(&line), "metrics lack {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_select_and_unload_at_runtime() {
    let Some((model, tok)) = load() else { return };
    let app = router(state(model, tok, EngineConfig::default(), 1 << 20));
    // Path traversal and absolute paths outside the root are refused.
    for path in ["../tiny-llama/fp32", "/etc", "smollm2-r8-qv/../../nf4"] {
        let (s, v, _) = call(
            &app,
            "POST",
            "/v1/adapters",
            &format!(r#"{{"name":"x","path":"{path}"}}"#),
        )
        .await;
        assert!(
            s == StatusCode::FORBIDDEN || s == StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {s} {v}"
        );
        assert!(v["error"]["message"].is_string());
    }
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        r#"{"name":"bad name","path":"smollm2-r8-qv"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "name");
    // An adapter made for another base model: 422 with the reason.
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        r#"{"name":"tiny","path":"tiny-r4-qv"}"#,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_adapter")),
        "{v}"
    );
    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        r#"{"name":"dora","path":"tiny-dora"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("DoRA"));

    let (s, v, _) = call(
        &app,
        "POST",
        "/v1/adapters",
        r#"{"name":"ft:smollm2:qv","path":"smollm2-r8-qv"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, v, _) = call(&app, "GET", "/v1/models", "").await;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smollm2", "ft:smollm2:qv"]);
    assert_eq!(v["data"][1]["parent"], "smollm2");
    let body = r#"{"model":"ft:smollm2:qv","messages":[{"role":"user","content":"What is the capital of France?"}],"temperature":0,"max_tokens":8}"#;
    let (s, v, _) = call(&app, "POST", "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["model"], "ft:smollm2:qv");
    let (s, _, _) = call(&app, "DELETE", "/v1/adapters/ft:smollm2:qv", "").await;
    assert_eq!(s, StatusCode::OK);
    let (s, v, _) = call(&app, "POST", "/v1/chat/completions", body).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
    let (s, _, _) = call(&app, "DELETE", "/v1/adapters/ft:smollm2:qv", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_scopes() {
    let Some((model, tok)) = load() else { return };
    let mut st = state(model, tok, EngineConfig::default(), 1 << 20);
    st.keys =
        Arc::new(qlorad::auth::ApiKeys::parse(["sk-infer-123", "sk-admin-456:admin"]).unwrap());
    let app = router(st);
    let send =
        |uri: &'static str, method: &'static str, key: Option<&'static str>, body: &'static str| {
            let app = app.clone();
            async move {
                let mut b = HttpRequest::builder()
                    .method(method)
                    .uri(uri)
                    .header("content-type", "application/json");
                if let Some(k) = key {
                    b = b.header("authorization", format!("Bearer {k}"));
                }
                let resp = app
                    .oneshot(b.body(Body::from(body)).unwrap())
                    .await
                    .unwrap();
                let s = resp.status();
                let v: serde_json::Value =
                    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes())
                        .unwrap_or_default();
                (s, v)
            }
        };
    let (s, v) = send("/v1/models", "GET", None, "").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_api_key"))
    );
    assert_eq!(
        send("/v1/models", "GET", Some("sk-wrong-999"), "").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send("/v1/models", "GET", Some("sk-infer-123"), "").await.0,
        StatusCode::OK
    );
    // Inference keys are refused on admin routes, admin-only keys on inference routes.
    let (s, v) = send("/v1/adapters", "GET", Some("sk-infer-123"), "").await;
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (StatusCode::FORBIDDEN, Some("permission_error"))
    );
    assert_eq!(
        send("/v1/adapters", "GET", Some("sk-admin-456"), "")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        send("/v1/models", "GET", Some("sk-admin-456"), "").await.0,
        StatusCode::FORBIDDEN
    );
    // Probes stay open.
    assert_eq!(send("/health", "GET", None, "").await.0, StatusCode::OK);
    assert_eq!(send("/metrics", "GET", None, "").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_transparent_reload_and_pinning() {
    let Some((model, tok)) = load() else { return };
    let one = qlorad_model::LoraAdapter::load(
        &qlorad_tests::fixture("lora/smollm2-r8-qv"),
        "x",
        model.config(),
    )
    .unwrap()
    .bytes();
    let mut st = state(model.clone(), tok, EngineConfig::default(), 1 << 20);
    // Room for one adapter: loading a second evicts the least recently used.
    st.adapters = Arc::new(qlorad::adapters::AdapterRegistry::new(
        Some(qlorad_tests::fixture("lora")),
        "smollm2",
        model.config().clone(),
        one + one / 2,
        Some(st.metrics.adapters.clone()),
    ));
    let metrics = st.metrics.clone();
    let app = router(st);
    for name in ["a1", "a2"] {
        let (s, v, _) = call(
            &app,
            "POST",
            "/v1/adapters",
            &format!(r#"{{"name":"{name}","path":"smollm2-r8-qv"}}"#),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let tiers = |v: &serde_json::Value| -> Vec<(String, String)> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["name"].as_str().unwrap().into(),
                    a["tier"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let (_, v, _) = call(&app, "GET", "/v1/adapters", "").await;
    assert_eq!(
        tiers(&v),
        [("a1".into(), "disk".into()), ("a2".into(), "host".into())]
    );
    assert_eq!(metrics.adapters.evictions.get(), 1);
    // A request for the evicted adapter reloads it (and evicts the other).
    let body = r#"{"model":"a1","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let (s, v, _) = call(&app, "POST", "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(metrics.adapters.misses.get(), 1);
    let (_, v, _) = call(&app, "GET", "/v1/adapters", "").await;
    assert_eq!(
        tiers(&v),
        [("a1".into(), "host".into()), ("a2".into(), "disk".into())]
    );
    // Pinned adapters are never evicted.
    let (s, v, _) = call(&app, "POST", "/v1/adapters/a1/pin", "").await;
    assert_eq!((s, v["pinned"].as_bool()), (StatusCode::OK, Some(true)));
    let (s, _, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        &body.replace("a1", "a2"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v, _) = call(&app, "GET", "/v1/adapters", "").await;
    assert_eq!(
        tiers(&v),
        [("a1".into(), "host".into()), ("a2".into(), "host".into())]
    );
    let (s, _, _) = call(&app, "POST", "/v1/adapters/a1/unpin", "").await;
    assert_eq!(s, StatusCode::OK);
    let (_, v, _) = call(&app, "GET", "/v1/adapters", "").await;
    assert_eq!(
        tiers(&v),
        [("a1".into(), "disk".into()), ("a2".into(), "host".into())]
    );
    let (s, _, _) = call(&app, "POST", "/v1/adapters/nope/pin", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_spec_matches_the_router() {
    let Some((model, tok)) = load() else { return };
    let app = router(state(model, tok, EngineConfig::default(), 1 << 20));
    let (s, v, _) = call(&app, "GET", "/openapi.json", "").await;
    assert_eq!((s, v["openapi"].as_str()), (StatusCode::OK, Some("3.1.0")));
    for (path, methods) in qlorad::api::openapi::ROUTES {
        assert!(v["paths"].get(path).is_some(), "{path}");
        let concrete = path.replace("{id}", "smollm2").replace("{name}", "missing");
        for m in methods {
            let body = if *m == "post" { "{}" } else { "" };
            let (s, v, _) = call(&app, &m.to_uppercase(), &concrete, body).await;
            assert_ne!(s, StatusCode::METHOD_NOT_ALLOWED, "{m} {concrete}");
            assert_ne!(
                v["error"]["message"].as_str(),
                Some("no such route"),
                "{m} {concrete} is not routed"
            );
        }
    }
}
