//! Prometheus metrics (`qlorad_<subsystem>_<name>_<unit>`), one registry per server.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
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
    pub queue_waiting: IntGauge,
    pub batch_running: IntGauge,
    pub model_weight_bytes: IntGauge,
    pub adapter_requests: IntCounterVec,
    pub adapters: crate::adapters::AdapterCounters,
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
            "Requests waiting for a batch slot",
        )?;
        let batch_running = IntGauge::new(
            "qlorad_batch_running_requests",
            "Requests in the running batch",
        )?;
        let model_weight_bytes = IntGauge::new(
            "qlorad_model_weight_bytes",
            "Bytes of resident base weights",
        )?;
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
                "Adapters evicted to disk (LRU)",
            )?,
            resident_bytes: IntGauge::new(
                "qlorad_adapter_host_bytes",
                "Bytes of adapter weights resident",
            )?,
            disk_bytes: IntGauge::new(
                "qlorad_adapter_disk_bytes",
                "Bytes of registered adapters evicted to disk",
            )?,
        };
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
        registry.register(Box::new(adapter_requests.clone()))?;
        registry.register(Box::new(adapters.hits.clone()))?;
        registry.register(Box::new(adapters.misses.clone()))?;
        registry.register(Box::new(adapters.evictions.clone()))?;
        registry.register(Box::new(adapters.resident_bytes.clone()))?;
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
            adapter_requests,
            adapters,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
