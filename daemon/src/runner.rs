//! The job runner: fine-tuning jobs execute in a background thread of the daemon, on the same
//! `Arc<Llama>` the inference engine serves from (one resident copy of the NF4 base; training adds
//! only the LoRA weights, their gradients and AdamW state). One job runs at a time; others queue.
//!
//! Serving keeps priority: while the engine has requests in flight, the runner sleeps after each
//! step so training takes at most `train_share` of wall time. With several serving devices the
//! runner trains on the first one's model and yields to that engine only; routing sees
//! [`JobRunner::is_training`] and sends requests to the other devices first. Every `checkpoint_interval` steps the
//! job writes a checkpoint (atomically) and records it in the state database; after a crash or
//! kill -9 the daemon marks running jobs queued again at start and they resume from their latest
//! checkpoint, which reproduces the uninterrupted run exactly (see qlorad-trainer's checkpoint
//! module).

use crate::adapters::AdapterRegistry;
use crate::engine::EngineHandle;
use crate::jobs::{checkpoint_name, fine_tuned_name, job_error, JobRequest, Resolved};
use crate::metrics::Metrics;
use crate::pending::PendingFailures;
use crate::state::{now, CheckpointRow, JobError, JobRow, Store, Wakeup};
use qlorad_model::{Llama, Tokenizer};
use qlorad_trainer::data::{load_examples, DataError, DataOptions, Example};
use qlorad_trainer::step::TrainableLora;
use qlorad_trainer::train::{save_peft, StepLog, Trainer};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub base_id: String,
    /// Default steps between checkpoints.
    pub checkpoint_interval: usize,
    /// Fraction of wall time training may take while serving has work (1: never yield).
    pub train_share: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Control {
    Cancel,
    Pause,
}

pub struct JobRunner {
    store: Arc<Store>,
    model: Arc<Llama>,
    tok: Arc<Tokenizer>,
    adapters: Arc<AdapterRegistry>,
    metrics: Arc<Metrics>,
    engine: EngineHandle,
    cfg: RunnerConfig,
    control: Mutex<HashMap<String, Control>>,
    /// Failures the store could not record yet (a full state volume).
    pending: PendingFailures,
    wake: Wakeup,
    /// Whether a job is executing (on the model of serving shard 0).
    training: AtomicBool,
}

/// Why a job stopped early.
enum Stop {
    Failed(JobError),
    Cancelled,
    Paused,
}

impl From<JobError> for Stop {
    fn from(e: JobError) -> Self {
        Stop::Failed(e)
    }
}

/// The message of a data error without the server-side path.
fn data_message(e: &DataError, name: &str) -> String {
    match e {
        DataError::Invalid { errors, .. } => {
            let mut parts: Vec<String> = errors
                .iter()
                .take(5)
                .map(|l| format!("line {}: {}", l.line, l.msg))
                .collect();
            if errors.len() > 5 {
                parts.push(format!("… and {} more", errors.len() - 5));
            }
            format!(
                "{name} has {} invalid example(s): {}",
                errors.len(),
                parts.join("; ")
            )
        }
        DataError::Format { msg, .. } => format!("{name}: {msg}"),
        DataError::Io { source, .. } => format!("{name} cannot be read: {source}"),
    }
}

impl JobRunner {
    /// Recovers state after a (re)start and starts the worker thread.
    pub fn start(
        store: Arc<Store>,
        model: Arc<Llama>,
        tok: Arc<Tokenizer>,
        adapters: Arc<AdapterRegistry>,
        metrics: Arc<Metrics>,
        engine: EngineHandle,
        cfg: RunnerConfig,
    ) -> crate::state::Result<Arc<Self>> {
        let runner = Arc::new(Self {
            store,
            model,
            tok,
            adapters,
            metrics,
            engine,
            cfg,
            control: Mutex::new(HashMap::new()),
            pending: PendingFailures::default(),
            wake: Wakeup::default(),
            training: AtomicBool::new(false),
        });
        for (name, dir) in runner.store.servable()? {
            if let Err(e) = runner.adapters.register_on_disk(&name, &dir) {
                tracing::warn!(adapter = %name, "not re-registered: {e}");
            }
        }
        for id in runner.store.jobs_in("running")? {
            let from = runner
                .store
                .checkpoints(&id)?
                .first()
                .map_or("the start".to_string(), |c| {
                    format!("checkpoint step {}", c.step)
                });
            runner.store.transition(&id, &["running"], "queued")?;
            runner.store.event(
                &id,
                "warn",
                "message",
                &format!("The daemon restarted during the job; it resumes from {from}"),
                None,
            )?;
        }
        for id in runner.store.jobs_in("validating_files")? {
            runner.clone().spawn_validation(id);
        }
        runner.update_gauges();
        let worker = runner.clone();
        std::thread::Builder::new()
            .name("qlorad-jobs".into())
            .spawn(move || worker.work())
            .map_err(|source| crate::state::StateError::Io {
                path: PathBuf::from("qlorad-jobs thread"),
                source,
            })?;
        Ok(runner)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn base_id(&self) -> &str {
        &self.cfg.base_id
    }

    /// Whether a fine-tuning job is training now (on the first serving device).
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Refreshes the jobs-by-status gauges and queue length.
    pub fn update_gauges(&self) {
        let t = &self.metrics.training;
        let Ok(mut counts) = self.store.job_counts() else {
            return;
        };
        // Failures not written yet count as failed, not under their stored status.
        for id in self.pending.ids() {
            if let Ok(Some(j)) = self.store.job(&id) {
                for (k, n) in counts.iter_mut() {
                    if *k == j.status {
                        *n -= 1;
                    }
                }
                counts.push(("failed".into(), 1));
            }
        }
        for s in [
            "validating_files",
            "queued",
            "running",
            "paused",
            "succeeded",
            "failed",
            "cancelled",
        ] {
            let n: i64 = counts.iter().filter(|(k, _)| k == s).map(|(_, n)| n).sum();
            t.jobs.with_label_values(&[s]).set(n);
        }
        let waiting: i64 = counts
            .iter()
            .filter(|(k, _)| k == "queued" || k == "validating_files")
            .map(|(_, n)| n)
            .sum();
        t.queue.set(waiting);
    }

    fn notify(&self) {
        self.wake.notify();
    }

    /// Validates a new job's files in the background, then queues it.
    pub fn spawn_validation(self: Arc<Self>, id: String) {
        let spawned = std::thread::Builder::new()
            .name("qlorad-validate".into())
            .spawn(move || {
                if let Err(e) = self.validate(&id) {
                    self.record_failure(&id, &e);
                }
                self.update_gauges();
                self.notify();
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a validation thread: {e}");
        }
    }

    fn file_path(&self, id: &str, param: &str) -> Result<PathBuf, JobError> {
        match self.store.file(id) {
            Ok(Some(f)) => Ok(f.path),
            Ok(None) => Err(job_error(
                "invalid_file",
                format!("file {id} no longer exists"),
                Some(param),
            )),
            Err(e) => Err(job_error("internal_error", e.to_string(), None)),
        }
    }

    fn examples(
        &self,
        job: &JobRow,
        max_seq_len: usize,
    ) -> Result<(Vec<Example>, Vec<Example>), JobError> {
        let opts = DataOptions {
            max_seq_len,
            completion_only: true,
        };
        let path = self.file_path(&job.training_file, "training_file")?;
        let train = load_examples(&path, &self.tok, &opts).map_err(|e| {
            job_error(
                "invalid_training_file",
                data_message(&e, &format!("training file {}", job.training_file)),
                Some("training_file"),
            )
        })?;
        let val = match &job.validation_file {
            None => Vec::new(),
            Some(v) => {
                let path = self.file_path(v, "validation_file")?;
                load_examples(&path, &self.tok, &opts).map_err(|e| {
                    job_error(
                        "invalid_validation_file",
                        data_message(&e, &format!("validation file {v}")),
                        Some("validation_file"),
                    )
                })?
            }
        };
        Ok((train, val))
    }

    fn internal(e: impl std::fmt::Display) -> JobError {
        job_error("internal_error", e.to_string(), None)
    }

    fn validate(&self, id: &str) -> Result<(), JobError> {
        let job = self
            .store
            .job(id)
            .map_err(Self::internal)?
            .ok_or_else(|| job_error("internal_error", "job vanished", None))?;
        let req: JobRequest = serde_json::from_str(&job.request).map_err(Self::internal)?;
        self.store
            .event(
                id,
                "info",
                "message",
                &format!("Validating training file: {}", job.training_file),
                None,
            )
            .map_err(Self::internal)?;
        let (train, val) = self.examples(&job, req.max_seq_len.unwrap_or(1024))?;
        let resolved = req.resolve(
            job.seed as u64,
            train.len(),
            val.len(),
            self.cfg.checkpoint_interval,
        );
        let text = serde_json::to_string(&resolved).map_err(Self::internal)?;
        self.store
            .set_resolved(id, &text, resolved.total_steps as i64)
            .map_err(Self::internal)?;
        if self
            .store
            .transition(id, &["validating_files"], "queued")
            .map_err(Self::internal)?
        {
            self.store
                .event(
                    id,
                    "info",
                    "message",
                    &format!(
                        "Files validated ({} training, {} validation examples); job queued",
                        train.len(),
                        val.len()
                    ),
                    None,
                )
                .map_err(Self::internal)?;
        }
        Ok(())
    }

    /// Requests cancellation. Jobs not yet running are cancelled at once; a running job stops at
    /// its next step boundary.
    pub fn cancel(&self, id: &str) -> crate::state::Result<()> {
        if self
            .store
            .transition(id, &["validating_files", "queued", "paused"], "cancelled")?
        {
            self.store
                .event(id, "info", "message", "Job cancelled", None)?;
        } else {
            self.lock_control().insert(id.to_string(), Control::Cancel);
        }
        self.update_gauges();
        Ok(())
    }

    /// Requests a pause: a queued job is paused at once; a running one checkpoints and pauses at
    /// its next step boundary.
    pub fn pause(&self, id: &str) -> crate::state::Result<()> {
        if self.store.transition(id, &["queued"], "paused")? {
            self.store
                .event(id, "info", "message", "Job paused", None)?;
        } else {
            self.lock_control().insert(id.to_string(), Control::Pause);
        }
        self.update_gauges();
        Ok(())
    }

    /// Queues a paused job again; it continues from its latest checkpoint.
    pub fn resume(&self, id: &str) -> crate::state::Result<bool> {
        let ok = self.store.transition(id, &["paused"], "queued")?;
        if ok {
            self.store
                .event(id, "info", "message", "Job resumed", None)?;
            self.notify();
        }
        self.update_gauges();
        Ok(ok)
    }

    fn lock_control(&self) -> std::sync::MutexGuard<'_, HashMap<String, Control>> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn work(self: Arc<Self>) {
        loop {
            if !self.pending.is_empty() && self.pending.flush(&self.store) > 0 {
                self.update_gauges();
            }
            let next = match self.store.jobs_in("queued") {
                Ok(ids) => ids.into_iter().next(),
                Err(e) => {
                    tracing::error!("reading queued jobs: {e}");
                    None
                }
            };
            match next {
                Some(id) => self.run(&id),
                None => self.wake.wait(Duration::from_secs(2)),
            }
        }
    }

    fn run(&self, id: &str) {
        // Clear a stale request first: a cancel that lands between this and the transition below
        // finds the job running and is kept.
        self.lock_control().remove(id);
        match self.store.transition(id, &["queued"], "running") {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(job = %id, "starting job: {e}");
                std::thread::sleep(Duration::from_secs(1));
                return;
            }
        }
        self.update_gauges();
        let _ = self.store.set_started(id);
        self.training.store(true, Ordering::Relaxed);
        // The job issues GPU work from this thread for its whole run: the engine captures no
        // decode step meanwhile (it replays those it has; qlorad_model::gpu_gate).
        let gpu = self
            .model
            .device()
            .is_cuda()
            .then(qlorad_model::gpu_gate::gpu_work);
        let outcome = self.execute(id);
        drop(gpu);
        self.training.store(false, Ordering::Relaxed);
        // The job's activations stay cached in the device's memory pool; hand them back.
        if let Err(e) = qlorad_model::device::trim_pool(self.model.device()) {
            tracing::warn!(job = %id, "{e}");
        }
        self.lock_control().remove(id);
        let t = &self.metrics.training;
        t.job_bytes.with_label_values(&["lora"]).set(0);
        t.job_bytes.with_label_values(&["optimizer"]).set(0);
        t.job_bytes.with_label_values(&["optimizer_host"]).set(0);
        // The last event is written before the status changes, so a client that stops reading at a
        // terminal status has seen every event.
        match outcome {
            Ok((name, out, tokens)) => {
                let _ = self.store.event(
                    id,
                    "info",
                    "message",
                    &format!("New fine-tuned model created: {name}"),
                    None,
                );
                let _ = self.store.event(
                    id,
                    "info",
                    "message",
                    "The job has successfully completed",
                    None,
                );
                if let Err(e) = self.store.succeed(id, &name, &out, tokens) {
                    tracing::error!(job = %id, "recording success: {e}");
                }
            }
            Err(Stop::Cancelled) => {
                let _ = self
                    .store
                    .event(id, "info", "message", "Job cancelled", None);
                let _ = self.store.transition(id, &["running"], "cancelled");
            }
            Err(Stop::Paused) => {
                let _ = self.store.event(id, "info", "message", "Job paused", None);
                let _ = self.store.transition(id, &["running"], "paused");
            }
            Err(Stop::Failed(e)) => self.record_failure(id, &e),
        }
        self.update_gauges();
    }

    fn record_failure(&self, id: &str, e: &JobError) {
        tracing::warn!(job = %id, "fine-tuning job failed: {}", e.message);
        let _ = self.store.event(
            id,
            "error",
            "message",
            &format!("Job failed: {}", e.message),
            None,
        );
        if let Err(err) = self.store.fail(id, e) {
            // A full volume: the API shows the failure now and the runner writes it later.
            tracing::error!(job = %id, "cannot record the failure yet: {err}");
            self.pending.add(id, e);
        }
    }

    /// A job as the API shows it: as stored, or failed if its failure is not written yet.
    pub fn shown(&self, j: JobRow) -> JobRow {
        self.pending.overlay(j)
    }

    /// Runs a job to its end; on success returns (model name, adapter folder, trained tokens).
    fn execute(&self, id: &str) -> Result<(String, PathBuf, i64), Stop> {
        let job = self
            .store
            .job(id)
            .map_err(Self::internal)?
            .ok_or_else(|| job_error("internal_error", "job vanished", None))?;
        let resolved: Resolved = job
            .resolved
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .ok_or_else(|| job_error("internal_error", "the job was never validated", None))?;
        let (train, val) = self.examples(&job, resolved.max_seq_len)?;
        let cfg = resolved.train_config();
        let pad = self.tok.eos_id().unwrap_or(0);
        let model_name = fine_tuned_name(&self.cfg.base_id, job.suffix.as_deref(), id);
        let latest = self.store.checkpoints(id).map_err(Self::internal)?;
        let mut trainer = match latest.first() {
            Some(c) => {
                let t = Trainer::resume(&self.model, &resolved.lora, train, val, cfg, pad, &c.path)
                    .map_err(|e| {
                        job_error(
                            "checkpoint_error",
                            format!("cannot resume from the checkpoint at step {}: {e}", c.step),
                            None,
                        )
                    })?;
                let _ = self.store.event(
                    id,
                    "info",
                    "message",
                    &format!("Fine-tuning job resumed from checkpoint step {}", c.step),
                    None,
                );
                t
            }
            None => {
                let lora = TrainableLora::new_on(
                    self.model.config(),
                    &resolved.lora,
                    resolved.seed,
                    self.model.device(),
                )
                .map_err(Self::internal)?;
                let _ = self
                    .store
                    .event(id, "info", "message", "Fine-tuning job started", None);
                Trainer::new(&self.model, lora, train, val, cfg, pad).map_err(Self::internal)?
            }
        };
        let lora_bytes: usize = trainer
            .lora()
            .map_err(Self::internal)?
            .named_vars()
            .iter()
            .map(|(_, v)| v.elem_count() * 4)
            .sum();
        let t = &self.metrics.training;
        t.job_bytes
            .with_label_values(&["lora"])
            .set(lora_bytes as i64);
        // Optimizer state where the model computes (none when paged to the host of a GPU run)
        // and in host memory.
        let on_device = trainer.optimizer().bytes_on(self.model.device());
        let on_host = if self.model.device().is_cpu() {
            0
        } else {
            trainer.optimizer().bytes_on(&candle_core::Device::Cpu)
        };
        t.job_bytes
            .with_label_values(&["optimizer"])
            .set(on_device as i64);
        t.job_bytes
            .with_label_values(&["optimizer_host"])
            .set(on_host as i64);
        // Preemption points inside a step (between layers, with gradient checkpointing) and after it.
        let yielder = Arc::new(Yielder::new(
            self.engine.clone(),
            self.cfg.train_share,
            &self.metrics.training,
            self.model.device().clone(),
        ));
        let y = yielder.clone();
        trainer.set_between_layers(Arc::new(move || y.maybe_yield()));
        let mut last_ckpt = trainer.position().step;
        let mut last_log: Option<StepLog> = None;
        loop {
            let ctl = self.lock_control().get(id).copied();
            match ctl {
                Some(Control::Cancel) => return Err(Stop::Cancelled),
                Some(Control::Pause) => {
                    if trainer.position().step > last_ckpt {
                        self.checkpoint(id, &model_name, &trainer, last_log.as_ref())?;
                    }
                    return Err(Stop::Paused);
                }
                None => {}
            }
            let started = Instant::now();
            let tokens_before = trainer.position().trained_tokens;
            let Some(log) = trainer.step().map_err(|e| {
                job_error("training_error", format!("training step failed: {e}"), None)
            })?
            else {
                break;
            };
            let took = started.elapsed();
            self.record_step(id, &log, log.trained_tokens - tokens_before, took);
            if log.step.is_multiple_of(resolved.checkpoint_interval) && log.step < log.total_steps {
                self.checkpoint(id, &model_name, &trainer, Some(&log))?;
                last_ckpt = log.step;
            }
            last_log = Some(log);
            yielder.maybe_yield();
        }
        self.finish(id, &model_name, &trainer)
    }

    /// Metrics, job progress and a metrics event for one step that trained on `new_tokens`.
    fn record_step(&self, id: &str, log: &StepLog, new_tokens: u64, took: Duration) {
        let t = &self.metrics.training;
        t.steps.inc();
        t.loss.set(log.loss);
        t.lr.set(log.lr);
        t.step_seconds.observe(took.as_secs_f64());
        t.tokens.inc_by(new_tokens);
        let remaining = (log.total_steps - log.step) as f64 * took.as_secs_f64();
        let _ = self.store.set_progress(
            id,
            log.step as i64,
            log.trained_tokens as i64,
            Some(now() + remaining.ceil() as i64),
        );
        let mut msg = format!(
            "Step {}/{}: training loss={:.4}",
            log.step, log.total_steps, log.loss
        );
        if let Some(v) = log.eval_loss {
            msg.push_str(&format!(", validation loss={v:.4}"));
        }
        let data = json!({
            "step": log.step,
            "total_steps": log.total_steps,
            "train_loss": log.loss,
            "valid_loss": log.eval_loss,
            "valid_perplexity": log.eval_perplexity,
            "learning_rate": log.lr,
            "grad_norm": if log.grad_norm.is_finite() { json!(log.grad_norm) } else { json!(null) },
            "trained_tokens": log.trained_tokens,
            "tokens_per_second": log.tokens_per_s,
            "epoch": log.epoch,
        });
        let _ = self.store.event(id, "info", "metrics", &msg, Some(&data));
    }

    fn checkpoint(
        &self,
        id: &str,
        model_name: &str,
        trainer: &Trainer,
        log: Option<&StepLog>,
    ) -> Result<(), Stop> {
        let step = trainer.position().step;
        let dir = self
            .store
            .dir()
            .join("jobs")
            .join(id)
            .join("checkpoints")
            .join(format!("step-{step}"));
        trainer
            .save_checkpoint(&dir, &self.cfg.base_id, true)
            .map_err(|e| {
                job_error(
                    "checkpoint_write_failed",
                    format!("writing the checkpoint at step {step} failed: {e}"),
                    None,
                )
            })?;
        let name = checkpoint_name(model_name, step);
        let metrics = match log {
            Some(l) => json!({
                "step": l.step, "train_loss": l.loss, "valid_loss": l.eval_loss,
                "full_valid_loss": l.eval_loss, "trained_tokens": l.trained_tokens,
            }),
            None => json!({"step": step, "trained_tokens": trainer.position().trained_tokens}),
        };
        self.store
            .insert_checkpoint(&CheckpointRow {
                seq: 0,
                job_id: id.to_string(),
                step: step as i64,
                created_at: now(),
                name: name.clone(),
                path: dir.clone(),
                metrics,
            })
            .map_err(Self::internal)?;
        if let Err(e) = self.adapters.register_on_disk(&name, &dir) {
            tracing::warn!(checkpoint = %name, "not registered for serving: {e}");
        }
        let _ = self.store.event(
            id,
            "info",
            "message",
            &format!("Checkpoint created at step {step}: {name}"),
            None,
        );
        Ok(())
    }

    /// Writes the final adapter and registers it for serving.
    fn finish(
        &self,
        id: &str,
        model_name: &str,
        trainer: &Trainer,
    ) -> Result<(String, PathBuf, i64), Stop> {
        let out = self.store.dir().join("adapters").join(id);
        let lora = trainer.lora().map_err(|e| {
            job_error(
                "output_write_failed",
                format!("applying the last optimizer update failed: {e}"),
                None,
            )
        })?;
        save_peft(lora, &self.cfg.base_id, &out, true).map_err(|e| {
            job_error(
                "output_write_failed",
                format!("writing the fine-tuned adapter failed: {e}"),
                None,
            )
        })?;
        self.adapters
            .load(model_name, &out)
            .map_err(|e| job_error("internal_error", e.to_string(), None))?;
        Ok((
            model_name.to_string(),
            out,
            trainer.position().trained_tokens as i64,
        ))
    }
}

/// Gives the cores back to serving: called at preemption points, it sleeps while the engine has
/// requests in flight so that training's share of wall time since the previous point stays at
/// `share` (returning early once serving is idle).
///
/// On a GPU the host only queues work: a layer's kernels are still running (and serving's queue
/// behind them on the same stream) when the host reaches the next point. So with requests in
/// flight the yielder first waits for the device, which makes `worked` the layer's real time and
/// leaves the GPU to serving for the pause (without that, training's measured share was mostly
/// queueing and serving's ITL took every queued layer).
struct Yielder {
    engine: EngineHandle,
    share: f64,
    last: Mutex<Instant>,
    yielded_ms: prometheus::IntCounter,
    uninterrupted: prometheus::Histogram,
    device_wait: prometheus::Histogram,
    device: candle_core::Device,
}

impl Yielder {
    fn new(
        engine: EngineHandle,
        share: f64,
        m: &crate::metrics::TrainingMetrics,
        device: candle_core::Device,
    ) -> Self {
        Self {
            engine,
            share: share.clamp(0.01, 1.0),
            last: Mutex::new(Instant::now()),
            yielded_ms: m.yielded_seconds.clone(),
            uninterrupted: m.uninterrupted_seconds.clone(),
            device_wait: m.device_wait_seconds.clone(),
            device,
        }
    }

    fn maybe_yield(&self) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if self.share < 1.0 && self.engine.inflight() > 0 {
            if !self.device.is_cpu() {
                // Best effort: a failed wait only makes the share less exact; the step's own
                // error handling sees a broken device at its next operation.
                let waited = Instant::now();
                let _ = self.device.synchronize();
                self.device_wait.observe(waited.elapsed().as_secs_f64());
            }
            let worked = last.elapsed();
            self.uninterrupted.observe(worked.as_secs_f64());
            let budget = worked.mul_f64((1.0 - self.share) / self.share);
            let started = Instant::now();
            // The job's hold of the GPU gate is let go for the pause: the engine may capture
            // decode steps meanwhile (qlorad_model::gpu_gate).
            qlorad_model::gpu_gate::released(|| {
                while started.elapsed() < budget && self.engine.inflight() > 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            self.yielded_ms.inc_by(started.elapsed().as_millis() as u64);
        }
        *last = Instant::now();
    }
}
