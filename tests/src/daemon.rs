//! A `qlorad serve` child process on a free loopback port, for the tests that drive the real
//! binary, with small HTTP helpers (every status is returned, never turned into an error).

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running daemon; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub url: String,
    pub port: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP agent that returns 4xx/5xx as responses.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}

impl Daemon {
    /// `BIN serve --model MODEL --listen 127.0.0.1:PORT ARGS…`, waiting (up to 2 min) for `/health`.
    pub fn start(bin: &str, model: &Path, args: &[&str]) -> Daemon {
        let port = free_port();
        let child = Command::new(bin)
            .args(["serve", "--model"])
            .arg(model)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qlorad");
        let d = Daemon {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
        };
        let t = Instant::now();
        while agent().get(format!("{}/health", d.url)).call().is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    /// SIGKILL, and reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let mut r = agent()
            .get(format!("{}{path}", self.url))
            .call()
            .expect("GET");
        let s = r.status().as_u16();
        (s, r.body_mut().read_json().unwrap_or(Value::Null))
    }

    pub fn get_text(&self, path: &str) -> (u16, String) {
        let mut r = agent()
            .get(format!("{}{path}", self.url))
            .call()
            .expect("GET");
        let s = r.status().as_u16();
        (s, r.body_mut().read_to_string().unwrap_or_default())
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut r = agent()
            .post(format!("{}{path}", self.url))
            .send_json(body)
            .expect("POST");
        let s = r.status().as_u16();
        (s, r.body_mut().read_json().unwrap_or(Value::Null))
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        let mut r = agent()
            .delete(format!("{}{path}", self.url))
            .call()
            .expect("DELETE");
        let s = r.status().as_u16();
        (s, r.body_mut().read_json().unwrap_or(Value::Null))
    }

    /// `POST /v1/files` as multipart/form-data.
    pub fn upload(&self, name: &str, bytes: &[u8], purpose: &str) -> (u16, Value) {
        let b = "qloradtestboundary";
        let mut body = format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n--{b}\r\n\
             Content-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
        let mut r = agent()
            .post(format!("{}/v1/files", self.url))
            .header(
                "Content-Type",
                &format!("multipart/form-data; boundary={b}"),
            )
            .send(&body[..])
            .expect("upload");
        let s = r.status().as_u16();
        (s, r.body_mut().read_json().unwrap_or(Value::Null))
    }
}
