//! The LoRA checks of `gpu-check`: the BGMV kernels (Punica, Chen et al. 2023) against the CPU's
//! f32 `LoraBatch::apply` on mixed batches, a whole random model decoding a batch of sequences
//! that each use another adapter (or none) GPU vs CPU, and the time per projection of the BGMV
//! and gather paths.
//!
//! Bounds: BGMV takes the same bf16 x, A, B and y as the f32 reference (which is given their
//! bf16 values) and keeps the shrink in f32, so it differs only by summation order and the final
//! rounding of y to bf16: the matrix-product bound. The model checks use the greedy module's
//! logit bound and near-tie rule.

use super::greedy::{max_abs_diff, top2_margin, LOGIT_BOUND};
use super::{adapter_pair, poison, random_pair, rel_err, Report, MATMUL_BOUND};
use crate::random_model::{self, nf4, RandomSpec};
use anyhow::Result;
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{DType, Device, Tensor};
use qlorad_model::lora::{LoraBatch, LoraKernel, LoraModule};
use qlorad_model::sampling::argmax;
use qlorad_model::{Llama, Logits, LoraAdapter, Placement, SeqInput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Instant;

/// A random f32 CPU tensor rounded to bf16 values (so CPU and GPU get the same numbers).
fn bf16_values(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f32) -> Result<Tensor> {
    let v = random_model::normal(rng, shape.0 * shape.1, std);
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(DType::BF16)?
        .to_dtype(DType::F32)?)
}

/// A module's (in, out) features, `None` where an adapter has none.
type Slot = Option<(usize, usize)>;

/// An adapter of rank `r` with a module of (in, out) features at each `Some` slot (layer 0,
/// projections 0, 1, …): on the CPU in f32 and on `dev` in bf16 with the same values, the scale
/// kept apart from B (so the kernels' scale is exercised).
fn slots_adapter(
    rng: &mut ChaCha8Rng,
    r: usize,
    slots: &[Slot],
    scale: f64,
    dev: &Device,
) -> Result<(Arc<LoraAdapter>, Arc<LoraAdapter>)> {
    let (mut cpu, mut gpu) = (Vec::new(), Vec::new());
    for slot in slots {
        let Some((in_f, out_f)) = *slot else {
            cpu.push(None);
            gpu.push(None);
            continue;
        };
        let a = bf16_values(rng, (r, in_f), 1.0 / (in_f as f32).sqrt())?;
        let b = bf16_values(rng, (out_f, r), 0.02)?;
        gpu.push(Some(LoraModule {
            a: a.to_dtype(DType::BF16)?.to_device(dev)?,
            b: b.to_dtype(DType::BF16)?.to_device(dev)?,
            scale,
        }));
        cpu.push(Some(LoraModule { a, b, scale }));
    }
    Ok((
        Arc::new(LoraAdapter::from_modules(&format!("r{r}"), cpu)),
        Arc::new(LoraAdapter::from_modules(&format!("r{r}"), gpu)),
    ))
}

/// [`slots_adapter`] with one module, at slot 0.
fn slot_adapter(
    rng: &mut ChaCha8Rng,
    r: usize,
    in_f: usize,
    out_f: usize,
    scale: f64,
    dev: &Device,
) -> Result<(Arc<LoraAdapter>, Arc<LoraAdapter>)> {
    slots_adapter(rng, r, &[Some((in_f, out_f))], scale, dev)
}

/// Which adapter (index) each of `n` rows uses: the largest-rank one for a single row, else a
/// seeded mix with about one row in five on the base.
fn row_pattern(rng: &mut ChaCha8Rng, n: usize, adapters: usize) -> Vec<Option<usize>> {
    if n == 1 {
        return vec![Some(adapters - 1)];
    }
    (0..n)
        .map(|_| {
            let k = rng.random_range(0..adapters + 1);
            (k < adapters).then_some(k)
        })
        .collect()
}

/// The per-row adapters of `pattern` from (CPU, GPU) adapter pairs: (CPU rows, GPU rows).
fn rows_of<A: Clone, B: Clone>(
    pattern: &[Option<usize>],
    ads: &[(A, B)],
) -> (Vec<Option<A>>, Vec<Option<B>>) {
    pattern
        .iter()
        .map(|p| (p.map(|i| ads[i].0.clone()), p.map(|i| ads[i].1.clone())))
        .unzip()
}

/// BGMV vs the CPU gather path on single projections: (in, out) of Mistral-7B plus a small odd
/// one (in % 8 != 0 and an odd rank: the kernels' element-by-element paths), batches of 1, 7 and
/// 48 rows mixing four adapters with different ranks and scales and base-only rows.
pub fn kernel_checks(dev: &Device, r: &mut Report) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(0xb6e7);
    let scales = [2.0, 0.5, 1.0, 0.25];
    let cases: [(usize, usize, [usize; 4]); 4] = [
        (4096, 4096, [8, 16, 32, 64]),
        (4096, 14336, [8, 16, 32, 64]),
        (14336, 4096, [8, 16, 32, 64]),
        (203, 77, [8, 16, 5, 64]),
    ];
    let mut base_rows_changed = 0usize;
    for (in_f, out_f, ranks) in cases {
        let ads = ranks
            .iter()
            .zip(scales)
            .map(|(&rk, s)| slot_adapter(&mut rng, rk, in_f, out_f, s, dev))
            .collect::<Result<Vec<_>>>()?;
        for n in [1usize, 7, 48] {
            let pattern = row_pattern(&mut rng, n, ads.len());
            let (cpu_rows, gpu_rows) = rows_of(&pattern, &ads);
            let x = bf16_values(&mut rng, (n, in_f), 1.0)?;
            let y0 = bf16_values(&mut rng, (n, out_f), 0.1)?;
            let want = LoraBatch::new(&cpu_rows, &Device::Cpu)?.apply(0, 0, &x, y0.clone())?;
            let xg = x.to_dtype(DType::BF16)?.to_device(dev)?;
            let name = format!("lora bgmv {in_f}->{out_f} rows={n} ranks {ranks:?}");
            poison(dev, n * 64 * 2)?;
            let bgmv = LoraBatch::with_kernel(&gpu_rows, dev, LoraKernel::Bgmv)?;
            if !bgmv.uses_bgmv() {
                r.add(
                    name,
                    f64::INFINITY,
                    MATMUL_BOUND,
                    "BGMV plan not built".into(),
                );
                continue;
            }
            let y = y0.to_dtype(DType::BF16)?.to_device(dev)?;
            let got = bgmv
                .apply(0, 0, &xg, y)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            let gather = LoraBatch::with_kernel(&gpu_rows, dev, LoraKernel::Gather)?;
            let y = y0.to_dtype(DType::BF16)?.to_device(dev)?;
            let g = gather.apply(0, 0, &xg, y)?;
            let gather_err = rel_err(&g, &want)?;
            let (gv, y0v) = (got.to_vec2::<f32>()?, y0.to_vec2::<f32>()?);
            for (row, p) in pattern.iter().enumerate() {
                if p.is_none() {
                    base_rows_changed += gv[row]
                        .iter()
                        .zip(&y0v[row])
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                }
            }
            let base = pattern.iter().filter(|p| p.is_none()).count();
            r.add(
                name,
                rel_err(&got, &want)?,
                MATMUL_BOUND,
                format!("{base} base rows; gather path on GPU: {gather_err:.2e}"),
            );
        }
    }
    group_check(dev, &mut rng, r)?;
    r.add(
        "lora bgmv: base-only rows changed".into(),
        base_rows_changed as f64,
        0.0,
        "elements of rows without an adapter that differ from y (bitwise)".into(),
    );
    gemv_epilogue(dev, r)?;
    Ok(())
}

/// One launch pair for three projections reading the same x (q/k/v of Mistral-7B: 4096 -> 4096,
/// 1024, 1024), 13 rows, four adapters of which one has no module at the middle slot, against the
/// CPU gather path slot by slot.
fn group_check(dev: &Device, rng: &mut ChaCha8Rng, r: &mut Report) -> Result<()> {
    let (in_f, outs) = (4096usize, [4096usize, 1024, 1024]);
    let full: Vec<_> = outs.iter().map(|&o| Some((in_f, o))).collect();
    let mut no_k = full.clone();
    no_k[1] = None;
    let ads = [(8usize, &full), (16, &no_k), (32, &full), (64, &full)]
        .iter()
        .zip([2.0, 0.5, 1.0, 0.25])
        .map(|(&(rk, slots), s)| slots_adapter(rng, rk, slots, s, dev))
        .collect::<Result<Vec<_>>>()?;
    let n = 13;
    let pattern = row_pattern(rng, n, ads.len());
    let (cpu_rows, gpu_rows) = rows_of(&pattern, &ads);
    let x = bf16_values(rng, (n, in_f), 1.0)?;
    let y0 = outs
        .iter()
        .map(|&o| bf16_values(rng, (n, o), 0.1))
        .collect::<Result<Vec<_>>>()?;
    let cpu = LoraBatch::new(&cpu_rows, &Device::Cpu)?;
    let want = (0..3)
        .map(|p| Ok(cpu.apply(0, p, &x, y0[p].clone())?))
        .collect::<Result<Vec<_>>>()?;
    let name = "lora bgmv group q/k/v 4096->4096,1024,1024 rows=13".to_string();
    poison(dev, 3 * n * 64 * 2)?;
    let gpu = LoraBatch::with_kernel(&gpu_rows, dev, LoraKernel::Bgmv)?;
    if !gpu.uses_bgmv() {
        r.add(
            name,
            f64::INFINITY,
            MATMUL_BOUND,
            "BGMV plan not built".into(),
        );
        return Ok(());
    }
    let ys = y0
        .iter()
        .map(|y| Ok(y.to_dtype(DType::BF16)?.to_device(dev)?))
        .collect::<Result<Vec<_>>>()?;
    let xg = x.to_dtype(DType::BF16)?.to_device(dev)?;
    let got = gpu.apply_group(0, 0, &xg, ys)?;
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| rel_err(g, w))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0f64, f64::max);
    r.add(
        name,
        worst,
        MATMUL_BOUND,
        "worst of the three outputs; one adapter lacks the k module".into(),
    );
    Ok(())
}

/// Host-timed µs per call of the batch's LoRA for projections `0..ys.len()` of layer 0 (one
/// group), over 200 calls after a warm-up.
/// The decode GEMV with the LoRA expand in its epilogue (after the group's BGMV shrink) against
/// the two-step path (GEMV, then the BGMV pair) on a q/k/v-shaped group: 1, 3 and 8 rows, ranks
/// 8..64, scales not folded, every third row without an adapter. The two differ by the bf16
/// rounding of y between the GEMV and the expand, which the epilogue skips.
fn gemv_epilogue(dev: &Device, r: &mut Report) -> Result<()> {
    use qlorad_kernels::cuda::GemvKernel;
    for kernel in [
        GemvKernel::Lut16,
        GemvKernel::Tc,
        GemvKernel::Tc3,
        GemvKernel::T4,
    ] {
        gemv_epilogue_with(dev, r, kernel)?;
    }
    Ok(())
}

fn gemv_epilogue_with(
    dev: &Device,
    r: &mut Report,
    kernel: qlorad_kernels::cuda::GemvKernel,
) -> Result<()> {
    use qlorad_kernels::cuda::GemvKernel;
    use qlorad_kernels::{nf4_linear, Nf4Config, Nf4Tensor, Nf4Weight};
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    // k = 3072: 48 k blocks per row, so every kernel's pipeline refills its stages (t4: 3 iterations
    // of 2 blocks per warp).
    let qkv = [Some((3072, 1024)), Some((3072, 256)), Some((3072, 256))];
    let ws = qkv
        .iter()
        .flatten()
        .map(|&(k, n)| {
            let w = random_model::normal(&mut rng, n * k, 0.05);
            let t = Nf4Tensor::quantize(&w, &[n, k], Nf4Config::default())?;
            Ok(Arc::new(Nf4Weight::new(t).to_device_with(dev, kernel)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut worst = 0f64;
    let (mut grouped, mut grouped_worst, mut fused_worst) = (false, 0f64, 0f64);
    for rows in [1usize, 3, 8] {
        let per_row = (0..rows)
            .map(|i| {
                if i % 3 == 2 {
                    return Ok(None);
                }
                let rank = 8 * (1 + (i * 3) % 8);
                Ok(Some(slots_adapter(&mut rng, rank, &qkv, 0.5, dev)?.1))
            })
            .collect::<Result<Vec<_>>>()?;
        let batch = LoraBatch::with_kernel(&per_row, dev, LoraKernel::Bgmv)?;
        let plan = batch
            .bgmv_plan()
            .ok_or_else(|| anyhow::anyhow!("no BGMV plan for {rows} rows"))?;
        let x = Tensor::randn(0f32, 1.0, (rows, 3072), dev)?.to_dtype(DType::BF16)?;
        let base = ws
            .iter()
            .map(|w| Ok(nf4_linear(&x, w)?))
            .collect::<Result<Vec<_>>>()?;
        let want = batch.apply_group(0, 0, &x, base)?;
        let epis = plan
            .shrink_for_gemv(0, 3, &x)?
            .ok_or_else(|| anyhow::anyhow!("shrink_for_gemv found no module"))?;
        let mut singles = Vec::new();
        for ((w, e), want) in ws.iter().zip(&epis).zip(&want) {
            let got = qlorad_kernels::nf4_op::nf4_linear_lora(&x, w, e)?;
            worst = worst.max(rel_err(
                &got.to_dtype(DType::F32)?,
                &want.to_dtype(DType::F32)?,
            )?);
            singles.push((got, nf4_linear(&x, w)?));
        }
        // The grouped launch (tensor-core kernels only) against the weights one by one: the same
        // arithmetic per tile, so the same bits; with the LoRA expand and without.
        let refs: Vec<&Arc<Nf4Weight>> = ws.iter().collect();
        for with_lora in [true, false] {
            let loras = with_lora.then_some(&epis[..]);
            match qlorad_kernels::nf4_group_cuda::nf4_linear_group(&x, &refs, loras)? {
                Some(ys) => {
                    for (y, (lo, base)) in ys.iter().zip(&singles) {
                        let want = if with_lora { lo } else { base };
                        let d = (y.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                            .abs()?
                            .max_all()?
                            .to_scalar::<f32>()?;
                        grouped_worst = grouped_worst.max(f64::from(d));
                    }
                    grouped = true;
                }
                None if kernel != GemvKernel::Lut16 => {
                    anyhow::bail!("the grouped GEMV declined {} weights", kernel.name())
                }
                None => {}
            }
        }
        // The grouped launch that runs the shrink itself, twice (its counters must come back to
        // zero), against the two-step path.
        if kernel != GemvKernel::Lut16 {
            for _ in 0..2 {
                let fused = plan
                    .gemv_loras_fused(0, 3, &x)?
                    .ok_or_else(|| anyhow::anyhow!("gemv_loras_fused found no module"))?;
                let ys = qlorad_kernels::nf4_group_cuda::nf4_linear_group(&x, &refs, Some(&fused))?
                    .ok_or_else(|| anyhow::anyhow!("the grouped GEMV declined the fused shrink"))?;
                for (y, want) in ys.iter().zip(&want) {
                    fused_worst = fused_worst.max(rel_err(
                        &y.to_dtype(DType::F32)?,
                        &want.to_dtype(DType::F32)?,
                    )?);
                }
            }
        }
    }
    if kernel != GemvKernel::Lut16 {
        r.add(
            format!(
                "grouped GEMV ({}) with the shrink in its launch vs GEMV then BGMV (q/k/v, 1/3/8 rows, r 8..64, twice)",
                kernel.name()
            ),
            fused_worst,
            1e-2,
            "bf16 rounding of y between the two steps".into(),
        );
    }
    if grouped {
        r.add(
            format!(
                "grouped GEMV ({}, q/k/v in one launch, with and without LoRA) vs one launch per weight, 1/3/8 rows",
                kernel.name()
            ),
            grouped_worst,
            0.0,
            "max |difference| (same arithmetic: bitwise)".into(),
        );
    }
    r.add(
        format!(
            "nf4 GEMV ({}) + LoRA expand epilogue vs GEMV then BGMV (q/k/v group, 1/3/8 rows, r 8..64)",
            kernel.name()
        ),
        worst,
        1e-2,
        "bf16 rounding of y between the two steps".into(),
    );
    Ok(())
}

/// (host µs, GPU µs) per call. The GPU time is taken with events over launches queued behind
/// ~5 ms of copies, so the GPU runs them back to back as in a decode step that the host issues
/// ahead of (the adapter's weights stay in L2 between calls here, unlike a decode step's).
fn time_apply(batch: &LoraBatch, x: &Tensor, ys: &[Tensor], dev: &Device) -> Result<(f64, f64)> {
    for _ in 0..10 {
        drop(batch.apply_group(0, 0, x, ys.to_vec())?);
    }
    dev.synchronize()?;
    let iters = 200;
    let t = Instant::now();
    for _ in 0..iters {
        drop(batch.apply_group(0, 0, x, ys.to_vec())?);
    }
    dev.synchronize()?;
    let host = t.elapsed().as_secs_f64() / iters as f64 * 1e6;
    let Device::Cuda(cd) = dev else {
        return Ok((host, f64::NAN));
    };
    let stream = cd.cuda_stream();
    let filler = Tensor::zeros(256 << 20, DType::BF16, dev)?;
    for _ in 0..20 {
        drop(filler.copy()?);
    }
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..iters {
        drop(batch.apply_group(0, 0, x, ys.to_vec())?);
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    end.synchronize()?;
    let gpu = f64::from(start.elapsed_ms(&end)?) * 1e3 / iters as f64;
    Ok((host, gpu))
}

/// µs per projection LoRA (and per q/k/v group), BGMV vs gather: 1 row with one r=64 adapter,
/// and 32 rows with 32 adapters of ranks 8..64 (host-timed, launches included: decode is
/// launch-bound; and GPU time from events). Scales are 1, as placement folds them into B. Also the cost of building the
/// per-forward plan for the 32 rows.
pub fn timing(dev: &Device, r: &mut Report) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x7173);
    let qkv = [Some((4096, 4096)), Some((4096, 1024)), Some((4096, 1024))];
    let shapes: [(&str, &[Slot]); 4] = [
        ("4096x4096", &qkv[..1]),
        ("4096x14336", &[Some((4096, 14336))]),
        ("14336x4096", &[Some((14336, 4096))]),
        ("qkv_group", &qkv),
    ];
    for (shape, slots) in shapes {
        let single = vec![Some(slots_adapter(&mut rng, 64, slots, 1.0, dev)?.1)];
        let many: Vec<_> = (0..32)
            .map(|i| {
                let rk = 8 * (1 + i * 7 / 31);
                Ok(Some(slots_adapter(&mut rng, rk, slots, 1.0, dev)?.1))
            })
            .collect::<Result<_>>()?;
        let in_f = slots[0].map_or(0, |s| s.0);
        for (case, rows) in [("1row_r64", &single), ("32rows_32adapters", &many)] {
            let n = rows.len();
            let x = Tensor::randn(0f32, 1.0, (n, in_f), dev)?.to_dtype(DType::BF16)?;
            let ys = slots
                .iter()
                .flatten()
                .map(|&(_, o)| Ok(Tensor::randn(0f32, 0.1, (n, o), dev)?.to_dtype(DType::BF16)?))
                .collect::<Result<Vec<_>>>()?;
            let mut us = [(0f64, 0f64); 2];
            for (k, kernel) in LoraKernel::ALL.into_iter().enumerate() {
                let batch = LoraBatch::with_kernel(rows, dev, kernel)?;
                us[k] = time_apply(&batch, &x, &ys, dev)?;
                r.extra.insert(
                    format!("lora_{}_{case}_{shape}_us", kernel.name()),
                    serde_json::json!((us[k].0 * 10.0).round() / 10.0),
                );
                r.extra.insert(
                    format!("lora_{}_{case}_{shape}_gpu_us", kernel.name()),
                    serde_json::json!((us[k].1 * 10.0).round() / 10.0),
                );
            }
            println!(
                "INFO lora {case} {shape}: gather {:.1} us, bgmv {:.1} us per call ({:.1}x); GPU time gather {:.1} us, bgmv {:.1} us",
                us[0].0,
                us[1].0,
                us[0].0 / us[1].0,
                us[0].1,
                us[1].1
            );
        }
        if shape == "4096x4096" {
            let iters = 100;
            let t = Instant::now();
            for _ in 0..iters {
                drop(LoraBatch::with_kernel(&many, dev, LoraKernel::Bgmv)?);
            }
            dev.synchronize()?;
            let per = t.elapsed().as_secs_f64() / iters as f64 * 1e6;
            println!("INFO lora bgmv plan for 32 rows / 32 adapters: {per:.1} us per forward");
            r.extra.insert(
                "lora_bgmv_plan_32rows_us".into(),
                serde_json::json!((per * 10.0).round() / 10.0),
            );
        }
    }
    Ok(())
}

/// Greedy tokens and every step's logits of a batch of sequences decoded together.
pub(super) struct BatchRun {
    pub(super) tokens: Vec<Vec<u32>>,
    pub(super) logits: Vec<Vec<Vec<f32>>>,
}

/// `forced` (teacher-forced on `want`'s tokens) against `want`, over every sequence and step:
/// the largest logits relative error, then the steps whose top token differs beyond a near-tie
/// (the reference's top-1/top-2 margin above twice the largest logit difference), and the
/// near-ties.
pub(super) fn forced_agreement(want: &BatchRun, forced: &BatchRun) -> Result<(f64, usize, usize)> {
    let (mut worst, mut unexplained, mut ties) = (0f64, 0usize, 0usize);
    for (w_seq, (f_seq, toks)) in want
        .logits
        .iter()
        .zip(forced.logits.iter().zip(&want.tokens))
    {
        for ((w, f), &tok) in w_seq.iter().zip(f_seq).zip(toks) {
            let want_t = Tensor::new(w.as_slice(), &Device::Cpu)?;
            let got_t = Tensor::new(f.as_slice(), &Device::Cpu)?;
            worst = worst.max(rel_err(&got_t, &want_t)?);
            if argmax(f) != tok {
                if top2_margin(w) <= 2.0 * max_abs_diff(f, w) {
                    ties += 1;
                } else {
                    unexplained += 1;
                }
            }
        }
    }
    Ok((worst, unexplained, ties))
}

/// Decodes `n` steps of all `prompts` in one batch (each with its adapter); with `forced`, step
/// i feeds `forced[seq][i]` instead of the model's choice (teacher forcing).
pub(super) fn batch_greedy(
    model: &Llama,
    prompts: &[Vec<u32>],
    adapters: &[Option<Arc<LoraAdapter>>],
    n: usize,
    forced: Option<&[Vec<u32>]>,
) -> Result<BatchRun> {
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut inputs = prompts.to_vec();
    let mut run = BatchRun {
        tokens: vec![Vec::new(); prompts.len()],
        logits: vec![Vec::new(); prompts.len()],
    };
    for step in 0..n {
        let mut seqs: Vec<SeqInput<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .zip(adapters)
            .map(|((t, c), a)| SeqInput {
                tokens: t,
                cache: c,
                adapter: a.clone(),
            })
            .collect();
        let rows = model.forward(&mut seqs, Logits::Last)?.to_vec2::<f32>()?;
        for (i, row) in rows.into_iter().enumerate() {
            let id = argmax(&row);
            run.tokens[i].push(id);
            run.logits[i].push(row);
            inputs[i] = vec![forced.map_or(id, |f| f[i][step])];
        }
    }
    Ok(run)
}

/// A random NF4 Llama decoding 5 sequences in one batch, 4 with adapters of ranks 8/16/64/32
/// (placed on the GPU with the scale folded into B) and one on the base, GPU vs CPU: prefill (92
/// rows) gathers, decode (5 rows) runs BGMV; the gather path on the GPU is run too.
pub fn mixed_model(gpu: &Placement, n: usize, r: &mut Report) -> Result<()> {
    let spec = RandomSpec::small();
    let (cpu_m, mut gpu_m) = random_pair(&spec, nf4(), gpu)?;
    let ranks = [8usize, 16, 64, 32];
    let pairs = ranks
        .iter()
        .map(|&rk| adapter_pair(&cpu_m, &gpu_m, rk))
        .collect::<Result<Vec<_>>>()?;
    let mut cpu_ads: Vec<_> = pairs.iter().map(|p| Some(p.0.clone())).collect();
    let mut gpu_ads: Vec<_> = pairs.iter().map(|p| Some(p.1.clone())).collect();
    cpu_ads.insert(2, None);
    gpu_ads.insert(2, None);
    let prompts: Vec<Vec<u32>> = [23usize, 9, 31, 17, 12]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut p = crate::synthetic_prompt(len + 5, spec.vocab);
            p.rotate_left(i);
            p.truncate(len);
            p
        })
        .collect();
    let tables = pairs.iter().filter(|p| p.1.bgmv_table().is_none()).count();
    let plan = LoraBatch::with_kernel(&gpu_ads, gpu_m.device(), LoraKernel::Bgmv)?.uses_bgmv();
    r.add(
        "mixed adapters: placed adapters without a BGMV plan".into(),
        (tables + usize::from(!plan)) as f64,
        0.0,
        "adapters lacking a device table, +1 if a decode batch builds no plan".into(),
    );
    let name = "random llama nf4 + 4 mixed adapters + base row";
    let c = batch_greedy(&cpu_m, &prompts, &cpu_ads, n, None)?;
    for kernel in LoraKernel::ALL {
        gpu_m.set_lora_kernel(kernel);
        let g = batch_greedy(&gpu_m, &prompts, &gpu_ads, n, None)?;
        let tf = batch_greedy(&gpu_m, &prompts, &gpu_ads, n, Some(&c.tokens))?;
        let (worst, unexplained, ties) = forced_agreement(&c, &tf)?;
        let equal: Vec<usize> = c
            .tokens
            .iter()
            .zip(&g.tokens)
            .map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count())
            .collect();
        let note = format!("free-running equal prefixes {equal:?} of {n}; near-ties {ties}");
        let k = kernel.name();
        r.add(
            format!("{name} ({k}): steps disagreeing beyond a near-tie"),
            unexplained as f64,
            0.0,
            note,
        );
        r.add(
            format!("{name} ({k}): teacher-forced logits rel err (max)"),
            worst,
            LOGIT_BOUND,
            String::new(),
        );
    }
    gpu_m.set_lora_kernel(LoraKernel::from_env());
    Ok(())
}
