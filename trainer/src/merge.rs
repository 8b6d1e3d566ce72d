//! Promotion: a LoRA adapter merged into its base model and exported as a plain Hugging Face model
//! folder (sharded safetensors + index, config, generation config, tokenizer and chat template) that
//! transformers, vLLM and `qlorad serve` load without peft.
//!
//! Each adapted projection becomes `W' = W + s·B·A` (LoRA, Hu et al. 2021, §4.1), with `s = alpha/r`,
//! or `alpha/sqrt(r)` with rsLoRA, per module and with PEFT's rank/alpha patterns: what peft's
//! `merge_and_unload` computes. `W` is chosen by [`MergeInto`]:
//! - `Original`: the base's full-precision weights. This is the model its authors shipped plus the
//!   learned update; a QLoRA adapter was trained against NF4-rounded weights, so the merged model
//!   differs from the one evaluated during training by the NF4 rounding error. Right when the
//!   adapter was trained on a full-precision base, or when the merged model is evaluated anyway.
//! - `Dequantized`: `dequant(NF4(W))` (blocksize 64, double quantization, as the daemon quantizes on
//!   load, byte-exact with bitsandbytes), or the stored NF4 weights of a bitsandbytes checkpoint: the
//!   weights a QLoRA adapter was trained against, so the export reproduces the served base + adapter
//!   (up to the output dtype's rounding). Right when the behaviour validated during training is what
//!   must ship. It is the only choice when the base exists only in 4-bit.
//!
//! Streaming: tensors are read from the memory-mapped base one at a time, merged in f32, converted
//! and appended to shards whose headers are planned up front (`shards`); each tensor's mapped pages
//! are released after use. Resident memory is about one tensor (the largest is the embedding)
//! whatever the model size. The folder is staged beside the target and renamed into place only once
//! every file is fsynced, with `qlorad-manifest.json` listing every file's sha256.

mod shards;

pub use shards::WrittenFile;

use candle_core::{Device, Tensor};
use qlorad_kernels::{KernelError, Nf4Config, Nf4Tensor};
use qlorad_model::config::Config;
use qlorad_model::io::{torch_dtype_name, StagingDir, AUX_FILES};
use qlorad_model::loader::{projection_shape, PROJECTIONS};
use qlorad_model::weights::WeightStore;
use qlorad_model::{bnb, LoraAdapter, ModelError};
use safetensors::Dtype;
use serde_json::{json, Value};
use shards::{write_file, ShardedWriter, TensorSpec};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Which base weights the adapter is merged into (see the module documentation for when each fits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeInto {
    Original,
    Dequantized,
}

impl MergeInto {
    pub fn as_str(self) -> &'static str {
        match self {
            MergeInto::Original => "original",
            MergeInto::Dequantized => "dequantized",
        }
    }
}

impl std::str::FromStr for MergeInto {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "original" => Ok(MergeInto::Original),
            "dequantized" => Ok(MergeInto::Dequantized),
            o => Err(format!(
                "unknown merge target {o:?} (expected original or dequantized)"
            )),
        }
    }
}

/// dtype of the exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
    BF16,
}

impl ExportDtype {
    pub fn safetensors(self) -> Dtype {
        match self {
            ExportDtype::F32 => Dtype::F32,
            ExportDtype::F16 => Dtype::F16,
            ExportDtype::BF16 => Dtype::BF16,
        }
    }

    /// torch's name (`config.json` `dtype`).
    pub fn torch_name(self) -> &'static str {
        torch_dtype_name(self.safetensors())
    }
}

impl std::str::FromStr for ExportDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "fp32" | "float32" => Ok(ExportDtype::F32),
            "f16" | "fp16" | "float16" => Ok(ExportDtype::F16),
            "bf16" | "bfloat16" => Ok(ExportDtype::BF16),
            o => Err(format!("unknown dtype {o:?} (expected f16, bf16 or f32)")),
        }
    }
}

/// Largest shard written by default: 5 GB, the size the Hugging Face Hub recommends per file.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// What to merge and where to write it.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Base model folder (full precision, or a bitsandbytes 4-bit checkpoint).
    pub model_dir: PathBuf,
    /// PEFT LoRA adapter folder.
    pub adapter_dir: PathBuf,
    /// Folder to create.
    pub out_dir: PathBuf,
    pub dtype: ExportDtype,
    pub merge_into: MergeInto,
    /// How a full-precision base is quantized for [`MergeInto::Dequantized`]: the daemon's setting.
    pub nf4: Nf4Config,
    /// Replace an existing `out_dir`.
    pub overwrite: bool,
    /// Largest shard in bytes of tensor data (a larger tensor gets a shard of its own).
    pub max_shard_bytes: u64,
    /// Set to stop the export between tensors; nothing is left under `out_dir`.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl MergeOptions {
    /// bf16, merged into the original weights, 5 GB shards, no overwrite.
    pub fn new(model_dir: &Path, adapter_dir: &Path, out_dir: &Path) -> Self {
        Self {
            model_dir: model_dir.to_path_buf(),
            adapter_dir: adapter_dir.to_path_buf(),
            out_dir: out_dir.to_path_buf(),
            dtype: ExportDtype::BF16,
            merge_into: MergeInto::Original,
            nf4: Nf4Config::default(),
            overwrite: false,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            cancel: None,
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// Reported after each tensor (and once before the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    /// Bytes of tensor data written.
    pub bytes_written: u64,
    pub bytes_total: u64,
}

/// What an export produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    pub out_dir: PathBuf,
    pub tensors: usize,
    /// Projections the adapter changed.
    pub merged_modules: usize,
    /// Every file of the folder except the manifest itself.
    pub files: Vec<WrittenFile>,
    /// Bytes of tensor data.
    pub total_size: u64,
    /// Tensors of the base that a Llama/Mistral model does not use and were left out (e.g. the
    /// `lm_head.weight` of a model with tied embeddings).
    pub skipped: Vec<String>,
}

/// Why an export failed. Each message names the file or option concerned.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Loading the base or the adapter failed (the message names the file and tensor).
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Writing the export failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The output folder exists and `overwrite` was not given.
    #[error("{0}: output already exists (pass --overwrite to replace it)")]
    Exists(PathBuf),
    /// `MergeInto::Original` on a base stored only in 4-bit.
    #[error("{0}: the base projections are stored in 4-bit NF4 (bitsandbytes), so the original full-precision weights are not available: merge into the dequantized weights (--merge-into dequantized) or use the full-precision model folder")]
    OriginalUnavailable(PathBuf),
    /// A value does not fit the output dtype, or the input is unusable for another reason.
    #[error("{0}")]
    Invalid(String),
    /// The cancel flag was set.
    #[error("export cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, MergeError>;

/// How an output tensor is produced.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Converted from the base as stored (embedding, norms, LM head).
    Plain,
    /// A projection, merged with the adapter's module if it has one.
    Projection {
        layer: usize,
        proj: usize,
        nf4: bool,
    },
}

struct Item {
    spec: TensorSpec,
    kind: Kind,
}

/// The output tensors in transformers' module order, checked against the stored shapes.
fn plan(cfg: &Config, store: &WeightStore, dtype: Dtype) -> Result<(Vec<Item>, Vec<String>)> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut items = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, kind: Kind| {
        items.push(Item {
            spec: TensorSpec { name, dtype, shape },
            kind,
        })
    };
    push("model.embed_tokens.weight".into(), vec![v, h], Kind::Plain);
    for layer in 0..cfg.num_layers {
        let p = format!("model.layers.{layer}");
        push(format!("{p}.input_layernorm.weight"), vec![h], Kind::Plain);
        for (proj, pname) in PROJECTIONS.iter().enumerate() {
            if proj == 4 {
                // transformers' order: self_attn, post_attention_layernorm, mlp
                push(
                    format!("{p}.post_attention_layernorm.weight"),
                    vec![h],
                    Kind::Plain,
                );
            }
            let name = format!("{p}.{pname}.weight");
            let nf4 = bnb::is_bnb_4bit(store, &name);
            let (o, i) = projection_shape(cfg, pname);
            push(name, vec![o, i], Kind::Projection { layer, proj, nf4 });
        }
    }
    push("model.norm.weight".into(), vec![h], Kind::Plain);
    if !cfg.tie_word_embeddings {
        push("lm_head.weight".into(), vec![v, h], Kind::Plain);
    }
    for it in &items {
        if matches!(it.kind, Kind::Projection { nf4: true, .. }) {
            continue; // its shape is in the quant state, checked when read
        }
        let raw = store.raw(&it.spec.name)?;
        let float = matches!(
            raw.dtype,
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        );
        if raw.shape != it.spec.shape || !float {
            return Err(ModelError::BadTensor {
                path: raw.path.to_path_buf(),
                name: it.spec.name.clone(),
                msg: format!(
                    "{:?} {:?}, expected a float tensor of shape {:?}",
                    raw.dtype, raw.shape, it.spec.shape
                ),
            }
            .into());
        }
    }
    let used = |n: &str| {
        items.iter().any(|it| {
            it.spec.name == n
                || (matches!(it.kind, Kind::Projection { nf4: true, .. })
                    && n.starts_with(&format!("{}.", it.spec.name)))
        })
    };
    let skipped = store
        .names()
        .into_iter()
        .filter(|n| !used(n))
        .map(String::from)
        .collect();
    Ok((items, skipped))
}

/// Refuses an existing output (unless overwriting) and an output that is, or contains, an input.
fn check_output(opts: &MergeOptions) -> Result<()> {
    let out = &opts.out_dir;
    if !out.exists() {
        return Ok(());
    }
    if !opts.overwrite {
        return Err(MergeError::Exists(out.clone()));
    }
    let o = out.canonicalize().map_err(|e| MergeError::Io {
        path: out.clone(),
        source: e,
    })?;
    for src in [&opts.model_dir, &opts.adapter_dir] {
        if src.canonicalize().is_ok_and(|s| s.starts_with(&o)) {
            return Err(MergeError::Invalid(format!(
                "{}: the output folder holds the input {}; choose another output",
                out.display(),
                src.display()
            )));
        }
    }
    Ok(())
}

/// Merges `opts.adapter_dir` into `opts.model_dir` and writes `opts.out_dir`, calling `progress`
/// before the first tensor and after each one. Blocking; meant for a worker thread. On any error
/// or cancellation nothing exists under `out_dir` (an existing folder is kept).
pub fn merge_and_export(
    opts: &MergeOptions,
    mut progress: impl FnMut(&Progress),
) -> Result<MergeReport> {
    for (dir, what) in [(&opts.model_dir, "model"), (&opts.adapter_dir, "adapter")] {
        if !dir.is_dir() {
            return Err(MergeError::Invalid(format!(
                "{}: {what} folder not found",
                dir.display()
            )));
        }
    }
    check_output(opts)?;
    let cfg = Config::from_file(&opts.model_dir.join("config.json"))?;
    let store = WeightStore::open(&opts.model_dir)?;
    let (items, skipped) = plan(&cfg, &store, opts.dtype.safetensors())?;
    let stored_nf4 = items
        .iter()
        .any(|it| matches!(it.kind, Kind::Projection { nf4: true, .. }));
    if stored_nf4 && opts.merge_into == MergeInto::Original {
        return Err(MergeError::OriginalUnavailable(opts.model_dir.clone()));
    }
    let adapter = LoraAdapter::load(&opts.adapter_dir, "adapter", &cfg)?;
    let staging = StagingDir::new(&opts.out_dir, opts.overwrite)?;
    let specs: Vec<TensorSpec> = items.iter().map(|it| it.spec.clone()).collect();
    let bytes_total = specs.iter().map(TensorSpec::nbytes).sum();
    let mut writer = ShardedWriter::new(staging.path(), specs, opts.max_shard_bytes);
    let mut p = Progress {
        tensors_done: 0,
        tensors_total: items.len(),
        bytes_written: 0,
        bytes_total,
    };
    progress(&p);
    let mut merged_modules = 0;
    for it in &items {
        if opts.cancelled() {
            return Err(MergeError::Cancelled);
        }
        match it.kind {
            Kind::Plain => write_plain(&store, &it.spec, &mut writer)?,
            Kind::Projection { layer, proj, nf4 } => {
                let mut w = base_projection(&store, &it.spec, nf4, opts)?;
                if adapter.module(layer, proj).is_some() {
                    merged_modules += 1;
                    let (o, i) = (it.spec.shape[0], it.spec.shape[1]);
                    let t = Tensor::from_vec(w, (o, i), &Device::Cpu)?; // (out, in)
                    let merged = adapter.merge_into(layer, proj, &t)?; // W + s·B·A, f32
                    w = merged.flatten_all()?.to_vec1::<f32>()?;
                }
                writer.write_tensor(&it.spec.name, &encode(&it.spec, &w)?)?;
            }
        }
        release(
            &store,
            &it.spec.name,
            matches!(it.kind, Kind::Projection { nf4: true, .. }),
        );
        p.tensors_done += 1;
        p.bytes_written = writer.bytes_written();
        progress(&p);
    }
    let mut files = writer.finish()?;
    files.extend(write_metadata(opts, &cfg, staging.path())?);
    let manifest = manifest(opts, stored_nf4, merged_modules, &files)?;
    write_file(staging.path(), "qlorad-manifest.json", &manifest)?;
    if opts.cancelled() {
        return Err(MergeError::Cancelled);
    }
    staging.commit()?;
    Ok(MergeReport {
        out_dir: opts.out_dir.clone(),
        tensors: items.len(),
        merged_modules,
        files,
        total_size: bytes_total,
        skipped,
    })
}

/// Drops the mapped pages of a tensor (and of its bitsandbytes quant-state tensors).
fn release(store: &WeightStore, name: &str, nf4: bool) {
    store.release(name);
    if nf4 {
        for suffix in ["absmax", "nested_absmax", "quant_map", "nested_quant_map"] {
            store.release(&format!("{name}.{suffix}"));
        }
    }
}

/// The base weight to merge into, as row-major f32 (out, in).
fn base_projection(
    store: &WeightStore,
    spec: &TensorSpec,
    stored_nf4: bool,
    opts: &MergeOptions,
) -> Result<Vec<f32>> {
    if stored_nf4 {
        let t = bnb::read_nf4(store, &spec.name)?;
        if t.shape != spec.shape {
            return Err(ModelError::BadTensor {
                path: store.dir().to_path_buf(),
                name: spec.name.clone(),
                msg: format!("quantized shape {:?}, expected {:?}", t.shape, spec.shape),
            }
            .into());
        }
        return Ok(t.dequantize());
    }
    let raw = store.raw(&spec.name)?;
    let w = raw.to_f32_vec().map_err(|msg| ModelError::BadTensor {
        path: raw.path.to_path_buf(),
        name: spec.name.clone(),
        msg,
    })?;
    Ok(match opts.merge_into {
        MergeInto::Original => w,
        // The same f32 → NF4 path as `Quant::Nf4` on load, so the weights equal the served ones.
        MergeInto::Dequantized => Nf4Tensor::quantize(&w, &spec.shape, opts.nf4)?.dequantize(),
    })
}

/// Elements converted per step when copying a tensor, so a large embedding is never held whole.
const CHUNK_ELEMS: usize = 1 << 20;

/// Copies a non-adapted tensor, converting its dtype chunk by chunk (bytes as stored when equal).
fn write_plain(store: &WeightStore, spec: &TensorSpec, writer: &mut ShardedWriter) -> Result<()> {
    let raw = store.raw(&spec.name)?;
    writer.start_tensor(&spec.name)?;
    let width = raw.dtype.bitsize() / 8;
    for chunk in raw.data.chunks(CHUNK_ELEMS * width) {
        if raw.dtype == spec.dtype {
            writer.write(chunk)?;
            continue;
        }
        let part = qlorad_model::weights::RawTensor {
            dtype: raw.dtype,
            shape: vec![chunk.len() / width],
            data: chunk,
            path: raw.path,
        };
        let v = part.to_f32_vec().map_err(|msg| ModelError::BadTensor {
            path: raw.path.to_path_buf(),
            name: spec.name.clone(),
            msg,
        })?;
        writer.write(&encode(spec, &v)?)?;
    }
    writer.finish_tensor()
}

/// f32 values as little-endian `spec.dtype` bytes (round to nearest even). Refuses values the dtype
/// cannot hold rather than writing infinities: a merged weight beyond f16's ±65504 needs bf16/f32.
fn encode(spec: &TensorSpec, v: &[f32]) -> Result<Vec<u8>> {
    if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
        return Err(MergeError::Invalid(format!(
            "tensor {}: non-finite value {bad} (a corrupt base or adapter?)",
            spec.name
        )));
    }
    Ok(match spec.dtype {
        Dtype::F16 => {
            let mut out = Vec::with_capacity(v.len() * 2);
            for &x in v {
                let h = half::f16::from_f32(x);
                if h.is_infinite() {
                    return Err(MergeError::Invalid(format!(
                        "tensor {}: value {x} overflows float16 (max 65504); export as bf16 or f32",
                        spec.name
                    )));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
            out
        }
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        ModelError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
        .into()
    })
}

fn pretty(v: &Value) -> Result<Vec<u8>> {
    let text = serde_json::to_string_pretty(v).map_err(|e| MergeError::Invalid(e.to_string()))?;
    Ok((text + "\n").into_bytes())
}

/// config.json (the base's, with the export dtype and without `quantization_config`), a generation
/// config, and the tokenizer / chat-template files the base has.
fn write_metadata(opts: &MergeOptions, cfg: &Config, dir: &Path) -> Result<Vec<WrittenFile>> {
    let src = &opts.model_dir;
    let mut config = read_json(&src.join("config.json"))?;
    let Some(obj) = config.as_object_mut() else {
        return Err(MergeError::Invalid(format!(
            "{}: not a JSON object",
            src.join("config.json").display()
        )));
    };
    obj.remove("quantization_config");
    // transformers ≥ 5 reads `dtype`; older readers (and vLLM on older transformers) `torch_dtype`.
    obj.insert("dtype".into(), opts.dtype.torch_name().into());
    if obj.contains_key("torch_dtype") {
        obj.insert("torch_dtype".into(), opts.dtype.torch_name().into());
    }
    let ids: Vec<(&str, Value)> = ["bos_token_id", "eos_token_id", "pad_token_id"]
        .into_iter()
        .filter_map(|k| obj.get(k).filter(|v| !v.is_null()).map(|v| (k, v.clone())))
        .collect();
    let mut files = vec![write_file(dir, "config.json", &pretty(&config)?)?];
    if !src.join("generation_config.json").exists() {
        // What transformers derives from the model config when a folder has none.
        let mut g = json!({"_from_model_config": true});
        for (key, v) in ids {
            g[key] = v;
        }
        if g.get("eos_token_id").is_none() && !cfg.eos_token_ids.is_empty() {
            g["eos_token_id"] = json!(cfg.eos_token_ids);
        }
        files.push(write_file(dir, "generation_config.json", &pretty(&g)?)?);
    }
    for name in AUX_FILES {
        let path = src.join(name);
        if path.exists() {
            let data = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
            files.push(write_file(dir, name, &data)?);
        }
    }
    Ok(files)
}

/// The absolute path (as given if it cannot be resolved), so the manifest names its sources
/// wherever it is read.
fn absolute(p: &Path) -> String {
    p.canonicalize()
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// sha256 of a file, streamed.
fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| ModelError::io(path, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `qlorad-manifest.json`: provenance (base, adapter and its hashes, merge settings) and the sha256
/// of every other file of the folder.
fn manifest(
    opts: &MergeOptions,
    stored_nf4: bool,
    merged_modules: usize,
    files: &[WrittenFile],
) -> Result<Vec<u8>> {
    let mut adapter_files = serde_json::Map::new();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let path = opts.adapter_dir.join(name);
        if path.exists() {
            adapter_files.insert(name.into(), sha256_file(&path)?.into());
        }
    }
    let nf4 = match (opts.merge_into, stored_nf4) {
        (MergeInto::Original, _) => Value::Null,
        (MergeInto::Dequantized, true) => json!("as stored (bitsandbytes 4-bit checkpoint)"),
        (MergeInto::Dequantized, false) => {
            json!({"blocksize": opts.nf4.blocksize, "double_quant": opts.nf4.double_quant})
        }
    };
    pretty(&json!({
        "format": "qlorad-export",
        "version": 1,
        "qlorad_version": env!("CARGO_PKG_VERSION"),
        "base_model": absolute(&opts.model_dir),
        "adapter": absolute(&opts.adapter_dir),
        "adapter_sha256": adapter_files,
        "merge_into": opts.merge_into.as_str(),
        "nf4": nf4,
        "dtype": opts.dtype.torch_name(),
        "merged_modules": merged_modules,
        "files": files,
    }))
}

/// Parses a size such as `5GB`, `500MB`, `2GiB` or `1048576` (bytes), as transformers'
/// `max_shard_size` (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (e.g. 5GB, 500MB, 2GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "invalid size unit in {s:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = (n * mult).round();
    if bytes < 1.0 {
        return Err(format!("size {s:?} must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5 KB"), Ok(1500));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn options_parse() {
        assert_eq!("bf16".parse(), Ok(ExportDtype::BF16));
        assert_eq!("float16".parse(), Ok(ExportDtype::F16));
        assert!("int8".parse::<ExportDtype>().is_err());
        assert_eq!("dequantized".parse(), Ok(MergeInto::Dequantized));
        assert!("nf4".parse::<MergeInto>().is_err());
        assert_eq!(ExportDtype::BF16.torch_name(), "bfloat16");
    }

    #[test]
    fn encode_rounds_to_nearest_and_refuses_f16_overflow() {
        let spec = |dtype| TensorSpec {
            name: "w".into(),
            dtype,
            shape: vec![2],
        };
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        let b = encode(&spec(Dtype::BF16), &[1.0 + 1.0 / 256.0, -2.0]).unwrap();
        assert_eq!(b, [0x80, 0x3f, 0x00, 0xc0]);
        let e = encode(&spec(Dtype::F16), &[1.0, 70000.0]).unwrap_err();
        assert!(e.to_string().contains("overflows float16"), "{e}");
        assert!(encode(&spec(Dtype::BF16), &[f32::NAN, 0.0]).is_err());
        assert_eq!(encode(&spec(Dtype::F32), &[1.5, 0.0]).unwrap().len(), 8);
    }
}
