//! The training forward pass: a padded batch `(batch, seq)` with no KV cache, built from
//! differentiable ops (candle's fused `rms_norm`, `rope` and `softmax_last_dim` have no backward,
//! see ../shared/CANDLE-NOTES.md), with trainable LoRA weights supplied per module. The frozen NF4
//! projections go through the NF4 custom op, whose backward re-dequantizes (QLoRA, §3). Same math
//! as [`Llama::forward`]; a test checks the two agree.
//!
//! Two sets of kernels ([`TrainOps`]): candle's composite ops (every device, the CPU's only
//! choice), or on a GPU in bf16 qlorad's fused CUDA ops with their own backward (kernels/
//! `train_cuda.rs`, `attention_train_cuda.rs`, `lora_train_cuda.rs`), which gpu-check compares
//! op by op and step by step against the first on the CPU.
//!
//! Device-generic: on the CPU everything is f32 (every cast below is then a no-op, so CPU results
//! are unchanged bit for bit); on a GPU the model computes in its placement dtype (bf16) the way
//! transformers does under bf16 autocast: RMSNorm's statistics and the attention softmax in f32
//! (as `LlamaRMSNorm` and eager attention's `softmax(..., dtype=float32)`), matmuls in bf16, and the
//! f32 LoRA master weights cast to bf16 for their matmuls (autocast's treatment of peft's
//! `lora_A/lora_B`), so gradients reach the f32 weights through the cast.

use super::{Block, Llama};
use crate::error::Result;
use crate::linear::BaseLinear;
use candle_core::{DType, Device, Tensor, D};

/// LoRA weights a training forward applies: `(A (r, in), B (out, r), scale)` per module.
pub trait LoraWeights {
    fn module(&self, layer: usize, proj: usize) -> Option<(&Tensor, &Tensor, f64)>;

    /// The LoRA branch's input after dropout (PEFT applies `lora_dropout` to x before A only; the
    /// base path sees x unchanged). The default is no dropout.
    fn dropout(&self, _layer: usize, _proj: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(x.clone())
    }

    /// The dropout the branch of (layer, proj) applies now, as (mask seed, probability), for
    /// kernels that draw the mask themselves (the fused GPU projection); `None`: no dropout.
    fn dropout_mask(&self, _layer: usize, _proj: usize) -> Option<(u64, f64)> {
        None
    }
}

/// No adapter.
pub struct NoLora;

impl LoraWeights for NoLora {
    fn module(&self, _: usize, _: usize) -> Option<(&Tensor, &Tensor, f64)> {
        None
    }
}

/// RMSNorm with the statistics in f32 and the result back in x's dtype before the weight, as
/// transformers' `LlamaRMSNorm` (a bf16 mean over 4096 features would lose the low bits).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))] // `ops` picks CUDA kernels
pub fn rms_norm(ops: TrainOps, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if ops == TrainOps::Fused {
        return Ok(x
            .contiguous()?
            .apply_op1(qlorad_kernels::train_cuda::RmsNorm {
                w: w.clone(),
                eps: eps as f32,
            })?);
    }
    let dt = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dt)?
        .broadcast_mul(w)?)
}

/// Non-interleaved RoPE (`x·cos + rotate_half(x)·sin`); x: (b, h, t, d), cos/sin: (t, d/2).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// A frozen base projection plus its LoRA branch, `y = x·Wᵀ + s·dropout(x)·Aᵀ·Bᵀ`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))] // `ops` picks CUDA kernels
pub fn project(
    ops: TrainOps,
    base: &dyn BaseLinear,
    layer: usize,
    proj: usize,
    x: &Tensor,
    lora: &dyn LoraWeights,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if ops == TrainOps::Fused {
        if let (Some(w), Some((a, b, scale))) = (base.nf4_weight(), lora.module(layer, proj)) {
            // NF4 base and LoRA in one op with one backward (kernels/src/lora_train_cuda.rs);
            // the f32 → bf16 casts stay in the graph, returning f32 gradients to A and B.
            let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
            let op = qlorad_kernels::lora_train_cuda::LoraLinear {
                weight: w.clone(),
                scale: scale as f32,
                // Drawn on the device from the seed (a different mask than the CPU's ChaCha one,
                // equally deterministic).
                dropout: lora
                    .dropout_mask(layer, proj)
                    .map(|(seed, p)| qlorad_kernels::train_cuda::Dropout { seed, p: p as f32 }),
            };
            return Ok(x.contiguous()?.apply_op3(&a, &b, op)?);
        }
    }
    let y = base.forward(x)?;
    match lora.module(layer, proj) {
        None => Ok(y),
        Some((a, b, scale)) => {
            let xd = lora.dropout(layer, proj, x)?;
            // f32 master weights → the activations' dtype (a no-op on the CPU); the cast's
            // backward returns f32 gradients to the master weights.
            let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
            // As one (rows, in) matrix: a batched matmul against a broadcast A would sum A's
            // gradient over the batch in a separate reduction.
            let rows = xd.elem_count() / xd.dim(D::Minus1)?;
            let xd = xd.reshape((rows, xd.dim(D::Minus1)?))?;
            let delta = xd.matmul(&a.t()?)?.matmul(&b.t()?)?.reshape(y.shape())?;
            Ok((y + (delta * scale)?)?)
        }
    }
}

/// A projection's output `y (b, t, heads·hd)` rotated by RoPE into attention's layout
/// `(b, heads, t, hd)`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))] // `ops` picks CUDA kernels
pub fn rope_heads(
    ops: TrainOps,
    y: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if ops == TrainOps::Fused {
        return Ok(y
            .contiguous()?
            .apply_op1(qlorad_kernels::train_cuda::RopeHeads {
                cos: cos.clone(),
                sin: sin.clone(),
                heads,
                sign: 1.0,
            })?);
    }
    rope(&to_heads(y, heads)?, cos, sin)
}

/// `(b, t, heads·hd)` → `(b, heads, t, hd)`, contiguous.
fn to_heads(y: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, n) = y.dims3()?;
    Ok(y.reshape((b, t, heads, n / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// [`attention`] through the fused op on a GPU (also the serving prefill's attention for a
/// sequence with nothing cached): Q·Kᵀ, scale, causal and sliding-window mask and softmax in one op
/// that keeps only the probabilities (bf16), then P·V. q (b, heads, t, hd), k and v
/// (b, kv_heads, t, hd) → (b, t, heads·hd).
#[cfg(feature = "cuda")]
pub(crate) fn causal_attention_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    // Query heads sharing a kv head are folded into rows: (b, kv, group*t, hd).
    let qg = q.reshape((b, nkv, (nh / nkv) * t, hd))?;
    let soft = qlorad_kernels::train_cuda::CausalSoftmax {
        scale: (1.0 / (hd as f64).sqrt()) as f32,
        window: window.unwrap_or(0) as u32,
    };
    let probs = qg.contiguous()?.apply_op2(
        &k.contiguous()?,
        qlorad_kernels::attention_train_cuda::AttnProbs(soft),
    )?;
    // v may be a view of a KV cache (the prefill's); a training batch's is contiguous already.
    Ok(probs
        .matmul(&v.contiguous()?)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))?)
}

/// Causal grouped-query attention of a training batch: q (b, heads, t, hd), k and v
/// (b, kv_heads, t, hd) → (b, t, heads·hd), under `ctx`'s causal mask and sliding window.
pub fn attention(ctx: &TrainContext, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if ctx.ops == TrainOps::Fused {
        return causal_attention_fused(q, k, v, ctx.window);
    }
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let group = nh / nkv;
    // Query heads sharing a kv head are folded into rows: (b, kv, group*t, hd).
    let qg = q.reshape((b, nkv, group * t, hd))?;
    let mask = ctx.mask.as_ref().ok_or_else(|| {
        crate::error::ModelError::Invalid(
            "a training context for candle's ops needs its mask".into(),
        )
    })?;
    // (b, kv, group*t, t) scores; mask and softmax in f32 (the mask is f32), probabilities back
    // in the compute dtype.
    let scores = (qg.matmul(&k.t()?)? / (hd as f64).sqrt())?;
    let scores = scores
        .to_dtype(DType::F32)?
        .reshape((b, nkv, group, t, t))?
        .broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?
        .to_dtype(v.dtype())?
        .reshape((b, nkv, group * t, t))?;
    Ok(probs
        .matmul(v)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))?)
}

/// SwiGLU's gating: `silu(gate) · up`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))] // `ops` picks CUDA kernels
pub fn swiglu(ops: TrainOps, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if ops == TrainOps::Fused {
        return Ok(gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, qlorad_kernels::train_cuda::Swiglu)?);
    }
    Ok((gate.silu()? * up)?)
}

/// Additive causal mask (t, t) with the optional sliding window.
pub fn causal_mask(t: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let outside = window.is_some_and(|w| i >= w && j <= i - w);
                if j > i || outside {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(m, (t, t), device)?)
}

/// Per-sequence-length constants of a training forward (RoPE tables, and the causal mask that
/// candle's attention adds; the fused attention applies the rule itself and needs none).
pub struct TrainContext {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Option<Tensor>,
    pub window: Option<usize>,
    pub ops: TrainOps,
}

/// Which kernels a training forward (and so its backward) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainOps {
    /// candle's differentiable ops (every device; the CPU's only choice).
    Candle,
    /// qlorad's fused CUDA ops with their own backward: RMSNorm, RoPE into the head layout,
    /// Q·Kᵀ + causal softmax, SwiGLU, the NF4 projection with its LoRA branch (and dropout), the
    /// cross-entropy. Needs a GPU computing in bf16.
    Fused,
}

impl TrainOps {
    /// Fused on a GPU in bf16 unless `QLORAD_TRAIN_FUSED=0`; candle's ops otherwise.
    pub fn for_placement(p: &crate::device::Placement) -> Self {
        let fused = cfg!(feature = "cuda")
            && p.device.is_cuda()
            && p.dtype == DType::BF16
            && std::env::var("QLORAD_TRAIN_FUSED").map_or(true, |v| v != "0");
        if fused {
            Self::Fused
        } else {
            Self::Candle
        }
    }
}

impl Llama {
    /// `ids (batch, seq)` → logits `(batch, seq, vocab)`, differentiable in the LoRA tensors.
    pub fn forward_train(&self, ids: &Tensor, lora: &dyn LoraWeights) -> Result<Tensor> {
        let ctx = self.train_context(ids.dim(1)?)?;
        let mut x = self.embed_train(ids)?;
        for li in 0..self.blocks.len() {
            x = self.block_train(li, &x, &ctx, lora)?;
        }
        self.head_train(&x)
    }

    /// The constants for sequences of length `t`.
    pub fn train_context(&self, t: usize) -> Result<TrainContext> {
        Ok(TrainContext {
            cos: self.cos.narrow(0, 0, t)?,
            sin: self.sin.narrow(0, 0, t)?,
            mask: match self.train_ops {
                TrainOps::Candle => Some(causal_mask(t, self.cfg.sliding_window, &self.device)?),
                TrainOps::Fused => None,
            },
            window: self.cfg.sliding_window,
            ops: self.train_ops,
        })
    }

    /// Token embeddings `(batch, seq, hidden)` (the embedding is frozen).
    pub fn embed_train(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        // Batches are built on the host; a no-op when the model is there too.
        let ids = ids.to_device(&self.device)?;
        Ok(self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?)
    }

    /// Decoder layer `layer` on `x (batch, seq, hidden)`. Exposed so a trainer can run layers one at a
    /// time (gradient checkpointing recomputes each layer in the backward pass).
    pub fn block_train(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &TrainContext,
        lora: &dyn LoraWeights,
    ) -> Result<Tensor> {
        self.blocks[layer].forward_train(self, layer, x, ctx, lora)
    }

    /// Final norm and LM head: hidden states → logits.
    pub fn head_train(&self, x: &Tensor) -> Result<Tensor> {
        let x = rms_norm(self.train_ops, x, &self.norm, self.cfg.rms_norm_eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(x.broadcast_matmul(&head.t()?)?)
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }
}

impl Block {
    fn forward_train(
        &self,
        m: &Llama,
        layer: usize,
        x: &Tensor,
        ctx: &TrainContext,
        lora: &dyn LoraWeights,
    ) -> Result<Tensor> {
        let (cos, sin, ops) = (&ctx.cos, &ctx.sin, ctx.ops);
        let cfg = &m.cfg;
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let h = rms_norm(ops, x, &self.input_norm, cfg.rms_norm_eps)?;
        // (b, t, heads*hd) → (b, heads, t, hd)
        let q = project(ops, self.attn.q.as_ref(), layer, 0, &h, lora)?;
        let q = rope_heads(ops, &q, nh, cos, sin)?;
        let k = project(ops, self.attn.k.as_ref(), layer, 1, &h, lora)?;
        let k = rope_heads(ops, &k, nkv, cos, sin)?;
        let v = to_heads(
            &project(ops, self.attn.v.as_ref(), layer, 2, &h, lora)?,
            nkv,
        )?;
        let a = attention(ctx, &q, &k, &v)?;
        let x = (x + project(ops, self.attn.o.as_ref(), layer, 3, &a, lora)?)?;
        let h = rms_norm(ops, &x, &self.post_norm, cfg.rms_norm_eps)?;
        let gate = project(ops, self.mlp.gate.as_ref(), layer, 4, &h, lora)?;
        let up = project(ops, self.mlp.up.as_ref(), layer, 5, &h, lora)?;
        let down = project(
            ops,
            self.mlp.down.as_ref(),
            layer,
            6,
            &swiglu(ops, &gate, &up)?,
            lora,
        )?;
        Ok((x + down)?)
    }
}
