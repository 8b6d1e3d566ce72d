//! Batched CPU attention over per-sequence KV caches: one call per layer appends every sequence's
//! new keys and values to its cache in place and computes causal grouped-query attention (with the
//! optional sliding window) for all of its queries, reading the cache buffers in place.
//!
//! The math is `llama::attend`'s (transformers' `eager_attention_forward`): softmax(q·kᵀ/√d + mask)·v
//! with a max-subtracted softmax and f32 accumulation. The work is split much as vLLM's CPU
//! paged-attention kernel splits it over (sequence, head): independent tasks per (kv head,
//! sequence, block of queries), run on rayon's pool. Query heads sharing a kv head are handled by the same task, so GQA reads K and V once per
//! group. Few-query blocks (decode) use direct dot/axpy loops (AVX2+FMA when the CPU has them, as
//! `qlorad_kernels::gemv`); blocks of prefill queries use the `gemm` crate (what candle's CPU matmul
//! runs) over the keys the block can see, skipping keys wholly masked for the block.
//!
//! Only the CPU f32 path runs this; CUDA and other dtypes keep the candle path of `llama.rs`.

use crate::error::{ModelError, Result};
use crate::kv_cache::{HostKv, NewKv};
use crate::llama::SeqInput;
use candle_core::{Layout, Storage, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Which attention the CPU f32 path runs (`QLORAD_CPU_ATTENTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuAttention {
    /// `batched_attention`: one op per layer for the whole batch.
    Batched,
    /// The per-sequence candle ops of `llama::attend` (the reference the batched op is tested
    /// against; also what CUDA runs).
    Reference,
}

impl CpuAttention {
    pub const ALL: [CpuAttention; 2] = [CpuAttention::Batched, CpuAttention::Reference];

    pub fn name(self) -> &'static str {
        match self {
            CpuAttention::Batched => "batched",
            CpuAttention::Reference => "reference",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// `QLORAD_CPU_ATTENTION` (`batched` or `reference`) if set to a known name, else batched.
    pub fn from_env() -> Self {
        std::env::var("QLORAD_CPU_ATTENTION")
            .ok()
            .and_then(|s| Self::parse(&s))
            .unwrap_or(CpuAttention::Batched)
    }
}

/// Query rows per task; a prefill row of n tokens becomes ⌈n / QUERY_BLOCK⌉ tasks per kv head.
const QUERY_BLOCK: usize = 64;
/// Blocks of at most this many queries use the direct loops: for so few rows the GEMM's operand
/// packing costs more than the product (the observation behind `qlorad_kernels::gemv`).
const DIRECT_MAX_ROWS: usize = 4;

/// The attention geometry of a layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnGeometry {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Mistral's sliding window: a query at position p sees keys at positions > p - window.
    pub(crate) window: Option<usize>,
}

/// One sequence's rows of the flattened batch: `n` new tokens at rows `off..off + n`, following
/// `past` cached positions.
#[derive(Debug, Clone, Copy)]
struct SeqRows {
    off: usize,
    n: usize,
    past: usize,
}

/// The f32 elements of a contiguous CPU tensor.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(ModelError::Invalid(format!(
            "batched CPU attention: {what} is not on the CPU"
        )));
    };
    let data = cpu.as_slice::<f32>()?;
    let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
        ModelError::Invalid(format!("batched CPU attention: {what} is not contiguous"))
    })?;
    Ok(&data[a..b])
}

/// Appends each sequence's new K/V to its cache (`layer`) and attends its queries over everything
/// it has cached. The caches' lengths are not advanced (`Llama::forward` does that after the last
/// layer), as with `KvCache::append`.
///
/// q: (heads, tokens, hd); k, v: (kv_heads, tokens, hd), rope already applied, contiguous, f32,
/// rows in `seqs` order → (tokens, heads * hd), the layout of `llama::attend`'s concatenated output.
pub(crate) fn batched_attention(
    geo: AttnGeometry,
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &mut [SeqInput<'_>],
) -> Result<Tensor> {
    let AttnGeometry {
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = geo;
    let (_, t, _) = q.dims3()?;
    if q.dims() != [heads, t, hd] || k.dims() != [kv_heads, t, hd] || k.dims() != v.dims() {
        return Err(ModelError::Invalid(format!(
            "batched CPU attention: q {:?}, k {:?}, v {:?} do not match {heads} heads / {kv_heads} \
             kv heads of {hd}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(ModelError::Invalid(format!(
            "{heads} attention heads are not a multiple of {kv_heads} kv heads"
        )));
    }
    let mut rows = Vec::with_capacity(seqs.len());
    let mut off = 0;
    for s in seqs.iter() {
        let n = s.tokens.len();
        rows.push(SeqRows {
            off,
            n,
            past: s.cache.len(),
        });
        off += n;
    }
    if off != t {
        return Err(ModelError::Invalid(format!(
            "batched CPU attention: the sequences have {off} new tokens, q has {t}"
        )));
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qd, kd, vd) = (
        cpu_f32(&qs, ql, "q")?,
        cpu_f32(&ks, kl, "k")?,
        cpu_f32(&vs, vl, "v")?,
    );
    // Pass 1: the new keys and values into each cache (n × kv_heads row copies per sequence).
    for (s, r) in seqs.iter_mut().zip(&rows) {
        s.cache.append_host(
            layer,
            &NewKv {
                k: kd,
                v: vd,
                tokens: t,
                off: r.off,
                n: r.n,
                kv_heads,
                head_dim: hd,
            },
        )?;
    }
    let caches = seqs
        .iter()
        .map(|s| {
            s.cache.host_layer(layer).ok_or_else(|| {
                ModelError::Invalid(format!("KV cache layer {layer} has no host buffers"))
            })
        })
        .collect::<Result<Vec<&HostKv>>>()?;
    // Pass 2: attention. The output is laid out (kv_heads, tokens, group, hd) so that each task owns
    // one contiguous chunk; one transpose at the end gives (tokens, heads * hd).
    let group = heads / kv_heads;
    let row_len = group * hd;
    let mut out = vec![0f32; kv_heads * t * row_len];
    let mut tasks = Vec::new();
    for (h, head_out) in out.chunks_mut((t * row_len).max(1)).enumerate() {
        let mut rest = head_out;
        for (si, r) in rows.iter().enumerate() {
            let (mine, tail) = rest.split_at_mut(r.n * row_len);
            rest = tail;
            for (b, block) in mine.chunks_mut(QUERY_BLOCK * row_len).enumerate() {
                tasks.push(Task {
                    kv_head: h,
                    rows: r,
                    first: b * QUERY_BLOCK,
                    cache: caches[si],
                    out: block,
                });
            }
        }
    }
    let ctx = TaskCtx {
        q: qd,
        tokens: t,
        geo,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    tasks.into_par_iter().for_each(|task| run_task(&ctx, task));
    let out = Tensor::from_vec(out, (kv_heads, t, row_len), q.device())?;
    Ok(out
        .transpose(0, 1)?
        .contiguous()?
        .reshape((t, heads * hd))?)
}

/// What every task reads.
struct TaskCtx<'a> {
    /// (heads, tokens, hd)
    q: &'a [f32],
    tokens: usize,
    geo: AttnGeometry,
    scale: f32,
}

/// Queries `first .. first + out.len() / (group * hd)` of one sequence, for the query heads of one
/// kv head; `out` is their (queries, group, hd) output.
struct Task<'a> {
    kv_head: usize,
    rows: &'a SeqRows,
    first: usize,
    cache: &'a HostKv,
    out: &'a mut [f32],
}

impl TaskCtx<'_> {
    /// The query of query head `head` at `row` of the flattened batch: hd floats.
    fn query(&self, head: usize, row: usize) -> &[f32] {
        let hd = self.geo.head_dim;
        let at = (head * self.tokens + row) * hd;
        &self.q[at..at + hd]
    }

    /// Keys visible to the query at position `pos`: `lo..=pos` (the causal and sliding-window rules
    /// of `llama::attention_mask`).
    fn visible(&self, pos: usize) -> std::ops::Range<usize> {
        let lo = self.geo.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        lo..pos + 1
    }
}

fn run_task(ctx: &TaskCtx<'_>, task: Task<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { run_task_fma(ctx, task) };
        return;
    }
    run_task_impl::<false>(ctx, task);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_task_fma(ctx: &TaskCtx<'_>, task: Task<'_>) {
    run_task_impl::<true>(ctx, task);
}

#[inline(always)]
fn run_task_impl<const FMA: bool>(ctx: &TaskCtx<'_>, task: Task<'_>) {
    let hd = ctx.geo.head_dim;
    let group = ctx.geo.heads / ctx.geo.kv_heads;
    let nq = task.out.len() / (group * hd);
    if nq <= DIRECT_MAX_ROWS {
        direct::<FMA>(ctx, task, group, nq);
    } else {
        blocked(ctx, task, group, nq);
    }
}

/// One query position at a time: scores of its `group` query heads over its visible keys,
/// softmax, weighted sum of values. Each key and value row is read once for the whole group (GQA's
/// saving; the rows stay in L1 across the group's dot products). Plain loops only: a closure
/// (`map`, `for_each`) is compiled as its own function without the caller's AVX2/FMA features, and
/// its `mul_add` then becomes a call to libm's `fmaf`.
#[inline(always)]
fn direct<const FMA: bool>(ctx: &TaskCtx<'_>, task: Task<'_>, group: usize, nq: usize) {
    let hd = ctx.geo.head_dim;
    let (keys, values) = (
        task.cache.keys(task.kv_head),
        task.cache.values(task.kv_head),
    );
    let r = task.rows;
    let head0 = task.kv_head * group;
    // (group, visible keys) scores of the current query position
    let mut scores = Vec::new();
    for i in 0..nq {
        let qi = task.first + i;
        let vis = ctx.visible(r.past + qi);
        let len = vis.len();
        scores.resize(group * len, 0f32);
        for (jj, j) in vis.clone().enumerate() {
            let k = &keys[j * hd..(j + 1) * hd];
            for g in 0..group {
                let q = ctx.query(head0 + g, r.off + qi);
                scores[g * len + jj] = dot::<FMA>(q, k) * ctx.scale;
            }
        }
        for g in 0..group {
            softmax_in_place(&mut scores[g * len..(g + 1) * len]);
        }
        let out = &mut task.out[i * group * hd..(i + 1) * group * hd];
        for (jj, j) in vis.enumerate() {
            let v = &values[j * hd..(j + 1) * hd];
            for g in 0..group {
                axpy::<FMA>(scores[g * len + jj], v, &mut out[g * hd..(g + 1) * hd]);
            }
        }
    }
}

/// A block of queries at once: S = Q·Kᵀ over the keys any of them sees (one GEMM per query head),
/// per-row mask + softmax, then O = P·V (another GEMM) straight into the output.
fn blocked(ctx: &TaskCtx<'_>, task: Task<'_>, group: usize, nq: usize) {
    let hd = ctx.geo.head_dim;
    let r = task.rows;
    let first_pos = r.past + task.first;
    let lo = ctx.visible(first_pos).start;
    let hi = first_pos + nq; // one past the last query's position
    let width = hi - lo;
    let keys = &task.cache.keys(task.kv_head)[lo * hd..hi * hd];
    let values = &task.cache.values(task.kv_head)[lo * hd..hi * hd];
    let mut s = vec![0f32; nq * width];
    for g in 0..group {
        let head = task.kv_head * group + g;
        let q = ctx.query(head, r.off + task.first);
        // SAFETY: q is nq×hd row-major (nq consecutive query rows of one head), keys is width×hd
        // row-major (read as its transpose, hd×width), s is nq×width row-major; every pointer is
        // valid for the extents and strides given and s does not alias the inputs.
        unsafe {
            gemm(
                nq,
                width,
                hd,
                s.as_mut_ptr(),
                1,
                width as isize,
                false,
                q.as_ptr(),
                1,
                hd as isize,
                keys.as_ptr(),
                hd as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        for (i, row) in s.chunks_mut(width).enumerate() {
            let vis = ctx.visible(first_pos + i);
            let (a, b) = (vis.start - lo, vis.end - lo);
            row[a..b].iter_mut().for_each(|x| *x *= ctx.scale);
            softmax_in_place(&mut row[a..b]);
            row[..a].fill(0.0);
            row[b..].fill(0.0);
        }
        let row_len = group * hd;
        let dst = &mut task.out[g * hd..];
        // SAFETY: s is nq×width row-major, values is width×hd row-major, dst holds nq rows of
        // row_len floats whose first hd (from g·hd) are this head's output: the last row ends at
        // (nq-1)·row_len + hd ≤ dst.len(); nothing aliases.
        unsafe {
            gemm(
                nq,
                hd,
                width,
                dst.as_mut_ptr(),
                1,
                row_len as isize,
                false,
                s.as_ptr(),
                1,
                width as isize,
                values.as_ptr(),
                1,
                hd as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    }
}

/// Numerically stable softmax (max subtracted), as candle's `softmax_last_dim`.
#[inline(always)]
fn softmax_in_place(x: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for &v in x.iter() {
        max = max.max(v);
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Dot product. Under `run_task_fma` (`FMA`) an explicit AVX2 kernel: the autovectorized lane
/// loop's horizontal sum was turned into 2-wide SLP code by LLVM, and a decode step does one
/// reduction per (key, query head).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is only true inside `run_task_fma`, which runs after checking that the CPU
        // has AVX2 and FMA.
        return unsafe { dot_avx2(a, b) };
    }
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0f32;
    for (p, q) in ca.remainder().iter().zip(cb.remainder()) {
        tail += p * q;
    }
    for (pa, pb) in ca.zip(cb) {
        for j in 0..8 {
            lanes[j] += pa[j] * pb[j];
        }
    }
    let mut sum = tail;
    for l in lanes {
        sum += l;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY (all loads): i + 16 ≤ n, resp. i + 8 ≤ n, keeps every 8-float load within both slices.
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            acc1,
        );
        i += 16;
    }
    if i + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        i += 8;
    }
    let acc = _mm256_add_ps(acc0, acc1);
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    let mut sum = _mm_cvtss_f32(s);
    for j in i..n {
        sum += a[j] * b[j];
    }
    sum
}

/// `acc += p · x`.
#[inline(always)]
fn axpy<const FMA: bool>(p: f32, x: &[f32], acc: &mut [f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = if FMA { p.mul_add(v, *a) } else { *a + p * v };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvCache;
    use crate::llama::reference_attention;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const LAYERS: usize = 2;
    const LAYER: usize = 1;

    fn random(rng: &mut ChaCha8Rng, shape: (usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Caches with `past` random positions already in `LAYER` (written by the reference path).
    fn caches(rng: &mut ChaCha8Rng, geo: AttnGeometry, pasts: &[usize]) -> Vec<KvCache> {
        pasts
            .iter()
            .map(|&past| {
                let mut c = KvCache::new(LAYERS);
                if past > 0 {
                    let shape = (geo.kv_heads, past, geo.head_dim);
                    c.append(LAYER, &random(rng, shape), &random(rng, shape))
                        .unwrap();
                    c.advance(past);
                }
                c
            })
            .collect()
    }

    /// Runs one step (new tokens `ns[i]` for sequence i) through both paths on the same random
    /// q/k/v, advances both sets of caches, and returns the largest difference relative to the
    /// largest reference output.
    fn step(
        rng: &mut ChaCha8Rng,
        geo: AttnGeometry,
        ns: &[usize],
        reference: &mut [KvCache],
        batched: &mut [KvCache],
    ) -> f32 {
        let t: usize = ns.iter().sum();
        let q = random(rng, (geo.heads, t, geo.head_dim));
        let k = random(rng, (geo.kv_heads, t, geo.head_dim));
        let v = random(rng, (geo.kv_heads, t, geo.head_dim));
        let tokens: Vec<Vec<u32>> = ns.iter().map(|&n| vec![0; n]).collect();
        let run = |caches: &mut [KvCache], batched_path: bool| {
            let mut seqs: Vec<SeqInput<'_>> = tokens
                .iter()
                .zip(caches.iter_mut())
                .map(|(t, c)| SeqInput::new(t, c))
                .collect();
            let out = if batched_path {
                batched_attention(geo, LAYER, &q, &k, &v, &mut seqs)
            } else {
                reference_attention(geo, LAYER, &q, &k, &v, &mut seqs, &Default::default())
            }
            .unwrap();
            for s in seqs.iter_mut() {
                s.cache.advance(s.tokens.len());
            }
            assert_eq!(out.dims(), &[t, geo.heads * geo.head_dim]);
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let want = run(reference, false);
        let got = run(batched, true);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = want
            .iter()
            .zip(&got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / scale
    }

    /// The batched op equals the per-sequence candle path on a mixed batch: decode rows at several
    /// cache lengths (one crossing the 16 → 32 doubling of the cache), a long prefill row (a GEMM
    /// block and a direct block), short chunked-prefill rows; GQA (6 query heads on 2 kv heads),
    /// head_dim 20 (not a multiple of the 16 dot lanes); with and without a sliding window smaller
    /// than the context. Then two more decode steps read what the batched op wrote to the caches.
    #[test]
    fn batched_equals_reference_on_a_mixed_gqa_batch() {
        for window in [None, Some(9)] {
            let geo = AttnGeometry {
                heads: 6,
                kv_heads: 2,
                head_dim: 20,
                window,
            };
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let pasts = [5, 16, 0, 30, 40, 31];
            let mut reference = caches(&mut rng, geo, &pasts);
            let mut batched: Vec<KvCache> =
                reference.iter().map(|c| c.try_clone().unwrap()).collect();
            let steps: [&[usize]; 3] = [&[1, 1, 67, 3, 10, 1], &[1; 6], &[1, 2, 1, 1, 1, 1]];
            for (i, ns) in steps.iter().enumerate() {
                let rel = step(&mut rng, geo, ns, &mut reference, &mut batched);
                assert!(
                    rel <= 1e-5,
                    "window {window:?}, step {i}: relative diff {rel}"
                );
            }
            for (r, b) in reference.iter().zip(&batched) {
                assert_eq!(r.len(), b.len());
            }
            assert!(batched.iter().all(|c| c.host_layer(LAYER).is_some()));
        }
    }

    /// Multi-query attention (one kv head) and plain multi-head attention (as many kv heads as
    /// heads) through both paths.
    #[test]
    fn batched_equals_reference_for_mqa_and_mha() {
        for (heads, kv_heads) in [(4, 1), (3, 3)] {
            let geo = AttnGeometry {
                heads,
                kv_heads,
                head_dim: 64,
                window: None,
            };
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let mut reference = caches(&mut rng, geo, &[0, 100]);
            let mut batched: Vec<KvCache> =
                reference.iter().map(|c| c.try_clone().unwrap()).collect();
            for ns in [&[12, 1][..], &[1, 1]] {
                let rel = step(&mut rng, geo, ns, &mut reference, &mut batched);
                assert!(rel <= 1e-5, "{heads}/{kv_heads} heads: relative diff {rel}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let geo = AttnGeometry {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            window: None,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let q = random(&mut rng, (4, 2, 8));
        let k = random(&mut rng, (2, 3, 8));
        let mut c = KvCache::new(1);
        let toks = [0u32; 2];
        let mut seqs = [SeqInput::new(&toks, &mut c)];
        let e = batched_attention(geo, 0, &q, &k, &k, &mut seqs).unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
    }

    #[test]
    fn selection_names_round_trip() {
        for a in CpuAttention::ALL {
            assert_eq!(CpuAttention::parse(a.name()), Some(a));
        }
        assert_eq!(CpuAttention::parse("fast"), None);
    }
}
