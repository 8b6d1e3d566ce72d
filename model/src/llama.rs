//! The Llama/Mistral decoder (transformers' `modeling_llama.py` / `modeling_mistral.py`): RMSNorm,
//! rotary embeddings (non-interleaved, "rotate half"), grouped-query attention with an optional
//! sliding window (Mistral), SwiGLU MLP, tied or separate LM head.
//!
//! The forward pass takes a *flattened batch*: the new tokens of several sequences are concatenated
//! into one `(tokens, hidden)` matrix so every projection runs once for the whole batch (as vLLM and
//! TGI do); only attention is per sequence, against that sequence's own [`KvCache`]. On the CPU in
//! f32 one batched op (`attention_cpu`) runs the attention of every sequence of a layer; elsewhere
//! (CUDA, or `QLORAD_CPU_ATTENTION=reference`) each sequence runs its own candle ops.

use crate::attention_cpu::{batched_attention, AttnGeometry, CpuAttention};
use crate::config::Config;
use crate::device::Placement;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::linear::BaseLinear;
use crate::loader::{LayerWeights, ModelWeights};
use crate::lora::{LoraAdapter, LoraBatch, LoraKernel};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

#[path = "llama_train.rs"]
pub mod train;

#[cfg(feature = "cuda")]
#[path = "llama_fused.rs"]
mod fused;
#[cfg(feature = "cuda")]
#[path = "llama_graph.rs"]
mod graph;
pub use crate::graph_cache::DecodeGraphStats;

#[cfg(feature = "cuda")]
#[path = "llama_backward.rs"]
pub mod backward;

/// One sequence's share of a forward pass: its new tokens, its cache (positions continue from
/// `cache.len()`) and the LoRA adapter it runs with (`None`: the base model).
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<Arc<LoraAdapter>>,
}

impl<'a> SeqInput<'a> {
    /// A sequence on the base model.
    pub fn new(tokens: &'a [u32], cache: &'a mut KvCache) -> Self {
        Self {
            tokens,
            cache,
            adapter: None,
        }
    }
}

/// Which logits to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last new token of each sequence: `(num_seqs, vocab)`.
    Last,
    /// Every new token: `(total_tokens, vocab)`.
    All,
}

struct Attention {
    q: Box<dyn BaseLinear>,
    k: Box<dyn BaseLinear>,
    v: Box<dyn BaseLinear>,
    o: Box<dyn BaseLinear>,
}

struct Mlp {
    gate: Box<dyn BaseLinear>,
    up: Box<dyn BaseLinear>,
    down: Box<dyn BaseLinear>,
}

struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

/// A loaded Llama/Mistral model.
pub struct Llama {
    cfg: Config,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// `None` when tied to the embedding.
    lm_head: Option<Tensor>,
    /// `(max_positions, head_dim / 2)` tables.
    cos: Tensor,
    sin: Tensor,
    device: Device,
    placement: Placement,
    /// How batches apply their LoRA deltas on a GPU (`QLORAD_LORA_KERNEL` at construction).
    lora_kernel: LoraKernel,
    /// The fused decode-step kernels on a GPU in bf16 (`None`: the general path only).
    #[cfg(feature = "cuda")]
    fused: Option<Arc<qlorad_kernels::decode_cuda::DecodeKernels>>,
    /// The fused decode step's captured CUDA graphs, by batch shape (`llama_graph.rs`).
    #[cfg(feature = "cuda")]
    graphs: graph::DecodeGraphs,
    /// Which attention a CPU f32 model runs (`QLORAD_CPU_ATTENTION` at construction).
    cpu_attention: CpuAttention,
    /// Which kernels the training forward runs (`QLORAD_TRAIN_FUSED` at construction).
    train_ops: train::TrainOps,
}

/// What every layer of one forward pass shares.
struct Pass<'a> {
    cfg: &'a Config,
    /// `(tokens, head_dim / 2)` rope tables of the batch's positions.
    cos: &'a Tensor,
    sin: &'a Tensor,
    lora: &'a LoraBatch,
    /// Whether attention runs as one batched CPU op (CPU, f32, [`CpuAttention::Batched`]).
    batched_attention: bool,
    /// The pass's attention masks, built once and shared by every layer.
    masks: &'a Masks,
}

/// Attention masks by (new tokens, cached tokens), in the compute dtype, built on first use.
///
/// A mask is the same for every layer of a pass; building it per layer (a host loop over n × total
/// entries and an upload) cost a 1,024-token prefill ~2 ms per layer on the host while the GPU
/// waited.
#[derive(Default)]
pub(crate) struct Masks(
    std::cell::RefCell<std::collections::HashMap<(usize, usize), Option<Tensor>>>,
);

impl Masks {
    fn get(
        &self,
        n: usize,
        past: usize,
        window: Option<usize>,
        device: &Device,
        dtype: DType,
    ) -> Result<Option<Tensor>> {
        if let Some(m) = self.0.borrow().get(&(n, past)) {
            return Ok(m.clone());
        }
        let m = attention_mask(n, past, window, device)?
            .map(|m| m.to_dtype(dtype))
            .transpose()?;
        self.0.borrow_mut().insert((n, past), m.clone());
        Ok(m)
    }
}

impl Llama {
    /// Builds the model from loaded weights, on the CPU in f32.
    pub fn new(cfg: Config, w: ModelWeights) -> Result<Self> {
        Self::new_on(cfg, w, &Placement::cpu())
    }

    /// Builds the model from loaded (host) weights, placing every weight on `p`'s device in its
    /// compute dtype (NF4 projections stay NF4 there). The KV caches and activations follow.
    pub fn new_on(cfg: Config, w: ModelWeights, p: &Placement) -> Result<Self> {
        let device = p.device.clone();
        let (cos, sin) = rope_tables(&cfg, &device)?;
        let blocks = w
            .layers
            .into_iter()
            .map(|l: LayerWeights| {
                Ok(Block {
                    input_norm: p.put(&l.input_norm)?,
                    attn: Attention {
                        q: l.q.to_placement(p)?,
                        k: l.k.to_placement(p)?,
                        v: l.v.to_placement(p)?,
                        o: l.o.to_placement(p)?,
                    },
                    post_norm: p.put(&l.post_norm)?,
                    mlp: Mlp {
                        gate: l.gate.to_placement(p)?,
                        up: l.up.to_placement(p)?,
                        down: l.down.to_placement(p)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let model = Self {
            cfg,
            embed: p.put(&w.embed)?,
            blocks,
            norm: p.put(&w.norm)?,
            lm_head: w.lm_head.as_ref().map(|t| p.put(t)).transpose()?,
            cos: cos.to_dtype(p.dtype)?,
            sin: sin.to_dtype(p.dtype)?,
            device,
            placement: p.clone(),
            lora_kernel: LoraKernel::from_env(),
            #[cfg(feature = "cuda")]
            fused: fused::load(p)?,
            #[cfg(feature = "cuda")]
            graphs: graph::DecodeGraphs::for_placement(p),
            cpu_attention: CpuAttention::from_env(),
            train_ops: train::TrainOps::for_placement(p),
        };
        // The upload's staging buffers stay cached in the device's memory pool: hand them back so
        // that what stays allocated is the model.
        crate::device::trim_pool(&model.device)?;
        Ok(model)
    }

    /// How batches apply their LoRA deltas on a GPU.
    pub fn lora_kernel(&self) -> LoraKernel {
        self.lora_kernel
    }

    /// Chooses how batches apply their LoRA deltas on a GPU (benchmarks compare both paths).
    pub fn set_lora_kernel(&mut self, k: LoraKernel) {
        self.lora_kernel = k;
    }

    /// Which attention a CPU f32 model runs.
    pub fn cpu_attention(&self) -> CpuAttention {
        self.cpu_attention
    }

    /// Chooses the CPU f32 attention (tests and benchmarks compare both; CUDA ignores it).
    pub fn set_cpu_attention(&mut self, a: CpuAttention) {
        self.cpu_attention = a;
    }

    /// Which kernels the training forward runs.
    pub fn train_ops(&self) -> train::TrainOps {
        self.train_ops
    }

    /// Chooses the training kernels (checks and benchmarks compare both; `Fused` needs a GPU in
    /// bf16).
    pub fn set_train_ops(&mut self, ops: train::TrainOps) {
        self.train_ops = ops;
    }

    /// Where the model lives and the dtype it computes in.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// This model's decode graphs so far (none without the `cuda` feature).
    #[cfg(not(feature = "cuda"))]
    pub fn decode_graph_stats(&self) -> DecodeGraphStats {
        DecodeGraphStats::default()
    }

    /// An adapter loaded on the host, placed where this model computes (device and dtype).
    pub fn place_adapter(&self, a: LoraAdapter) -> Result<LoraAdapter> {
        a.to_placement(&self.placement)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers)
    }

    /// Bytes of base weights held where the model computes (projections in their storage format,
    /// plus embeddings and norms in the compute dtype).
    pub fn weight_bytes(&self) -> usize {
        let t = |x: &Tensor| x.elem_count() * x.dtype().size_in_bytes();
        let mut total = t(&self.embed) + t(&self.norm) + self.lm_head.as_ref().map_or(0, t);
        for b in &self.blocks {
            total += t(&b.input_norm) + t(&b.post_norm);
            for l in b.linears() {
                total += l.storage_bytes();
            }
        }
        total
    }

    /// Runs the new tokens of every sequence through the model, appending to their caches.
    pub fn forward(&self, seqs: &mut [SeqInput<'_>], logits: Logits) -> Result<Tensor> {
        let max_pos = self.cfg.max_position_embeddings;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut row_adapters = Vec::new();
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::Invalid("a sequence has no new tokens".into()));
            }
            let start = s.cache.len();
            if start + s.tokens.len() > max_pos {
                return Err(ModelError::Invalid(format!(
                    "sequence of {} tokens exceeds the context length {max_pos}",
                    start + s.tokens.len()
                )));
            }
            if let Some(&bad) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::Invalid(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    self.cfg.vocab_size
                )));
            }
            ids.extend_from_slice(s.tokens);
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
            row_adapters.extend(std::iter::repeat_n(s.adapter.clone(), s.tokens.len()));
        }
        let lora = LoraBatch::with_kernel(&row_adapters, &self.device, self.lora_kernel)?;
        #[cfg(feature = "cuda")]
        if let Some(kern) = self.fused_for(seqs) {
            return self.forward_fused(&kern, seqs, &ids, lora);
        }
        let t = ids.len();
        let ids = Tensor::from_vec(ids, t, &self.device)?;
        let pos = Tensor::from_vec(positions, t, &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?; // (tokens, head_dim/2)
        let sin = self.sin.index_select(&pos, 0)?;
        let mut x = self.embed.index_select(&ids, 0)?; // (tokens, hidden)
        let masks = Masks::default();
        let pass = Pass {
            cfg: &self.cfg,
            cos: &cos,
            sin: &sin,
            lora: &lora,
            batched_attention: self.cpu_attention == CpuAttention::Batched
                && self.device.is_cpu()
                && self.placement.dtype == DType::F32,
            masks: &masks,
        };
        for (li, block) in self.blocks.iter().enumerate() {
            x = block.forward(&pass, li, &x, seqs)?;
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        let x = match logits {
            Logits::All => x,
            Logits::Last => {
                let mut last = Vec::with_capacity(seqs.len());
                let mut off = 0u32;
                for s in seqs.iter() {
                    off += s.tokens.len() as u32;
                    last.push(off - 1);
                }
                let n = last.len();
                x.index_select(&Tensor::from_vec(last, n, &self.device)?, 0)?
            }
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = crate::linear::dense_xwt(&x, head)?; // (rows, vocab)
                                                          // Callers sample on the host in f32 whatever the compute dtype.
        Ok(logits.to_dtype(DType::F32)?)
    }
}

impl Block {
    fn linears(&self) -> [&dyn BaseLinear; 7] {
        [
            self.attn.q.as_ref(),
            self.attn.k.as_ref(),
            self.attn.v.as_ref(),
            self.attn.o.as_ref(),
            self.mlp.gate.as_ref(),
            self.mlp.up.as_ref(),
            self.mlp.down.as_ref(),
        ]
    }

    fn forward(
        &self,
        pass: &Pass<'_>,
        layer: usize,
        x: &Tensor,
        seqs: &mut [SeqInput<'_>],
    ) -> Result<Tensor> {
        let (cfg, lora) = (pass.cfg, pass.lora);
        let eps = cfg.rms_norm_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &self.input_norm, eps)?;
        let a = self.attn.forward(pass, layer, &h, seqs)?;
        let x = (x + a)?;
        let h = candle_nn::ops::rms_norm(&x, &self.post_norm, eps)?;
        let [gate, up] = project_group(
            [self.mlp.gate.as_ref(), self.mlp.up.as_ref()],
            layer,
            4,
            &h,
            lora,
        )?;
        let gate = candle_nn::ops::silu(&gate)?;
        let m = project(self.mlp.down.as_ref(), layer, 6, &(gate * up)?, lora)?;
        Ok((x + m)?)
    }
}

/// A base projection plus the batch's LoRA deltas (`proj` indexes [`crate::loader::PROJECTIONS`]).
fn project(
    base: &dyn BaseLinear,
    layer: usize,
    proj: usize,
    x: &Tensor,
    lora: &LoraBatch,
) -> Result<Tensor> {
    let y = base.forward(x)?;
    if lora.is_empty() {
        return Ok(y);
    }
    lora.apply(layer, proj, x, y)
}

/// Projections `proj0, proj0 + 1, …` that read the same `x` (q/k/v, gate/up): the base ones, then
/// the batch's LoRA deltas for all of them at once (one BGMV launch pair on a GPU).
fn project_group<const N: usize>(
    bases: [&dyn BaseLinear; N],
    layer: usize,
    proj0: usize,
    x: &Tensor,
    lora: &LoraBatch,
) -> Result<[Tensor; N]> {
    let ys = bases
        .iter()
        .map(|b| b.forward(x))
        .collect::<Result<Vec<_>>>()?;
    let ys = if lora.is_empty() {
        ys
    } else {
        lora.apply_group(layer, proj0, x, ys)?
    };
    group_outputs(ys)
}

/// A projection group's outputs as the array its callers destructure.
fn group_outputs<const N: usize>(ys: Vec<Tensor>) -> Result<[Tensor; N]> {
    ys.try_into()
        .map_err(|_| ModelError::Invalid("a projection group lost an output".into()))
}

impl Attention {
    fn forward(
        &self,
        pass: &Pass<'_>,
        layer: usize,
        h: &Tensor,
        seqs: &mut [SeqInput<'_>],
    ) -> Result<Tensor> {
        let (cfg, lora) = (pass.cfg, pass.lora);
        let (t, _) = h.dims2()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        // (tokens, heads * hd) → (1, heads, tokens, hd) for the rope kernel
        let to_heads = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.reshape((t, heads, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let [q, k, v] = project_group(
            [self.q.as_ref(), self.k.as_ref(), self.v.as_ref()],
            layer,
            0,
            h,
            lora,
        )?;
        let (q, k, v) = (to_heads(q, nh)?, to_heads(k, nkv)?, to_heads(v, nkv)?);
        let q = candle_nn::rotary_emb::rope(&q, pass.cos, pass.sin)?.squeeze(0)?; // (heads, tokens, hd)
        let k = candle_nn::rotary_emb::rope(&k, pass.cos, pass.sin)?.squeeze(0)?;
        let v = v.squeeze(0)?;
        let geo = AttnGeometry {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            window: cfg.sliding_window,
        };
        let a = if pass.batched_attention {
            batched_attention(geo, layer, &q, &k, &v, seqs)?
        } else {
            reference_attention(geo, layer, &q, &k, &v, seqs, pass.masks)?
        }; // (tokens, heads * hd)
        project(self.o.as_ref(), layer, 3, &a, lora)
    }
}

/// Attention of a flattened batch one sequence at a time in candle ops: append to the cache, then
/// [`attend`] (the CUDA path, and the reference of `attention_cpu::batched_attention`).
/// q: (heads, tokens, hd); k, v: (kv_heads, tokens, hd) → (tokens, heads * hd).
pub(crate) fn reference_attention(
    geo: AttnGeometry,
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &mut [SeqInput<'_>],
    masks: &Masks,
) -> Result<Tensor> {
    let mut outs = Vec::with_capacity(seqs.len());
    let mut off = 0;
    for s in seqs.iter_mut() {
        let n = s.tokens.len();
        let past = s.cache.len();
        let (kk, vv) = s
            .cache
            .append(layer, &k.narrow(1, off, n)?, &v.narrow(1, off, n)?)?;
        let qi = q.narrow(1, off, n)?;
        // A sequence's first tokens on a GPU: the training forward's fused attention (one
        // batched GEMM, then one softmax kernel that skips the masked half) instead of passes over
        // the (heads, n, n) scores with a mask.
        #[cfg(feature = "cuda")]
        if past == 0 && qi.device().is_cuda() && qi.dtype() == DType::BF16 {
            let a = train::causal_attention_fused(
                &qi.unsqueeze(0)?,
                &kk.unsqueeze(0)?,
                &vv.unsqueeze(0)?,
                geo.window,
            )?;
            outs.push(a.squeeze(0)?);
            off += n;
            continue;
        }
        let mask = masks.get(n, past, geo.window, q.device(), q.dtype())?;
        outs.push(attend(geo, &qi, &kk, &vv, mask)?); // (n, heads * hd)
        off += n;
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// Causal grouped-query attention of `n` new queries against `past + n` cached keys, with the
/// additive `mask` of [`attention_mask`] (in q's dtype).
/// q: (heads, n, hd); k, v: (kv_heads, past + n, hd) → (n, heads * hd).
fn attend(
    geo: AttnGeometry,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let (nh, n, hd) = q.dims3()?;
    let nkv = geo.kv_heads;
    let group = nh / nkv;
    let total = k.dim(1)?;
    // Query heads h·group .. h·group+group share kv head h: fold the group into the row dimension
    // instead of repeating K and V.
    let qg = q.reshape((nkv, group * n, hd))?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (qg.matmul(&k.t()?)? * scale)?; // (kv, group*n, total)
    let scores = match mask {
        Some(mask) => scores
            .reshape((nkv, group, n, total))?
            .broadcast_add(&mask)?
            .reshape((nkv, group * n, total))?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&v.contiguous()?)?; // (kv, group*n, hd)
    Ok(out
        .reshape((nh, n, hd))?
        .transpose(0, 1)?
        .reshape((n, nh * hd))?)
}

/// Additive mask `(n, past + n)`: query i (at position past + i) sees keys at positions ≤ past + i
/// and, with a sliding window w, > past + i - w. `None` when nothing is masked (a single decode token
/// with no window limit).
fn attention_mask(
    n: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let total = past + n;
    let limited = window.is_some_and(|w| total > w);
    if n == 1 && !limited {
        return Ok(None);
    }
    let mut m = vec![0f32; n * total];
    for i in 0..n {
        let qpos = past + i;
        for j in 0..total {
            let causal = j > qpos;
            let outside = window.is_some_and(|w| qpos >= w && j <= qpos - w);
            if causal || outside {
                m[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (n, total), device)?))
}

/// RoPE cos/sin tables `(max_positions, head_dim / 2)`, from the configured inverse frequencies.
fn rope_tables(cfg: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv = cfg.rope_inv_freq();
    let n = cfg.max_position_embeddings;
    let half = inv.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &f in &inv {
            // f32 product, as transformers forms `position * inv_freq` in float32.
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_and_windowed() {
        let m = attention_mask(3, 2, None, &Device::Cpu).unwrap().unwrap();
        let v = m.to_vec2::<f32>().unwrap();
        assert_eq!(v[0][..3], [0.0, 0.0, 0.0]);
        assert!(v[0][3].is_infinite() && v[1][4].is_infinite() && v[2][4] == 0.0);
        let w = attention_mask(1, 5, Some(3), &Device::Cpu)
            .unwrap()
            .unwrap();
        let w = w.to_vec2::<f32>().unwrap();
        // query at position 5 sees positions 3, 4, 5 only
        assert!(w[0][2].is_infinite() && w[0][3] == 0.0 && w[0][5] == 0.0);
        assert!(attention_mask(1, 5, None, &Device::Cpu).unwrap().is_none());
    }
}
