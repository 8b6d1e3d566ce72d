//! The fused decode step on a GPU: a batch whose every sequence brings exactly one new token runs
//! its layers as 12 launches each (two residual-add + RMSNorm, seven projections, RoPE + KV write,
//! attention over the caches in place, silu·mul), plus the LoRA launches, where the general
//! path issues ~25 candle ops per layer and copies each sequence's cached V (see
//! `qlorad_kernels::decode_cuda` and kernels/cuda/decode.cu). Same weights, same projections and
//! LoRA code path; the general path stays the reference (and serves prefill and mixed batches).
//!
//! `QLORAD_FUSED_DECODE=0` turns it off for a process; [`Llama::set_fused_decode`] per model.

use super::{group_outputs, project_group, Llama, SeqInput};
use crate::device::Placement;
use crate::error::{ModelError, Result};
use crate::host_profile::{timed, timed_more, Phase};
use crate::linear::BaseLinear;
use crate::lora::LoraBatch;
use candle_core::{DType, Tensor};
use qlorad_kernels::bgmv::{BgmvPlan, GemvLora};
use qlorad_kernels::decode_cuda::{
    attention_supports, rope_attention_supports, DecodeKernels, KvRow, KvTable,
};
use std::sync::Arc;

/// The kernels when the fused step can serve `p` (a GPU in bf16) and the environment allows it.
pub(super) fn load(p: &Placement) -> Result<Option<Arc<DecodeKernels>>> {
    let off = std::env::var("QLORAD_FUSED_DECODE").is_ok_and(|v| v == "0");
    if off || !p.device.is_cuda() || p.dtype != DType::BF16 {
        return Ok(None);
    }
    Ok(Some(Arc::new(DecodeKernels::load(&p.device)?)))
}

impl Llama {
    /// Whether decode batches take the fused step (a GPU in bf16, not turned off).
    pub fn fused_decode(&self) -> bool {
        self.fused.is_some()
    }

    /// Turns the fused decode step on (where the placement allows it) or off.
    pub fn set_fused_decode(&mut self, on: bool) -> Result<()> {
        self.fused = if on && self.device.is_cuda() && self.placement.dtype == DType::BF16 {
            Some(Arc::new(DecodeKernels::load(&self.device)?))
        } else {
            None
        };
        // Graphs captured with the old kernels go (a later step captures with the new ones).
        let graphs_on = self.decode_graph_stats().on;
        self.set_decode_graphs(graphs_on);
        Ok(())
    }

    /// The kernels if this batch can take the fused step: one new token per sequence and
    /// attention shapes the kernel takes.
    pub(super) fn fused_for(&self, seqs: &[SeqInput<'_>]) -> Option<Arc<DecodeKernels>> {
        let k = self.fused.as_ref()?;
        let c = &self.cfg;
        let shapes_fit = attention_supports(c.num_heads, c.num_kv_heads, c.head_dim);
        (shapes_fit && seqs.iter().all(|s| s.tokens.len() == 1)).then(|| k.clone())
    }

    /// One decode step of `seqs` (validated by the caller; `ids` their tokens, one per sequence):
    /// logits (rows, vocab) in f32, caches advanced by one. The step replays a captured graph of
    /// itself where the model keeps one for its shape (`llama_graph.rs`).
    pub(super) fn forward_fused(
        &self,
        kern: &DecodeKernels,
        seqs: &mut [SeqInput<'_>],
        ids: &[u32],
        mut lora: LoraBatch,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (nkv, hd) = (c.num_kv_heads, c.head_dim);
        let layers = self.blocks.len();
        let words = timed(Phase::Setup, || -> Result<_> {
            let mut caps = Vec::with_capacity(seqs.len());
            for s in seqs.iter_mut() {
                caps.push(
                    s.cache
                        .reserve(1, nkv, hd, self.placement.dtype, &self.device)?,
                );
            }
            let rows = seqs
                .iter()
                .zip(&caps)
                .map(|(s, &capacity)| {
                    let layers = (0..layers)
                        .map(|l| {
                            s.cache.buffers(l).ok_or_else(|| {
                                ModelError::Invalid(format!("layer {l} has no KV buffers"))
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Ok(KvRow {
                        position: s.cache.len(),
                        capacity,
                        layers,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(kern.kv_words(&rows, layers, nkv, hd)?)
        })?;
        let logits = match self.graph_step(kern, ids, &words, &mut lora)? {
            Some(logits) => logits,
            None => {
                let table = timed_more(Phase::Setup, || kern.kv_table_of(&words))?;
                let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
                super::graph::debug_sync(&self.device, "an eager step's inputs")?;
                let out = self.fused_body(kern, &table, &ids, &lora)?;
                super::graph::debug_sync(&self.device, "an eager step")?;
                out
            }
        };
        for s in seqs.iter_mut() {
            s.cache.advance(1);
        }
        Ok(logits)
    }

    /// Whether RoPE and the KV write run inside the attention launch (`QLORAD_ROPE_ATTENTION=0`:
    /// rope_kv first, for comparison; read per step because gpu-check switches it).
    pub(super) fn rope_in_attention(&self) -> bool {
        let c = &self.cfg;
        rope_attention_supports(c.num_heads, c.num_kv_heads, c.head_dim)
            && !std::env::var("QLORAD_ROPE_ATTENTION").is_ok_and(|v| v == "0")
    }

    /// The fused step's launches for a batch whose KV table (positions, capacities, cache
    /// addresses) is `table` and whose tokens are `ids` on the device: logits (rows, vocab) f32.
    /// Queues GPU work only (no host reads), so a stream capture can record it.
    pub(super) fn fused_body(
        &self,
        kern: &DecodeKernels,
        table: &KvTable,
        ids: &Tensor,
        lora: &LoraBatch,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let rope_in_attention = self.rope_in_attention();
        // The embeddings gathered on the device (candle's index_select would upload its shape
        // from host memory, which a captured step cannot replay).
        let mut x = kern.embed_rows(&self.embed, ids)?;
        // The MLP output of the previous layer, added to x by the next add + norm.
        let mut pending: Option<Tensor> = None;
        for (li, b) in self.blocks.iter().enumerate() {
            let qkv = [b.attn.q.as_ref(), b.attn.k.as_ref(), b.attn.v.as_ref()];
            let (xs, h, pre) = timed(Phase::Norm, || {
                norm_for_group(
                    kern,
                    &x,
                    pending.as_ref(),
                    &b.input_norm,
                    eps,
                    lora,
                    (li, 0),
                    qkv,
                )
            })?;
            let [q, k, v] = timed(Phase::QkvProjection, || {
                project_group_fused(qkv, li, 0, &h, lora, pre)
            })?;
            let attention = || -> Result<_> {
                if rope_in_attention {
                    Ok(kern.rope_attention(
                        &q,
                        &k,
                        &v,
                        &self.cos,
                        &self.sin,
                        table,
                        li,
                        nh,
                        nkv,
                        hd,
                        c.sliding_window,
                    )?)
                } else {
                    let q =
                        kern.rope_kv(&q, &k, &v, &self.cos, &self.sin, table, li, nh, nkv, hd)?;
                    Ok(kern.attention(&q, table, li, nh, nkv, hd, c.sliding_window)?)
                }
            };
            let a = timed(Phase::Attention, attention)?;
            let [o] = timed(Phase::OProjection, || {
                project_group_fused([b.attn.o.as_ref()], li, 3, &a, lora, None)
            })?;
            let gate_up = [b.mlp.gate.as_ref(), b.mlp.up.as_ref()];
            let (xs, h, pre) = timed(Phase::Norm, || {
                norm_for_group(
                    kern,
                    &xs,
                    Some(&o),
                    &b.post_norm,
                    eps,
                    lora,
                    (li, 4),
                    gate_up,
                )
            })?;
            let [gate, up] = timed(Phase::GateUpProjection, || {
                project_group_fused(gate_up, li, 4, &h, lora, pre)
            })?;
            let mixed = timed(Phase::SiluMul, || kern.silu_mul(&gate, &up))?;
            let [m] = timed(Phase::DownProjection, || {
                project_group_fused([b.mlp.down.as_ref()], li, 6, &mixed, lora, None)
            })?;
            x = xs;
            pending = Some(m);
        }
        timed(Phase::Head, || {
            let (_, h) = kern.add_rms_norm(&x, pending.as_ref(), &self.norm, eps)?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            let logits = crate::linear::dense_xwt(&h, head)?;
            Ok(logits.to_dtype(DType::F32)?)
        })
    }
}

/// Whether decode GEMVs apply LoRA expands in their epilogue (`QLORAD_LORA_EPILOGUE=0`: off, the
/// BGMV expand launches instead; read once per process).
fn lora_epilogue() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QLORAD_LORA_EPILOGUE").map_or(true, |v| v != "0"))
}

/// Whether decode's projections that read the same input run as one grouped GEMV launch
/// (`QLORAD_GEMV_GROUP=0` turns it off, for comparisons).
fn gemv_group() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QLORAD_GEMV_GROUP").map_or(true, |v| v != "0"))
}

/// Whether the grouped GEMV runs the BGMV shrink inside its launch (by the blocks' LoRA warps,
/// while the others stream the weights) instead of a launch of its own before it
/// (`QLORAD_FUSED_SHRINK=0` turns it off, for comparisons).
fn fused_shrink() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QLORAD_FUSED_SHRINK").map_or(true, |v| v != "0"))
}

/// Whether the add + RMSNorm launch before q/k/v and before gate/up also computes their LoRA
/// shrink (`QLORAD_NORM_SHRINK=0`: the grouped GEMV runs it, as before; read once per process).
fn norm_shrink() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QLORAD_NORM_SHRINK").map_or(true, |v| v != "0"))
}

/// The batch's BGMV plan when the projections `bases` reading `x` (rows, in_f) will run as fused
/// GEMVs that add the LoRA expand in their epilogue ([`gemv_weights`], the plan's rows): then a
/// launch before them may compute their shrink ([`norm_for_group`]).
fn epilogue_plan<'a>(
    lora: &'a LoraBatch,
    bases: &[&dyn BaseLinear],
    x: &Tensor,
) -> Option<&'a BgmvPlan> {
    if lora.is_empty() || !lora_epilogue() {
        return None;
    }
    let plan = lora.bgmv_plan()?;
    gemv_weights(bases, x)?;
    (x.dim(0).ok()? == plan.rows()).then_some(plan)
}

/// The residual add + RMSNorm before the projections `bases` of layer `at.0` from projection `at.1`
/// on (adapter slots `layer · 7 + proj0 ..`, as [`project_group_fused`]) that read its output. With
/// adapters on the BGMV path whose expand the GEMVs apply (the group takes the fused GEMVs:
/// [`gemv_weights`], the test [`project_group_fused`] makes), the same launch computes the group's
/// shrink from the rows it normalizes (its blocks fetch the A rows during the previous kernel, and
/// the grouped GEMV no longer waits inside its launch for a shrink): the third value is then the
/// GEMVs' epilogue descriptors for [`project_group_fused`].
#[allow(clippy::too_many_arguments)]
fn norm_for_group<const N: usize>(
    kern: &DecodeKernels,
    x: &Tensor,
    y: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
    lora: &LoraBatch,
    at: (usize, usize),
    bases: [&dyn BaseLinear; N],
) -> Result<(Tensor, Tensor, Option<Vec<GemvLora>>)> {
    let slot0 = at.0 * 7 + at.1;
    // x (rows, in_f) has the shape of the normed rows the group reads.
    if let Some(plan) = norm_shrink()
        .then(|| epilogue_plan(lora, &bases, x))
        .flatten()
    {
        // Dots in k-chunk partials only for the grouped GEMV, the one launch that sums them.
        let parts = if gemv_group() {
            qlorad_kernels::bgmv::norm_shrink_parts()
        } else {
            1
        };
        if let Some((sh, epis)) = plan.norm_shrink(slot0, N, x.dim(1)?, parts)? {
            if let Some((xs, h)) = kern.add_rms_norm_shrink(x, y, w, eps, Some(&sh))? {
                return Ok((xs, h, Some(epis)));
            }
        }
    }
    let (xs, h) = kern.add_rms_norm(x, y, w, eps)?;
    Ok((xs, h, None))
}

/// The bases' NF4 weights when the group can run as fused GEMVs on `x` (rows, k): every base NF4,
/// at most GEMV_MAX_ROWS rows, k % 32 == 0, on a GPU. [`project_group_fused`] takes the fused path
/// on it, and [`norm_for_group`] computes a shrink only for groups that will.
fn gemv_weights<'a>(
    bases: &[&'a dyn BaseLinear],
    x: &Tensor,
) -> Option<Vec<&'a Arc<qlorad_kernels::Nf4Weight>>> {
    let (rows, k) = x.dims2().ok()?;
    if rows > qlorad_kernels::cuda::GEMV_MAX_ROWS || k % 32 != 0 || !x.device().is_cuda() {
        return None;
    }
    bases.iter().map(|b| b.nf4_weight()).collect()
}

/// Projections `proj0 ..` reading `x`, with the batch's LoRA deltas: on the GPU with NF4 bases and
/// at most 8 rows, one grouped GEMV launch for the whole group when the bases decode on tensor
/// cores (`qlorad_kernels::nf4_group_cuda`), else one launch per base; with adapters on the BGMV
/// path, the grouped launch also runs the group's shrink and adds each projection's expand in its
/// epilogue (else one shrink launch for the group first, then `qlorad_kernels::nf4_linear_lora`
/// per base): y is rounded to bf16 once. Otherwise
/// [`project_group`]. `pre`: the group's shrink already ran ([`norm_for_group`]); these are the
/// epilogue descriptors that read it.
fn project_group_fused<const N: usize>(
    bases: [&dyn BaseLinear; N],
    layer: usize,
    proj0: usize,
    x: &Tensor,
    lora: &LoraBatch,
    pre: Option<Vec<GemvLora>>,
) -> Result<[Tensor; N]> {
    let plain = || project_group(bases, layer, proj0, x, lora);
    let Some(weights) = gemv_weights(&bases, x) else {
        return plain();
    };
    let rows = x.dim(0)?;
    if lora.is_empty() {
        if gemv_group() {
            if let Some(ys) = qlorad_kernels::nf4_group_cuda::nf4_linear_group(x, &weights, None)? {
                return group_outputs(ys);
            }
        }
        return plain();
    }
    let (Some(plan), true) = (lora.bgmv_plan(), lora_epilogue()) else {
        return plain();
    };
    if rows != plan.rows() {
        return plain();
    }
    let x = x.contiguous()?;
    let slot0 = layer * 7 + proj0;
    let mut grouped = gemv_group();
    if let Some(epis) = pre {
        if epis.iter().all(|e| e.parts <= 1) {
            return project_with_epilogues(&weights, &x, &epis, grouped);
        }
        // t in partials (the norm launch's k chunks): only the grouped launch sums them; if it
        // declines, the shrink runs again as whole dots for the one-weight kernels.
        if grouped {
            if let Some(ys) =
                qlorad_kernels::nf4_group_cuda::nf4_linear_group(&x, &weights, Some(&epis))?
            {
                return group_outputs(ys);
            }
        }
        let Some(epis) = plan.shrink_for_gemv(slot0, N, &x)? else {
            return plain();
        };
        return project_with_epilogues(&weights, &x, &epis, false);
    }
    if grouped && fused_shrink() {
        // The grouped GEMV runs the shrink in its own launch; if it declines the group (which
        // does not depend on the shrink), the shrink is launched below and the bases one by one.
        let Some(epis) = plan.gemv_loras_fused(slot0, N, &x)? else {
            return plain();
        };
        if let Some(ys) =
            qlorad_kernels::nf4_group_cuda::nf4_linear_group(&x, &weights, Some(&epis))?
        {
            return group_outputs(ys);
        }
        grouped = false;
    }
    let Some(epis) = plan.shrink_for_gemv(slot0, N, &x)? else {
        // No row has a module at these slots: the base alone.
        return plain();
    };
    project_with_epilogues(&weights, &x, &epis, grouped)
}

/// The NF4 bases of a group on `x` with their LoRA expands in the GEMV epilogues, the shrink
/// already in `epis`' scratch: one grouped launch when `grouped` and the kernels take it, else one
/// GEMV per base.
fn project_with_epilogues<const N: usize>(
    weights: &[&Arc<qlorad_kernels::Nf4Weight>],
    x: &Tensor,
    epis: &[GemvLora],
    grouped: bool,
) -> Result<[Tensor; N]> {
    if grouped {
        if let Some(ys) = qlorad_kernels::nf4_group_cuda::nf4_linear_group(x, weights, Some(epis))?
        {
            return group_outputs(ys);
        }
    }
    let ys = weights
        .iter()
        .zip(epis)
        .map(|(w, e)| {
            if e.active {
                Ok(qlorad_kernels::nf4_op::nf4_linear_lora(x, w, e)?)
            } else {
                Ok(qlorad_kernels::nf4_linear(x, w)?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    group_outputs(ys)
}
