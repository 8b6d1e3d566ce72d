//! Promotion: merging a served adapter into a full-precision copy of the base and exporting a plain
//! Hugging Face model folder, as a background export job of the daemon.
//!
//! `POST /v1/adapters/{name}/promote` records an export in the state database and a worker thread
//! runs [`qlorad_trainer::merge::merge_and_export`] (streaming, layer by layer, written to a staging
//! folder and renamed into place). Progress is stored on the export's row and as events; cancel is a
//! flag checked between tensors. Outputs go under the export root only (names, not paths, come over
//! HTTP). An export interrupted by a crash is queued again at start: the staging folder of the dead
//! process is swept and the export reruns, so no half-written folder is ever visible.

use crate::adapters::AdapterRegistry;
use crate::state::{new_id, now, Store, Wakeup};
use qlorad_kernels::Nf4Config;
use qlorad_trainer::merge::{merge_and_export, ExportDtype, MergeInto, MergeOptions, Progress};
use rusqlite::{params, OptionalExtension, Row};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS exports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    adapter TEXT NOT NULL,
    adapter_path TEXT NOT NULL,
    out_name TEXT NOT NULL,
    out_path TEXT NOT NULL,
    dtype TEXT NOT NULL,
    merge_into TEXT NOT NULL,
    overwrite INTEGER NOT NULL,
    status TEXT NOT NULL,
    tensors_done INTEGER NOT NULL DEFAULT 0,
    tensors_total INTEGER NOT NULL DEFAULT 0,
    bytes_written INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    finished_at INTEGER
);
";

const COLS: &str = "id, created_at, adapter, adapter_path, out_name, out_path, dtype, merge_into, \
    overwrite, status, tensors_done, tensors_total, bytes_written, bytes_total, error, finished_at";

/// A promote request, checked.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub adapter: String,
    pub out_name: String,
    pub dtype: ExportDtype,
    pub merge_into: MergeInto,
    pub overwrite: bool,
}

/// An export's row as the API shows it.
pub fn export_json(r: &Row) -> rusqlite::Result<Value> {
    let error: Option<String> = r.get(14)?;
    Ok(json!({
        "id": r.get::<_, String>(0)?, "object": "export", "created_at": r.get::<_, i64>(1)?,
        "adapter": r.get::<_, String>(2)?, "output": r.get::<_, String>(4)?,
        "path": r.get::<_, String>(5)?, "dtype": r.get::<_, String>(6)?,
        "merge_into": r.get::<_, String>(7)?, "status": r.get::<_, String>(9)?,
        "progress": {"tensors_done": r.get::<_, i64>(10)?, "tensors_total": r.get::<_, i64>(11)?,
                     "bytes_written": r.get::<_, i64>(12)?, "bytes_total": r.get::<_, i64>(13)?},
        "error": error.map(|m| json!({"code": "export_failed", "message": m})),
        "finished_at": r.get::<_, Option<i64>>(15)?,
    }))
}

/// Why a promote request is refused (HTTP 400/404 with this message; the state store's own
/// failures, e.g. a full disk, are the server's: 507 or 500).
#[derive(Debug)]
pub enum Refused {
    NoAdapter(String),
    Invalid(String, &'static str),
    Store(crate::state::StateError),
}

pub struct ExportRunner {
    store: Arc<Store>,
    adapters: Arc<AdapterRegistry>,
    model_dir: PathBuf,
    nf4: Nf4Config,
    root: PathBuf,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    wake: Wakeup,
    pub exports_total: prometheus::IntCounterVec,
    pub bytes_written: prometheus::IntCounter,
}

impl ExportRunner {
    /// Creates the table, queues exports a crash interrupted, and starts the worker.
    pub fn start(
        store: Arc<Store>,
        adapters: Arc<AdapterRegistry>,
        model_dir: &Path,
        nf4: Nf4Config,
        root: &Path,
        metrics: &crate::metrics::Metrics,
    ) -> crate::state::Result<Arc<Self>> {
        std::fs::create_dir_all(root).map_err(|source| crate::state::StateError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        store.with_conn(|c| {
            c.execute_batch(SCHEMA)?;
            c.execute(
                "UPDATE exports SET status = 'queued' WHERE status = 'running'",
                [],
            )
        })?;
        let runner = Arc::new(Self {
            store,
            adapters,
            model_dir: model_dir.to_path_buf(),
            nf4,
            root: root.canonicalize().unwrap_or_else(|_| root.to_path_buf()),
            cancels: Mutex::new(HashMap::new()),
            wake: Wakeup::default(),
            exports_total: metrics.exports.clone(),
            bytes_written: metrics.export_bytes.clone(),
        });
        let worker = runner.clone();
        std::thread::Builder::new()
            .name("qlorad-exports".into())
            .spawn(move || worker.work())
            .map_err(|source| crate::state::StateError::Io {
                path: PathBuf::from("qlorad-exports thread"),
                source,
            })?;
        Ok(runner)
    }

    /// Records a promote request and wakes the worker; returns the export's JSON.
    pub fn submit(&self, req: &ExportRequest) -> Result<Value, Refused> {
        let info = self
            .adapters
            .info(&req.adapter)
            .ok_or_else(|| Refused::NoAdapter(req.adapter.clone()))?;
        let ok_name = !req.out_name.is_empty()
            && req.out_name.len() <= 128
            && !req.out_name.starts_with('.')
            && req
                .out_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok_name {
            return Err(Refused::Invalid(
                "`out` must be a folder name of letters, digits, '.', '_' and '-' (it is created under the export root)".into(),
                "out",
            ));
        }
        let out = self.root.join(&req.out_name);
        if out.exists() && !req.overwrite {
            return Err(Refused::Invalid(
                format!(
                    "export {:?} already exists (set \"overwrite\": true to replace it)",
                    req.out_name
                ),
                "out",
            ));
        }
        let busy = self
            .store
            .with_conn(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM exports WHERE out_name = ?1 AND status IN ('queued', 'running')",
                    [&req.out_name],
                    |r| r.get::<_, i64>(0),
                )
            })
            .map_err(Refused::Store)?;
        if busy > 0 {
            return Err(Refused::Invalid(
                format!("an export to {:?} is already in progress", req.out_name),
                "out",
            ));
        }
        let id = new_id("export");
        let dtype = match req.dtype {
            ExportDtype::F32 => "f32",
            ExportDtype::F16 => "f16",
            ExportDtype::BF16 => "bf16",
        };
        self.store
            .with_conn(|c| {
                c.execute(
                    "INSERT INTO exports (id, created_at, adapter, adapter_path, out_name, out_path, dtype, \
                     merge_into, overwrite, status) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,'queued')",
                    params![id, now(), req.adapter, info.path, req.out_name, out.to_string_lossy(),
                            dtype, req.merge_into.as_str(), req.overwrite],
                )
            })
            .map_err(Refused::Store)?;
        let _ = self.store.event(
            &id,
            "info",
            "message",
            &format!("Export of {} queued", req.adapter),
            None,
        );
        self.exports_total.with_label_values(&["queued"]).inc();
        self.wake.notify();
        self.get(&id)
            .ok()
            .flatten()
            .ok_or_else(|| Refused::Invalid("export vanished".into(), "out"))
    }

    pub fn get(&self, id: &str) -> crate::state::Result<Option<Value>> {
        self.store.with_conn(|c| {
            c.query_row(
                &format!("SELECT {COLS} FROM exports WHERE id = ?1"),
                [id],
                export_json,
            )
            .optional()
        })
    }

    pub fn list(&self) -> crate::state::Result<Vec<Value>> {
        self.store.with_conn(|c| {
            let mut st = c.prepare(&format!("SELECT {COLS} FROM exports ORDER BY seq DESC"))?;
            let rows = st.query_map([], export_json)?;
            rows.collect()
        })
    }

    /// An export's events, newest first.
    pub fn events(&self, id: &str) -> crate::state::Result<Vec<crate::state::EventRow>> {
        self.store.events(id, None, 1000)
    }

    /// Cancels a queued export at once, a running one between two tensors.
    pub fn cancel(&self, id: &str) -> crate::state::Result<()> {
        let n = self.store.with_conn(|c| {
            c.execute(
                "UPDATE exports SET status = 'cancelled', finished_at = ?2 WHERE id = ?1 AND status = 'queued'",
                params![id, now()],
            )
        })?;
        if n == 0 {
            if let Some(flag) = self.lock_cancels().get(id) {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        } else {
            let _ = self
                .store
                .event(id, "info", "message", "Export cancelled", None);
        }
        Ok(())
    }

    fn lock_cancels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn work(self: Arc<Self>) {
        loop {
            let next: Option<(String, String, String, String, String, bool)> = self
                .store
                .with_conn(|c| {
                    c.query_row(
                        "SELECT id, adapter_path, out_path, dtype, merge_into, overwrite FROM exports \
                         WHERE status = 'queued' ORDER BY seq LIMIT 1",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
                    )
                    .optional()
                })
                .unwrap_or(None);
            match next {
                Some((id, adapter, out, dtype, into, overwrite)) => {
                    self.run(&id, &adapter, &out, &dtype, &into, overwrite)
                }
                None => self.wake.wait(Duration::from_secs(2)),
            }
        }
    }

    fn set(&self, id: &str, status: &str, error: Option<&str>) {
        let end = matches!(status, "succeeded" | "failed" | "cancelled").then(now);
        let _ = self.store.with_conn(|c| {
            c.execute(
                "UPDATE exports SET status = ?2, error = ?3, finished_at = ?4 WHERE id = ?1",
                params![id, status, error, end],
            )
        });
        self.exports_total.with_label_values(&[status]).inc();
    }

    fn run(&self, id: &str, adapter: &str, out: &str, dtype: &str, into: &str, overwrite: bool) {
        let flag = Arc::new(AtomicBool::new(false));
        self.lock_cancels().insert(id.to_string(), flag.clone());
        self.set(id, "running", None);
        let _ = self
            .store
            .event(id, "info", "message", "Export started", None);
        let opts = MergeOptions {
            dtype: dtype.parse().unwrap_or(ExportDtype::BF16),
            merge_into: into.parse().unwrap_or(MergeInto::Original),
            nf4: self.nf4,
            overwrite,
            cancel: Some(flag),
            ..MergeOptions::new(&self.model_dir, Path::new(adapter), Path::new(out))
        };
        let mut last = Instant::now() - Duration::from_secs(10);
        let mut written = 0u64;
        let result = merge_and_export(&opts, |p: &Progress| {
            self.bytes_written
                .inc_by(p.bytes_written.saturating_sub(written));
            written = p.bytes_written;
            // Progress rows at most every 250 ms (and at the end): the database is not a log.
            if last.elapsed() >= Duration::from_millis(250) || p.tensors_done == p.tensors_total {
                last = Instant::now();
                let _ = self.store.with_conn(|c| {
                    c.execute(
                        "UPDATE exports SET tensors_done = ?2, tensors_total = ?3, bytes_written = ?4, \
                         bytes_total = ?5 WHERE id = ?1",
                        params![id, p.tensors_done as i64, p.tensors_total as i64,
                                p.bytes_written as i64, p.bytes_total as i64],
                    )
                });
            }
        });
        self.lock_cancels().remove(id);
        match result {
            Ok(report) => {
                let _ = self.store.event(
                    id,
                    "info",
                    "message",
                    &format!(
                        "Exported {} tensors ({} merged modules, {} bytes) to {}",
                        report.tensors,
                        report.merged_modules,
                        report.total_size,
                        report.out_dir.display()
                    ),
                    Some(&json!({"files": report.files.len(), "total_size": report.total_size})),
                );
                self.set(id, "succeeded", None);
            }
            Err(qlorad_trainer::merge::MergeError::Cancelled) => {
                let _ = self
                    .store
                    .event(id, "info", "message", "Export cancelled", None);
                self.set(id, "cancelled", None);
            }
            Err(e) => {
                let msg = e.to_string();
                let _ = self.store.event(
                    id,
                    "error",
                    "message",
                    &format!("Export failed: {msg}"),
                    None,
                );
                self.set(id, "failed", Some(&msg));
            }
        }
    }
}
