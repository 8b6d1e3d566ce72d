//! `qlorad-bench gpu-train-profile`: where a QLoRA training step's time goes, one piece at a time.
//!
//! One decoder layer of Mistral-7B's shapes (random NF4 weights, bf16, LoRA r=64 on all 7
//! projections, batch 4 × 512) and the pieces its training forward is made of — RMSNorm, RoPE,
//! attention, one projection with and without LoRA, SwiGLU — each timed forward alone and forward +
//! backward (GPU synchronized around each batch of calls), plus the LM head + loss and the
//! optimizer (clip + AdamW over the 448 tensors of all 32 layers). No profiler reaches the device
//! machine's driver from here (no nsys there), so the step is taken apart by hand instead.

use crate::gpu_train::{random_batch, spec};
use crate::random_model::{nf4, weights, RandomSpec};
use anyhow::Result;
use candle_core::{Tensor, Var};
use qlorad_model::linear::{BaseLinear, Nf4Linear};
use qlorad_model::llama::train::{self, LoraWeights, NoLora, TrainOps};
use qlorad_model::Llama;
use qlorad_model::{DeviceSpec, Placement};
use qlorad_trainer::step::{grad_norm, loss_from_logits, AdamW, AdamWConfig, TrainableLora};
use std::time::Instant;

/// Milliseconds per call of `f` (2 untimed calls first).
fn time(p: &Placement, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    p.synchronize()?;
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    p.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / n as f64)
}

/// Backward of `Σ y·g` (g fixed random): back-propagates a given upstream gradient.
fn backward(y: &Tensor) -> Result<()> {
    let g = y.ones_like()?;
    // Per row first: candle sums a whole tensor in one block (milliseconds for a layer's output).
    (y * g)?
        .sum(candle_core::D::Minus1)?
        .sum_all()?
        .backward()?;
    Ok(())
}

fn var(p: &Placement, shape: &[usize], std: f64) -> Result<Var> {
    let t = Tensor::randn(0f32, std as f32, shape, &p.device)?.to_dtype(p.dtype)?;
    Ok(Var::from_tensor(&t)?)
}

struct Row {
    name: &'static str,
    ops: TrainOps,
    fwd: f64,
    fwd_bwd: f64,
    per_layer: f64,
}

pub fn run(device: DeviceSpec, json_out: Option<std::path::PathBuf>) -> Result<()> {
    let p = Placement::open(device)?;
    let rs = RandomSpec {
        hidden: 4096,
        layers: 1,
        heads: 32,
        kv_heads: 8,
        intermediate: 14336,
        vocab: 32000,
        max_pos: 1024,
        rope_theta: 10_000.0,
        embed_std: 1.0,
        proj_std: 0.02,
        head_std: 0.02,
    };
    let cfg = rs.config()?;
    let t0 = Instant::now();
    let mut model = Llama::new_on(cfg.clone(), weights(&cfg, &rs, 1, nf4())?, &p)?;
    let lora = TrainableLora::new_on(&cfg, &spec(64, 16.0), 42, &p.device)?;
    eprintln!("built in {:.1}s", t0.elapsed().as_secs_f64());
    let (b, t, h, nh, nkv, hd, inter) = (4, 512, 4096, 32, 8, 128, 14336);
    let n = 10;
    let mut rows = Vec::new();
    let mut add = |name: &'static str, per_layer: f64, ops: TrainOps, fwd: f64, fwd_bwd: f64| {
        eprintln!(
            "{name:<30} {ops:<6?} fwd {fwd:8.3} ms   fwd+bwd {fwd_bwd:8.3} ms   ×{per_layer}/layer"
        );
        rows.push(Row {
            name,
            ops,
            fwd,
            fwd_bwd,
            per_layer,
        });
    };
    let cfgq = match nf4() {
        qlorad_model::Quant::Nf4(c) => c,
        _ => anyhow::bail!("nf4() is not NF4"),
    };
    let host_w = |o: usize, i: usize| Tensor::randn(0f32, 0.02, (o, i), &candle_core::Device::Cpu);
    let qlin: Box<dyn BaseLinear> =
        Box::new(Nf4Linear::quantize(&host_w(h, h)?, cfgq)?).to_placement(&p)?;
    let glin: Box<dyn BaseLinear> =
        Box::new(Nf4Linear::quantize(&host_w(inter, h)?, cfgq)?).to_placement(&p)?;
    let x = var(&p, &[b, t, h], 1.0)?;
    let q = var(&p, &[b, nh, t, hd], 1.0)?;
    let k = var(&p, &[b, nkv, t, hd], 1.0)?;
    let v = var(&p, &[b, nkv, t, hd], 1.0)?;
    let gate = var(&p, &[b, t, inter], 1.0)?;
    let up = var(&p, &[b, t, inter], 1.0)?;
    let w = Tensor::ones(h, p.dtype, &p.device)?;
    for ops in [TrainOps::Candle, TrainOps::Fused] {
        model.set_train_ops(ops);
        let ctx = model.train_context(t)?;
        let fwd = time(&p, n, || {
            model.block_train(0, x.as_tensor(), &ctx, &lora)?;
            Ok(())
        })?;
        let fb = time(&p, n, || {
            backward(&model.block_train(0, x.as_tensor(), &ctx, &lora)?)
        })?;
        add("decoder layer (all)", 1.0, ops, fwd, fb);

        let f = || train::rms_norm(ops, x.as_tensor(), &w, 1e-5);
        add(
            "rms_norm",
            2.0,
            ops,
            time(&p, n, || Ok(f().map(drop)?))?,
            time(&p, n, || backward(&f()?))?,
        );
        let f = || train::rope_heads(ops, x.as_tensor(), nh, &ctx.cos, &ctx.sin);
        add(
            "rope into heads (q; k 1/4)",
            1.25,
            ops,
            time(&p, n, || Ok(f().map(drop)?))?,
            time(&p, n, || backward(&f()?))?,
        );
        let f = || train::attention(&ctx, q.as_tensor(), k.as_tensor(), v.as_tensor());
        add(
            "attention core",
            1.0,
            ops,
            time(&p, n, || Ok(f().map(drop)?))?,
            time(&p, n, || backward(&f()?))?,
        );
        let f = || train::swiglu(ops, gate.as_tensor(), up.as_tensor());
        add(
            "swiglu",
            1.0,
            ops,
            time(&p, n, || Ok(f().map(drop)?))?,
            time(&p, n, || backward(&f()?))?,
        );
    }
    // The same layer through its hand-written backward (what the trainer runs on a GPU).
    let ops = model.train_ops();
    {
        let ctx = model.train_context(t)?;
        let dy = x.as_tensor().ones_like()?;
        let fwd = time(&p, n, || {
            Ok(model
                .block_forward_saved(0, x.as_tensor(), &ctx, &lora, &|| {})
                .map(drop)?)
        })?;
        let fb = time(&p, n, || {
            let (_, acts) = model.block_forward_saved(0, x.as_tensor(), &ctx, &lora, &|| {})?;
            Ok(model
                .block_backward(0, acts, &dy, &ctx, &lora, &|| {})
                .map(drop)?)
        })?;
        add("layer, hand-written backward", 1.0, ops, fwd, fb);
        // The same layer taken apart: each piece of the hand-written path on its own.
        let klin: Box<dyn BaseLinear> =
            Box::new(Nf4Linear::quantize(&host_w(nkv * hd, h)?, cfgq)?).to_placement(&p)?;
        let dlin: Box<dyn BaseLinear> =
            Box::new(Nf4Linear::quantize(&host_w(h, inter)?, cfgq)?).to_placement(&p)?;
        let projs = crate::gpu_train_pieces::Projections {
            q: qlin.as_ref(),
            k: klin.as_ref(),
            gate: glin.as_ref(),
            down: dlin.as_ref(),
        };
        eprintln!("pieces of the hand-written layer (ms per call, calls per layer):");
        let pieces = crate::gpu_train_pieces::pieces(&p, &ctx, &projs, &|f| time(&p, n, f))?;
        crate::gpu_train_pieces::summary(&pieces, fwd, fb);
    }
    let f = |l: &dyn LoraWeights| train::project(ops, qlin.as_ref(), 0, 0, x.as_tensor(), l);
    add(
        "q proj, NF4 only",
        1.0,
        ops,
        time(&p, n, || Ok(f(&NoLora).map(drop)?))?,
        time(&p, n, || backward(&f(&NoLora)?))?,
    );
    add(
        "q proj + LoRA r64",
        1.0,
        ops,
        time(&p, n, || Ok(f(&lora).map(drop)?))?,
        time(&p, n, || backward(&f(&lora)?))?,
    );
    let f = |l: &dyn LoraWeights| train::project(ops, glin.as_ref(), 0, 4, x.as_tensor(), l);
    add(
        "gate proj, NF4 only",
        2.0,
        ops,
        time(&p, n, || Ok(f(&NoLora).map(drop)?))?,
        time(&p, n, || backward(&f(&NoLora)?))?,
    );
    add(
        "gate proj + LoRA r64",
        2.0,
        ops,
        time(&p, n, || Ok(f(&lora).map(drop)?))?,
        time(&p, n, || backward(&f(&lora)?))?,
    );
    // The harness's own cost: Σ y·1 and its backward on a layer-sized output.
    let f = || -> Result<Tensor> { Ok(x.as_tensor().affine(1.0, 0.0)?) };
    add(
        "harness (y = x·1)",
        0.0,
        ops,
        time(&p, n, || f().map(drop))?,
        time(&p, n, || backward(&f()?))?,
    );

    let batch = random_batch(cfg.vocab_size, b, t, 1)?;
    for ops in [TrainOps::Candle, TrainOps::Fused] {
        model.set_train_ops(ops);
        let f = || -> Result<Tensor> {
            Ok(loss_from_logits(
                ops,
                &model.head_train(x.as_tensor())?,
                &batch,
            )?)
        };
        add(
            "head + loss (once per step)",
            0.0,
            ops,
            time(&p, n, || f().map(drop))?,
            time(&p, n, || Ok(f()?.backward().map(drop)?))?,
        );
    }
    // The head and loss with their hand-written backward (what the trainer runs on a GPU).
    {
        let ctx = model.train_context(t)?;
        let targets = qlorad_trainer::step::row_targets(&batch)?;
        let hb = time(&p, n, || {
            Ok(model
                .head_backward(x.as_tensor(), &targets, 1.0, &ctx, &|| {})
                .map(drop)?)
        })?;
        add(
            "head + loss, hand-written backward",
            0.0,
            TrainOps::Fused,
            hb,
            hb,
        );
    }

    // The optimizer over all 32 layers' LoRA tensors (gradients: the weights themselves).
    let mut cfg32 = cfg.clone();
    cfg32.num_layers = 32;
    let lora32 = TrainableLora::new_on(&cfg32, &spec(64, 16.0), 7, &p.device)?;
    let named = lora32.named_vars();
    let vars: Vec<&Var> = named.iter().map(|(_, v)| *v).collect();
    let grads: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let mut opt = AdamW::new(&vars, AdamWConfig::default())?;
    let clip = time(&p, 3, || Ok(grad_norm(&grads).map(drop)?))?;
    let adam = time(&p, 3, || {
        Ok(opt.update_scaled(&vars, &grads, 2e-4, 0.5, &|| {})?)
    })?;
    add("grad norm (448 tensors, per step)", 0.0, ops, clip, clip);
    add(
        "clipped AdamW (448 tensors, per step)",
        0.0,
        ops,
        adam,
        adam,
    );

    // A plain step ≈ 32 layers' forward + backward, the head and loss, clip and AdamW.
    for (ops, piece) in [
        (TrainOps::Candle, "decoder"),
        (TrainOps::Fused, "decoder"),
        (TrainOps::Fused, "layer, hand"),
    ] {
        let layer = rows
            .iter()
            .find(|r| r.ops == ops && r.per_layer == 1.0 && r.name.starts_with(piece))
            .map_or(0.0, |r| r.fwd_bwd);
        // The head and loss as this path runs them, the norm and the update.
        let head = if piece == "layer, hand" {
            "head + loss, hand"
        } else {
            "head + loss (once"
        };
        let once: f64 = rows
            .iter()
            .filter(|r| {
                (r.name.starts_with(head) && r.ops == ops)
                    || r.name.starts_with("grad norm")
                    || r.name.starts_with("clipped AdamW")
            })
            .map(|r| r.fwd_bwd)
            .sum();
        let step = 32.0 * layer + once;
        eprintln!(
            "{ops:?} ({piece}): layer fwd+bwd {layer:.2} ms (harness included for autograd) → plain step ≈ {step:.0} ms, {:.0} tok/s",
            (b * t) as f64 / step * 1e3
        );
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({"piece": r.name, "ops": format!("{:?}", r.ops), "fwd_ms": r.fwd,
                "fwd_bwd_ms": r.fwd_bwd, "per_layer": r.per_layer})
        })
        .collect();
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
