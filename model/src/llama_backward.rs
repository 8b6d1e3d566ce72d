//! A decoder layer's backward written by hand over the fused CUDA training ops (issue 6): the
//! forward keeps exactly the activations the backward needs ([`LayerActs`]), and the backward calls
//! each op's gradient kernels in reverse order, freeing every intermediate as soon as its last use
//! is past. candle's autograd (the other path, [`super::train`] under `backward()`) allocates a
//! zeroed gradient per graph node and adds into it, and keeps every node of the layer alive until
//! the backward ends: the profile of issue 6 put that at more than half of a layer's time, and
//! most of the checkpointed step's memory beyond the weights.
//!
//! Same math, same kernels as [`super::train`] with `TrainOps::Fused`; only the order of the
//! gradient sums (bf16 additions) differs, and gpu-check compares the two layer by layer.
//! RMSNorm outputs are recomputed in the backward rather than kept (one cheap launch each).
//! SwiGLU's product, the down projection's input, is kept from a full forward (a fifth more of a
//! layer's saved bytes) and recomputed after a checkpointed layer's shorter forward.

use super::train::{rms_norm, rope_heads, swiglu, LoraWeights, TrainContext, TrainOps};
use super::Llama;
use crate::error::{ModelError, Result};
use crate::linear::BaseLinear;
use candle_core::{DType, Tensor, Var, D};
use qlorad_kernels::attention_train_cuda::AttnProbs;
use qlorad_kernels::lora_train_cuda::LoraLinear;
use qlorad_kernels::train_cuda::{CausalSoftmax, Dropout, RmsNorm, RopeHeads, Swiglu};
use qlorad_kernels::train_elem_cuda::{add, swap12};

/// Rows of the LM head and loss per chunk in [`Llama::head_backward`]: at Mistral-7B's shapes a
/// chunk is ~0.3 ms of GEMMs per direction, and 512 rows still fill the GPU.
pub const HEAD_ROWS: usize = 512;

/// One projection's fused op with its bf16 adapter copies, when the base is NF4 and the module
/// has LoRA; `None` runs the projection through candle's ops (and their autograd, locally).
struct Fused {
    op: LoraLinear,
    a: Tensor,
    b: Tensor,
}

/// What a layer's backward needs from its forward (bf16, on the GPU).
pub struct LayerActs {
    /// The layer's input (`x`) and the residual stream after attention (`x2`).
    x: Tensor,
    x2: Tensor,
    /// RoPE'd queries folded by kv head `(b, kv, group·t, hd)`, RoPE'd keys and the values
    /// `(b, kv, t, hd)`.
    qg: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention probabilities `(b, kv, group·t, t)`.
    p: Tensor,
    /// Attention output `(b, t, heads·hd)`, the input of o_proj.
    a: Tensor,
    /// MLP gate and up projections, and silu(gate)·up when the forward formed it (a
    /// checkpointed layer's recomputation stops before it; the backward then recomputes it).
    gate: Tensor,
    up: Tensor,
    s: Option<Tensor>,
    fused: Vec<Option<Fused>>,
}

/// Where a projection sits: its layer, the step's context and adapter.
#[derive(Clone, Copy)]
struct Site<'a> {
    layer: usize,
    ctx: &'a TrainContext,
    lora: &'a dyn LoraWeights,
}

/// A layer's gradients: dx, and per projection with LoRA, f32 (dA, dB) for its master weights.
pub struct LayerGrads {
    pub dx: Tensor,
    pub lora: Vec<(usize, Tensor, Tensor)>,
}

impl Llama {
    fn projections(&self, layer: usize) -> [&dyn BaseLinear; 7] {
        self.blocks[layer].linears()
    }

    fn fused_parts(&self, layer: usize, lora: &dyn LoraWeights) -> Result<Vec<Option<Fused>>> {
        let mut out = Vec::with_capacity(7);
        for (proj, base) in self.projections(layer).into_iter().enumerate() {
            out.push(match (base.nf4_weight(), lora.module(layer, proj)) {
                (Some(w), Some((a, b, scale))) => Some(Fused {
                    op: LoraLinear {
                        weight: w.clone(),
                        scale: scale as f32,
                        dropout: lora
                            .dropout_mask(layer, proj)
                            .map(|(seed, p)| Dropout { seed, p: p as f32 }),
                    },
                    // detach: no graph from the master weights (their gradients come back by
                    // hand, cast to f32 as the cast's backward would).
                    a: a.detach().to_dtype(DType::BF16)?,
                    b: b.detach().to_dtype(DType::BF16)?,
                }),
                _ => None,
            });
        }
        Ok(out)
    }

    /// One projection's forward without a graph.
    fn proj_fwd(
        &self,
        fused: &[Option<Fused>],
        site: Site,
        proj: usize,
        x: &Tensor,
    ) -> Result<Tensor> {
        let Site { layer, ctx, lora } = site;
        match &fused[proj] {
            Some(f) => Ok(x.contiguous()?.apply_op3_no_bwd(&f.a, &f.b, &f.op)?),
            None => Ok(super::train::project(
                ctx.ops,
                self.projections(layer)[proj],
                layer,
                proj,
                x,
                lora,
            )?
            .detach()),
        }
    }

    /// One projection's backward: dx and, with LoRA, the f32 (dA, dB).
    fn proj_bwd(
        &self,
        fused: &[Option<Fused>],
        site: Site,
        proj: usize,
        (x, dy): (&Tensor, &Tensor),
        grads: &mut Vec<(usize, Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let Site { layer, ctx, lora } = site;
        if let Some(f) = &fused[proj] {
            let (dx, da, db) = f.op.backward(x, &f.a, &f.b, dy)?;
            grads.push((proj, da.to_dtype(DType::F32)?, db.to_dtype(DType::F32)?));
            return Ok(dx);
        }
        // Any other projection (a base without NF4, or no LoRA on it): candle's autograd over this
        // projection alone, d/dx Σ(y ⊙ dy).
        let xv = Var::from_tensor(x)?;
        let base = self.projections(layer)[proj];
        let y = super::train::project(ctx.ops, base, layer, proj, xv.as_tensor(), lora)?;
        let store = (y * dy)?.sum(D::Minus1)?.sum_all()?.backward()?;
        if let Some((a, b, _)) = lora.module(layer, proj) {
            if let (Some(da), Some(db)) = (store.get(a), store.get(b)) {
                grads.push((proj, da.clone(), db.clone()));
            }
        }
        store
            .get(xv.as_tensor())
            .cloned()
            .ok_or_else(|| ModelError::Invalid(format!("no gradient through projection {proj}")))
    }

    fn softmax(&self, hd: usize, ctx: &TrainContext) -> AttnProbs {
        AttnProbs(CausalSoftmax {
            scale: (1.0 / (hd as f64).sqrt()) as f32,
            window: ctx.window.unwrap_or(0) as u32,
        })
    }

    fn check_fused(&self, ctx: &TrainContext) -> Result<()> {
        if ctx.ops != TrainOps::Fused {
            return Err(ModelError::Invalid(
                "a hand-written layer backward needs the fused training ops".into(),
            ));
        }
        Ok(())
    }

    /// The final norm, LM head and mean cross-entropy of the last layer's output `x (b, t,
    /// hidden)` against `targets` (one per position, `train_cuda::NO_TARGET` where none), and
    /// their backward for an upstream gradient `scale` of the loss: (loss, dx). Logits are bf16
    /// and never kept past this call; no gradient is formed for the frozen head (candle's matmul
    /// backward would form one: a (vocab, hidden) product per step, broadcast over the batch).
    ///
    /// The rows go through in chunks of [`HEAD_ROWS`], each weighted by its share of the targets
    /// (the mean over all rows is the target-weighted mean of the chunks' means), with `pause`
    /// between chunks: the logits stay a fraction of (rows, vocab) and serving is never stalled
    /// behind the whole head (two GEMMs over the vocabulary for every row).
    pub fn head_backward(
        &self,
        x: &Tensor,
        targets: &[u32],
        scale: f32,
        ctx: &TrainContext,
        pause: &dyn Fn(),
    ) -> Result<(Tensor, Tensor)> {
        self.head_backward_chunked(x, targets, scale, ctx, pause, HEAD_ROWS)
    }

    /// [`Llama::head_backward`] in chunks of `chunk_rows` rows.
    pub fn head_backward_chunked(
        &self,
        x: &Tensor,
        targets: &[u32],
        scale: f32,
        ctx: &TrainContext,
        pause: &dyn Fn(),
        chunk_rows: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.check_fused(ctx)?;
        let chunk_rows = chunk_rows.max(1);
        let (b, t, hidden) = x.dims3()?;
        let rows = b * t;
        let eps = self.cfg.rms_norm_eps;
        let h = rms_norm(ctx.ops, x, &self.norm, eps)?.reshape((rows, hidden))?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let vocab = head.dim(0)?;
        let has_target = |tg: &[u32]| tg.iter().filter(|&&i| (i as usize) < vocab).count();
        let total = has_target(targets);
        if targets.len() != rows || total == 0 {
            return Err(ModelError::Invalid(format!(
                "head: {} targets ({total} valid) for {rows} rows",
                targets.len()
            )));
        }
        let head_t = head.t()?;
        let (mut loss, mut dhs) = (None::<Tensor>, Vec::new());
        for start in (0..rows).step_by(chunk_rows) {
            let len = chunk_rows.min(rows - start);
            let tg = &targets[start..start + len];
            let n = has_target(tg);
            if n == 0 {
                dhs.push(Tensor::zeros((len, hidden), h.dtype(), h.device())?);
                continue;
            }
            if start > 0 {
                pause();
            }
            let share = n as f64 / total as f64;
            let logits = h.narrow(0, start, len)?.matmul(&head_t)?;
            let (l, dlogits) = qlorad_kernels::train_cuda::cross_entropy_with_grad(
                &logits,
                tg,
                scale * share as f32,
            )?;
            drop(logits);
            let l = (l * share)?;
            loss = Some(match loss {
                None => l,
                Some(acc) => (acc + l)?,
            });
            dhs.push(dlogits.matmul(head)?);
        }
        drop(h);
        let loss = loss.ok_or_else(|| ModelError::Invalid("head: no rows".into()))?;
        let dh = Tensor::cat(&dhs, 0)?.reshape((b, t, hidden))?;
        drop(dhs);
        let norm = RmsNorm {
            w: self.norm.clone(),
            eps: eps as f32,
        };
        Ok((loss, norm.backward(x, &dh)?))
    }

    /// Decoder layer `layer` on `x (b, t, hidden)` (no graph): its output and what its backward
    /// needs. Same result as [`Llama::block_train`] under the fused ops. `pause` is called
    /// between attention and the MLP (a preemption point).
    pub fn block_forward_saved(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &TrainContext,
        lora: &dyn LoraWeights,
        pause: &dyn Fn(),
    ) -> Result<(Tensor, LayerActs)> {
        let mut acts = self.block_acts(layer, x, ctx, lora, pause)?;
        let site = Site { layer, ctx, lora };
        let s = swiglu(ctx.ops, &acts.gate, &acts.up)?;
        let y = add(&acts.x2, &self.proj_fwd(&acts.fused, site, 6, &s)?)?;
        acts.s = Some(s);
        Ok((y, acts))
    }

    /// What the backward of layer `layer` needs, without the layer's output: the recomputation of
    /// a checkpointed layer stops before the down projection, whose output it would discard.
    /// `pause` is called between attention and the MLP.
    pub fn block_acts(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &TrainContext,
        lora: &dyn LoraWeights,
        pause: &dyn Fn(),
    ) -> Result<LayerActs> {
        self.check_fused(ctx)?;
        let (cfg, blk, ops) = (&self.cfg, &self.blocks[layer], ctx.ops);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let x = x.detach();
        let (b, t, _) = x.dims3()?;
        let fused = self.fused_parts(layer, lora)?;
        let site = Site { layer, ctx, lora };
        let pf = |proj: usize, x: &Tensor| self.proj_fwd(&fused, site, proj, x);
        let h = rms_norm(ops, &x, &blk.input_norm, cfg.rms_norm_eps)?;
        let q = rope_heads(ops, &pf(0, &h)?, nh, &ctx.cos, &ctx.sin)?;
        let k = rope_heads(ops, &pf(1, &h)?, nkv, &ctx.cos, &ctx.sin)?;
        let v = pf(2, &h)?;
        drop(h);
        let hd = v.dim(D::Minus1)? / nkv;
        let v = swap12(&v.reshape((b, t, nkv, hd))?)?;
        let qg = q.reshape((b, nkv, (nh / nkv) * t, hd))?;
        let p = qg.apply_op2_no_bwd(&k, &self.softmax(hd, ctx))?;
        let a = swap12(&p.matmul(&v)?.reshape((b, nh, t, hd))?)?.reshape((b, t, nh * hd))?;
        let x2 = add(&x, &pf(3, &a)?)?;
        pause();
        let h = rms_norm(ops, &x2, &blk.post_norm, cfg.rms_norm_eps)?;
        let gate = pf(4, &h)?;
        let up = pf(5, &h)?;
        drop(h);
        Ok(LayerActs {
            x,
            x2,
            qg,
            k,
            v,
            p,
            a,
            gate,
            up,
            s: None,
            fused,
        })
    }

    /// The backward of decoder layer `layer` from its saved activations and `dy`, the gradient of
    /// its output: dx and the LoRA gradients, each intermediate freed after its last use.
    /// `pause` is called between the MLP's backward and attention's (a preemption point).
    pub fn block_backward(
        &self,
        layer: usize,
        acts: LayerActs,
        dy: &Tensor,
        ctx: &TrainContext,
        lora: &dyn LoraWeights,
        pause: &dyn Fn(),
    ) -> Result<LayerGrads> {
        self.check_fused(ctx)?;
        let (cfg, blk, ops) = (&self.cfg, &self.blocks[layer], ctx.ops);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let LayerActs {
            x,
            x2,
            qg,
            k,
            v,
            p,
            a,
            gate,
            up,
            s,
            fused,
        } = acts;
        let (b, t, _) = x.dims3()?;
        let hd = v.dim(D::Minus1)?;
        let mut grads = Vec::with_capacity(7);
        let site = Site { layer, ctx, lora };
        let mut pb = |proj: usize, x: &Tensor, dy: &Tensor| {
            self.proj_bwd(&fused, site, proj, (x, dy), &mut grads)
        };

        // MLP: y = x2 + down(silu(gate)·up), gate/up = proj(rmsnorm(x2)).
        let s = match s {
            Some(s) => s,
            None => swiglu(ops, &gate, &up)?,
        };
        let ds = pb(6, &s, dy)?;
        drop(s);
        let (dgate, dup) = Swiglu::backward(&gate, &up, &ds)?;
        drop((ds, gate, up));
        let h = rms_norm(ops, &x2, &blk.post_norm, cfg.rms_norm_eps)?;
        let dh = add(&pb(4, &h, &dgate)?, &pb(5, &h, &dup)?)?;
        drop((h, dgate, dup));
        let norm = RmsNorm {
            w: blk.post_norm.clone(),
            eps: cfg.rms_norm_eps as f32,
        };
        let dx2 = add(dy, &norm.backward(&x2, &dh)?)?;
        drop((dh, x2));
        pause();

        // Attention: x2 = x + o(P·V), P = softmax(Q·Kᵀ), Q/K/V = proj(rmsnorm(x)).
        let da = pb(3, &a, &dx2)?;
        drop(a);
        let d_o = swap12(&da.reshape((b, t, nh, hd))?)?.reshape((b, nkv, (nh / nkv) * t, hd))?;
        drop(da);
        let dv = p.t()?.matmul(&d_o)?; // (b, kv, t, hd)
        let dp = d_o.matmul(&v.t()?)?; // (b, kv, group·t, t)
        drop((d_o, v));
        let (dqg, dk) = self.softmax(hd, ctx).backward(&qg, &k, &p, &dp)?;
        drop((dp, p, qg, k));
        let back = |d: &Tensor, heads: usize| -> Result<Tensor> {
            Ok(d.contiguous()?.apply_op1_no_bwd(&RopeHeads {
                cos: ctx.cos.clone(),
                sin: ctx.sin.clone(),
                heads,
                sign: -1.0,
            })?)
        };
        let dq = back(&dqg.reshape((b, nh, t, hd))?, nh)?;
        let dk = back(&dk, nkv)?;
        let dv = swap12(&dv)?.reshape((b, t, nkv * hd))?;
        let h = rms_norm(ops, &x, &blk.input_norm, cfg.rms_norm_eps)?;
        let dh = add(&add(&pb(0, &h, &dq)?, &pb(1, &h, &dk)?)?, &pb(2, &h, &dv)?)?;
        drop((h, dq, dk, dv));
        let norm = RmsNorm {
            w: blk.input_norm.clone(),
            eps: cfg.rms_norm_eps as f32,
        };
        let dx = add(&dx2, &norm.backward(&x, &dh)?)?;
        Ok(LayerGrads { dx, lora: grads })
    }
}
