//! gpu-check's section for the fused training ops (`kernels/cuda/train.cu`): each op's output and
//! input gradients on the GPU in bf16 against candle's composite ops on the CPU in f32, from the
//! same bf16-representable inputs and the same upstream gradient.

use crate::gpu_check::{rel_err, Report};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use qlorad_model::linear::{BaseLinear, Nf4Linear};
use qlorad_model::llama::train::{self, causal_mask, LoraWeights, TrainContext, TrainOps};
use qlorad_model::Placement;
use qlorad_trainer::step::loss_from_logits;

/// A random f32 tensor on the host whose values bf16 represents exactly.
fn input(shape: &[usize], mean: f64, std: f64, seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            // A fixed pseudo-random sequence (splitmix64), so CPU and GPU see the same values.
            let mut z = (i as u64).wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
            (mean + std * (2.0 * u - 1.0) * 1.7) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(DType::BF16)?
        .to_dtype(DType::F32)?)
}

/// An op built from its inputs with the given kernels on the given device.
type OpUnderTest<'a> = dyn Fn(TrainOps, &Device, &[Tensor]) -> Result<Tensor> + 'a;

/// Runs `f` on the CPU (f32, candle's ops) and the GPU (bf16, fused ops) with `inputs` as
/// variables, back-propagates `Σ y·g` for a fixed random g, and records the output's and each
/// input gradient's relative error.
fn check(
    r: &mut Report,
    gpu: &Placement,
    name: &str,
    inputs: &[Tensor],
    f: &OpUnderTest<'_>,
) -> Result<()> {
    let run = |ops: TrainOps, dev: &Device, dt: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let vars = inputs
            .iter()
            .map(|t| Ok(Var::from_tensor(&t.to_dtype(dt)?.to_device(dev)?)?))
            .collect::<Result<Vec<_>>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(ops, dev, &ts)?;
        let g = input(y.dims(), 0.0, 1.0, 99)?
            .to_dtype(dt)?
            .to_device(dev)?;
        let store = (&y * g)?.sum(D::Minus1)?.sum_all()?.backward()?;
        let grads = ts
            .iter()
            .map(|t| {
                store
                    .get(t)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("{name}: an input got no gradient"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((y, grads))
    };
    let (yc, gc) = run(TrainOps::Candle, &Device::Cpu, DType::F32)?;
    let (yg, gg) = run(TrainOps::Fused, &gpu.device, DType::BF16)?;
    let bound = 2e-2;
    r.add(
        format!("fused train op {name}: output vs cpu (rel)"),
        rel_err(&yg.to_device(&Device::Cpu)?, &yc)?,
        bound,
        format!("{:?}", yc.dims()),
    );
    let worst = gc
        .iter()
        .zip(&gg)
        .map(|(c, g)| rel_err(&g.to_device(&Device::Cpu)?, c))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0f64, f64::max);
    r.add(
        format!("fused train op {name}: input grads vs cpu (max rel)"),
        worst,
        bound,
        format!("{} inputs", gc.len()),
    );
    Ok(())
}

/// The training context of `t` positions on `dev` (RoPE tables in the inputs' dtype).
fn context(
    t: usize,
    hd: usize,
    window: Option<usize>,
    ops: TrainOps,
    dev: &Device,
    dt: DType,
) -> Result<TrainContext> {
    let half = hd / 2;
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for p in 0..t {
        for j in 0..half {
            let a = p as f32 * 10_000f32.powf(-((2 * j) as f32) / hd as f32);
            c.push(a.cos());
            s.push(a.sin());
        }
    }
    let table = |v: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, (t, half), &Device::Cpu)?
            .to_dtype(dt)?
            .to_device(dev)?)
    };
    Ok(TrainContext {
        cos: table(c)?,
        sin: table(s)?,
        mask: Some(causal_mask(t, window, dev)?),
        window,
        ops,
    })
}

/// One LoRA module for every (layer, projection).
struct OneModule<'a>(&'a Tensor, &'a Tensor, f64);

impl LoraWeights for OneModule<'_> {
    fn module(&self, _: usize, _: usize) -> Option<(&Tensor, &Tensor, f64)> {
        Some((self.0, self.1, self.2))
    }
}

/// A LoRA module whose dropout is drawn by the fused op from a seed.
struct SeededDropout<'a>(&'a Tensor, &'a Tensor, f64, u64, f64);

impl LoraWeights for SeededDropout<'_> {
    fn module(&self, _: usize, _: usize) -> Option<(&Tensor, &Tensor, f64)> {
        Some((self.0, self.1, self.2))
    }
    fn dropout_mask(&self, _: usize, _: usize) -> Option<(u64, f64)> {
        Some((self.3, self.4))
    }
}

/// The same module with the mask given as a tensor, applied by candle's ops.
struct MaskDropout<'a>(&'a Tensor, &'a Tensor, f64, &'a Tensor);

impl LoraWeights for MaskDropout<'_> {
    fn module(&self, _: usize, _: usize) -> Option<(&Tensor, &Tensor, f64)> {
        Some((self.0, self.1, self.2))
    }
    fn dropout(&self, _: usize, _: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        x.mul(self.3)
    }
}

/// The fused projection with LoRA dropout (mask drawn on the device) against candle's ops with
/// the same mask as a tensor, both on the GPU: output and gradients of x, A and B; and the share
/// of dropped values.
fn dropout_check(
    r: &mut Report,
    gpu: &Placement,
    lin: &dyn BaseLinear,
    xab: &[Tensor],
) -> Result<()> {
    let (seed, p) = (0x5eed_u64, 0.1);
    let on_gpu = |t: &Tensor| -> Result<Var> {
        Ok(Var::from_tensor(
            &t.to_dtype(DType::BF16)?.to_device(&gpu.device)?,
        )?)
    };
    let run = |fused: bool| -> Result<Vec<Tensor>> {
        let (x, a, b) = (on_gpu(&xab[0])?, on_gpu(&xab[1])?, on_gpu(&xab[2])?);
        let y = if fused {
            let l = SeededDropout(a.as_tensor(), b.as_tensor(), 2.0, seed, p);
            train::project(TrainOps::Fused, lin, 0, 0, x.as_tensor(), &l)?
        } else {
            let d = qlorad_kernels::train_cuda::Dropout { seed, p: p as f32 };
            let mask = qlorad_kernels::train_cuda::dropout(&x.as_tensor().ones_like()?, d)?;
            let l = MaskDropout(a.as_tensor(), b.as_tensor(), 2.0, &mask);
            train::project(TrainOps::Candle, lin, 0, 0, x.as_tensor(), &l)?
        };
        let g = input(y.dims(), 0.0, 1.0, 98)?
            .to_dtype(DType::BF16)?
            .to_device(&gpu.device)?;
        let store = (&y * g)?.sum(D::Minus1)?.sum_all()?.backward()?;
        let mut out = vec![y.to_device(&Device::Cpu)?];
        for v in [&x, &a, &b] {
            let gv = store
                .get(v.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("dropout check: no gradient"))?;
            out.push(gv.to_device(&Device::Cpu)?);
        }
        Ok(out)
    };
    let (f, c) = (run(true)?, run(false)?);
    let worst = f
        .iter()
        .zip(&c)
        .map(|(a, b)| rel_err(a, b))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0f64, f64::max);
    r.add(
        "fused LoRA dropout p 0.1 vs candle ops with its mask (y, dx, dA, dB max rel)".into(),
        worst,
        2e-2,
        String::new(),
    );
    let ones = Tensor::ones(xab[0].dims(), DType::BF16, &gpu.device)?;
    let d = qlorad_kernels::train_cuda::Dropout { seed, p: p as f32 };
    let mask = qlorad_kernels::train_cuda::dropout(&ones, d)?;
    let dropped = mask
        .to_dtype(DType::F32)?
        .eq(0f64)?
        .to_dtype(DType::F32)?
        .mean_all()?;
    let share = dropped.to_scalar::<f32>()? as f64;
    r.add(
        "LoRA dropout mask: |dropped share - p|".into(),
        (share - p).abs(),
        1e-2,
        format!("{share:.4} dropped of {}", ones.elem_count()),
    );
    Ok(())
}

pub fn checks(gpu: &Placement, r: &mut Report) -> Result<()> {
    let dt = |d: &Device| if d.is_cuda() { DType::BF16 } else { DType::F32 };
    let w = input(&[320], 1.0, 0.1, 5)?;
    check(
        r,
        gpu,
        "rms_norm",
        &[input(&[3, 37, 320], 0.0, 1.0, 1)?],
        &|ops, d, x| {
            let w = w.to_dtype(dt(d))?.to_device(d)?;
            Ok(train::rms_norm(ops, &x[0], &w, 1e-5)?)
        },
    )?;
    let (t, hd) = (40, 64);
    // hd 64: eight pairs per thread; hd 40: the one-pair kernel (hd % 16 != 0).
    for hdr in [hd, 40] {
        check(
            r,
            gpu,
            &format!("rope into heads (3 heads of {hdr})"),
            &[input(&[2, t, 3 * hdr], 0.0, 1.0, 2)?],
            &|ops, d, x| {
                let ctx = context(t, hdr, None, ops, d, dt(d))?;
                Ok(train::rope_heads(ops, &x[0], 3, &ctx.cos, &ctx.sin)?)
            },
        )?;
    }
    // t 40: the softmax kernels' one-piece-per-lane form; t 264: two pieces per lane, the second
    // in lane 0 only; t 42: the scalar kernels (t % 8 != 0).
    for (ta, window) in [
        (t, None),
        (t, Some(16)),
        (264, None),
        (264, Some(100)),
        (42, None),
    ] {
        let name = match window {
            None => format!("attention (GQA 8/2, t {ta})"),
            Some(w) => format!("attention (GQA 8/2, t {ta}, window {w})"),
        };
        let qkv = [
            input(&[2, 8, ta, 32], 0.0, 1.0, 3)?,
            input(&[2, 2, ta, 32], 0.0, 1.0, 4)?,
            input(&[2, 2, ta, 32], 0.0, 1.0, 6)?,
        ];
        check(r, gpu, &name, &qkv, &|ops, d, x| {
            let ctx = context(ta, 32, window, ops, d, dt(d))?;
            Ok(train::attention(&ctx, &x[0], &x[1], &x[2])?)
        })?;
    }
    // NF4 base + LoRA branch (r 16, scale 2): the fused projection op vs candle's graph.
    let wq = input(&[192, 256], 0.0, 0.05, 9)?;
    let cfgq = match crate::random_model::nf4() {
        qlorad_model::Quant::Nf4(c) => c,
        _ => anyhow::bail!("nf4() is not NF4"),
    };
    let cpu_lin = Nf4Linear::quantize(&wq, cfgq)?;
    let gpu_lin = Box::new(Nf4Linear::quantize(&wq, cfgq)?).to_placement(gpu)?;
    let xab = [
        input(&[3, 37, 256], 0.0, 1.0, 10)?,
        input(&[16, 256], 0.0, 0.06, 11)?,
        input(&[192, 16], 0.0, 0.05, 12)?,
    ];
    check(r, gpu, "NF4 + LoRA projection", &xab, &|ops, d, x| {
        let base: &dyn BaseLinear = if d.is_cuda() {
            gpu_lin.as_ref()
        } else {
            &cpu_lin
        };
        let lora = OneModule(&x[1], &x[2], 2.0);
        Ok(train::project(ops, base, 0, 0, &x[0], &lora)?)
    })?;
    dropout_check(r, gpu, gpu_lin.as_ref(), &xab)?;

    // The causal-LM loss: fused cross-entropy vs candle's f32 log-softmax on the CPU.
    let mut batch = crate::gpu_train::random_batch(300, 2, 20, 13)?;
    for m in batch.mask.iter_mut().skip(5).step_by(3) {
        *m = false; // some rows without a target
    }
    let logits = input(&[2, 20, 300], 0.0, 3.0, 14)?;
    let run = |ops: TrainOps, d: &Device| -> Result<(f64, Tensor)> {
        let dt = if d.is_cuda() { DType::BF16 } else { DType::F32 };
        let v = Var::from_tensor(&logits.to_dtype(dt)?.to_device(d)?)?;
        let l = (loss_from_logits(ops, v.as_tensor(), &batch)? * 0.7)?;
        let g = l.backward()?;
        let gv = g
            .get(v.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("cross-entropy: no gradient"))?;
        Ok((l.to_scalar::<f32>()? as f64, gv.to_device(&Device::Cpu)?))
    };
    let (lc, gc) = run(TrainOps::Candle, &Device::Cpu)?;
    let (lg, gg) = run(TrainOps::Fused, &gpu.device)?;
    r.add(
        "fused train op cross-entropy: loss vs cpu (rel)".into(),
        (lg - lc).abs() / lc.abs(),
        1e-3,
        format!("cpu {lc:.5}, gpu {lg:.5}"),
    );
    r.add(
        "fused train op cross-entropy: logit grads vs cpu (rel)".into(),
        rel_err(&gg, &gc)?,
        2e-2,
        String::new(),
    );
    let gu = [
        input(&[3, 37, 200], 0.0, 2.0, 7)?,
        input(&[3, 37, 200], 0.0, 1.0, 8)?,
    ];
    check(r, gpu, "swiglu", &gu, &|ops, _, x| {
        Ok(train::swiglu(ops, &x[0], &x[1])?)
    })?;
    // An element count that is not a multiple of 8: the kernels' scalar tail.
    let gu = [
        input(&[3, 37, 203], 0.0, 2.0, 15)?,
        input(&[3, 37, 203], 0.0, 1.0, 16)?,
    ];
    check(r, gpu, "swiglu (odd length)", &gu, &|ops, _, x| {
        Ok(train::swiglu(ops, &x[0], &x[1])?)
    })?;
    elem_checks(gpu, r)
}

/// The hand-written layer's sum and head transpose (kernels/src/train_elem_cuda.rs) against
/// candle's add and strided copy on the same GPU, bit for bit (aligned, odd-length and offset
/// views: the vector path, its scalar tail and the fallbacks).
fn elem_checks(gpu: &Placement, r: &mut Report) -> Result<()> {
    use qlorad_kernels::train_elem_cuda::{add, swap12};
    let on_gpu = |shape: &[usize], seed: u64| -> Result<Tensor> {
        Ok(input(shape, 0.0, 1.0, seed)?
            .to_dtype(DType::BF16)?
            .to_device(&gpu.device)?)
    };
    let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
        if a.dims() != b.dims() {
            anyhow::bail!("shapes {:?} vs {:?}", a.dims(), b.dims());
        }
        let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
        Ok(d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
    };
    for shape in [[4usize, 33, 128], [3, 37, 203]] {
        let (a, b) = (on_gpu(&shape, 21)?, on_gpu(&shape, 22)?);
        r.add(
            format!("bf16 add {shape:?} vs candle's (max |d|, bit-identical)"),
            max_diff(&add(&a, &b)?, &(&a + &b)?)?,
            0.0,
            String::new(),
        );
    }
    let big = on_gpu(&[2 * 6 * 5 * 64 + 8], 23)?;
    for (name, x) in [
        ("(2, 6, 5, 64)", on_gpu(&[2, 6, 5, 64], 24)?),
        ("(2, 3, 4, 12) (candle's copy)", on_gpu(&[2, 3, 4, 12], 25)?),
        (
            "(2, 6, 5, 64) at an offset (candle's copy)",
            big.narrow(0, 3, 2 * 6 * 5 * 64)?.reshape((2, 6, 5, 64))?,
        ),
        (
            "(2, 6, 5, 64) at a 16-byte offset",
            big.narrow(0, 8, 2 * 6 * 5 * 64)?.reshape((2, 6, 5, 64))?,
        ),
    ] {
        r.add(
            format!("swap dims 1, 2 of {name} vs transpose + contiguous (max |d|)"),
            max_diff(&swap12(&x)?, &x.transpose(1, 2)?.contiguous()?)?,
            0.0,
            String::new(),
        );
    }
    Ok(())
}

/// The optimizer's multi-tensor launches (kernels/src/multi_tensor_cuda.rs): the gradient norm and
/// clipped AdamW over tensors of ragged sizes (chunk tails, one-value tensors, several per block
/// group) against the trainer's candle ops on the CPU, and the update cut into groups (with a
/// preemption point between them) against one launch, bit for bit.
pub fn optimizer_checks(gpu: &Placement, r: &mut Report) -> Result<()> {
    use qlorad_kernels::multi_tensor_cuda::{adamw_update, Moments};
    use qlorad_trainer::step::{AdamW, AdamWConfig};
    let sizes = [8192 * 3 + 5, 1, 100_003, 64 * 37, 8192, 4099];
    let cfg = AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..Default::default()
    };
    let on = |d: &Device, seed: u64, std: f64| -> Result<Vec<Var>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                Ok(Var::from_tensor(
                    &input(&[n], 0.0, std, seed + i as u64)?.to_device(d)?,
                )?)
            })
            .collect()
    };
    let grads_on = |d: &Device, step: u64| -> Result<Vec<Tensor>> {
        Ok(on(d, 100 * step, 2.0)?
            .into_iter()
            .map(|v| v.as_tensor().clone())
            .collect())
    };
    let (pc, pg) = (on(&Device::Cpu, 40, 0.5)?, on(&gpu.device, 40, 0.5)?);
    let (rc, rg): (Vec<&Var>, Vec<&Var>) = (pc.iter().collect(), pg.iter().collect());
    let mut oc = AdamW::new(&rc, cfg)?;
    let mut og = AdamW::new(&rg, cfg)?;
    let (mut norm_err, mut pauses) = (0f64, 0usize);
    let count = std::cell::Cell::new(0usize);
    for step in 1..=3 {
        let gc = grads_on(&Device::Cpu, step)?;
        // The exact norm in f64 (the CPU path sums each tensor in f32: ~1e-5 relative).
        let mut sq = 0f64;
        for g in &gc {
            sq += g
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|&x| x as f64 * x as f64)
                .sum::<f64>();
        }
        oc.clip_and_update(&rc, &gc, 1e-3, 30.0, &|| {})?;
        let ng = og.clip_and_update(&rg, &grads_on(&gpu.device, step)?, 1e-3, 30.0, &|| {
            count.set(count.get() + 1)
        })?;
        norm_err = norm_err.max((ng - sq.sqrt()).abs() / sq.sqrt());
        pauses = count.get();
    }
    r.add(
        "multi-tensor grad norm vs f64 on the host, 6 ragged tensors (rel)".into(),
        norm_err,
        1e-6,
        format!(
            "{} values; clip 30 → coefficient < 1",
            sizes.iter().sum::<usize>()
        ),
    );
    let mut werr = 0f64;
    for (a, b) in pc.iter().zip(&pg) {
        werr = werr.max(rel_err(
            &b.as_tensor().to_device(&Device::Cpu)?,
            a.as_tensor(),
        )?);
    }
    r.add(
        "multi-tensor clipped AdamW, 3 steps, gpu vs cpu (weights, rel)".into(),
        werr,
        1e-6,
        format!("weight decay 0.01; {pauses} preemption points"),
    );
    // The same update in groups of ≥ 10,000 values (4 launches) vs one launch: bit-identical.
    let step = qlorad_kernels::train_cuda::AdamWStep {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        decay: 0.999,
        step_size: 1e-3,
        bc2_sqrt: 0.05,
    };
    let mut out = Vec::new();
    let mut groups_seen = 0;
    for group in [usize::MAX, 10_000] {
        let ps = on(&gpu.device, 7, 0.5)?;
        let ms: Vec<Tensor> = on(&gpu.device, 17, 0.1)?
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        let vs: Vec<Tensor> = on(&gpu.device, 27, 0.1)?
            .iter()
            .map(|v| v.as_tensor().abs())
            .collect::<candle_core::Result<_>>()?;
        let gs = grads_on(&gpu.device, 9)?;
        let pr: Vec<&Tensor> = ps.iter().map(|v| v.as_tensor()).collect();
        let n = std::cell::Cell::new(1usize);
        adamw_update(
            &pr,
            &gs,
            Moments::Device(&ms, &vs),
            step,
            0.7,
            group,
            &|| n.set(n.get() + 1),
        )?;
        groups_seen = n.get();
        let flat = |ts: Vec<Tensor>| -> Result<Tensor> {
            Ok(Tensor::cat(&ts, 0)?.to_device(&Device::Cpu)?)
        };
        out.push([
            flat(ps.iter().map(|v| v.as_tensor().clone()).collect())?,
            flat(ms)?,
            flat(vs)?,
        ]);
    }
    let mut d = 0f64;
    for (a, b) in out[0].iter().zip(&out[1]) {
        d = d.max((a - b)?.abs()?.max(0)?.to_scalar::<f32>()? as f64);
    }
    r.add(
        "multi-tensor AdamW in groups vs one launch (max |Δ|, bit-identical)".into(),
        d,
        0.0,
        format!("{groups_seen} launches"),
    );
    Ok(())
}

/// NCCL's entry points as the data-parallel trainer calls them (trainer/src/parallel_nccl.rs), on
/// a one-rank group (one GPU here; the two-GPU runs are `scripts/device-dp-run.sh`): both ways of
/// making a communicator, the flattened gradient all-reduce (a sum over one rank returns its
/// input, in the input's shapes) and the host-value one. Skipped when libnccl.so.2 is absent.
pub fn nccl_checks(gpu: &Placement, r: &mut Report) -> Result<()> {
    use qlorad_trainer::parallel::Collective;
    use qlorad_trainer::parallel_nccl::{available, NcclGroup};
    if !available() {
        println!("SKIP nccl checks: libnccl.so.2 not found");
        return Ok(());
    }
    let ts = [
        input(&[3, 5], 0.0, 1.0, 70)?.to_device(&gpu.device)?,
        input(&[7], 0.0, 1.0, 71)?.to_device(&gpu.device)?,
    ];
    for (how, group) in [
        (
            "ncclCommInitAll",
            NcclGroup::new_local(std::slice::from_ref(&gpu.device))?.remove(0),
        ),
        (
            "ncclGetUniqueId + ncclCommInitRank",
            NcclGroup::join(&gpu.device, &NcclGroup::unique_id()?, 0, 1)?,
        ),
    ] {
        let mut out = ts.to_vec();
        group.all_reduce_sum(&mut out)?;
        let mut d = 0f64;
        for (a, b) in ts.iter().zip(&out) {
            anyhow::ensure!(a.dims() == b.dims(), "all-reduce changed a shape");
            d = d.max((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64);
        }
        let h = group.all_reduce_sum_f64(&[1.5, -2.25])?;
        d = d.max((h[0] - 1.5).abs() + (h[1] + 2.25).abs());
        r.add(
            format!("nccl one-rank all-reduce = identity ({how})"),
            d,
            0.0,
            format!("rank {} of {}", group.rank(), group.world()),
        );
    }
    Ok(())
}
