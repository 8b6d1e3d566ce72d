//! `qlorad-bench write-adapter`: a random LoRA adapter in the PEFT layout (adapter_config.json +
//! adapter_model.safetensors, f32 as PEFT saves QLoRA adapters) on all 7 projections of a model
//! folder's config, for the hot-load and adapter-decode benchmarks (ours and the Python reference
//! load the same files).

use crate::random_model::lora_modules;
use anyhow::{Context, Result};
use qlorad_model::loader::PROJECTIONS;
use qlorad_model::Config;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct WriteAdapterArgs {
    /// Model folder whose config.json gives the shapes.
    #[arg(long)]
    model: PathBuf,
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 64)]
    rank: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

pub fn run(a: WriteAdapterArgs) -> Result<()> {
    let cfg = Config::from_file(&a.model.join("config.json"))?;
    let modules = lora_modules(&cfg, a.rank, a.seed)?;
    let mut data: BTreeMap<String, (Vec<u8>, Vec<usize>)> = BTreeMap::new();
    for (i, m) in modules.iter().enumerate() {
        let Some(m) = m else { continue };
        let (layer, proj) = (i / 7, PROJECTIONS[i % 7]);
        for (ab, t) in [("lora_A", &m.a), ("lora_B", &m.b)] {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            data.insert(
                format!("base_model.model.model.layers.{layer}.{proj}.{ab}.weight"),
                (bytes, t.dims().to_vec()),
            );
        }
    }
    let views = data
        .iter()
        .map(|(k, (b, s))| Ok((k.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    safetensors::serialize_to_file(views, None, &a.out.join("adapter_model.safetensors"))?;
    let targets: Vec<&str> = PROJECTIONS
        .iter()
        .map(|p| p.rsplit('.').next().unwrap_or(p))
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": a.rank,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": targets,
        "base_model_name_or_path": a.model.display().to_string(),
        "inference_mode": true,
    });
    std::fs::write(
        a.out.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    eprintln!(
        "wrote a rank-{} adapter ({} tensors) to {}",
        a.rank,
        data.len(),
        a.out.display()
    );
    Ok(())
}
