//! The inference engine: one thread owns the running batch and runs the forward passes; requests
//! reach it through a channel and results flow back on a per-request channel (TGI's router/batcher
//! split, with the queue as an actor instead of locked state).
//!
//! Continuous batching (Orca, Yu et al. 2022; vLLM): every step runs one forward pass over the new
//! prompt tokens of admitted sequences plus one token of every running sequence, flattened into a
//! single batch under a token budget; sequences join and leave between steps. A request whose
//! client went away (its event channel closed) is dropped at the next step.

use crate::metrics::Metrics;
use qlorad_model::generate::{GenerateParams, IncrementalDecoder, StopMatcher};
use qlorad_model::{FinishReason, KvCache, Llama, Logits, Sampler, SeqInput, Tokenizer};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Limits of the batcher.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per forward pass (prefill tokens + one per running sequence).
    pub max_batch_tokens: usize,
    /// Sequences decoded together.
    pub max_running: usize,
    /// Requests accepted (running + waiting) before new ones get 429.
    pub max_inflight: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 2048,
            max_running: 32,
            max_inflight: 128,
        }
    }
}

/// What a request receives, in order: text pieces, then exactly one `Finish` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    Finish {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
    /// The device ran out of memory for the batch this request was in: a retry can succeed
    /// (→ 503 with Retry-After).
    OutOfMemory(String),
}

/// Whether a forward-pass error is the device running out of memory (cudarc reports
/// `CUDA_ERROR_OUT_OF_MEMORY`; candle's CPU allocator aborts instead, so this is GPU-only).
pub fn is_out_of_memory(err: &str) -> bool {
    err.contains("OUT_OF_MEMORY") || err.to_ascii_lowercase().contains("out of memory")
}

/// A generation request.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub events: UnboundedSender<Event>,
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("too many requests in flight ({0}); retry later")]
    QueueFull(usize),
    #[error("the inference engine has stopped")]
    Stopped,
}

struct Shared {
    inflight: AtomicUsize,
    alive: AtomicBool,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    max_inflight: usize,
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn start(
        model: Arc<Llama>,
        tok: Arc<Tokenizer>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            inflight: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
        });
        let max_inflight = cfg.max_inflight;
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("qlorad-engine".into())
            .spawn(move || {
                Engine {
                    model,
                    tok,
                    cfg,
                    metrics,
                    shared: s.clone(),
                    waiting: VecDeque::new(),
                    running: Vec::new(),
                    published: (0, 0),
                    graphs: Default::default(),
                    logits: Default::default(),
                }
                .run(rx);
                s.alive.store(false, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the engine thread: {e}");
            shared.alive.store(false, Ordering::SeqCst);
        }
        Self {
            tx,
            shared,
            max_inflight,
        }
    }

    /// Queues a request, or refuses it when the engine is saturated (→ 429) or gone (→ 503).
    pub fn submit(&self, req: Request) -> Result<(), SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Stopped);
        }
        let prev = self.shared.inflight.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_inflight {
            self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(self.max_inflight));
        }
        self.tx.send(req).map_err(|_| {
            self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Requests accepted and not yet finished.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::SeqCst)
    }
}

/// A sequence being generated.
struct Seq {
    req: Request,
    cache: KvCache,
    sampler: Sampler,
    stop: StopMatcher,
    detok: IncrementalDecoder,
    generated: usize,
    max_new: usize,
    /// The token to feed next (after prefill).
    last: u32,
    prefilled: bool,
    started: Instant,
    last_token_at: Option<Instant>,
}

struct Engine {
    model: Arc<Llama>,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    waiting: VecDeque<Request>,
    running: Vec<Seq>,
    /// The (waiting, running) counts this engine last added to the shared gauges.
    published: (i64, i64),
    /// The model's decode-graph counts when last added to the metrics.
    graphs: qlorad_model::llama::DecodeGraphStats,
    /// Reads each step's logits back (on a GPU through pinned memory; `QLORAD_PINNED_LOGITS=0` off).
    logits: qlorad_model::device::LogitsReader,
}

impl Engine {
    fn run(&mut self, rx: mpsc::Receiver<Request>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                // Idle: the gauges were last set before the final step, which may have finished
                // every sequence; without this they would show the old batch until the next request.
                self.publish_gauges();
                match rx.recv() {
                    Ok(r) => self.waiting.push_back(r),
                    Err(_) => return, // every handle dropped: shut down
                }
            }
            while let Ok(r) = rx.try_recv() {
                self.waiting.push_back(r);
            }
            self.drop_cancelled();
            self.admit();
            self.publish_gauges();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    /// Brings the shared gauges up to date by this engine's change since its last report: with one
    /// engine per device they are sums, and a `set` would overwrite the other engines' counts.
    fn publish_gauges(&mut self) {
        let now = (self.waiting.len() as i64, self.running.len() as i64);
        self.metrics.queue_waiting.add(now.0 - self.published.0);
        self.metrics.batch_running.add(now.1 - self.published.1);
        self.published = now;
    }

    fn finish_one(&self) {
        self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len() + self.waiting.len();
        self.running.retain(|s| !s.req.events.is_closed());
        self.waiting.retain(|r| !r.events.is_closed());
        let dropped = before - self.running.len() - self.waiting.len();
        for _ in 0..dropped {
            self.finish_one();
        }
        if dropped > 0 {
            self.metrics.cancelled.inc_by(dropped as u64);
            tracing::debug!(dropped, "cancelled requests whose clients disconnected");
        }
    }

    /// Moves waiting requests into the batch while the token budget allows (a prompt larger than the
    /// budget still runs, alone, so nothing starves).
    fn admit(&mut self) {
        let mut budget = self.cfg.max_batch_tokens.saturating_sub(self.running.len());
        while let Some(r) = self.waiting.front() {
            let n = r.prompt.len();
            if self.running.len() >= self.cfg.max_running
                || (n > budget && !self.running.is_empty())
            {
                break;
            }
            let Some(r) = self.waiting.pop_front() else {
                break;
            };
            budget = budget.saturating_sub(n);
            let ctx = self.model.config().max_position_embeddings;
            let max_new = r.params.max_tokens.min(ctx.saturating_sub(n));
            self.running.push(Seq {
                cache: self.model.new_cache(),
                sampler: Sampler::new(r.params.sampling.clone()),
                stop: StopMatcher::new(&r.params.stop),
                detok: IncrementalDecoder::new(),
                generated: 0,
                max_new,
                last: 0,
                prefilled: false,
                started: Instant::now(),
                last_token_at: None,
                req: r,
            });
        }
    }

    /// One forward pass over the batch, then sampling and streaming for each sequence.
    fn step(&mut self) {
        let span = tracing::debug_span!("batch", seqs = self.running.len());
        let _g = span.enter();
        let mut inputs: Vec<SeqInput<'_>> = self
            .running
            .iter_mut()
            .map(|s| SeqInput {
                tokens: if s.prefilled {
                    std::slice::from_ref(&s.last)
                } else {
                    &s.req.prompt
                },
                cache: &mut s.cache,
                adapter: s.req.params.adapter.clone(),
            })
            .collect();
        let tokens: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        self.metrics.batch_tokens.observe(tokens as f64);
        let logits = self
            .model
            .forward(&mut inputs, Logits::Last)
            .and_then(|l| self.logits.rows(&l));
        drop(inputs);
        self.publish_graph_steps();
        let rows = match logits {
            Ok(rows) => rows,
            Err(e) => {
                let oom = is_out_of_memory(&e.to_string());
                tracing::error!(out_of_memory = oom, "forward pass failed: {e}");
                for s in self.running.drain(..) {
                    let ev = if oom {
                        Event::OutOfMemory(format!(
                            "the GPU ran out of memory for a batch of {tokens} tokens; retry \
                             later (fewer concurrent requests, or shorter prompts, fit)"
                        ))
                    } else {
                        Event::Error("internal error in the forward pass".into())
                    };
                    // Out of the count before the client can see its error (as `advance`).
                    self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
                    let _ = s.req.events.send(ev);
                }
                if oom {
                    // The failed batch's caches and activations are back in the device's memory
                    // pool, which keeps what it frees (possibly in pieces too small for the next
                    // large allocation): give it all back so that a retry maps it afresh.
                    if let Err(e) = qlorad_model::device::trim_pool(self.model.device()) {
                        tracing::warn!("{e}");
                    }
                }
                return;
            }
        };
        let mut done = vec![false; self.running.len()];
        for (i, (s, row)) in self.running.iter_mut().zip(rows).enumerate() {
            done[i] = advance(s, &row, &self.tok, &self.metrics, &self.shared.inflight);
        }
        let mut i = 0;
        self.running.retain(|_| {
            let keep = !done[i];
            i += 1;
            keep
        });
    }
}

impl Engine {
    /// Adds the model's decode-graph steps since the last call to the metrics (its counts restart
    /// from zero when graphs are switched on again).
    fn publish_graph_steps(&mut self) {
        let now = self.model.decode_graph_stats();
        let last = std::mem::replace(&mut self.graphs, now);
        let delta = |n: u64, l: u64| if n >= l { n - l } else { n };
        let m = &self.metrics.decode_graph_steps;
        m.with_label_values(&["replayed"])
            .inc_by(delta(now.replays, last.replays));
        m.with_label_values(&["captured"])
            .inc_by(delta(now.captures, last.captures));
    }
}

impl Drop for Engine {
    /// Takes this engine's share out of the shared gauges when it stops (also by a panic).
    fn drop(&mut self) {
        self.metrics.queue_waiting.sub(self.published.0);
        self.metrics.batch_running.sub(self.published.1);
    }
}

/// Samples the next token of `s` from its logits row, streams text, and says whether it finished.
/// A finished sequence leaves `inflight` before its last event is sent, so a client that has its
/// whole response never reads a count that still includes it (`/ready`, the runner's yield).
fn advance(s: &mut Seq, row: &[f32], tok: &Tokenizer, m: &Metrics, inflight: &AtomicUsize) -> bool {
    let now = Instant::now();
    match s.last_token_at {
        None => m.ttft.observe(now.duration_since(s.started).as_secs_f64()),
        Some(t) => m.itl.observe(now.duration_since(t).as_secs_f64()),
    }
    s.last_token_at = Some(now);
    if !s.prefilled {
        s.prefilled = true;
        m.prompt_tokens.inc_by(s.req.prompt.len() as u64);
    }
    let id = s.sampler.sample(row);
    let mut finish = None;
    if tok.eos_ids().contains(&id) {
        finish = Some(FinishReason::Stop);
    } else {
        s.generated += 1;
        m.generated_tokens.inc();
        s.last = id;
        match s.detok.step(tok, id) {
            Ok(piece) if !piece.is_empty() => {
                let (out, hit) = s.stop.push(&piece);
                if !out.is_empty() {
                    let _ = s.req.events.send(Event::Text(out));
                }
                if hit {
                    finish = Some(FinishReason::Stop);
                }
            }
            Ok(_) => {}
            Err(e) => {
                inflight.fetch_sub(1, Ordering::SeqCst);
                let _ = s
                    .req
                    .events
                    .send(Event::Error(format!("detokenization failed: {e}")));
                return true;
            }
        }
        if finish.is_none() && s.generated >= s.max_new {
            finish = Some(FinishReason::Length);
        }
    }
    let Some(reason) = finish else { return false };
    // Text held back as a possible stop-string prefix turned out to be ordinary text.
    let rest = s.stop.flush();
    if !rest.is_empty() {
        let _ = s.req.events.send(Event::Text(rest));
    }
    inflight.fetch_sub(1, Ordering::SeqCst);
    let _ = s.req.events.send(Event::Finish {
        reason,
        prompt_tokens: s.req.prompt.len(),
        completion_tokens: s.generated,
    });
    true
}

#[cfg(test)]
mod tests {
    use super::is_out_of_memory;

    #[test]
    fn recognises_device_out_of_memory() {
        // cudarc's DriverError text for cuMemAllocAsync, as candle wraps it.
        assert!(is_out_of_memory(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(is_out_of_memory("CUDA out of memory"));
        assert!(!is_out_of_memory("shape mismatch in matmul"));
    }
}
