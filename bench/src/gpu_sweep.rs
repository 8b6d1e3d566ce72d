//! GEMV sweep (an experiment, reported as INFO lines): the lut16 NF4 GEMV for one input row with
//! one thing changed at a time — how the weight bytes are loaded, whether x is staged in shared
//! memory, how many chunks a lane keeps in flight, warps per block — timed back to back over
//! 256 MB of rotating weights (GPU-bound: the raw launch costs a few µs, the kernels 10–30 µs),
//! each checked against the production kernel's output.

use super::{rand_tensor, rel_err, Report};
use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{DType, Device, Storage, Tensor};
use half::bf16;
use qlorad_kernels::cuda::GemvKernel;
use qlorad_kernels::{nf4_linear, Nf4Config, Nf4Tensor, Nf4Weight};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Instant;

/// (kernel suffix, warps per block, x staged in shared memory, grid of resident blocks only).
/// `noscale`, `read*` and `calc*` compute something else on purpose (no block scales; the weight
/// stream alone; the arithmetic alone): their error vs lut16 is not a check.
const VARIANTS: [(&str, u32, bool, bool); 20] = [
    ("ld0_u4", 8, false, false),
    ("ld0_u4", 4, false, false),
    ("ld3_u4", 8, false, false),
    ("ld0_u2", 8, false, false),
    ("xs_u4", 8, true, false),
    ("noscale_u4", 8, false, false),
    ("read_u4", 8, false, false),
    ("read_u4", 4, false, false),
    ("read_u8", 8, false, false),
    ("read2_u4", 8, false, false),
    ("calc_u4", 8, false, false),
    ("calcnolds_u4", 8, false, false),
    ("calcnox_u4", 8, false, false),
    ("pipe_u1", 8, false, true),
    ("pipe_u2", 8, false, true),
    ("pipe_u2", 4, false, true),
    ("prmt_u4", 8, false, false),
    ("prmt_u2", 8, false, false),
    ("prmt_u4", 4, false, false),
    ("prmt_u2", 16, false, false),
];

fn to_tensor(
    y: candle_core::cuda_backend::cudarc::driver::CudaSlice<bf16>,
    dev: &Device,
) -> Result<Tensor> {
    let Device::Cuda(cd) = dev else {
        anyhow::bail!("the sweep needs a CUDA device");
    };
    let n = y.len();
    Ok(Tensor::from_storage(
        Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(y, cd.clone())),
        n,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// The device-to-device copy rate of 512 MB (candle's copy kernel), timed with events: the
/// ceiling the GEMV's streaming is compared with.
fn copy_ceiling(dev: &Device, r: &mut Report) -> Result<()> {
    let Device::Cuda(cd) = dev else {
        anyhow::bail!("the sweep needs a CUDA device");
    };
    let stream = cd.cuda_stream();
    let t = Tensor::zeros(256 << 20, DType::BF16, dev)?;
    drop(t.copy()?);
    dev.synchronize()?;
    let iters = 10;
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..iters {
        drop(t.copy()?);
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    end.synchronize()?;
    let per = f64::from(start.elapsed_ms(&end)?) * 1e-3 / iters as f64;
    let gbs = 2.0 * (512 << 20) as f64 / per / 1e9;
    println!(
        "INFO copy 512 MB device to device: {:.0} us, {gbs:.0} GB/s (read + write)",
        per * 1e6
    );
    r.extra
        .insert("copy_512mb_gb_s".into(), serde_json::json!(gbs.round()));
    Ok(())
}

pub fn run(dev: &Device, r: &mut Report) -> Result<()> {
    copy_ceiling(dev, r)?;
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (n, k) in [(14336usize, 4096usize), (4096, 14336), (4096, 4096)] {
        let w = crate::random_model::normal(&mut rng, n * k, 0.02);
        let t = Nf4Tensor::quantize(&w, &[n, k], Nf4Config::default())?;
        let copies = (256 << 20) / (n * k / 2) + 1;
        let ws: Vec<Arc<Nf4Weight>> = (0..copies)
            .map(|_| {
                Ok(Arc::new(
                    Nf4Weight::new(t.clone()).to_device_with(dev, GemvKernel::Lut16)?,
                ))
            })
            .collect::<Result<_>>()?;
        let x = rand_tensor(&mut rng, &[1, k], 1.0)?
            .to_dtype(DType::BF16)?
            .to_device(dev)?;
        let want = nf4_linear(&x, &ws[0])?
            .flatten_all()?
            .to_dtype(DType::F32)?;
        let (xs, xl) = x.storage_and_layout();
        let Storage::Cuda(xc) = &*xs else {
            anyhow::bail!("x is not on the GPU");
        };
        let (a, b) = xl.contiguous_offsets().context("x not contiguous")?;
        let xslice = xc.as_cuda_slice::<bf16>()?;
        let xv = xslice.slice(a..b);
        let Device::Cuda(cd) = dev else {
            anyhow::bail!("the sweep needs a CUDA device");
        };
        let stream = cd.cuda_stream();
        for (name, warps, shared, resident) in VARIANTS {
            let tag = if resident { "res" } else { "row" };
            let gpu = |i: usize| ws[i % copies].gpu().context("weight not on the GPU");
            let got = to_tensor(gpu(0)?.gemv_sweep(name, warps, shared, resident, &xv)?, dev)?
                .to_dtype(DType::F32)?;
            let err = rel_err(&got, &want)?;
            for i in 0..copies {
                drop(gpu(i)?.gemv_sweep(name, warps, shared, resident, &xv)?);
            }
            dev.synchronize()?;
            // GPU time, not host time: the launches queue behind ~4 ms of dequantization, so the
            // GPU runs them back to back however long the host takes to issue them.
            for _ in 0..40 {
                drop(ws[0].dequantize_gpu()?);
            }
            let iters = 20 * copies;
            let t0 = Instant::now();
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            for i in 0..iters {
                drop(gpu(i)?.gemv_sweep(name, warps, shared, resident, &xv)?);
            }
            let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let host = t0.elapsed().as_secs_f64() / iters as f64;
            end.synchronize()?;
            let per = f64::from(start.elapsed_ms(&end)?) * 1e-3 / iters as f64;
            let gbs = (n * k / 2 + n * k / 64) as f64 / per / 1e9;
            println!(
                "INFO gemv sweep {name:<10} {warps:>2} warps {tag} {n}x{k}: {:.1} us GPU ({:.1} us host to issue), {gbs:.0} GB/s (rel err vs lut16 {err:.1e})",
                per * 1e6,
                host * 1e6
            );
            r.extra.insert(
                format!("sweep_{name}_w{warps}_{tag}_{n}x{k}_us"),
                serde_json::json!((per * 1e7).round() / 10.0),
            );
        }
    }
    Ok(())
}
