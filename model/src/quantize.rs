//! `qlorad quantize`: writes a model folder in the bitsandbytes 4-bit layout that transformers'
//! `save_pretrained` produces for `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`,
//! so transformers + bitsandbytes load our output (and we load theirs, see [`crate::bnb`]).
//! Only the decoder projections are quantized; embeddings, norms and the LM head stay as stored, as
//! transformers does (`lm_head` is in bitsandbytes' default skip list).

use crate::bnb::nf4_to_tensors;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::io::{copy_aux_files, write_json, write_safetensors, OwnedTensor, StagingDir};
use crate::loader::PROJECTIONS;
use crate::weights::WeightStore;
use qlorad_kernels::{Nf4Config, Nf4Tensor};
use serde_json::json;
use std::path::Path;

fn is_projection(name: &str) -> bool {
    name.starts_with("model.layers.")
        && PROJECTIONS
            .iter()
            .any(|p| name.ends_with(&format!(".{p}.weight")))
}

fn torch_name(d: safetensors::Dtype) -> &'static str {
    crate::io::torch_dtype_name(d)
}

/// Quantizes the projections of the model in `src` and writes the bnb-layout folder `out`.
pub fn quantize_model(src: &Path, out: &Path, cfg: Nf4Config, overwrite: bool) -> Result<()> {
    let config = Config::from_file(&src.join("config.json"))?;
    if config.raw.quantization_config.is_some() {
        return Err(ModelError::Config {
            path: src.join("config.json"),
            msg: "the model is already quantized (quantization_config present)".into(),
        });
    }
    let store = WeightStore::open(src)?;
    let staging = StagingDir::new(out, overwrite)?;
    let mut tensors: Vec<OwnedTensor> = Vec::new();
    let mut compute = "float32";
    for name in store.names() {
        let raw = store.raw(name)?;
        if is_projection(name) {
            let values = raw.to_f32_vec().map_err(|msg| ModelError::BadTensor {
                path: raw.path.to_path_buf(),
                name: name.to_string(),
                msg,
            })?;
            let t = Nf4Tensor::quantize(&values, &raw.shape, cfg)?;
            compute = torch_name(raw.dtype);
            tensors.extend(nf4_to_tensors(name, &t, torch_name(raw.dtype)));
        } else {
            tensors.push(OwnedTensor {
                name: name.to_string(),
                dtype: raw.dtype,
                shape: raw.shape.clone(),
                data: raw.data.to_vec(),
            });
        }
    }
    write_safetensors(&staging.path().join("model.safetensors"), &tensors)?;
    let mut raw_cfg =
        serde_json::to_value(&config.raw).map_err(|e| ModelError::Invalid(e.to_string()))?;
    raw_cfg["quantization_config"] = json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": cfg.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    });
    write_json(&staging.path().join("config.json"), &raw_cfg)?;
    copy_aux_files(src, staging.path())?;
    staging.commit()
}
