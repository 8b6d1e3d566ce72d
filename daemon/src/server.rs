//! `qlorad serve`: loads the base model on each device of `--device` (one copy and one engine
//! thread per device, [`crate::shards`]), starts the HTTP server, and shuts down gracefully on
//! SIGINT/SIGTERM (in-flight requests drain, bounded by a deadline).

use crate::adapters::AdapterRegistry;
use crate::api::{self, AppState};
use crate::auth::ApiKeys;
use crate::engine::{EngineConfig, EngineHandle};
use crate::exports::ExportRunner;
use crate::metrics::Metrics;
use crate::runner::{JobRunner, RunnerConfig};
use crate::shards::{Shard, Shards};
use crate::state::Store;
use anyhow::{bail, Context, Result};
use qlorad_model::{DeviceSpec, Llama, Placement, Quant, Tokenizer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A TOML file of serve settings (keys: the long option names); flags and QLORAD_* win over it.
    #[arg(long, env = "QLORAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model folder (config.json, safetensors, tokenizer.json).
    #[arg(long, env = "QLORAD_MODEL")]
    pub model: PathBuf,
    /// Address to listen on. Without API keys only loopback addresses are allowed.
    #[arg(long, env = "QLORAD_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// The id clients use in `model` (default: the model folder's name).
    #[arg(long, env = "QLORAD_MODEL_ID")]
    pub model_id: Option<String>,
    /// Base weight storage: nf4 (quantize on load) or none.
    #[arg(long, env = "QLORAD_QUANT", default_value = "nf4")]
    pub quant: Quant,
    /// Where the model computes: cpu (f32) or cuda:N (bf16; needs a build with the cuda feature).
    /// Several, comma-separated (cuda:0,cuda:1), serve from each: one copy of the base, KV caches
    /// and engine per device behind one API, one adapter registry and one state store; each
    /// request goes to the least loaded device, preferring one that holds its adapter.
    /// Fine-tuning jobs train on the first device.
    #[arg(
        long,
        env = "QLORAD_DEVICE",
        default_value = "cpu",
        value_delimiter = ','
    )]
    pub device: Vec<DeviceSpec>,
    /// Tokens per forward pass (prefill + decode).
    #[arg(long, env = "QLORAD_MAX_BATCH_TOKENS", default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// Sequences decoded together (per device).
    #[arg(long, env = "QLORAD_MAX_RUNNING", default_value_t = 32)]
    pub max_running: usize,
    /// Requests accepted at once by each device's engine (running + waiting); beyond it clients
    /// get 429.
    #[arg(long, env = "QLORAD_MAX_INFLIGHT", default_value_t = 128)]
    pub max_inflight: usize,
    /// Largest request body accepted (413 beyond).
    #[arg(long, env = "QLORAD_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// API keys as KEY or KEY:SCOPES (SCOPES: inference, admin, inference+admin); comma-separated in
    /// the environment variable. With keys the daemon may listen on any address.
    #[arg(
        long = "api-key",
        env = "QLORAD_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// A file of API keys, one KEY[:SCOPES] per line (# comments).
    #[arg(long, env = "QLORAD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Folder that runtime-loaded adapters must live under (`POST /v1/adapters`).
    #[arg(long, env = "QLORAD_ADAPTER_ROOT")]
    pub adapter_root: Option<PathBuf>,
    /// Bytes of adapter weights kept resident on each device; beyond it the least recently used
    /// unpinned adapters are evicted and reloaded on their next request (0: no limit).
    #[arg(long, env = "QLORAD_MAX_ADAPTER_BYTES", default_value_t = 0)]
    pub max_adapter_bytes: usize,
    /// On a GPU: bytes of host-memory copies kept of adapters evicted from a GPU (or not yet on
    /// every GPU), so that their next request there is an upload rather than a disk read (0: no
    /// limit).
    #[arg(long, env = "QLORAD_MAX_HOST_ADAPTER_BYTES", default_value_t = 8 << 30)]
    pub max_host_adapter_bytes: usize,
    /// Adapters to load at start, as NAME=DIR (repeatable).
    #[arg(long = "lora", env = "QLORAD_LORA", value_delimiter = ',', value_parser = parse_lora)]
    pub loras: Vec<(String, PathBuf)>,
    /// Folder of the durable state (SQLite database, uploaded files, job checkpoints and outputs).
    /// Without it the files and fine-tuning routes are disabled.
    #[arg(long, env = "QLORAD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where promoted (merged) models are written (default: STATE_DIR/exports).
    #[arg(long, env = "QLORAD_EXPORT_ROOT")]
    pub export_root: Option<PathBuf>,
    /// Largest file accepted by `POST /v1/files`.
    #[arg(long, env = "QLORAD_MAX_UPLOAD_BYTES", default_value_t = 512 << 20)]
    pub max_upload_bytes: usize,
    /// Steps between checkpoints of fine-tuning jobs (a job may override it).
    #[arg(long, env = "QLORAD_CHECKPOINT_INTERVAL", default_value_t = 25)]
    pub checkpoint_interval: usize,
    /// Fraction of wall time a fine-tuning job may take while requests are being served (0.01–1;
    /// 1: training never yields).
    #[arg(long, env = "QLORAD_TRAIN_SHARE", default_value_t = 0.5)]
    pub train_share: f64,
    /// Seconds in-flight requests get to finish after a shutdown signal.
    #[arg(long, env = "QLORAD_SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// Seconds a client has to send a request's headers, counted from the connection opening or
    /// the previous response (also closes idle keep-alive connections); 0: no limit.
    #[arg(long, env = "QLORAD_HEADER_READ_TIMEOUT_S", default_value_t = 30.0)]
    pub header_read_timeout_s: f64,
    /// Seconds allowed between two chunks of a request body (408 beyond); 0: no limit.
    #[arg(long, env = "QLORAD_BODY_READ_TIMEOUT_S", default_value_t = 60.0)]
    pub body_read_timeout_s: f64,
    /// Seconds a response write may make no progress (a client that stopped reading) before the
    /// connection is closed and its generation cancelled; 0: no limit.
    #[arg(long, env = "QLORAD_WRITE_TIMEOUT_S", default_value_t = 60.0)]
    pub write_timeout_s: f64,
}

fn parse_lora(s: &str) -> std::result::Result<(String, PathBuf), String> {
    let (name, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=DIR, got {s:?}"))?;
    Ok((name.to_string(), PathBuf::from(dir)))
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let file_keys = match &a.api_keys_file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => String::new(),
    };
    let keys = ApiKeys::parse(
        a.api_keys
            .iter()
            .map(String::as_str)
            .chain(file_keys.lines()),
    )
    .map_err(anyhow::Error::msg)
    .context("API keys")?;
    if keys.is_empty() && !a.listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {} without API keys: only loopback addresses are allowed until keys are configured",
            a.listen
        );
    }
    let loaded = load_shards(&a)?;
    let model = loaded
        .models
        .first()
        .cloned()
        .context("no serving device")?;
    let tok = loaded.tok;
    let model_id = a.model_id.clone().unwrap_or_else(|| {
        a.model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into())
    });
    let metrics = Arc::new(Metrics::new().context("creating metrics")?);
    let budget = if a.max_adapter_bytes == 0 {
        usize::MAX
    } else {
        a.max_adapter_bytes
    };
    let adapters = Arc::new(
        AdapterRegistry::new(
            a.adapter_root.clone(),
            &model_id,
            model.config().clone(),
            budget,
            Some(metrics.adapters.clone()),
        )
        .with_devices(
            loaded
                .names
                .iter()
                .cloned()
                .zip(loaded.placements.clone())
                .collect(),
        )
        .with_host_budget(if a.max_host_adapter_bytes == 0 {
            usize::MAX
        } else {
            a.max_host_adapter_bytes
        }),
    );
    for (name, dir) in &a.loras {
        adapters
            .load(name, dir)
            .with_context(|| format!("loading adapter {name} from {}", dir.display()))?;
    }
    let weights: usize = loaded.models.iter().map(|m| m.weight_bytes()).sum();
    metrics.model_weight_bytes.set(weights as i64);
    metrics.watch_devices(loaded.placements);
    let context_len = model.config().max_position_embeddings;
    if !(0.01..=1.0).contains(&a.train_share) {
        bail!("--train-share must be between 0.01 and 1");
    }
    let shards = start_engines(&a, &loaded.models, &loaded.names, &tok, &metrics);
    // Jobs train on shard 0's model and yield to its engine only.
    let engine = shards
        .get(0)
        .map(|s| s.engine.clone())
        .context("no serving device")?;
    let (runner, exports) = match &a.state_dir {
        None => (None, None),
        Some(dir) => {
            let store = Arc::new(
                Store::open(dir).with_context(|| format!("opening state in {}", dir.display()))?,
            );
            let nf4 = match a.quant {
                Quant::Nf4(c) => c,
                Quant::None => Default::default(),
            };
            let root = a.export_root.clone().unwrap_or_else(|| dir.join("exports"));
            let exports = ExportRunner::start(
                store.clone(),
                adapters.clone(),
                &a.model,
                nf4,
                &root,
                &metrics,
            )
            .context("starting the export runner")?;
            let jobs = JobRunner::start(
                store,
                model.clone(),
                tok.clone(),
                adapters.clone(),
                metrics.clone(),
                engine,
                RunnerConfig {
                    base_id: model_id.clone(),
                    checkpoint_interval: a.checkpoint_interval.max(1),
                    train_share: a.train_share,
                },
            )
            .context("starting the job runner")?;
            // Adapters loaded or pinned through the API before a restart come back (after the
            // job outputs, which the runner has just registered).
            let records = jobs
                .store()
                .recorded_adapters()
                .context("reading adapters")?;
            for problem in adapters.restore(&records) {
                tracing::warn!("not restored: {problem}");
                eprintln!("qlorad: warning: not restored: {problem}");
            }
            (Some(jobs), Some(exports))
        }
    };
    let state = AppState {
        shards,
        adapters,
        keys: Arc::new(keys),
        tok,
        model_id: model_id.clone().into(),
        context_len,
        metrics,
        created: api::unix_now(),
        max_body_bytes: a.max_body_bytes,
        ids: Arc::new(AtomicU64::new(0)),
        runner,
        exports,
        max_upload_bytes: a.max_upload_bytes,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let timeouts = crate::http::Timeouts::from_secs(
        a.header_read_timeout_s,
        a.body_read_timeout_s,
        a.write_timeout_s,
    );
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        eprintln!("qlorad: serving {model_id} on http://{}", listener.local_addr()?);
        let grace = Duration::from_secs(a.shutdown_grace_s);
        let (sig_tx, sig_rx) = tokio::sync::oneshot::channel::<()>();
        let router = crate::http::with_request_timeouts(api::router(state), &timeouts);
        let server = crate::http::serve(listener, router, timeouts, async move {
            shutdown_signal().await;
            eprintln!("qlorad: shutting down, draining in-flight requests (up to {}s)", grace.as_secs());
            let _ = sig_tx.send(());
        });
        let server = tokio::spawn(server);
        let deadline = async move {
            if sig_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = server => { r.context("server task")?; }
            _ = deadline => { eprintln!("qlorad: shutdown deadline reached, closing remaining connections"); }
        }
        Ok(())
    })
}

/// The base loaded on each serving device, in `--device` order.
struct Loaded {
    models: Vec<Arc<Llama>>,
    placements: Vec<Placement>,
    names: Vec<String>,
    tok: Arc<Tokenizer>,
}

/// One engine thread per loaded copy of the base, in device order.
fn start_engines(
    a: &ServeArgs,
    models: &[Arc<Llama>],
    names: &[String],
    tok: &Arc<Tokenizer>,
    metrics: &Arc<Metrics>,
) -> Shards {
    let cfg = EngineConfig {
        max_batch_tokens: a.max_batch_tokens,
        max_running: a.max_running,
        max_inflight: a.max_inflight,
    };
    let shards = models
        .iter()
        .zip(names)
        .enumerate()
        .map(|(i, (m, name))| {
            let engine = EngineHandle::start(m.clone(), tok.clone(), cfg.clone(), metrics.clone());
            Shard::new(i, engine, name, metrics)
        })
        .collect();
    // Routing's penalty: one batch.
    Shards::new(shards, a.max_running.max(1))
}

/// Opens every device first (a bad one fails before minutes of loading), then loads one copy of
/// the base on each, one after the other.
fn load_shards(a: &ServeArgs) -> Result<Loaded> {
    if a.device.is_empty() {
        bail!("--device names no device");
    }
    let placements = a
        .device
        .iter()
        .map(|d| Placement::open(*d))
        .collect::<qlorad_model::Result<Vec<_>>>()?;
    let names = crate::shards::names(&a.device);
    let mut models = Vec::with_capacity(placements.len());
    let mut tok = None;
    for (p, name) in placements.iter().zip(&names) {
        let (model, t) = qlorad_model::load_model_on(&a.model, a.quant, p)
            .with_context(|| format!("loading model from {}", a.model.display()))?;
        if placements.len() > 1 {
            eprintln!("qlorad: loaded the base on {name}");
        }
        models.push(Arc::new(model));
        // Every copy reads the same tokenizer; the first is kept.
        tok.get_or_insert(t);
    }
    Ok(Loaded {
        models,
        placements,
        names,
        tok: Arc::new(tok.context("no serving device")?),
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
