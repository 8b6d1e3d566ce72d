//! Typed calls for the files and fine-tuning-jobs routes (OpenAI's `files` and
//! `fine_tuning.jobs` shapes plus qlorad's LoRA extensions): a streamed multipart upload, job
//! creation with "auto" hyperparameters, and an event cursor that turns the newest-first events
//! listing into an oldest-first feed of new events.

use crate::{enc, ClientError, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::io::Read;
use std::path::Path;

/// The statuses after which a job never changes again.
pub const ENDED: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// The fields of a `fine_tuning.job` the CLI acts on (the raw JSON is kept for `--json`).
#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    pub id: String,
    pub status: String,
    pub model: String,
    #[serde(default)]
    pub fine_tuned_model: Option<String>,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub finished_at: Option<i64>,
    #[serde(default)]
    pub trained_tokens: Option<u64>,
    /// Unix time the daemon expects the job to end.
    #[serde(default)]
    pub estimated_finish: Option<i64>,
    #[serde(default)]
    pub step: u64,
    #[serde(default)]
    pub total_steps: u64,
    #[serde(default)]
    pub error: Option<JobError>,
}

impl Job {
    pub fn from_json(v: &Value) -> Result<Job> {
        serde_json::from_value(v.clone())
            .map_err(|e| ClientError::Protocol(format!("not a fine-tuning job: {e}")))
    }

    pub fn ended(&self) -> bool {
        ENDED.contains(&self.status.as_str())
    }
}

/// Why a job failed, as the daemon stored it.
#[derive(Debug, Clone, Deserialize)]
pub struct JobError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub param: Option<String>,
}

/// One `fine_tuning.job.event`: `type` is "message" or "metrics" (then `data` holds step,
/// total_steps, train_loss, valid_loss, learning_rate, trained_tokens, tokens_per_second, epoch).
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub level: String,
    #[serde(default)]
    pub message: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub data: Value,
    /// The event as the API sent it.
    #[serde(skip)]
    pub raw: Value,
}

impl Event {
    /// The sequence number in the id (`ftevent-N`); ids increase with time.
    pub fn seq(&self) -> Option<u64> {
        self.id.strip_prefix("ftevent-")?.parse().ok()
    }
}

/// Hyperparameters of a new job; `None` leaves the choice to the daemon ("auto").
#[derive(Debug, Clone, Default)]
pub struct Hyperparameters {
    pub n_epochs: Option<u32>,
    pub batch_size: Option<u32>,
    pub learning_rate_multiplier: Option<f64>,
    pub lora_r: Option<u32>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub target_modules: Option<Vec<String>>,
    pub max_seq_len: Option<u32>,
    pub checkpoint_interval: Option<u32>,
}

impl Hyperparameters {
    /// `method.supervised.hyperparameters`: OpenAI's three fields always present ("auto" when
    /// unset), the LoRA extensions only when set.
    pub fn to_json(&self) -> Value {
        fn auto(v: Option<Value>) -> Value {
            v.unwrap_or_else(|| json!("auto"))
        }
        let mut m = Map::new();
        m.insert("n_epochs".into(), auto(self.n_epochs.map(Value::from)));
        m.insert("batch_size".into(), auto(self.batch_size.map(Value::from)));
        m.insert(
            "learning_rate_multiplier".into(),
            auto(self.learning_rate_multiplier.map(Value::from)),
        );
        let ext = [
            ("lora_r", self.lora_r.map(Value::from)),
            ("lora_alpha", self.lora_alpha.map(Value::from)),
            ("lora_dropout", self.lora_dropout.map(Value::from)),
            (
                "target_modules",
                self.target_modules.clone().map(Value::from),
            ),
            ("max_seq_len", self.max_seq_len.map(Value::from)),
            (
                "checkpoint_interval",
                self.checkpoint_interval.map(Value::from),
            ),
        ];
        for (k, v) in ext {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        }
        Value::Object(m)
    }
}

/// A `POST /v1/fine_tuning/jobs` request.
#[derive(Debug, Clone, Default)]
pub struct JobSpec {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: Option<u64>,
    pub hyperparameters: Hyperparameters,
}

impl JobSpec {
    pub fn to_json(&self) -> Value {
        let mut body = json!({
            "model": self.model,
            "training_file": self.training_file,
            "method": {"type": "supervised", "supervised": {
                "hyperparameters": self.hyperparameters.to_json()}},
        });
        let opt = [
            (
                "validation_file",
                self.validation_file.clone().map(Value::from),
            ),
            ("suffix", self.suffix.clone().map(Value::from)),
            ("seed", self.seed.map(Value::from)),
        ];
        for (k, v) in opt {
            if let (Some(v), Some(o)) = (v, body.as_object_mut()) {
                o.insert(k.into(), v);
            }
        }
        body
    }
}

/// `?limit=…&after=…` (only the parts given).
fn page_query(limit: Option<u32>, after: Option<&str>) -> String {
    let mut q = Vec::new();
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    if let Some(a) = after {
        q.push(format!("after={}", enc(a)));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// A multipart/form-data body: `purpose` then `file`, streamed from disk with its length known.
struct Multipart {
    boundary: String,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Multipart {
    fn new(purpose: &str, filename: &str) -> Self {
        // Unique enough not to occur in the data: the time in nanoseconds and the process id.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let boundary = format!("qctl-{nanos:x}-{:x}", std::process::id());
        // Quotes, backslashes and line breaks cannot appear in a quoted header parameter.
        let filename: String = filename
            .chars()
            .map(|c| {
                if matches!(c, '"' | '\\' | '\r' | '\n') {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        let tail = format!("\r\n--{boundary}--\r\n").into_bytes();
        Self {
            boundary,
            head,
            tail,
        }
    }
}

impl crate::Client {
    /// `POST /v1/files`: uploads `path` with `purpose` (streamed, not read into memory).
    pub fn upload_file(&self, path: &Path, purpose: &str) -> Result<Value> {
        let input = |e: std::io::Error| ClientError::Input(format!("{}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(input)?;
        let meta = file.metadata().map_err(input)?;
        if !meta.is_file() {
            return Err(ClientError::Input(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "upload.jsonl".into());
        let mp = Multipart::new(purpose, &name);
        let len = mp.head.len() as u64 + meta.len() + mp.tail.len() as u64;
        let body = std::io::Cursor::new(mp.head)
            .chain(file)
            .chain(std::io::Cursor::new(mp.tail));
        let resp = self
            .auth(self.agent.post(&format!("{}/v1/files", self.base)))
            .header(
                "Content-Type",
                &format!("multipart/form-data; boundary={}", mp.boundary),
            )
            .header("Content-Length", &len.to_string())
            .send(ureq::SendBody::from_owned_reader(body))
            .map_err(|e| match e {
                // The daemon may close the connection while a too-large body is still being sent.
                ureq::Error::Io(_) if meta.len() > DEFAULT_MAX_UPLOAD => ClientError::Connect {
                    url: self.base.clone(),
                    msg: format!(
                        "{e} (the file has {} bytes; qlorad refuses uploads over --max-upload-bytes, \
                         {DEFAULT_MAX_UPLOAD} by default)",
                        meta.len()
                    ),
                },
                e => self.connect_err(e),
            })?;
        self.finish(resp)
    }

    /// `POST /v1/fine_tuning/jobs`.
    pub fn create_job(&self, spec: &JobSpec) -> Result<Value> {
        self.post("/v1/fine_tuning/jobs", &spec.to_json())
    }

    /// `GET /v1/fine_tuning/jobs` (newest first).
    pub fn list_jobs(&self, limit: Option<u32>, after: Option<&str>) -> Result<Value> {
        self.get(&format!("/v1/fine_tuning/jobs{}", page_query(limit, after)))
    }

    pub fn job(&self, id: &str) -> Result<Value> {
        self.get(&format!("/v1/fine_tuning/jobs/{}", enc(id)))
    }

    /// `POST /v1/fine_tuning/jobs/{id}/{action}` for cancel, pause and resume.
    pub fn job_action(&self, id: &str, action: &str) -> Result<Value> {
        self.post(
            &format!("/v1/fine_tuning/jobs/{}/{action}", enc(id)),
            &json!({}),
        )
    }

    /// `GET …/{id}/events` (newest first; `after` pages to older events).
    pub fn job_events(&self, id: &str, limit: Option<u32>, after: Option<&str>) -> Result<Value> {
        self.get(&format!(
            "/v1/fine_tuning/jobs/{}/events{}",
            enc(id),
            page_query(limit, after)
        ))
    }

    /// `GET …/{id}/checkpoints` (highest step first).
    pub fn job_checkpoints(
        &self,
        id: &str,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<Value> {
        self.get(&format!(
            "/v1/fine_tuning/jobs/{}/checkpoints{}",
            enc(id),
            page_query(limit, after)
        ))
    }
}

/// The daemon's default `--max-upload-bytes` (512 MiB).
pub const DEFAULT_MAX_UPLOAD: u64 = 512 << 20;

/// Follows a job's events: each [`EventFeed::poll`] returns the events that appeared since the
/// previous one, oldest first. The API lists newest first and pages only towards older events, so
/// a poll pages back until it reaches an event it has already seen.
pub struct EventFeed {
    job: String,
    last: Option<u64>,
}

impl EventFeed {
    /// A feed whose first poll returns the whole history.
    pub fn new(job: &str) -> Self {
        Self {
            job: job.to_string(),
            last: None,
        }
    }

    /// A feed that starts after the newest of `seen`.
    pub fn after(job: &str, seen: &[Event]) -> Self {
        Self {
            job: job.to_string(),
            last: seen.iter().filter_map(Event::seq).max(),
        }
    }

    pub fn poll(&mut self, c: &crate::Client) -> Result<Vec<Event>> {
        let mut fresh = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = c.job_events(&self.job, Some(100), cursor.as_deref())?;
            let (events, has_more) = parse_events(&page)?;
            let mut reached_seen = false;
            for e in events {
                match (e.seq(), self.last) {
                    (Some(s), Some(last)) if s <= last => {
                        reached_seen = true;
                        break;
                    }
                    _ => {
                        cursor = Some(e.id.clone());
                        fresh.push(e);
                    }
                }
            }
            if reached_seen || !has_more || cursor.is_none() {
                break;
            }
        }
        fresh.reverse();
        if let Some(s) = fresh.iter().filter_map(Event::seq).max() {
            self.last = Some(s);
        }
        Ok(fresh)
    }
}

/// The events of one listing page (as sent: newest first) and `has_more`.
pub fn parse_events(page: &Value) -> Result<(Vec<Event>, bool)> {
    let data = page["data"]
        .as_array()
        .ok_or_else(|| ClientError::Protocol("an events list without `data`".into()))?;
    let events = data
        .iter()
        .map(|v| {
            let mut e: Event = serde_json::from_value(v.clone())
                .map_err(|e| ClientError::Protocol(format!("not a job event: {e}")))?;
            e.raw = v.clone();
            Ok(e)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((events, page["has_more"].as_bool().unwrap_or(false)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_hyperparameters_are_auto_and_extensions_are_left_out() {
        let hp = Hyperparameters {
            n_epochs: Some(1),
            lora_r: Some(4),
            target_modules: Some(vec!["q_proj".into(), "v_proj".into()]),
            ..Default::default()
        };
        assert_eq!(
            hp.to_json(),
            json!({"n_epochs": 1, "batch_size": "auto", "learning_rate_multiplier": "auto",
                   "lora_r": 4, "target_modules": ["q_proj", "v_proj"]})
        );
        let spec = JobSpec {
            model: "m".into(),
            training_file: "file-1".into(),
            suffix: Some("s".into()),
            ..Default::default()
        };
        let body = spec.to_json();
        assert_eq!(body["suffix"], "s");
        assert!(body.get("validation_file").is_none());
        assert_eq!(body["method"]["type"], "supervised");
    }

    #[test]
    fn multipart_frames_the_file_between_boundaries() {
        let mp = Multipart::new("fine-tune", "a\"b.jsonl");
        let head = String::from_utf8(mp.head).unwrap();
        assert!(head.starts_with(&format!("--{}\r\n", mp.boundary)));
        assert!(head.contains("name=\"purpose\"\r\n\r\nfine-tune\r\n"));
        assert!(head.contains("filename=\"a_b.jsonl\""));
        assert!(head.ends_with("\r\n\r\n"));
        assert_eq!(
            String::from_utf8(mp.tail).unwrap(),
            format!("\r\n--{}--\r\n", mp.boundary)
        );
    }

    #[test]
    fn page_query_encodes_the_cursor() {
        assert_eq!(page_query(None, None), "");
        assert_eq!(page_query(Some(5), Some("a b")), "?limit=5&after=a%20b");
    }
}
