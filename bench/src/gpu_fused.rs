//! The fused decode step (model/src/llama_fused.rs, kernels/cuda/decode.cu) against the general
//! path on the same GPU model: teacher-forced batches whose logits must agree to bf16 rounding
//! (both paths run the same projections; they differ only in attention's intermediate rounding,
//! which the fused kernel keeps in f32). The GPU-vs-CPU checks of gpu_greedy/gpu_lora run the
//! fused step too (it is the default), so together they tie it to the f32 CPU reference.
//!
//! Cases: mixed adapters (4 ranks + a base row) with contexts long enough for the split attention
//! (flash-decoding combine); a sliding window shorter than the context; sequences whose first
//! forward is a single token (the fused step creates their caches).

use super::lora::{batch_greedy, forced_agreement, BatchRun};
use super::Report;
use crate::random_model::{self, nf4, RandomSpec};
use anyhow::Result;
use qlorad_model::{Llama, LoraAdapter, Placement};
use std::sync::Arc;

/// Fused vs general logits, both bf16 on the GPU.
const FUSED_BOUND: f64 = 2e-2;

pub(super) fn model(gpu: &Placement, window: Option<usize>) -> Result<Llama> {
    let spec = RandomSpec::small();
    let mut cfg = spec.config()?;
    cfg.sliding_window = window;
    let w = random_model::weights(&cfg, &spec, 11, nf4())?;
    Ok(Llama::new_on(cfg, w, gpu)?)
}

pub(super) fn prompts(lens: &[usize], vocab: usize) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut p = crate::synthetic_prompt(len + 7, vocab);
            let shift = (i * 3) % p.len();
            p.rotate_left(shift);
            p.truncate(len);
            p
        })
        .collect()
}

/// Decodes `n` steps with the general path, then teacher-forces the fused path on its tokens.
fn compare(
    m: &mut Llama,
    prompts: &[Vec<u32>],
    ads: &[Option<Arc<LoraAdapter>>],
    n: usize,
    name: &str,
    r: &mut Report,
) -> Result<()> {
    m.set_fused_decode(false)?;
    let want = batch_greedy(m, prompts, ads, n, None)?;
    m.set_fused_decode(true)?;
    let got = batch_greedy(m, prompts, ads, n, Some(&want.tokens))?;
    // RoPE and the KV write in the attention launch (the default) against rope_kv then
    // attention: the same arithmetic, so the same logits bit for bit.
    std::env::set_var("QLORAD_ROPE_ATTENTION", "0");
    let two = batch_greedy(m, prompts, ads, n, Some(&want.tokens));
    std::env::remove_var("QLORAD_ROPE_ATTENTION");
    let differing = differing_bits(&two?, &got);
    r.add(
        format!("fused decode, {name}: RoPE in the attention launch vs rope_kv, differing logits"),
        differing as f64,
        0.0,
        String::new(),
    );
    // The splits merged inside a thread-block cluster (the default; QLORAD_ATT_CLUSTER=0 turns it
    // off) against the combine launch: the same splits and merge arithmetic, so the same bits.
    // Both runs with long contexts' splits not capped at one cluster (a cap the combine launch
    // does not take, so other splits): `uncapped` (the cluster merge as set) against `cl` (the
    // other merge).
    let was = qlorad_kernels::step_graph_cuda::cluster_merge();
    let cap_was = qlorad_kernels::step_graph_cuda::cluster_cap();
    qlorad_kernels::step_graph_cuda::set_cluster_cap(false);
    let uncapped = batch_greedy(m, prompts, ads, n, Some(&want.tokens));
    qlorad_kernels::step_graph_cuda::set_cluster_merge(!was);
    let cl = batch_greedy(m, prompts, ads, n, Some(&want.tokens));
    qlorad_kernels::step_graph_cuda::set_cluster_merge(was);
    qlorad_kernels::step_graph_cuda::set_cluster_cap(cap_was);
    let uncapped = uncapped?;
    same_bits(
        r,
        format!("fused decode, {name}: splits merged in a cluster vs the combine launch, differing logits"),
        &cl,
        &uncapped,
        format!("cluster merge {} for the compared run, splits not capped", on_off(!was)),
    );
    let steps = format!("{} sequences x {n} steps", prompts.len());
    // The norm launches' shrink dots in k-chunk partials (the default, 2) or whole (1; 4 when the
    // process runs 1): other summation orders, both within the general path's bound.
    let parts_was = qlorad_kernels::bgmv::norm_shrink_parts();
    let parts = if parts_was == 1 { 4 } else { 1 };
    qlorad_kernels::bgmv::set_norm_shrink_parts(parts);
    let split = batch_greedy(m, prompts, ads, n, Some(&want.tokens));
    qlorad_kernels::bgmv::set_norm_shrink_parts(parts_was);
    agreement(
        &format!(
            "fused decode with the norm shrink in {parts} k-chunk partials vs general path, {name}"
        ),
        &want,
        &split?,
        &steps,
        r,
    )?;
    // Contexts past 8 splits capped at 8 so the cluster merges them (the default;
    // QLORAD_ATT_CLUSTER_CAP=0 off) or not: other splits, so other rounding; both within the
    // general path's bound (`got` runs as set, `uncapped` without the cap).
    agreement(
        &format!("fused decode with splits not capped vs general path, {name}"),
        &want,
        &uncapped,
        &steps,
        r,
    )?;
    agreement(
        &format!("fused decode vs general path, {name}"),
        &want,
        &got,
        &steps,
        r,
    )?;
    Ok(())
}

/// Logits of `a` and `b` (same sequences and steps) whose bits differ, plus any length mismatch.
/// A bit-for-bit check of `run` against `base`: a failed run is a failed check (NaN), not the end
/// of gpu-check.
fn same_bits(r: &mut Report, check: String, run: &Result<BatchRun>, base: &BatchRun, note: String) {
    let (differing, note) = match run {
        Ok(c) => (differing_bits(c, base) as f64, note),
        Err(e) => (f64::NAN, format!("{note}; run failed: {e}")),
    };
    r.add(check, differing, 0.0, note);
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

pub(super) fn differing_bits(a: &BatchRun, b: &BatchRun) -> usize {
    a.logits
        .iter()
        .flatten()
        .zip(b.logits.iter().flatten())
        .map(|(x, y)| differing_values(x, y))
        .sum::<usize>()
        + a.logits.len().abs_diff(b.logits.len())
}

/// Values of `a` and `b` whose bits differ (so a NaN counts), plus any length mismatch.
fn differing_values(a: &[f32], b: &[f32]) -> usize {
    a.len().abs_diff(b.len())
        + a.iter()
            .zip(b)
            .filter(|(p, q)| p.to_bits() != q.to_bits())
            .count()
}

/// The fused run `got`, teacher-forced on `want`'s tokens, against the general path's `want`: its
/// worst logits error within the fused bound, and no step disagreeing beyond a near-tie.
fn agreement(
    what: &str,
    want: &BatchRun,
    got: &BatchRun,
    steps: &str,
    r: &mut Report,
) -> Result<()> {
    let (worst, unexplained, ties) = forced_agreement(want, got)?;
    r.add(
        format!("{what}: logits rel err (max)"),
        worst,
        FUSED_BOUND,
        steps.to_string(),
    );
    r.add(
        format!("{what}: steps disagreeing beyond a near-tie"),
        unexplained as f64,
        0.0,
        format!("near-ties {ties}"),
    );
    Ok(())
}

/// The packed hot-load placement (one staging buffer, one copy) against placing module by module:
/// every A and folded B must be bit-identical, and both must get a BGMV table.
fn packed_placement(m: &Llama, gpu: &Placement, r: &mut Report) -> Result<()> {
    let host = LoraAdapter::from_modules("packed", random_model::lora_modules(m.config(), 48, 3)?);
    let packed = host.to_placement(gpu)?;
    let each = host.to_placement_each(gpu)?;
    let mut differing = 0usize;
    for slot in 0..m.config().num_layers * 7 {
        let (layer, proj) = (slot / 7, slot % 7);
        match (packed.module(layer, proj), each.module(layer, proj)) {
            (Some(a), Some(b)) => {
                for (x, y) in [(&a.a, &b.a), (&a.b, &b.b)] {
                    let x = x
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let y = y
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    differing += differing_values(&x, &y);
                }
            }
            (None, None) => {}
            _ => differing += 1,
        }
    }
    let tables =
        usize::from(packed.bgmv_table().is_none()) + usize::from(each.bgmv_table().is_none());
    r.add(
        "adapter hot-load: packed placement vs module by module, differing values".into(),
        (differing + tables) as f64,
        0.0,
        format!(
            "{} bytes placed; +1 per placement without a BGMV table",
            packed.bytes()
        ),
    );
    Ok(())
}

/// The pinned staging ring of the hot-load upload (`qlorad_kernels::upload_cuda`) on a buffer of
/// several chunks with a partial last one, twice (the second reuses the ring): the device copy must
/// be the host buffer bit for bit.
fn upload_round_trip(gpu: &Placement, r: &mut Report) -> Result<()> {
    let candle_core::Device::Cuda(dev) = &gpu.device else {
        return Ok(());
    };
    let n = 2 * (8 << 20) + 12_345;
    let mut differing = 0usize;
    for round in 0..2u32 {
        let host: Vec<half::bf16> = (0..n as u32)
            .map(|i| half::bf16::from_bits((i.wrapping_mul(2_654_435_761) ^ round) as u16 & 0x7f7f))
            .collect();
        let t = qlorad_kernels::upload_cuda::upload_bf16(dev, &host)?;
        let back = t.to_vec1::<half::bf16>()?;
        differing += back.len().abs_diff(host.len());
        differing += back
            .iter()
            .zip(&host)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
    }
    r.add(
        "adapter hot-load: pinned ring upload of 16.8M bf16 (3 chunks), twice, differing values"
            .into(),
        differing as f64,
        0.0,
        String::new(),
    );
    Ok(())
}

pub fn checks(gpu: &Placement, n: usize, r: &mut Report) -> Result<()> {
    let vocab = RandomSpec::small().vocab;
    let mut m = model(gpu, None)?;
    embed_rows(gpu, r)?;
    readback(gpu, r)?;
    upload_round_trip(gpu, r)?;
    packed_placement(&m, gpu, r)?;
    let mut ads: Vec<Option<Arc<LoraAdapter>>> = [8usize, 16, 64, 32]
        .iter()
        .enumerate()
        .map(|(i, &rank)| {
            let modules = random_model::lora_modules(m.config(), rank, 5 + i as u64)?;
            Ok(Some(Arc::new(m.place_adapter(
                LoraAdapter::from_modules(&format!("fused-{rank}"), modules),
            )?)))
        })
        .collect::<Result<_>>()?;
    ads.insert(2, None);
    compare(
        &mut m,
        &prompts(&[300, 9, 150, 64, 2], vocab),
        &ads,
        n,
        "4 adapters + base, contexts up to 300 (split attention)",
        r,
    )?;
    // A rank that is not a multiple of 8: the kernels' element-by-element paths.
    let odd = random_model::lora_modules(m.config(), 12, 11)?;
    let odd = Arc::new(m.place_adapter(LoraAdapter::from_modules("fused-12", odd))?);
    compare(
        &mut m,
        &prompts(&[1, 1, 1], vocab),
        &[None, ads[0].clone(), Some(odd)],
        n,
        "one-token prompts (caches created by the fused step), ranks 8 and 12",
        r,
    )?;
    let mut w = model(gpu, Some(40))?;
    compare(
        &mut w,
        &prompts(&[100, 20, 45], vocab),
        &[None, None, None],
        n,
        "sliding window 40",
        r,
    )?;
    Ok(())
}

/// The fused step's embedding gather (decode.cu embed_rows_bf16, ids read on the device so that a
/// captured step replays it) against candle's index_select on the same table: the same rows bit
/// for bit, and zeros for an id past the vocabulary (which index_select would not take).
fn embed_rows(gpu: &Placement, r: &mut Report) -> Result<()> {
    use candle_core::{DType, Tensor};
    let (vocab, hidden) = (1000usize, 576usize);
    let table = Tensor::randn(0f32, 1.0, (vocab, hidden), &gpu.device)?.to_dtype(DType::BF16)?;
    let kern = qlorad_kernels::decode_cuda::DecodeKernels::load(&gpu.device)?;
    let good = [3u32, 999, 0, 17, 3];
    let ids = Tensor::new(&good[..], &gpu.device)?;
    let got = kern.embed_rows(&table, &ids)?;
    let want = table.index_select(&ids, 0)?;
    let differing = got
        .ne(&want)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    r.add(
        "embed_rows vs index_select (5 rows of a 1000 x 576 bf16 table), differing values".into(),
        f64::from(differing),
        0.0,
        String::new(),
    );
    let past = Tensor::new(&[5u32, vocab as u32, u32::MAX][..], &gpu.device)?;
    let rows = kern.embed_rows(&table, &past)?;
    let nonzero = rows
        .narrow(0, 1, 2)?
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    let first = rows
        .narrow(0, 0, 1)?
        .ne(&table.narrow(0, 5, 1)?)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    r.add(
        "embed_rows: ids past the vocabulary give zero rows (sum |x| of 2 rows + differing values of a valid one)".into(),
        f64::from(nonzero + first),
        0.0,
        String::new(),
    );
    Ok(())
}

/// The pinned logits readback (kernels/src/readback_cuda.rs, `QLORAD_PINNED_LOGITS=1`) against
/// candle's copy: the same values bit for bit, flat and as rows (the engine's form), through a
/// buffer that grows, is reused, and reads a tensor that starts inside its storage.
fn readback(gpu: &Placement, r: &mut Report) -> Result<()> {
    use candle_core::{DType, Tensor};
    let mut rb = qlorad_kernels::readback_cuda::HostReadback::new();
    let mut differing = 0usize;
    let mut total = 0usize;
    for (rows, cols) in [(1usize, 1000usize), (5, 4099), (3, 300)] {
        let t = Tensor::randn(0f32, 1.0, (rows + 1, cols), &gpu.device)?.to_dtype(DType::F32)?;
        let part = t.narrow(0, 1, rows)?;
        let got = rb.read_f32(&part)?;
        let want: Vec<f32> = part.flatten_all()?.to_vec1()?;
        total += want.len();
        differing += differing_values(&got, &want);
        // The engine's form: rows.
        let rows_got = rb.read_f32_rows(&part)?;
        let rows_want = part.to_vec2::<f32>()?;
        differing += rows_got.len().abs_diff(rows_want.len());
        for (g, w) in rows_got.iter().zip(&rows_want) {
            differing += differing_values(g, w);
        }
    }
    r.add(
        "pinned logits readback vs candle's copy, differing values".into(),
        differing as f64,
        0.0,
        format!("{total} values over 3 reads (growing, reused, offset), flat and as rows"),
    );
    Ok(())
}
