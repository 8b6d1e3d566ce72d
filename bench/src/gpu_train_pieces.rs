//! The pieces of one decoder layer's hand-written training forward and backward
//! (`Llama::block_forward_saved` / `block_backward`, what the trainer runs on a GPU), each timed on
//! its own at Mistral-7B's shapes (batch 4 × 512, LoRA r = 64), so that the layer's time can be
//! split by piece: the seven fused QLoRA projections forward and backward, attention's GEMMs and
//! softmax, RoPE, the norms, SwiGLU, and the copies and additions between them. The sum of the
//! pieces × their count per layer is printed next to the layer's own time: what the sum misses is
//! launch gaps and allocation.

use anyhow::Result;
use candle_core::{DType, Tensor};
use qlorad_kernels::attention_train_cuda::AttnProbs;
use qlorad_kernels::lora_train_cuda::LoraLinear;
use qlorad_kernels::train_cuda::{CausalSoftmax, RmsNorm, RopeHeads, Swiglu};
use qlorad_kernels::train_elem_cuda::{add as add_bf16, swap12};
use qlorad_model::linear::BaseLinear;
use qlorad_model::llama::train::{self, TrainContext, TrainOps};
use qlorad_model::Placement;

/// One timed piece: name, ms per call, calls per layer, forward (true) or backward.
pub struct Piece {
    pub name: String,
    pub ms: f64,
    pub per_layer: f64,
    pub fwd: bool,
}

/// The NF4 projections the pieces use: (out, in) → the weight as the model holds it.
pub struct Projections<'a> {
    /// 4096 → 4096 (q, o), 4096 → 1024 (k, v), 4096 → 14336 (gate, up), 14336 → 4096 (down).
    pub q: &'a dyn BaseLinear,
    pub k: &'a dyn BaseLinear,
    pub gate: &'a dyn BaseLinear,
    pub down: &'a dyn BaseLinear,
}

/// The caller's timer: ms per call of the closure (synchronized around a batch of calls).
pub type Timer<'a> = dyn Fn(&mut dyn FnMut() -> Result<()>) -> Result<f64> + 'a;

fn rand(p: &Placement, shape: &[usize], std: f32) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, std, shape, &p.device)?.to_dtype(DType::BF16)?)
}

/// Times every piece; `time(n, f)` is the caller's timer (ms per call, synchronized).
pub fn pieces(
    p: &Placement,
    ctx: &TrainContext,
    proj: &Projections,
    time: &Timer<'_>,
) -> Result<Vec<Piece>> {
    let (b, t, h, nh, nkv, hd, inter, r) = (4usize, 512usize, 4096, 32, 8, 128, 14336, 64);
    let mut out = Vec::new();
    let mut add = |name: String, ms: f64, per_layer: f64, fwd: bool| {
        eprintln!(
            "  {:<44} {} {ms:8.3} ms  ×{per_layer}",
            name,
            if fwd { "fwd" } else { "bwd" }
        );
        out.push(Piece {
            name,
            ms,
            per_layer,
            fwd,
        });
    };
    // The seven projections: (name, weight, calls per layer).
    let shapes: [(&str, &dyn BaseLinear, f64); 4] = [
        ("q/o 4096->4096", proj.q, 2.0),
        ("k/v 4096->1024", proj.k, 2.0),
        ("gate/up 4096->14336", proj.gate, 2.0),
        ("down 14336->4096", proj.down, 1.0),
    ];
    for (name, base, count) in shapes {
        let w = base
            .nf4_weight()
            .ok_or_else(|| anyhow::anyhow!("{name}: not NF4"))?
            .clone();
        let (n, k) = (w.out_features(), w.in_features());
        let op = LoraLinear {
            weight: w,
            scale: 0.25,
            dropout: None,
        };
        let x = rand(p, &[b, t, k], 1.0)?;
        let a = rand(p, &[r, k], 0.02)?;
        let bm = rand(p, &[n, r], 0.02)?;
        let dy = rand(p, &[b, t, n], 1.0)?;
        let fwd = time(&mut || Ok(x.apply_op3_no_bwd(&a, &bm, &op).map(drop)?))?;
        add(format!("proj {name} + LoRA"), fwd, count, true);
        let bwd = time(&mut || {
            let (dx, da, db) = op.backward(&x, &a, &bm, &dy)?;
            // As block_backward does: the adapter's gradients to f32.
            drop((dx, da.to_dtype(DType::F32)?, db.to_dtype(DType::F32)?));
            Ok(())
        })?;
        add(format!("proj {name} + LoRA, dx dA dB"), bwd, count, false);
    }
    let x = rand(p, &[b, t, h], 1.0)?;
    let dx = rand(p, &[b, t, h], 1.0)?;
    let w = Tensor::ones(h, DType::BF16, &p.device)?;
    let norm = RmsNorm {
        w: w.clone(),
        eps: 1e-5,
    };
    // Twice in the forward, recomputed twice in the backward.
    let ms = time(&mut || Ok(train::rms_norm(TrainOps::Fused, &x, &w, 1e-5).map(drop)?))?;
    add("rms_norm".into(), ms, 2.0, true);
    add("rms_norm (recomputed)".into(), ms, 2.0, false);
    add(
        "rms_norm backward".into(),
        time(&mut || Ok(norm.backward(&x, &dx).map(drop)?))?,
        2.0,
        false,
    );
    // x2 = x + o and y = x2 + down; dh = dgate + dup, dq + dk + dv (two), dx2 and dx.
    let ms = time(&mut || Ok(add_bf16(&x, &dx).map(drop)?))?;
    add("residual add (b, t, 4096)".into(), ms, 2.0, true);
    add("gradient add (b, t, 4096)".into(), ms, 5.0, false);
    let ms = time(&mut || Ok((&x + &dx).map(drop)?))?;
    add(
        "  the same add by candle (not counted)".into(),
        ms,
        0.0,
        true,
    );
    let q = rand(p, &[b, t, nh * hd], 1.0)?;
    let kk = rand(p, &[b, t, nkv * hd], 1.0)?;
    add(
        "rope q (b, t, 32 heads)".into(),
        time(&mut || {
            Ok(train::rope_heads(TrainOps::Fused, &q, nh, &ctx.cos, &ctx.sin).map(drop)?)
        })?,
        1.0,
        true,
    );
    add(
        "rope k (b, t, 8 heads)".into(),
        time(&mut || {
            Ok(train::rope_heads(TrainOps::Fused, &kk, nkv, &ctx.cos, &ctx.sin).map(drop)?)
        })?,
        1.0,
        true,
    );
    let qh = rand(p, &[b, nh, t, hd], 1.0)?;
    add(
        "rope backward q (b, 32, t, hd)".into(),
        time(&mut || {
            Ok(qh
                .apply_op1_no_bwd(&RopeHeads {
                    cos: ctx.cos.clone(),
                    sin: ctx.sin.clone(),
                    heads: nh,
                    sign: -1.0,
                })
                .map(drop)?)
        })?,
        1.25,
        false,
    );
    // Attention, as block_acts / block_backward run it.
    let qg = rand(p, &[b, nkv, (nh / nkv) * t, hd], 1.0)?;
    let k = rand(p, &[b, nkv, t, hd], 1.0)?;
    let v = rand(p, &[b, nkv, t, hd], 1.0)?;
    let sm = AttnProbs(CausalSoftmax {
        scale: (1.0 / (hd as f64).sqrt()) as f32,
        window: 0,
    });
    add(
        "attention P = softmax(Q Kt) (one op)".into(),
        time(&mut || Ok(qg.apply_op2_no_bwd(&k, &sm).map(drop)?))?,
        1.0,
        true,
    );
    let pr = qg.apply_op2_no_bwd(&k, &sm)?;
    add(
        "attention P V".into(),
        time(&mut || Ok(pr.matmul(&v).map(drop)?))?,
        1.0,
        true,
    );
    let av = pr.matmul(&v)?;
    add(
        "attention out to (b, t, 4096) (transpose copy)".into(),
        time(&mut || {
            Ok(swap12(&av.reshape((b, nh, t, hd))?)?
                .reshape((b, t, nh * hd))
                .map(drop)?)
        })?,
        1.0,
        true,
    );
    add(
        "  the same by candle's copy (not counted)".into(),
        time(&mut || {
            Ok(av
                .reshape((b, nh, t, hd))?
                .transpose(1, 2)?
                .reshape((b, t, nh * hd))
                .map(drop)?)
        })?,
        0.0,
        true,
    );
    let vin = rand(p, &[b, t, nkv * hd], 1.0)?;
    add(
        "v to (b, kv, t, hd) (transpose copy)".into(),
        time(&mut || Ok(swap12(&vin.reshape((b, t, nkv, hd))?).map(drop)?))?,
        1.0,
        true,
    );
    let d_o = rand(p, &[b, nkv, (nh / nkv) * t, hd], 1.0)?;
    add(
        "attention dV = Pt dO".into(),
        time(&mut || Ok(pr.t()?.matmul(&d_o).map(drop)?))?,
        1.0,
        false,
    );
    add(
        "attention dP = dO Vt".into(),
        time(&mut || Ok(d_o.matmul(&v.t()?).map(drop)?))?,
        1.0,
        false,
    );
    let dp = d_o.matmul(&v.t()?)?;
    add(
        "attention softmax backward -> dQ, dK".into(),
        time(&mut || Ok(sm.backward(&qg, &k, &pr, &dp).map(drop)?))?,
        1.0,
        false,
    );
    let da = rand(p, &[b, t, nh * hd], 1.0)?;
    add(
        "dO to (b, kv, group t, hd) (transpose copy)".into(),
        time(&mut || Ok(swap12(&da.reshape((b, t, nh, hd))?).map(drop)?))?,
        1.0,
        false,
    );
    let dv = rand(p, &[b, nkv, t, hd], 1.0)?;
    add(
        "dV to (b, t, 1024) (transpose copy)".into(),
        time(&mut || Ok(swap12(&dv)?.reshape((b, t, nkv * hd)).map(drop)?))?,
        1.0,
        false,
    );
    let gate = rand(p, &[b, t, inter], 1.0)?;
    let up = rand(p, &[b, t, inter], 1.0)?;
    let ds = rand(p, &[b, t, inter], 1.0)?;
    // In the forward, and recomputed in the backward.
    let ms = time(&mut || Ok(train::swiglu(TrainOps::Fused, &gate, &up).map(drop)?))?;
    add("swiglu".into(), ms, 1.0, true);
    add("swiglu (recomputed)".into(), ms, 1.0, false);
    add(
        "swiglu backward".into(),
        time(&mut || Ok(Swiglu::backward(&gate, &up, &ds).map(drop)?))?,
        1.0,
        false,
    );
    Ok(out)
}

/// Prints the pieces' sums per direction against the layer's measured forward and fwd+bwd.
pub fn summary(pieces: &[Piece], layer_fwd: f64, layer_fwd_bwd: f64) {
    let sum = |fwd: bool| -> f64 {
        pieces
            .iter()
            .filter(|p| p.fwd == fwd)
            .map(|p| p.ms * p.per_layer)
            .sum()
    };
    let (f, bw) = (sum(true), sum(false));
    eprintln!(
        "pieces: forward {f:.3} ms (layer {layer_fwd:.3}), backward {bw:.3} ms (layer {:.3}); \
         forward + backward {:.3} of {layer_fwd_bwd:.3} ms",
        layer_fwd_bwd - layer_fwd,
        f + bw
    );
    let mut by_share: Vec<&Piece> = pieces.iter().collect();
    by_share.sort_by(|a, b| (b.ms * b.per_layer).total_cmp(&(a.ms * a.per_layer)));
    for p in by_share.iter().take(8) {
        eprintln!(
            "  {:<44} {:6.3} ms per layer ({:4.1} %)",
            p.name,
            p.ms * p.per_layer,
            100.0 * p.ms * p.per_layer / layer_fwd_bwd
        );
    }
}
