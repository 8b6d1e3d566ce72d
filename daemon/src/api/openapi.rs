//! `GET /openapi.json`: the OpenAPI 3.1 description of every route, kept beside the router (a test
//! checks that the two list the same paths). Request schemas mirror `openai.rs`; responses reference
//! the OpenAI error shape for every failure status.

use serde_json::{json, Value};

/// Every route the router serves, with its methods (kept in sync with `super::router` by a test).
pub const ROUTES: [(&str, &[&str]); 27] = [
    ("/v1/chat/completions", &["post"]),
    ("/v1/completions", &["post"]),
    ("/v1/models", &["get"]),
    ("/v1/models/{id}", &["get"]),
    ("/v1/adapters", &["get", "post"]),
    ("/v1/adapters/{name}", &["delete"]),
    ("/v1/adapters/{name}/pin", &["post"]),
    ("/v1/adapters/{name}/unpin", &["post"]),
    ("/v1/adapters/{name}/promote", &["post"]),
    ("/v1/exports", &["get"]),
    ("/v1/exports/{id}", &["get"]),
    ("/v1/exports/{id}/cancel", &["post"]),
    ("/v1/exports/{id}/events", &["get"]),
    ("/v1/files", &["get", "post"]),
    ("/v1/files/{id}", &["get", "delete"]),
    ("/v1/files/{id}/content", &["get"]),
    ("/v1/fine_tuning/jobs", &["get", "post"]),
    ("/v1/fine_tuning/jobs/{id}", &["get"]),
    ("/v1/fine_tuning/jobs/{id}/cancel", &["post"]),
    ("/v1/fine_tuning/jobs/{id}/pause", &["post"]),
    ("/v1/fine_tuning/jobs/{id}/resume", &["post"]),
    ("/v1/fine_tuning/jobs/{id}/events", &["get"]),
    ("/v1/fine_tuning/jobs/{id}/checkpoints", &["get"]),
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
    let ft = |summary: &str, ok: &str| path_op(summary, "id", json_ok(ok));
    let mut upload = op(
        "Upload a file (multipart: `file`, `purpose`); fine-tune files are validated line by line",
        None,
        json_ok("file"),
        &["400", "401", "403", "413", "503", "507"],
        true,
    );
    upload["requestBody"] = json!({"required": true, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"], "properties": {
            "file": {"type": "string", "format": "binary"},
            "purpose": {"type": "string", "enum": ["fine-tune", "assistants", "batch", "user_data", "vision", "evals"]}}}}}});
    let mut promote = path_op(
        "Merge an adapter into a full-precision base and export a Hugging Face folder (background export job)",
        "name",
        json_ok("export (202)"),
    );
    promote["responses"]["202"] = promote["responses"]["200"].take();
    if let Some(m) = promote["responses"].as_object_mut() {
        m.remove("200");
        for code in ["400", "503", "507"] {
            m.insert(code.into(), errors(&[code])[code].clone());
        }
    }
    promote["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {
        "type": "object", "required": ["out"], "properties": {
            "out": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$", "description": "folder name under the export root"},
            "dtype": {"type": "string", "enum": ["bf16", "f16", "f32"]},
            "merge_into": {"type": "string", "enum": ["original", "dequantized"]},
            "overwrite": {"type": "boolean"}}}}}});
    let mut content = path_op(
        "A file's content",
        "id",
        json!({"description": "the file's bytes", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}),
    );
    content["responses"]["503"] = errors(&["503"])["503"].clone();
    let create_job = op(
        "Create a fine-tuning job on the resident base",
        Some("CreateFineTuningJob"),
        json_ok("fine_tuning.job"),
        &["400", "401", "403", "503", "507"],
        true,
    );
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
                "get": op("List adapters (tier, pinned, bytes, devices)", None, json_ok("list"), &["401", "403"], true),
                "post": load
            },
            "/v1/adapters/{name}": {"delete": unload},
            "/v1/adapters/{name}/pin": {"post": pin},
            "/v1/adapters/{name}/unpin": {"post": unpin},
            "/v1/adapters/{name}/promote": {"post": promote},
            "/v1/exports": {"get": op("List exports (promote jobs)", None, json_ok("list"), &["401", "403", "503"], true)},
            "/v1/exports/{id}": {"get": ft("Retrieve an export with its progress", "export")},
            "/v1/exports/{id}/cancel": {"post": ft("Cancel an export (nothing is left under its name)", "export")},
            "/v1/exports/{id}/events": {"get": ft("An export's events", "list")},
            "/v1/files": {"get": op("List files", None, json_ok("list"), &["401", "403", "503"], true), "post": upload},
            "/v1/files/{id}": {"get": ft("Retrieve a file", "file"), "delete": ft("Delete a file", "deleted")},
            "/v1/files/{id}/content": {"get": content},
            "/v1/fine_tuning/jobs": {
                "get": op("List jobs, newest first (`after`, `limit`)", None, json_ok("list"), &["400", "401", "403", "503"], true),
                "post": create_job
            },
            "/v1/fine_tuning/jobs/{id}": {"get": ft("Retrieve a job", "fine_tuning.job")},
            "/v1/fine_tuning/jobs/{id}/cancel": {"post": ft("Cancel a job", "fine_tuning.job")},
            "/v1/fine_tuning/jobs/{id}/pause": {"post": ft("Pause a job (checkpoints first)", "fine_tuning.job")},
            "/v1/fine_tuning/jobs/{id}/resume": {"post": ft("Resume a paused job from its checkpoint", "fine_tuning.job")},
            "/v1/fine_tuning/jobs/{id}/events": {"get": ft("A job's events, newest first", "list")},
            "/v1/fine_tuning/jobs/{id}/checkpoints": {"get": ft("A job's checkpoints (each servable by name)", "list")},
            "/health": {"get": op("Liveness", None, json_ok("ok"), &[], false)},
            "/ready": {"get": op("Readiness (model loaded, every engine alive)", None, json_ok("ready"), &["503"], false)},
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
                "CreateFineTuningJob": {"type": "object", "required": ["model", "training_file"], "properties": {
                    "model": {"type": "string"}, "training_file": {"type": "string"},
                    "validation_file": {"type": ["string", "null"]},
                    "suffix": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                    "seed": {"type": ["integer", "null"], "minimum": 0},
                    "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
                    "hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"},
                    "method": {"type": "object", "properties": {"type": {"type": "string", "enum": ["supervised"]},
                        "supervised": {"type": "object", "properties": {"hyperparameters": {"$ref": "#/components/schemas/Hyperparameters"}}}}}}},
                "Hyperparameters": {"type": "object", "description": "each value \"auto\" or a number; lora_* and the rest are qlorad extensions",
                    "properties": {
                    "n_epochs": {"oneOf": [{"const": "auto"}, {"type": "integer", "minimum": 1, "maximum": 50}]},
                    "batch_size": {"oneOf": [{"const": "auto"}, {"type": "integer", "minimum": 1, "maximum": 256}]},
                    "learning_rate_multiplier": {"oneOf": [{"const": "auto"}, {"type": "number", "minimum": 0.0001, "maximum": 100}]},
                    "lora_r": {"type": "integer", "minimum": 1, "maximum": 1024},
                    "lora_alpha": {"type": "number"}, "lora_dropout": {"type": "number", "minimum": 0, "maximum": 0.9},
                    "use_rslora": {"type": "boolean"},
                    "target_modules": {"type": "array", "items": {"type": "string",
                        "enum": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}},
                    "max_seq_len": {"type": "integer", "minimum": 8},
                    "checkpoint_interval": {"type": "integer", "minimum": 1},
                    "eval_interval": {"type": "integer", "minimum": 1},
                    "gradient_checkpointing": {"type": "boolean"},
                    "paged_optimizer": {"type": "boolean"}}},
                "LoadAdapter": {"type": "object", "required": ["name", "path"], "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}$"}, "path": {"type": "string"}}}
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
