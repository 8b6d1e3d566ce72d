//! Prometheus metrics (`qlorad_<subsystem>_<name>_<unit>`), one registry per server.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_latency: HistogramVec,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub cancelled: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub batch_tokens: Histogram,
    /// Sums over the engines: each adds the change of its own count (several engines share them).
    pub queue_waiting: IntGauge,
    pub batch_running: IntGauge,
    /// Base weights of every shard's copy.
    pub model_weight_bytes: IntGauge,
    /// Requests submitted to each engine (label `engine`: the shard's index).
    pub engine_requests: IntCounterVec,
    /// Decode steps replayed from a captured CUDA graph, and steps captured
    /// (on a GPU unless `QLORAD_DECODE_GRAPH=0`; zero otherwise).
    pub decode_graph_steps: IntCounterVec,
    pub adapter_requests: IntCounterVec,
    pub adapters: crate::adapters::AdapterCounters,
    pub training: TrainingMetrics,
    pub exports: IntCounterVec,
    pub export_bytes: IntCounter,
    /// Memory of the devices the shards compute on, read at each scrape.
    pub device_memory: IntGaugeVec,
    devices: std::sync::OnceLock<Vec<qlorad_model::Placement>>,
}

/// Fine-tuning job metrics.
pub struct TrainingMetrics {
    pub jobs: IntGaugeVec,
    pub queue: IntGauge,
    pub steps: IntCounter,
    pub tokens: IntCounter,
    pub loss: Gauge,
    pub lr: Gauge,
    pub step_seconds: Histogram,
    pub yielded_seconds: IntCounter,
    /// Wall time between two preemption points of training while requests were in flight: the
    /// training work in between plus, on a GPU, whatever serving queued on the same device stream
    /// meanwhile (the yielder waits for the device before it measures).
    pub uninterrupted_seconds: Histogram,
    /// At each of those points on a GPU, how long the job waited for the device to finish what
    /// was queued (its own layer and any serving work in between) before it yielded.
    pub device_wait_seconds: Histogram,
    /// Bytes of trainable LoRA weights and of optimizer state of the running job.
    pub job_bytes: IntGaugeVec,
    pub process_rss: IntGauge,
}

/// Total physical memory of the machine, from /proc (0 where unavailable).
fn host_memory_total_bytes() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<i64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resident set size of this process, from /proc (0 where unavailable).
pub fn process_rss_bytes() -> i64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn buckets(start: f64, factor: f64, n: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, n).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "qlorad_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )?;
        let http_latency = HistogramVec::new(
            HistogramOpts::new(
                "qlorad_http_request_duration_seconds",
                "HTTP request duration by route",
            )
            .buckets(buckets(0.001, 2.0, 18)),
            &["route"],
        )?;
        let prompt_tokens =
            IntCounter::new("qlorad_tokens_prompt_total", "Prompt tokens processed")?;
        let generated_tokens =
            IntCounter::new("qlorad_tokens_generated_total", "Tokens generated")?;
        let cancelled = IntCounter::new(
            "qlorad_requests_cancelled_total",
            "Requests dropped because the client disconnected",
        )?;
        let ttft = Histogram::with_opts(
            HistogramOpts::new(
                "qlorad_time_to_first_token_seconds",
                "Time from admission to the first token",
            )
            .buckets(buckets(0.005, 2.0, 16)),
        )?;
        let itl = Histogram::with_opts(
            HistogramOpts::new(
                "qlorad_inter_token_latency_seconds",
                "Time between consecutive tokens of a request",
            )
            .buckets(buckets(0.001, 2.0, 16)),
        )?;
        let batch_tokens = Histogram::with_opts(
            HistogramOpts::new("qlorad_batch_tokens", "Tokens per forward pass")
                .buckets(buckets(1.0, 2.0, 13)),
        )?;
        let queue_waiting = IntGauge::new(
            "qlorad_queue_waiting_requests",
            "Requests waiting for a batch slot (all engines)",
        )?;
        let batch_running = IntGauge::new(
            "qlorad_batch_running_requests",
            "Requests in the running batches (all engines)",
        )?;
        let model_weight_bytes = IntGauge::new(
            "qlorad_model_weight_bytes",
            "Bytes of resident base weights (summed over the devices' copies)",
        )?;
        let engine_requests = IntCounterVec::new(
            Opts::new(
                "qlorad_engine_requests_total",
                "Generation requests submitted to each engine (one per --device entry, by index)",
            ),
            &["engine"],
        )?;
        let decode_graph_steps = IntCounterVec::new(
            Opts::new(
                "qlorad_decode_graph_steps_total",
                "Decode steps run from a captured CUDA graph (kind=replayed) and steps captured \
                 (kind=captured); on a GPU unless QLORAD_DECODE_GRAPH=0, zero otherwise",
            ),
            &["kind"],
        )?;
        for kind in ["replayed", "captured"] {
            decode_graph_steps.with_label_values(&[kind]);
        }
        let adapter_requests = IntCounterVec::new(
            Opts::new(
                "qlorad_adapter_requests_total",
                "Generation requests by adapter (base: the model id)",
            ),
            &["adapter"],
        )?;
        let adapters = crate::adapters::AdapterCounters {
            hits: IntCounter::new(
                "qlorad_adapter_cache_hits_total",
                "Requests whose adapter was resident",
            )?,
            misses: IntCounter::new(
                "qlorad_adapter_cache_misses_total",
                "Requests whose adapter had to be reloaded",
            )?,
            evictions: IntCounter::new(
                "qlorad_adapter_evictions_total",
                "Adapters evicted from the servable tier (LRU)",
            )?,
            resident_bytes: IntGauge::new(
                "qlorad_adapter_resident_bytes",
                "Bytes of servable adapter weights (on the GPU, or in host memory for a CPU model), summed over the serving devices",
            )?,
            host_bytes: IntGauge::new(
                "qlorad_adapter_host_bytes",
                "Bytes of host copies of adapters evicted from a GPU or not on every GPU (one upload from servable)",
            )?,
            disk_bytes: IntGauge::new(
                "qlorad_adapter_disk_bytes",
                "Bytes of registered adapters evicted to disk",
            )?,
        };
        let training = TrainingMetrics {
            jobs: IntGaugeVec::new(
                Opts::new("qlorad_fine_tuning_jobs", "Fine-tuning jobs by status"),
                &["status"],
            )?,
            queue: IntGauge::new(
                "qlorad_fine_tuning_queue_length",
                "Jobs waiting to run (validating or queued)",
            )?,
            steps: IntCounter::new(
                "qlorad_fine_tuning_steps_total",
                "Optimizer steps taken by fine-tuning jobs",
            )?,
            tokens: IntCounter::new(
                "qlorad_fine_tuning_tokens_total",
                "Tokens trained on by fine-tuning jobs",
            )?,
            loss: Gauge::new(
                "qlorad_fine_tuning_loss",
                "Training loss of the latest step",
            )?,
            lr: Gauge::new(
                "qlorad_fine_tuning_learning_rate",
                "Learning rate of the latest step",
            )?,
            step_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "qlorad_fine_tuning_step_seconds",
                    "Wall time of one optimizer step",
                )
                .buckets(buckets(0.01, 2.0, 16)),
            )?,
            yielded_seconds: IntCounter::new(
                "qlorad_fine_tuning_yield_milliseconds_total",
                "Milliseconds training paused to give serving priority",
            )?,
            uninterrupted_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "qlorad_fine_tuning_uninterrupted_seconds",
                    "Wall time between two preemption points of training while requests were in flight (with a GPU, serving work queued in between included)",
                )
                .buckets(buckets(0.0005, 2.0, 12)),
            )?,
            device_wait_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "qlorad_fine_tuning_device_wait_seconds",
                    "Time training waited for the GPU to finish queued work (its own and serving's) at a preemption point before yielding, while requests were in flight",
                )
                .buckets(buckets(0.0005, 2.0, 12)),
            )?,
            job_bytes: IntGaugeVec::new(
                Opts::new(
                    "qlorad_fine_tuning_memory_bytes",
                    "Memory of the running job beyond the shared base (lora: trainable weights, optimizer: AdamW moments where the model computes, optimizer_host: moments paged to host memory)",
                ),
                &["kind"],
            )?,
            process_rss: IntGauge::new(
                "qlorad_process_resident_memory_bytes",
                "Resident set size of the daemon process",
            )?,
        };
        registry.register(Box::new(training.jobs.clone()))?;
        registry.register(Box::new(training.queue.clone()))?;
        registry.register(Box::new(training.steps.clone()))?;
        registry.register(Box::new(training.tokens.clone()))?;
        registry.register(Box::new(training.loss.clone()))?;
        registry.register(Box::new(training.lr.clone()))?;
        registry.register(Box::new(training.step_seconds.clone()))?;
        registry.register(Box::new(training.yielded_seconds.clone()))?;
        registry.register(Box::new(training.uninterrupted_seconds.clone()))?;
        registry.register(Box::new(training.device_wait_seconds.clone()))?;
        registry.register(Box::new(training.job_bytes.clone()))?;
        registry.register(Box::new(training.process_rss.clone()))?;
        let exports = IntCounterVec::new(
            Opts::new(
                "qlorad_exports_total",
                "Export (promote) job transitions by status",
            ),
            &["status"],
        )?;
        let export_bytes = IntCounter::new(
            "qlorad_export_bytes_written_total",
            "Bytes of merged weights written by exports",
        )?;
        registry.register(Box::new(exports.clone()))?;
        registry.register(Box::new(export_bytes.clone()))?;
        let device_memory = IntGaugeVec::new(
            Opts::new(
                "qlorad_device_memory_bytes",
                "Memory of each device a shard computes on (kind used|total): on a GPU the driver's \
                 view (CUDA context and caching pool included), and of it the captured decode \
                 steps' graph memory (kind graphs); on the CPU the process RSS and the machine's \
                 physical memory",
            ),
            &["device", "kind"],
        )?;
        registry.register(Box::new(device_memory.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_latency.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(cancelled.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(itl.clone()))?;
        registry.register(Box::new(batch_tokens.clone()))?;
        registry.register(Box::new(queue_waiting.clone()))?;
        registry.register(Box::new(batch_running.clone()))?;
        registry.register(Box::new(model_weight_bytes.clone()))?;
        registry.register(Box::new(engine_requests.clone()))?;
        registry.register(Box::new(decode_graph_steps.clone()))?;
        registry.register(Box::new(adapter_requests.clone()))?;
        registry.register(Box::new(adapters.hits.clone()))?;
        registry.register(Box::new(adapters.misses.clone()))?;
        registry.register(Box::new(adapters.evictions.clone()))?;
        registry.register(Box::new(adapters.resident_bytes.clone()))?;
        registry.register(Box::new(adapters.host_bytes.clone()))?;
        registry.register(Box::new(adapters.disk_bytes.clone()))?;
        Ok(Self {
            registry,
            http_requests,
            http_latency,
            prompt_tokens,
            generated_tokens,
            cancelled,
            ttft,
            itl,
            batch_tokens,
            queue_waiting,
            batch_running,
            model_weight_bytes,
            engine_requests,
            decode_graph_steps,
            adapter_requests,
            adapters,
            training,
            exports,
            export_bytes,
            device_memory,
            devices: std::sync::OnceLock::new(),
        })
    }

    /// Reports the memory of `devices` (the shards' placements) in `qlorad_device_memory_bytes`
    /// from now on; the first call wins.
    pub fn watch_devices(&self, devices: Vec<qlorad_model::Placement>) {
        let _ = self.devices.set(devices);
    }

    fn update_device_memory(&self) {
        let Some(devices) = self.devices.get() else {
            return;
        };
        let mut seen = Vec::new();
        for p in devices {
            let name = match p.device.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                _ => "cpu".to_string(),
            };
            // Several CPU shards share one memory (and one line).
            if seen.contains(&name) {
                continue;
            }
            let (used, total) = match p.memory_info() {
                Some((free, total)) => ((total - free) as i64, total as i64),
                None => (process_rss_bytes(), host_memory_total_bytes()),
            };
            let g = &self.device_memory;
            g.with_label_values(&[name.as_str(), "used"]).set(used);
            g.with_label_values(&[name.as_str(), "total"]).set(total);
            if let Some(graphs) = p.graph_memory() {
                g.with_label_values(&[name.as_str(), "graphs"])
                    .set(graphs as i64);
            }
            seen.push(name);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        self.training.process_rss.set(process_rss_bytes());
        self.update_device_memory();
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
