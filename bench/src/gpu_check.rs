//! `qlorad-bench gpu-check`: every CUDA kernel against its CPU reference (the LoRA BGMV kernels in
//! bench/src/gpu_lora.rs), then GPU-vs-CPU greedy decoding on whole models (one with a batch of
//! mixed adapters), then a QLoRA training step GPU vs CPU (bench/src/gpu_train.rs);
//! scripts/gpu-test.sh runs it on the device.
//!
//! Bounds (relative error ‖gpu − ref‖ / ‖ref‖ on fresh random inputs, as ../.library METHOD.md
//! sets them for bf16): the NF4 dequantize must equal the CPU's f32 dequantize rounded to bf16 bit
//! for bit (same f32 products, same rounding); the matrix products take the same bf16 inputs and
//! the same NF4 weights as the f32 CPU reference and differ only by f32 summation order and the
//! final rounding to bf16 (≈ 2⁻⁹ per element), so they must land under 4e-3.

use crate::random_model::{self, RandomSpec};
use crate::GpuCheckArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::bf16;
use qlorad_kernels::cuda::GemvKernel;
use qlorad_kernels::{nf4_linear, Nf4Config, Nf4MatmulGrad, Nf4Tensor, Nf4Weight};
use qlorad_model::{Llama, LoraAdapter, Placement, Quant};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Instant;

#[path = "gpu_fused.rs"]
mod fused;
#[path = "gpu_graph.rs"]
mod graph;
#[path = "gpu_greedy.rs"]
mod greedy;
#[path = "gpu_lora.rs"]
mod lora;
#[path = "gpu_sweep.rs"]
mod sweep;

/// Error bound of the bf16 matrix products against the f32 CPU reference.
const MATMUL_BOUND: f64 = 4e-3;

/// One line of the report.
#[derive(Debug, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    pub bound: f64,
    pub pass: bool,
    pub note: String,
}

#[derive(Default)]
pub struct Report {
    pub checks: Vec<Check>,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    pub fn add(&mut self, name: String, value: f64, bound: f64, note: String) {
        let pass = value.is_finite() && value <= bound;
        println!(
            "{} {name:<52} {value:>10.3e}  (bound {bound:.0e}) {note}",
            if pass { "PASS" } else { "FAIL" }
        );
        self.checks.push(Check {
            name,
            value,
            bound,
            pass,
            note,
        });
    }
}

/// Loading every kernel module (first use in this process): the fat binaries carry machine code
/// for the build's GPU, so nothing is JIT-compiled (PTX alone took ~20 s on a fresh H200 machine).
fn module_load(device: &Device, r: &mut Report) -> Result<()> {
    use qlorad_kernels::module_cuda::{function, DECODE, LORA, NF4, NF4_SWEEP, TRAIN};
    let Device::Cuda(dev) = device else {
        anyhow::bail!("gpu-check needs a CUDA device");
    };
    let t = Instant::now();
    for (image, f) in [
        (&NF4, "nf4_dequantize_bf16"),
        (&NF4_SWEEP, "nf4_gemv_sweep_ld0_u4"),
        (&LORA, "lora_bgmv_shrink"),
        (&DECODE, "silu_mul_bf16"),
        (&TRAIN, "adamw_multi_f32"),
    ] {
        function(dev, image, f)?;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    r.add(
        "kernel modules load without JIT (5 modules, ms)".into(),
        ms,
        1000.0,
        String::new(),
    );
    Ok(())
}

pub fn run(a: GpuCheckArgs) -> Result<()> {
    let gpu = Placement::open(a.device)?;
    let mut report = Report::default();
    let t = Instant::now();
    module_load(&gpu.device, &mut report)?;
    if !a.skip_kernels {
        kernel_checks(&gpu.device, &mut report)?;
        grouped_checks(&gpu.device, &mut report)?;
        lora::kernel_checks(&gpu.device, &mut report)?;
        bandwidth(&gpu.device, &mut report)?;
        sweep::run(&gpu.device, &mut report)?;
        lora::timing(&gpu.device, &mut report)?;
    }
    greedy::random_models(&gpu, a.tokens, &mut report)?;
    lora::mixed_model(&gpu, a.tokens, &mut report)?;
    fused::checks(&gpu, a.tokens, &mut report)?;
    graph::checks(a.device, a.tokens, &mut report)?;
    if let Some(dir) = &a.model {
        greedy::real_model(&gpu, dir, a.tokens, a.prompt_file.as_deref(), &mut report)?;
    }
    crate::gpu_train_ops::checks(&gpu, &mut report)?;
    crate::gpu_train::checks(&gpu, &mut report)?;
    crate::gpu_trainer_check::checks(&gpu, &mut report)?;
    crate::gpu_train_ops::optimizer_checks(&gpu, &mut report)?;
    crate::gpu_train_ops::nccl_checks(&gpu, &mut report)?;
    let failed = report.checks.iter().filter(|c| !c.pass).count();
    println!(
        "gpu-check: {} checks, {failed} failed, {:.1}s",
        report.checks.len(),
        t.elapsed().as_secs_f64()
    );
    if let Some(p) = &a.json_out {
        let out = serde_json::json!({
            "checks": report.checks,
            "extra": report.extra,
            "failed": failed,
        });
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if failed > 0 {
        bail!("{failed} GPU checks failed");
    }
    Ok(())
}

fn rand_tensor(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(
        random_model::normal(rng, n, std),
        shape,
        &Device::Cpu,
    )?)
}

/// `‖a − b‖ / ‖b‖` in f64, NaN if either holds a NaN.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// Fills the pool with NaNs of `n` bf16 and frees them, so a kernel that leaves part of a fresh
/// output unwritten shows NaNs instead of a stale right answer.
fn poison(dev: &Device, n: usize) -> Result<()> {
    drop(Tensor::full(bf16::NAN, n, dev)?);
    Ok(())
}

fn nf4_pair(
    rng: &mut ChaCha8Rng,
    n: usize,
    k: usize,
    cfg: Nf4Config,
    dev: &Device,
) -> Result<(Arc<Nf4Weight>, Arc<Nf4Weight>)> {
    let (cpu, mut gpus) = nf4_variants(rng, n, k, cfg, dev, &[GemvKernel::Lut16])?;
    Ok((cpu, gpus.remove(0).1))
}

/// A CPU NF4 weight and its GPU copies, one per GEMV kernel.
type Nf4Variants = (Arc<Nf4Weight>, Vec<(GemvKernel, Arc<Nf4Weight>)>);

/// One random NF4 weight on the CPU and on the GPU once per GEMV kernel.
fn nf4_variants(
    rng: &mut ChaCha8Rng,
    n: usize,
    k: usize,
    cfg: Nf4Config,
    dev: &Device,
    kernels: &[GemvKernel],
) -> Result<Nf4Variants> {
    let w = random_model::normal(rng, n * k, 0.02);
    let t = Nf4Tensor::quantize(&w, &[n, k], cfg)?;
    let gpus = kernels
        .iter()
        .map(|&g| {
            Ok((
                g,
                Arc::new(Nf4Weight::new(t.clone()).to_device_with(dev, g)?),
            ))
        })
        .collect::<Result<_>>()?;
    Ok((Arc::new(Nf4Weight::new(t)), gpus))
}

fn kernel_checks(dev: &Device, r: &mut Report) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let dq = Nf4Config::default();
    let plain = Nf4Config {
        blocksize: 64,
        double_quant: false,
    };
    let bs128 = Nf4Config {
        blocksize: 128,
        double_quant: true,
    };
    // Dequantize: bit-exact against the CPU dequantize rounded to bf16.
    for (n, k, cfg) in [
        (4096, 4096, dq),
        (14336, 4096, dq),
        (1024, 4096, plain),
        (256, 576, bs128),
        (3, 37, dq), // 111 elements: the partial last chunk and an odd element count
    ] {
        // Row-major (lut16's upload) and, where the shape fits, t4's tiled layout.
        let (cpu, gpus) = nf4_variants(
            &mut rng,
            n,
            k,
            cfg,
            dev,
            &[GemvKernel::Lut16, GemvKernel::T4],
        )?;
        let want: Vec<bf16> = cpu
            .tensor
            .dequantize()
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        for (g, gpu) in &gpus {
            if *g == GemvKernel::T4 && !qlorad_kernels::tiled::fits(n, k, cfg.blocksize) {
                continue;
            }
            poison(dev, n * k)?;
            let got = gpu.dequantize_gpu()?.flatten_all()?.to_vec1::<bf16>()?;
            let mismatches = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            r.add(
                format!(
                    "dequantize {n}x{k} bs{} {}{}",
                    cfg.blocksize,
                    if cfg.double_quant { "dq" } else { "plain" },
                    if *g == GemvKernel::T4 { " (tiled)" } else { "" }
                ),
                mismatches as f64,
                0.0,
                "elements differing from CPU (bitwise)".into(),
            );
        }
    }
    // y = x·Wᵀ: the fused GEMV (≤ 32 rows, k % 32 == 0) and dequantize + cuBLAS otherwise.
    let cases: &[(usize, usize, &[usize])] = &[
        (4096, 4096, &[1, 2, 3, 4, 5, 6, 7, 8, 13, 32, 33, 100]),
        (1024, 4096, &[1, 8]),
        (14336, 4096, &[1, 4, 100]),
        (4096, 14336, &[1, 2, 100]),
        (1536, 576, &[1, 3, 64]),
        (100, 72, &[1, 9]), // k % 32 != 0: always the GEMM path
    ];
    for &(n, k, ms) in cases {
        let (cpu, gpus) = nf4_variants(&mut rng, n, k, dq, dev, &GemvKernel::ALL)?;
        let gpu = gpus[0].1.clone();
        for &m in ms {
            let x = rand_tensor(&mut rng, &[m, k], 1.0)?.to_dtype(DType::BF16)?;
            let want = nf4_linear(&x.to_dtype(DType::F32)?, &cpu)?;
            let gemv = m <= 32 && k % 32 == 0;
            for (g, w) in &gpus {
                if !gemv && !matches!(*g, GemvKernel::Lut16 | GemvKernel::T4) {
                    // The GEMM path depends on the GEMV kernel only through the layout: row-major
                    // (lut16) or t4's tiled one.
                    continue;
                }
                poison(dev, m * n)?;
                let got = nf4_linear(&x.to_device(dev)?, w)?;
                let path = if gemv {
                    format!("gemv {}", g.name())
                } else if *g == GemvKernel::T4 {
                    "dequant+gemm, tiled".into()
                } else {
                    "dequant+gemm".into()
                };
                r.add(
                    format!("x·Wᵀ {n}x{k} m={m} ({path})"),
                    rel_err(&got, &want)?,
                    MATMUL_BOUND,
                    String::new(),
                );
            }
        }
        // dx = dy·W (the backward's op), one decode-sized and one batch-sized input, for the
        // first kernel's weight and t4's (tiled where the shape fits).
        let tiled = gpus
            .iter()
            .find(|(g, _)| *g == GemvKernel::T4)
            .map(|(_, w)| w.clone());
        for m in [1usize, 64] {
            let dy = rand_tensor(&mut rng, &[m, n], 1.0)?.to_dtype(DType::BF16)?;
            let op = Nf4MatmulGrad {
                weight: cpu.clone(),
            };
            let want = dy.to_dtype(DType::F32)?.apply_op1_no_bwd(&op)?;
            for (w, label) in
                std::iter::once((gpu.clone(), "")).chain(tiled.clone().map(|w| (w, ", t4")))
            {
                let op = Nf4MatmulGrad { weight: w };
                let got = dy.to_device(dev)?.apply_op1_no_bwd(&op)?;
                r.add(
                    format!("dy·W {n}x{k} m={m} (dequant+gemm{label})"),
                    rel_err(&got, &want)?,
                    MATMUL_BOUND,
                    String::new(),
                );
            }
        }
    }
    Ok(())
}

/// A grouped-GEMV case of [`grouped_checks`]: name, quantization, the weights' (n, k).
type GroupCase = (&'static str, Nf4Config, &'static [(usize, usize)]);

/// The grouped base GEMV on decode shapes against one launch per weight, bit for bit (same
/// arithmetic per tile): groups of more tiles than the device holds blocks at once, across the
/// group's weights, with double-quantized (per-weight offsets) and plain absmax.
fn grouped_checks(dev: &Device, r: &mut Report) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x6e0f);
    let plain = Nf4Config {
        blocksize: 64,
        double_quant: false,
    };
    // (name, quantization, the group's (n, k) shapes)
    let groups: [GroupCase; 3] = [
        (
            "gate/up dq",
            Nf4Config::default(),
            &[(14336, 4096), (4096, 4096)],
        ),
        (
            "q/k/v plain",
            plain,
            &[(8192, 4096), (1024, 4096), (1024, 4096)],
        ),
        ("down dq", Nf4Config::default(), &[(4096, 14336)]),
    ];
    for (name, cfg, shapes) in groups {
        let ws = shapes
            .iter()
            .map(|&(n, k)| {
                Ok(
                    nf4_variants(&mut rng, n, k, cfg, dev, &[GemvKernel::T4])?.1[0]
                        .1
                        .clone(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Arc<Nf4Weight>> = ws.iter().collect();
        let k = shapes[0].1;
        let mut mismatches = 0usize;
        for m in 1..=4usize {
            let x = rand_tensor(&mut rng, &[m, k], 1.0)?
                .to_dtype(DType::BF16)?
                .to_device(dev)?;
            let singles = ws
                .iter()
                .map(|w| Ok(nf4_linear(&x, w)?))
                .collect::<Result<Vec<_>>>()?;
            poison(dev, m * shapes.iter().map(|s| s.0).sum::<usize>())?;
            let ys = qlorad_kernels::nf4_group_cuda::nf4_linear_group(&x, &refs, None)?
                .context("the grouped GEMV declined t4 weights")?;
            for (y, want) in ys.iter().zip(&singles) {
                let got = y.flatten_all()?.to_vec1::<bf16>()?;
                let want = want.flatten_all()?.to_vec1::<bf16>()?;
                // Bits, so that a NaN (an output left unwritten) counts too.
                mismatches += got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
            }
        }
        r.add(
            format!(
                "grouped base GEMV (t4, {name}, {} tiles) vs one launch per weight, 1..4 rows",
                shapes.iter().map(|s| s.0 / 16).sum::<usize>()
            ),
            mismatches as f64,
            0.0,
            "outputs differing (same arithmetic: bitwise)".into(),
        );
    }
    Ok(())
}

/// Seconds per `x·Wᵀ` launch over `ws` in rotation (20 rounds after a warm-up round; weights
/// rotate so they stream from memory, not L2), host-timed back to back.
fn time_rotating(x: &Tensor, ws: &[Arc<Nf4Weight>], dev: &Device) -> Result<f64> {
    for w in ws {
        nf4_linear(x, w)?; // warm-up
    }
    dev.synchronize()?;
    let iters = 20 * ws.len();
    let t = Instant::now();
    for i in 0..iters {
        nf4_linear(x, &ws[i % ws.len()])?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// Achieved bandwidth of the NF4 kernels on Mistral-7B projection shapes, rotating over enough
/// weights (> 4x the 60 MB L2) that each launch reads from HBM; host-timed over many launches, so
/// small shapes include the launch overhead. Bytes: packed codes + scale bytes + x + y. Records
/// the GEMV kernel with the least time per decoder layer among those whose checks passed.
fn bandwidth(dev: &Device, r: &mut Report) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // (n, k, uses per decoder layer): q/o, k/v, gate/up, down.
    let shapes = [
        (4096usize, 4096usize, 2usize),
        (1024, 4096, 2),
        (14336, 4096, 2),
        (4096, 14336, 1),
    ];
    let mut layer_us = vec![0f64; GemvKernel::ALL.len()];
    for (n, k, uses) in shapes {
        let copies = (256 << 20) / (n * k / 2) + 1;
        let (cpu, _) = nf4_pair(&mut rng, n, k, Nf4Config::default(), dev)?;
        let x = rand_tensor(&mut rng, &[1, k], 1.0)?
            .to_dtype(DType::BF16)?
            .to_device(dev)?;
        for (gi, g) in GemvKernel::ALL.into_iter().enumerate() {
            let ws: Vec<Arc<Nf4Weight>> = (0..copies)
                .map(|_| {
                    Ok(Arc::new(
                        Nf4Weight::new(cpu.tensor.clone()).to_device_with(dev, g)?,
                    ))
                })
                .collect::<Result<_>>()?;
            let per = time_rotating(&x, &ws, dev)?;
            let bytes = (n * k / 2 + n * k / 64 + 2 * k + 2 * n) as f64;
            let gbs = bytes / per / 1e9;
            println!(
                "INFO gemv {:<5} m=1 {n}x{k}: {:.1} us/launch (host-timed, incl. launch), {gbs:.0} GB/s",
                g.name(),
                per * 1e6
            );
            r.extra.insert(
                format!("gemv_{}_m1_{n}x{k}_us", g.name()),
                serde_json::json!((per * 1e7).round() / 10.0),
            );
            r.extra.insert(
                format!("gemv_{}_m1_{n}x{k}_gb_s", g.name()),
                serde_json::json!(gbs.round()),
            );
            layer_us[gi] += per * 1e6 * uses as f64;
            if n == 14336 {
                // Eight input rows (one GEMV group of batched decode), same weights.
                let x8 = rand_tensor(&mut rng, &[8, k], 1.0)?
                    .to_dtype(DType::BF16)?
                    .to_device(dev)?;
                let per8 = time_rotating(&x8, &ws, dev)?;
                println!(
                    "INFO gemv {:<5} m=8 {n}x{k}: {:.1} us/launch (host-timed, incl. launch)",
                    g.name(),
                    per8 * 1e6
                );
                r.extra.insert(
                    format!("gemv_{}_m8_{n}x{k}_us", g.name()),
                    serde_json::json!((per8 * 1e7).round() / 10.0),
                );
            }
        }
        if n == 14336 {
            // Diagnostic: the same shape with plain f32 absmax (no dependent scale lookups).
            let plain = Nf4Config {
                double_quant: false,
                ..Nf4Config::default()
            };
            let (_, pw) = nf4_pair(&mut rng, n, k, plain, dev)?;
            let ws: Vec<Arc<Nf4Weight>> = (0..copies)
                .map(|_| Ok(Arc::new(Nf4Weight::new(pw.tensor.clone()).to_device(dev)?)))
                .collect::<Result<_>>()?;
            let per = time_rotating(&x, &ws, dev)?;
            println!(
                "INFO gemv lut16 m=1 {n}x{k}, plain f32 absmax: {:.1} us/launch",
                per * 1e6
            );
            let w = Arc::new(Nf4Weight::new(cpu.tensor.clone()).to_device(dev)?);
            drop(w.dequantize_gpu()?);
            dev.synchronize()?;
            let iters = 50;
            let t = Instant::now();
            for _ in 0..iters {
                drop(w.dequantize_gpu()?);
            }
            dev.synchronize()?;
            let per = t.elapsed().as_secs_f64() / iters as f64;
            let gbs = (n * k / 2 + n * k * 2) as f64 / per / 1e9;
            println!(
                "INFO dequantize {n}x{k} to bf16: {:.1} us, {gbs:.0} GB/s (read + write)",
                per * 1e6
            );
            r.extra.insert(
                "dequant_14336x4096_gb_s".into(),
                serde_json::json!(gbs.round()),
            );
        }
    }
    let mut best: Option<(GemvKernel, f64)> = None;
    for (gi, g) in GemvKernel::ALL.into_iter().enumerate() {
        let tag = format!("gemv {}", g.name());
        let ok = r
            .checks
            .iter()
            .filter(|c| c.name.contains(&tag))
            .all(|c| c.pass);
        println!(
            "INFO gemv {:<5}: {:.1} us of NF4 GEMV per Mistral-7B layer at batch 1{}",
            g.name(),
            layer_us[gi],
            if ok { "" } else { " (checks FAILED)" }
        );
        r.extra.insert(
            format!("gemv_{}_layer_us", g.name()),
            serde_json::json!((layer_us[gi] * 10.0).round() / 10.0),
        );
        if ok && best.is_none_or(|(_, t)| layer_us[gi] < t) {
            best = Some((g, layer_us[gi]));
        }
    }
    if let Some((g, _)) = best {
        println!("INFO fastest correct GEMV kernel: {}", g.name());
        r.extra
            .insert("best_gemv_kernel".into(), serde_json::json!(g.name()));
    }
    Ok(())
}

/// The two copies of one random model: CPU f32 and placed on `gpu`.
pub fn random_pair(spec: &RandomSpec, quant: Quant, gpu: &Placement) -> Result<(Llama, Llama)> {
    let cfg = spec.config()?;
    let cpu = Llama::new(cfg.clone(), random_model::weights(&cfg, spec, 11, quant)?)?;
    let g = Llama::new_on(
        cfg.clone(),
        random_model::weights(&cfg, spec, 11, quant)?,
        gpu,
    )?;
    Ok((cpu, g))
}

/// One random adapter (rank `r`) for `cfg`, on the CPU and placed on `gpu`.
pub fn adapter_pair(
    cpu: &Llama,
    gpu: &Llama,
    r: usize,
) -> Result<(Arc<LoraAdapter>, Arc<LoraAdapter>)> {
    let m = random_model::lora_modules(cpu.config(), r, 5)?;
    let a = LoraAdapter::from_modules("check", m);
    let g = gpu.place_adapter(LoraAdapter::from_modules(
        "check",
        random_model::lora_modules(cpu.config(), r, 5)?,
    ))?;
    Ok((Arc::new(a), Arc::new(g)))
}
