//! The bitsandbytes 4-bit checkpoint layout that transformers writes with `save_pretrained` for a
//! model loaded with `BitsAndBytesConfig(load_in_4bit=True)`, read and written.
//!
//! For a quantized `X.weight` (bitsandbytes `QuantState.as_dict(packed=True)`):
//! - `X.weight`: uint8 `(ceil(numel/2), 1)`, packed codes, high nibble first;
//! - `X.weight.absmax`: f32 per block, or uint8 codes when double-quantized;
//! - `X.weight.quant_map`: f32 `(16,)`, the NF4 code;
//! - `X.weight.nested_absmax`, `X.weight.nested_quant_map` (f32 `(256,)`): double-quant state;
//! - `X.weight.quant_state.bitsandbytes__nf4`: uint8 bytes of a JSON object with `quant_type`,
//!   `blocksize`, `dtype`, `shape` and, when nested, `nested_blocksize`, `nested_dtype`,
//!   `nested_offset` (bitsandbytes' `pack_dict_to_tensor`).

use crate::error::{ModelError, Result};
use crate::io::OwnedTensor;
use crate::weights::WeightStore;
use qlorad_kernels::{Absmax, DoubleQuant, Nf4Tensor};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

const QS_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

/// The JSON packed into the `quant_state.bitsandbytes__nf4` tensor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PackedQuantState {
    pub quant_type: String,
    pub blocksize: usize,
    pub dtype: String,
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_offset: Option<f32>,
}

/// Whether `name` (e.g. `model.layers.0.self_attn.q_proj.weight`) is stored in bnb NF4 layout.
pub fn is_bnb_4bit(store: &WeightStore, name: &str) -> bool {
    store.contains(&format!("{name}{QS_SUFFIX}"))
}

fn bad(store: &WeightStore, name: &str, msg: impl Into<String>) -> ModelError {
    ModelError::BadTensor {
        path: store.dir().to_path_buf(),
        name: name.to_string(),
        msg: msg.into(),
    }
}

fn f32_vec(store: &WeightStore, name: &str) -> Result<Vec<f32>> {
    let raw = store.raw(name)?;
    raw.to_f32_vec().map_err(|m| bad(store, name, m))
}

fn u8_vec(store: &WeightStore, name: &str) -> Result<Vec<u8>> {
    let raw = store.raw(name)?;
    if raw.dtype != Dtype::U8 {
        return Err(bad(
            store,
            name,
            format!("dtype {:?}, expected U8", raw.dtype),
        ));
    }
    Ok(raw.data.to_vec())
}

/// Reads the quantized tensor `name` written in bnb's layout.
pub fn read_nf4(store: &WeightStore, name: &str) -> Result<Nf4Tensor> {
    let qs_name = format!("{name}{QS_SUFFIX}");
    let qs_bytes = u8_vec(store, &qs_name)?;
    let qs: PackedQuantState = serde_json::from_slice(&qs_bytes)
        .map_err(|e| bad(store, &qs_name, format!("bad quant state JSON: {e}")))?;
    if qs.quant_type != "nf4" {
        return Err(bad(
            store,
            name,
            format!("quant_type {:?} is not supported (only nf4)", qs.quant_type),
        ));
    }
    let numel: usize = qs.shape.iter().product();
    let packed = u8_vec(store, name)?;
    if packed.len() != numel.div_ceil(2) {
        return Err(bad(
            store,
            name,
            format!("{} packed bytes for shape {:?}", packed.len(), qs.shape),
        ));
    }
    let nblocks = numel.div_ceil(qs.blocksize.max(1));
    let code_v = f32_vec(store, &format!("{name}.quant_map"))?;
    let code: [f32; 16] = code_v
        .as_slice()
        .try_into()
        .map_err(|_| bad(store, name, "quant_map must have 16 entries"))?;
    let absmax_name = format!("{name}.absmax");
    let absmax = match qs.nested_offset {
        Some(offset) => {
            let quantized = u8_vec(store, &absmax_name)?;
            let nested_absmax = f32_vec(store, &format!("{name}.nested_absmax"))?;
            let nc = f32_vec(store, &format!("{name}.nested_quant_map"))?;
            let nested_code: [f32; 256] = nc
                .as_slice()
                .try_into()
                .map_err(|_| bad(store, name, "nested_quant_map must have 256 entries"))?;
            let nb = qs.nested_blocksize.unwrap_or(256);
            if nb != qlorad_kernels::nf4::NESTED_BLOCKSIZE {
                return Err(bad(
                    store,
                    name,
                    format!("nested_blocksize {nb} is not supported (256)"),
                ));
            }
            if quantized.len() != nblocks || nested_absmax.len() != nblocks.div_ceil(nb) {
                return Err(bad(
                    store,
                    name,
                    "absmax sizes do not match the block count",
                ));
            }
            Absmax::Double(DoubleQuant {
                quantized,
                nested_absmax,
                offset,
                nested_code: Box::new(nested_code),
            })
        }
        None => {
            let a = f32_vec(store, &absmax_name)?;
            if a.len() != nblocks {
                return Err(bad(
                    store,
                    name,
                    "absmax size does not match the block count",
                ));
            }
            Absmax::Plain(a)
        }
    };
    Ok(Nf4Tensor {
        shape: qs.shape,
        blocksize: qs.blocksize,
        packed,
        absmax,
        code,
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors bitsandbytes stores for `name` (`dtype` is the original weight dtype's torch name).
pub fn nf4_to_tensors(name: &str, t: &Nf4Tensor, dtype: &str) -> Vec<OwnedTensor> {
    let mut qs = PackedQuantState {
        quant_type: "nf4".into(),
        blocksize: t.blocksize,
        dtype: dtype.into(),
        shape: t.shape.clone(),
        nested_blocksize: None,
        nested_dtype: None,
        nested_offset: None,
    };
    let mut out = vec![OwnedTensor {
        name: name.into(),
        dtype: Dtype::U8,
        shape: vec![t.packed.len(), 1],
        data: t.packed.clone(),
    }];
    match &t.absmax {
        Absmax::Plain(a) => out.push(OwnedTensor {
            name: format!("{name}.absmax"),
            dtype: Dtype::F32,
            shape: vec![a.len()],
            data: f32_bytes(a),
        }),
        Absmax::Double(d) => {
            out.push(OwnedTensor {
                name: format!("{name}.absmax"),
                dtype: Dtype::U8,
                shape: vec![d.quantized.len()],
                data: d.quantized.clone(),
            });
            out.push(OwnedTensor {
                name: format!("{name}.nested_absmax"),
                dtype: Dtype::F32,
                shape: vec![d.nested_absmax.len()],
                data: f32_bytes(&d.nested_absmax),
            });
            out.push(OwnedTensor {
                name: format!("{name}.nested_quant_map"),
                dtype: Dtype::F32,
                shape: vec![256],
                data: f32_bytes(&d.nested_code[..]),
            });
            qs.nested_blocksize = Some(qlorad_kernels::nf4::NESTED_BLOCKSIZE);
            qs.nested_dtype = Some("float32".into());
            qs.nested_offset = Some(d.offset);
        }
    }
    out.push(OwnedTensor {
        name: format!("{name}.quant_map"),
        dtype: Dtype::F32,
        shape: vec![16],
        data: f32_bytes(&t.code),
    });
    let json = python_json(&qs);
    out.push(OwnedTensor {
        name: format!("{name}{QS_SUFFIX}"),
        dtype: Dtype::U8,
        shape: vec![json.len()],
        data: json.into_bytes(),
    });
    out
}

/// `json.dumps` formatting (", " and ": " separators), so our bytes match what Python writes.
fn python_json(qs: &PackedQuantState) -> String {
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        qs.quant_type,
        qs.blocksize,
        qs.dtype,
        qs.shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let (Some(nb), Some(nd), Some(off)) =
        (qs.nested_blocksize, &qs.nested_dtype, qs.nested_offset)
    {
        s.push_str(&format!(
            ", \"nested_blocksize\": {nb}, \"nested_dtype\": \"{nd}\", \"nested_offset\": {}",
            python_float_repr(off)
        ));
    }
    s.push('}');
    s
}

/// Python's `repr(float(x))` for an f32 widened to f64 (shortest round-trip of the f64).
fn python_float_repr(x: f32) -> String {
    let v = x as f64;
    let s = format!("{v:?}");
    // Rust prints 1e-5 as "1e-5"; Python as "1e-05".
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = e.strip_prefix('-').map_or(("+", e), |d| ("-", d));
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_formatting() {
        assert_eq!(python_float_repr(0.5), "0.5");
        assert_eq!(python_float_repr(1e-5_f32), "9.999999747378752e-06");
        let qs = PackedQuantState {
            quant_type: "nf4".into(),
            blocksize: 64,
            dtype: "float32".into(),
            shape: vec![4, 8],
            nested_blocksize: None,
            nested_dtype: None,
            nested_offset: None,
        };
        assert_eq!(
            python_json(&qs),
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, 8]}"#
        );
    }
}
