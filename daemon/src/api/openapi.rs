//! `GET /openapi.json`: the OpenAPI 3.1 description of every route, kept beside the router (a test
//! checks that the two list the same paths). Request schemas mirror `openai.rs`; responses reference
//! the OpenAI error shape for every failure status.

use serde_json::{json, Value};

/// Every route the router serves, with its methods (kept in sync with `super::router` by a test).
pub const ROUTES: [(&str, &[&str]); 12] = [
    ("/v1/chat/completions", &["post"]),
    ("/v1/completions", &["post"]),
    ("/v1/models", &["get"]),
    ("/v1/models/{id}", &["get"]),
    ("/v1/adapters", &["get", "post"]),
    ("/v1/adapters/{name}", &["delete"]),
    ("/v1/adapters/{name}/pin", &["post"]),
    ("/v1/adapters/{name}/unpin", &["post"]),
    ("/health", &["get"]),
    ("/ready", &["get"]),
    ("/metrics", &["get"]),
    ("/openapi.json", &["get"]),
];

fn errors(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        m.insert(
            c.to_string(),
            json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    Value::Object(m)
}

fn op(summary: &str, body: Option<&str>, ok: Value, fail: &[&str], security: bool) -> Value {
    let mut responses = errors(fail);
    if let Value::Object(m) = &mut responses {
        m.insert("200".into(), ok);
    }
    let mut o = json!({"summary": summary, "responses": responses});
    if let Some(schema) = body {
        o["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    }
    if security {
        o["security"] = json!([{"bearer": []}, {}]);
    }
    o
}

fn json_ok(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"type": "object"}}}})
}

/// An authenticated operation on `/…/{param}` that can answer 401, 403 or 404.
fn path_op(summary: &str, param: &str, ok: Value) -> Value {
    let mut o = op(summary, None, ok, &["401", "403", "404"], true);
    o["parameters"] =
        json!([{"name": param, "in": "path", "required": true, "schema": {"type": "string"}}]);
    o
}

/// The document.
pub fn spec(version: &str) -> Value {
    let gen_fail = ["400", "401", "403", "404", "413", "429", "500", "503"];
    let completion_ok = json!({"description": "completion (JSON), or text/event-stream chunks ending in `data: [DONE]` when stream=true",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}});
    let model = path_op("Retrieve a model or adapter", "id", json_ok("model"));
    let unload = path_op("Unload an adapter", "name", json_ok("deleted"));
    let pin = path_op("Pin an adapter (never evicted)", "name", json_ok("adapter"));
    let unpin = path_op("Unpin an adapter", "name", json_ok("adapter"));
    let mut load = op(
        "Load or replace an adapter from a folder under the adapter root",
        Some("LoadAdapter"),
        json_ok("adapter"),
        &["400", "401", "403", "413", "422", "500"],
        true,
    );
    load["responses"]["201"] = load["responses"]["200"].take();
    if let Some(m) = load["responses"].as_object_mut() {
        m.remove("200");
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "qlorad", "version": version,
                 "description": "OpenAI-compatible serving of an NF4 base model with LoRA adapters"},
        "paths": {
            "/v1/chat/completions": {"post": op("Chat completion", Some("ChatCompletionRequest"), completion_ok.clone(), &gen_fail, true)},
            "/v1/completions": {"post": op("Text completion", Some("CompletionRequest"), completion_ok, &gen_fail, true)},
            "/v1/models": {"get": op("List the base model and adapters", None, json_ok("list"), &["401", "403"], true)},
            "/v1/models/{id}": {"get": model},
            "/v1/adapters": {
                "get": op("List adapters (tier, pinned, bytes)", None, json_ok("list"), &["401", "403"], true),
                "post": load
            },
            "/v1/adapters/{name}": {"delete": unload},
            "/v1/adapters/{name}/pin": {"post": pin},
            "/v1/adapters/{name}/unpin": {"post": unpin},
            "/health": {"get": op("Liveness", None, json_ok("ok"), &[], false)},
            "/ready": {"get": op("Readiness (model loaded, engine alive)", None, json_ok("ready"), &["503"], false)},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "required": ["message", "type"], "properties": {
                        "message": {"type": "string"}, "type": {"type": "string"},
                        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
                "Message": {"type": "object", "required": ["role"], "properties": {
                    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                    "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {"type": "object",
                        "required": ["type"], "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}}]}}},
                "Sampling": {"type": "object", "properties": {
                    "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens": {"type": "integer", "minimum": 1},
                    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                    "top_k": {"type": "integer", "minimum": 0}, "seed": {"type": "integer", "minimum": 0},
                    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
                    "n": {"type": "integer", "enum": [1]}, "stream": {"type": "boolean"},
                    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
                    "frequency_penalty": {"type": "number", "enum": [0]}, "presence_penalty": {"type": "number", "enum": [0]}}},
                "ChatCompletionRequest": {"allOf": [{"$ref": "#/components/schemas/Sampling"}, {"type": "object",
                    "required": ["model", "messages"], "properties": {"model": {"type": "string"},
                    "messages": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Message"}}}}]},
                "CompletionRequest": {"allOf": [{"$ref": "#/components/schemas/Sampling"}, {"type": "object",
                    "required": ["model", "prompt"], "properties": {"model": {"type": "string"},
                    "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 1}]}}}]},
                "LoadAdapter": {"type": "object", "required": ["name", "path"], "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}, "path": {"type": "string"}}}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_lists_exactly_the_routes() {
        let s = spec("test");
        let paths = s["paths"].as_object().unwrap();
        assert_eq!(paths.len(), ROUTES.len());
        for (p, methods) in ROUTES {
            let item = paths
                .get(p)
                .unwrap_or_else(|| panic!("{p} missing from the spec"));
            for m in methods {
                assert!(item.get(m).is_some(), "{m} {p} missing");
            }
        }
    }
}
