//! The daemon's durable state: an embedded SQLite database under `--state-dir` holding uploaded
//! files, fine-tuning jobs, their events and their checkpoints. WAL journal with `synchronous=FULL`,
//! so a row the API has acknowledged survives a crash (kill -9 or power loss). Blobs (file contents,
//! adapters, checkpoints) live in folders beside the database; rows only point at them.
//!
//! All calls are short and synchronous; the connection sits behind a `std::sync::Mutex` that is never
//! held across an `.await`.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state database: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, StateError>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    suffix TEXT,
    seed INTEGER NOT NULL,
    request TEXT NOT NULL,
    resolved TEXT,
    metadata TEXT,
    fine_tuned_model TEXT,
    trained_tokens INTEGER,
    error TEXT,
    started_at INTEGER,
    finished_at INTEGER,
    estimated_finish INTEGER,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    result_path TEXT
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints(job_id, step);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    path TEXT,
    pinned INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL
);
";

/// An adapter whose registration the API changed: loaded at run time (`path` set) and/or pinned.
/// Job outputs are re-registered from the jobs table; for them only the pin is recorded here.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRecord {
    pub name: String,
    pub path: Option<PathBuf>,
    pub pinned: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileRow {
    pub id: String,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    #[serde(skip)]
    pub path: PathBuf,
}

/// A job's error, OpenAI's `{code, message, param}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub created_at: i64,
    pub status: String,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: i64,
    /// The creation request's settings (JSON of `jobs::JobRequest`).
    pub request: String,
    /// Hyperparameters with every "auto" resolved, once files are validated (JSON).
    pub resolved: Option<String>,
    pub metadata: Option<String>,
    pub fine_tuned_model: Option<String>,
    pub trained_tokens: Option<i64>,
    pub error: Option<JobError>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub estimated_finish: Option<i64>,
    pub step: i64,
    pub total_steps: i64,
    pub result_path: Option<String>,
}

impl JobRow {
    /// A job as it is created: validating its files, nothing run yet.
    pub fn new(
        id: String,
        model: String,
        training_file: String,
        seed: i64,
        request: String,
    ) -> Self {
        JobRow {
            id,
            created_at: now(),
            status: "validating_files".into(),
            model,
            training_file,
            validation_file: None,
            suffix: None,
            seed,
            request,
            resolved: None,
            metadata: None,
            fine_tuned_model: None,
            trained_tokens: None,
            error: None,
            started_at: None,
            finished_at: None,
            estimated_finish: None,
            step: 0,
            total_steps: 0,
            result_path: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub seq: i64,
    pub job_id: String,
    pub created_at: i64,
    pub level: String,
    pub kind: String,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct CheckpointRow {
    pub seq: i64,
    pub job_id: String,
    pub step: i64,
    pub created_at: i64,
    pub name: String,
    pub path: PathBuf,
    pub metrics: serde_json::Value,
}

pub struct Store {
    conn: Mutex<Connection>,
    dir: PathBuf,
}

pub fn now() -> i64 {
    crate::api::unix_now() as i64
}

fn json_col(row: &Row, i: usize) -> rusqlite::Result<Option<serde_json::Value>> {
    let s: Option<String> = row.get(i)?;
    Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
}

const JOB_COLS: &str =
    "id, created_at, status, model, training_file, validation_file, suffix, seed, \
    request, resolved, metadata, fine_tuned_model, trained_tokens, error, started_at, finished_at, \
    estimated_finish, step, total_steps, result_path";

fn job_from(row: &Row) -> rusqlite::Result<JobRow> {
    let error: Option<String> = row.get(13)?;
    Ok(JobRow {
        id: row.get(0)?,
        created_at: row.get(1)?,
        status: row.get(2)?,
        model: row.get(3)?,
        training_file: row.get(4)?,
        validation_file: row.get(5)?,
        suffix: row.get(6)?,
        seed: row.get(7)?,
        request: row.get(8)?,
        resolved: row.get(9)?,
        metadata: row.get(10)?,
        fine_tuned_model: row.get(11)?,
        trained_tokens: row.get(12)?,
        error: error.and_then(|e| serde_json::from_str(&e).ok()),
        started_at: row.get(14)?,
        finished_at: row.get(15)?,
        estimated_finish: row.get(16)?,
        step: row.get(17)?,
        total_steps: row.get(18)?,
        result_path: row.get(19)?,
    })
}

impl Store {
    /// Opens (creating if needed) the state under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        for sub in ["", "files", "jobs", "adapters"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|source| StateError::Io { path: p, source })?;
        }
        let conn = Connection::open(dir.join("qlorad.sqlite3"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // Each statement is atomic in SQLite; a panic mid-call leaves nothing half-done in memory.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection (for modules with tables of their own, e.g. exports).
    pub fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        Ok(f(&self.conn())?)
    }

    // ---- files ----

    pub fn insert_file(&self, f: &FileRow) -> Result<()> {
        self.conn().execute(
            "INSERT INTO files (id, created_at, filename, purpose, bytes, path) VALUES (?1,?2,?3,?4,?5,?6)",
            params![f.id, f.created_at, f.filename, f.purpose, f.bytes, f.path.to_string_lossy()],
        )?;
        Ok(())
    }

    fn file_from(row: &Row) -> rusqlite::Result<FileRow> {
        let path: String = row.get(5)?;
        Ok(FileRow {
            id: row.get(0)?,
            created_at: row.get(1)?,
            filename: row.get(2)?,
            purpose: row.get(3)?,
            bytes: row.get(4)?,
            path: PathBuf::from(path),
        })
    }

    pub fn file(&self, id: &str) -> Result<Option<FileRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, created_at, filename, purpose, bytes, path FROM files WHERE id = ?1",
                [id],
                Self::file_from,
            )
            .optional()?)
    }

    /// Files, newest first, optionally of one purpose.
    pub fn files(&self, purpose: Option<&str>) -> Result<Vec<FileRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, created_at, filename, purpose, bytes, path FROM files \
             WHERE (?1 IS NULL OR purpose = ?1) ORDER BY seq DESC",
        )?;
        let rows = st.query_map([purpose], Self::file_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_file(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM files WHERE id = ?1", [id])?
            > 0)
    }

    // ---- jobs ----

    pub fn insert_job(&self, j: &JobRow) -> Result<()> {
        self.conn().execute(
            "INSERT INTO jobs (id, created_at, status, model, training_file, validation_file, suffix, \
             seed, request, metadata) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
            params![
                j.id,
                j.created_at,
                j.status,
                j.model,
                j.training_file,
                j.validation_file,
                j.suffix,
                j.seed,
                j.request,
                j.metadata
            ],
        )?;
        Ok(())
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"),
                [id],
                job_from,
            )
            .optional()?)
    }

    /// Jobs newest first; `after`: a job id, only jobs created before it; at most `limit` + 1 rows
    /// are read so the caller can tell `has_more`.
    pub fn jobs(&self, after: Option<&str>, limit: usize) -> Result<Vec<JobRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE (?1 IS NULL OR seq < (SELECT seq FROM jobs WHERE id = ?1)) \
             ORDER BY seq DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![after, (limit + 1) as i64], job_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Ids of jobs in `status`, oldest first.
    pub fn jobs_in(&self, status: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT id FROM jobs WHERE status = ?1 ORDER BY seq")?;
        let rows = st.query_map([status], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Counts of jobs per status.
    pub fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Sets the status if the job is currently in one of `from` (a compare-and-set, so racing
    /// cancels and completions cannot overwrite each other). Returns whether it changed.
    pub fn transition(&self, id: &str, from: &[&str], to: &str) -> Result<bool> {
        let conn = self.conn();
        let cur: Option<String> = conn
            .query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        match cur {
            Some(c) if from.contains(&c.as_str()) => {
                let finished = matches!(to, "succeeded" | "failed" | "cancelled").then(now);
                conn.execute(
                    "UPDATE jobs SET status = ?2, finished_at = COALESCE(?3, finished_at) WHERE id = ?1",
                    params![id, to, finished],
                )?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    pub fn set_resolved(&self, id: &str, resolved: &str, total_steps: i64) -> Result<()> {
        self.conn().execute(
            "UPDATE jobs SET resolved = ?2, total_steps = ?3 WHERE id = ?1",
            params![id, resolved, total_steps],
        )?;
        Ok(())
    }

    pub fn set_started(&self, id: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE jobs SET started_at = COALESCE(started_at, ?2) WHERE id = ?1",
            params![id, now()],
        )?;
        Ok(())
    }

    pub fn set_progress(&self, id: &str, step: i64, tokens: i64, eta: Option<i64>) -> Result<()> {
        self.conn().execute(
            "UPDATE jobs SET step = ?2, trained_tokens = ?3, estimated_finish = ?4 WHERE id = ?1",
            params![id, step, tokens, eta],
        )?;
        Ok(())
    }

    /// Marks a job failed with `err` (unless it already ended).
    pub fn fail(&self, id: &str, err: &JobError) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "UPDATE jobs SET status = 'failed', error = ?2, finished_at = ?3, estimated_finish = NULL \
             WHERE id = ?1 AND status NOT IN ('succeeded', 'failed', 'cancelled')",
            params![id, serde_json::to_string(err)?, now()],
        )?;
        Ok(())
    }

    pub fn succeed(&self, id: &str, model: &str, path: &Path, tokens: i64) -> Result<()> {
        self.conn().execute(
            "UPDATE jobs SET status = 'succeeded', fine_tuned_model = ?2, result_path = ?3, \
             trained_tokens = ?4, finished_at = ?5, estimated_finish = NULL WHERE id = ?1",
            params![id, model, path.to_string_lossy(), tokens, now()],
        )?;
        Ok(())
    }

    // ---- events ----

    pub fn event(
        &self,
        job: &str,
        level: &str,
        kind: &str,
        message: &str,
        data: Option<&serde_json::Value>,
    ) -> Result<()> {
        let data = data.map(serde_json::to_string).transpose()?;
        self.conn().execute(
            "INSERT INTO events (job_id, created_at, level, type, message, data) VALUES (?1,?2,?3,?4,?5,?6)",
            params![job, now(), level, kind, message, data],
        )?;
        Ok(())
    }

    /// Events of a job, newest first (OpenAI's order); `after`: an event seq, only older ones.
    pub fn events(&self, job: &str, after: Option<i64>, limit: usize) -> Result<Vec<EventRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT seq, job_id, created_at, level, type, message, data FROM events \
             WHERE job_id = ?1 AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC LIMIT ?3",
        )?;
        let rows = st.query_map(params![job, after, (limit + 1) as i64], |r| {
            Ok(EventRow {
                seq: r.get(0)?,
                job_id: r.get(1)?,
                created_at: r.get(2)?,
                level: r.get(3)?,
                kind: r.get(4)?,
                message: r.get(5)?,
                data: json_col(r, 6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- checkpoints ----

    pub fn insert_checkpoint(&self, c: &CheckpointRow) -> Result<()> {
        self.conn().execute(
            "INSERT INTO checkpoints (job_id, step, created_at, name, path, metrics) VALUES (?1,?2,?3,?4,?5,?6)",
            params![
                c.job_id,
                c.step,
                c.created_at,
                c.name,
                c.path.to_string_lossy(),
                serde_json::to_string(&c.metrics)?
            ],
        )?;
        Ok(())
    }

    /// A job's checkpoints, newest (highest step) first.
    pub fn checkpoints(&self, job: &str) -> Result<Vec<CheckpointRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT seq, job_id, step, created_at, name, path, metrics FROM checkpoints \
             WHERE job_id = ?1 ORDER BY step DESC, seq DESC",
        )?;
        let rows = st.query_map([job], |r| {
            let path: String = r.get(5)?;
            Ok(CheckpointRow {
                seq: r.get(0)?,
                job_id: r.get(1)?,
                step: r.get(2)?,
                created_at: r.get(3)?,
                name: r.get(4)?,
                path: PathBuf::from(path),
                metrics: json_col(r, 6)?.unwrap_or(serde_json::Value::Null),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- adapters registered through the API ----

    /// Records a runtime load of adapter `name` from `path` (replacing an earlier one).
    pub fn record_adapter(&self, name: &str, path: &Path) -> Result<()> {
        self.conn().execute(
            "INSERT INTO adapters (name, path, pinned, updated_at) VALUES (?1, ?2, 0, ?3) \
             ON CONFLICT(name) DO UPDATE SET path = excluded.path, updated_at = excluded.updated_at",
            params![name, path.to_string_lossy(), now()],
        )?;
        Ok(())
    }

    /// Records a pin or unpin (of any adapter, runtime-loaded or a job output).
    pub fn record_pin(&self, name: &str, pinned: bool) -> Result<()> {
        self.conn().execute(
            "INSERT INTO adapters (name, path, pinned, updated_at) VALUES (?1, NULL, ?2, ?3) \
             ON CONFLICT(name) DO UPDATE SET pinned = excluded.pinned, updated_at = excluded.updated_at",
            params![name, pinned, now()],
        )?;
        Ok(())
    }

    /// Forgets an unloaded adapter.
    pub fn forget_adapter(&self, name: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM adapters WHERE name = ?1", params![name])?;
        Ok(())
    }

    /// Every recorded adapter, oldest change first.
    pub fn recorded_adapters(&self) -> Result<Vec<AdapterRecord>> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT name, path, pinned FROM adapters ORDER BY updated_at, name")?;
        let rows = st.query_map([], |r| {
            Ok(AdapterRecord {
                name: r.get(0)?,
                path: r.get::<_, Option<String>>(1)?.map(PathBuf::from),
                pinned: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every registered output (succeeded jobs' models and all checkpoints) as (name, folder), for
    /// re-registering adapters at start.
    pub fn servable(&self) -> Result<Vec<(String, PathBuf)>> {
        let conn = self.conn();
        let mut out = Vec::new();
        let mut st = conn.prepare(
            "SELECT fine_tuned_model, result_path FROM jobs WHERE status = 'succeeded' \
             AND fine_tuned_model IS NOT NULL AND result_path IS NOT NULL",
        )?;
        for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (n, p) = r?;
            out.push((n, PathBuf::from(p)));
        }
        let mut st = conn.prepare("SELECT name, path FROM checkpoints")?;
        for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (n, p) = r?;
            out.push((n, PathBuf::from(p)));
        }
        Ok(out)
    }
}

/// Wakes a worker thread that otherwise polls its queue every `period` (a condition variable with
/// a remembered signal, so a notify before the wait is not lost).
pub struct Wakeup {
    flag: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Default for Wakeup {
    fn default() -> Self {
        Self {
            flag: Mutex::new(false),
            cv: std::sync::Condvar::new(),
        }
    }
}

impl Wakeup {
    pub fn notify(&self) {
        *self.flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Returns when notified or after `period`.
    pub fn wait(&self, period: std::time::Duration) {
        let mut woken = self.flag.lock().unwrap_or_else(|p| p.into_inner());
        if !*woken {
            woken = self
                .cv
                .wait_timeout(woken, period)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        *woken = false;
    }
}

/// A random id with a prefix (`file-…`, `ftjob-…`): 24 base-62 characters.
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let s: String = (0..24)
        .map(|_| ALPHA[rng.random_range(0..ALPHA.len())] as char)
        .collect();
    format!("{prefix}-{s}")
}

/// A job row for unit tests of the store and its users.
#[cfg(test)]
pub(crate) fn sample_job(id: &str) -> JobRow {
    JobRow::new(id.into(), "m".into(), "file-1".into(), 1, "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_records_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            s.record_adapter("a", Path::new("/x/a")).unwrap();
            s.record_adapter("b", Path::new("/x/b")).unwrap();
            s.record_pin("a", true).unwrap();
            s.record_pin("ft:m:s:job", true).unwrap(); // a job output: only the pin
            s.record_adapter("a", Path::new("/x/a2")).unwrap(); // replaced: keeps the pin
            s.forget_adapter("b").unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        let mut got = s.recorded_adapters().unwrap();
        got.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(
            got,
            [
                AdapterRecord {
                    name: "a".into(),
                    path: Some("/x/a2".into()),
                    pinned: true
                },
                AdapterRecord {
                    name: "ft:m:s:job".into(),
                    path: None,
                    pinned: true
                },
            ]
        );
    }

    #[test]
    fn jobs_paginate_transition_and_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            for i in 0..5 {
                s.insert_job(&sample_job(&format!("ftjob-{i}"))).unwrap();
            }
            let page = s.jobs(None, 2).unwrap();
            assert_eq!(
                page.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
                ["ftjob-4", "ftjob-3", "ftjob-2"]
            );
            let page = s.jobs(Some("ftjob-2"), 2).unwrap();
            assert_eq!(page.len(), 2);
            assert!(s
                .transition("ftjob-1", &["validating_files"], "queued")
                .unwrap());
            assert!(!s.transition("ftjob-1", &["running"], "succeeded").unwrap());
            assert!(s.transition("ftjob-1", &["queued"], "cancelled").unwrap());
            s.event("ftjob-1", "info", "message", "hello", None)
                .unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        let j = s.job("ftjob-1").unwrap().unwrap();
        assert_eq!(j.status, "cancelled");
        assert!(j.finished_at.is_some());
        assert_eq!(s.events("ftjob-1", None, 10).unwrap()[0].message, "hello");
        assert_eq!(s.jobs_in("validating_files").unwrap().len(), 4);
    }
}
