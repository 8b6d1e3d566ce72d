//! Job failures the state store could not take yet: when the state volume is full, marking a job
//! failed is itself a write that fails, and the job would show `running` forever. Such failures are
//! held here, overlaid on what the API shows, and written (with their event) as soon as the store
//! accepts writes again — the job runner retries them whenever it looks for work.

use crate::state::{now, JobError, JobRow, Store};
use std::collections::HashMap;
use std::sync::Mutex;

/// Failures not yet recorded, by job id, with the time the job failed.
#[derive(Default)]
pub struct PendingFailures {
    map: Mutex<HashMap<String, (JobError, i64)>>,
}

impl PendingFailures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (JobError, i64)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that job `id` failed with `e` (the store refused to record it).
    pub fn add(&self, id: &str, e: &JobError) {
        self.lock().insert(id.to_string(), (e.clone(), now()));
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Ids of the jobs waiting to be recorded.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Shows a job as the store would once its failure is written: `failed`, with the error.
    pub fn overlay(&self, mut j: JobRow) -> JobRow {
        if let Some((e, at)) = self.lock().get(&j.id) {
            if !matches!(j.status.as_str(), "succeeded" | "failed" | "cancelled") {
                j.status = "failed".into();
                j.error = Some(e.clone());
                j.finished_at = Some(*at);
                j.estimated_finish = None;
            }
        }
        j
    }

    /// Writes every pending failure the store now accepts; returns how many were written.
    pub fn flush(&self, store: &Store) -> usize {
        let items: Vec<(String, JobError)> = self
            .lock()
            .iter()
            .map(|(id, (e, _))| (id.clone(), e.clone()))
            .collect();
        let mut written = 0;
        for (id, e) in items {
            if store.fail(&id, &e).is_ok() {
                let msg = format!("Job failed: {}", e.message);
                let _ = store.event(&id, "error", "message", &msg, None);
                self.lock().remove(&id);
                written += 1;
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, status: &str) -> JobRow {
        JobRow {
            status: status.into(),
            created_at: 0,
            training_file: "file-x".into(),
            seed: 0,
            estimated_finish: Some(5),
            step: 1,
            total_steps: 6,
            ..crate::state::sample_job(id)
        }
    }

    #[test]
    fn an_unrecorded_failure_shows_and_is_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .insert_job(&row("ftjob-a", "validating_files"))
            .unwrap();
        store
            .transition("ftjob-a", &["validating_files"], "running")
            .unwrap();
        let p = PendingFailures::default();
        let e = crate::jobs::job_error("checkpoint_write_failed", "no space", None);
        p.add("ftjob-a", &e);
        let shown = p.overlay(store.job("ftjob-a").unwrap().unwrap());
        assert_eq!(shown.status, "failed");
        assert_eq!(shown.error.as_ref(), Some(&e));
        assert_eq!(shown.estimated_finish, None);
        // Another job is shown as stored.
        assert_eq!(p.overlay(row("ftjob-b", "running")).status, "running");
        assert_eq!(p.flush(&store), 1);
        assert!(p.is_empty());
        let stored = store.job("ftjob-a").unwrap().unwrap();
        assert_eq!((stored.status.as_str(), stored.error), ("failed", Some(e)));
    }
}
