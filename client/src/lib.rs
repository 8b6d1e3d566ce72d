//! A small typed client for the qlorad HTTP API (plain HTTP; put TLS in front of the daemon with a
//! proxy). Used by `qctl`; errors carry the server's OpenAI-shaped message and HTTP status.

pub mod jobs;

use serde_json::Value;
use std::io::BufRead;

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached.
    #[error("cannot reach qlorad at {url}: {msg}")]
    Connect { url: String, msg: String },
    /// The daemon answered with an error status.
    #[error("{message} (HTTP {status})")]
    Api {
        status: u16,
        message: String,
        code: Option<String>,
    },
    /// The answer was not what the API promises.
    #[error("unexpected response: {0}")]
    Protocol(String),
    /// Local input that cannot be sent (a missing or unreadable file).
    #[error("{0}")]
    Input(String),
}

impl ClientError {
    /// Exit code for scripts: 2 invalid input (local, or refused by the daemon with 400, 413 or
    /// 422), 3 unreachable, 4 unauthorized/forbidden, 5 not found, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Input(_) => 2,
            ClientError::Api {
                status: 400 | 413 | 422,
                ..
            } => 2,
            ClientError::Connect { .. } => 3,
            ClientError::Api {
                status: 401 | 403, ..
            } => 4,
            ClientError::Api { status: 404, .. } => 5,
            _ => 1,
        }
    }
}

/// Percent-encodes one URL path segment or query value (everything but RFC 3986's unreserved
/// characters), so an id can never change the route.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub type Result<T> = std::result::Result<T, ClientError>;

pub struct Client {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, key: Option<String>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base: base.trim_end_matches('/').to_string(),
            key,
            agent,
        }
    }

    fn connect_err(&self, e: ureq::Error) -> ClientError {
        ClientError::Connect {
            url: self.base.clone(),
            msg: e.to_string(),
        }
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.key {
            Some(k) => req.header("Authorization", &format!("Bearer {k}")),
            None => req,
        }
    }

    /// Turns a response into JSON or the server's error.
    fn finish(&self, resp: ureq::http::Response<ureq::Body>) -> Result<Value> {
        let status = resp.status().as_u16();
        let text = resp
            .into_body()
            .read_to_string()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let e = &v["error"];
            // A body that is not OpenAI's error shape (a proxy's page, a plain-text rejection).
            let fallback = v
                .as_str()
                .filter(|t| !t.trim().is_empty())
                .unwrap_or("request failed");
            return Err(ClientError::Api {
                status,
                // One line: scripts and logs read errors line by line.
                message: e["message"]
                    .as_str()
                    .unwrap_or(fallback)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                code: e["code"].as_str().map(String::from),
            });
        }
        Ok(v)
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .auth(self.agent.get(&format!("{}{path}", self.base)))
            .call()
            .map_err(|e| self.connect_err(e))?;
        self.finish(resp)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self
            .auth(self.agent.post(&format!("{}{path}", self.base)))
            .send_json(body)
            .map_err(|e| self.connect_err(e))?;
        self.finish(resp)
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        let resp = self
            .auth(self.agent.delete(&format!("{}{path}", self.base)))
            .call()
            .map_err(|e| self.connect_err(e))?;
        self.finish(resp)
    }

    /// Streams a chat completion, calling `on_text` with each delta; returns the finish reason.
    pub fn chat_stream(&self, body: &Value, mut on_text: impl FnMut(&str)) -> Result<String> {
        let mut body = body.clone();
        body["stream"] = Value::Bool(true);
        let resp = self
            .auth(
                self.agent
                    .post(&format!("{}/v1/chat/completions", self.base)),
            )
            .send_json(&body)
            .map_err(|e| self.connect_err(e))?;
        if resp.status().as_u16() >= 400 {
            return self.finish(resp).map(|_| String::new());
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        let mut finish = String::new();
        for line in reader.lines() {
            let line = line.map_err(|e| ClientError::Protocol(e.to_string()))?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return Ok(finish);
            }
            let ev: Value =
                serde_json::from_str(data).map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Some(msg) = ev["error"]["message"].as_str() {
                return Err(ClientError::Api {
                    status: 500,
                    message: msg.to_string(),
                    code: None,
                });
            }
            if let Some(c) = ev["choices"].get(0) {
                if let Some(t) = c["delta"]["content"].as_str() {
                    on_text(t);
                }
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
        }
        Err(ClientError::Protocol(
            "the stream ended without [DONE]".into(),
        ))
    }
}
