//! The packed bf16 form of an adapter: every module's `A` and `B·scale` end to end in one buffer,
//! each at a 256-byte boundary (the BGMV kernels' 16-byte loads want it), the modules being views
//! of that buffer. It is the GPU hot-load path: an adapter folder converts straight from the mapped
//! safetensors file into this form in one parallel pass (no f32 copy in between), the buffer goes to
//! a GPU in one pipelined upload through pinned memory (`qlorad_kernels::upload_cuda`), and the host
//! form is what the adapter registry keeps for GPU devices (half the bytes of f32; placing it again,
//! on another GPU or after an eviction, is the upload alone).
//!
//! Values are those of the general placement exactly: `B·s` computed in f32, then rounded to
//! nearest even (checked against `half` here and against module-by-module placement on the GPU by
//! gpu-check).

use super::{bgmv_table, LoraAdapter, LoraModule};
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::weights::RawTensor;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use safetensors::Dtype;
use std::path::Path;
use std::sync::Arc;

/// Alignment of each tensor in the buffer, in bf16 elements (256 bytes).
const ALIGN: usize = 128;

/// Where one module's tensors lie in the packed buffer: offsets and (rows, cols).
#[derive(Debug, Clone)]
struct Region {
    slot: usize,
    a: (usize, [usize; 2]),
    b: (usize, [usize; 2]),
}

/// Where every tensor of an adapter goes in its packed buffer.
struct Layout {
    regions: Vec<Region>,
    /// Per tensor (module `i / 2`'s A when `i` is even, its B·scale when odd): (offset, elements,
    /// elements including the alignment padding after it), in buffer order.
    spans: Vec<(usize, usize, usize)>,
    total: usize,
}

impl Layout {
    /// The layout of modules of the given shapes, `(slot, A dims, B dims)` each.
    fn new(shapes: &[(usize, [usize; 2], [usize; 2])]) -> Self {
        let mut total = 0;
        let mut regions = Vec::with_capacity(shapes.len());
        let mut spans = Vec::with_capacity(2 * shapes.len());
        for &(slot, a, b) in shapes {
            let mut place = |dims: [usize; 2]| {
                let n = dims[0] * dims[1];
                let padded = n.next_multiple_of(ALIGN);
                spans.push((total, n, padded));
                total += padded;
                (total - padded, dims)
            };
            let (a, b) = (place(a), place(b));
            regions.push(Region { slot, a, b });
        }
        Self {
            regions,
            spans,
            total,
        }
    }

    /// Fills `dst` with buffer elements `at .. at + dst.len()`: `convert(i, from, d)` writes
    /// elements `from .. from + d.len()` of tensor `i`; padding is zeroed.
    fn fill<F>(&self, at: usize, dst: &mut [u16], convert: &F) -> bool
    where
        F: Fn(usize, usize, &mut [u16]) -> bool,
    {
        let end = at + dst.len();
        let mut i = self
            .spans
            .partition_point(|&(off, _, padded)| off + padded <= at);
        let mut pos = at;
        while pos < end {
            let Some(&(off, n, padded)) = self.spans.get(i) else {
                return false;
            };
            let data_end = (off + n).min(end);
            if pos < data_end && !convert(i, pos - off, &mut dst[pos - at..data_end - at]) {
                return false;
            }
            let pad_end = (off + padded).min(end);
            dst[data_end.max(pos) - at..pad_end - at].fill(0);
            pos = pad_end;
            i += 1;
        }
        true
    }
}

/// An adapter's packed buffer (1-D bf16 on the CPU) and its layout.
#[derive(Debug)]
pub(super) struct Packed {
    all: Tensor,
    regions: Vec<Region>,
    slots: usize,
}

impl Packed {
    /// Packs tensors laid out by `layout`: `convert(i, from, dst)` fills elements `from ..` of
    /// tensor `i` with bf16 bits and says whether it could. The buffer fills in parallel pieces
    /// through [`Layout::fill`], as the GPU staging ring fills its slots. `None` when a tensor
    /// could not convert.
    fn build<F>(layout: Layout, slots: usize, convert: F) -> Option<Self>
    where
        F: Fn(usize, usize, &mut [u16]) -> bool + Sync,
    {
        const PIECE: usize = 256 << 10;
        let mut buf = vec![0u16; layout.total];
        let ok = buf
            .par_chunks_mut(PIECE)
            .enumerate()
            .all(|(j, dst)| layout.fill(j * PIECE, dst, &convert));
        if !ok {
            return None;
        }
        let buf: Vec<half::bf16> = half::vec::HalfBitsVecExt::reinterpret_into(buf);
        let all = Tensor::from_vec(buf, layout.total, &Device::Cpu).ok()?;
        Some(Self {
            all,
            regions: layout.regions,
            slots,
        })
    }

    fn bytes(&self) -> usize {
        self.all.elem_count() * 2
    }

    /// The modules as views of `all` (this buffer, or its copy on a device), scale folded.
    fn modules(&self, all: &Tensor) -> Result<Vec<Option<LoraModule>>> {
        views(&self.regions, self.slots, all)
    }

    /// The buffer copied to `p`'s device (a GPU: through the pinned staging ring).
    fn upload(&self, p: &crate::device::Placement) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &p.device {
            let (storage, _) = self.all.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                return Err(ModelError::Invalid(
                    "packed adapter not in host memory".into(),
                ));
            };
            let host = cpu.as_slice::<half::bf16>()?;
            return Ok(qlorad_kernels::upload_cuda::upload_bf16(d, host)?);
        }
        Ok(self.all.to_device(&p.device)?)
    }
}

/// Modules (`slots` of them, those of `regions` present) as views of a packed buffer `all`,
/// scale folded.
fn views(regions: &[Region], slots: usize, all: &Tensor) -> Result<Vec<Option<LoraModule>>> {
    let view = |(off, dims): (usize, [usize; 2])| -> Result<Tensor> {
        Ok(all.narrow(0, off, dims[0] * dims[1])?.reshape(&dims[..])?)
    };
    let mut modules: Vec<Option<LoraModule>> = (0..slots).map(|_| None).collect();
    for r in regions {
        let m = modules
            .get_mut(r.slot)
            .ok_or_else(|| ModelError::Invalid("packed adapter: slot out of range".into()))?;
        *m = Some(LoraModule {
            a: view(r.a)?,
            b: view(r.b)?,
            scale: 1.0,
        });
    }
    Ok(modules)
}

/// f32 → bf16 bits, round to nearest even; NaN stays a (quiet) NaN. Bit-identical to
/// `half::bf16::from_f32`, written branch-free so that the conversion loops vectorize.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x0040;
    (if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

/// Converts `src` (f32 values) times `scale` into bf16 bits.
fn from_f32(src: impl Iterator<Item = f32>, scale: f32, dst: &mut [u16]) {
    if scale == 1.0 {
        for (d, v) in dst.iter_mut().zip(src) {
            *d = bf16_bits(v);
        }
    } else {
        for (d, v) in dst.iter_mut().zip(src) {
            *d = bf16_bits(v * scale);
        }
    }
}

/// [`from_f32`] on a slice, in blocks of 16 so that the loop vectorizes (the iterator form ran at
/// ~2–3 ns per element, a rank-64 7B adapter's 168M values 30 ms on 16 threads; this form about
/// half that).
fn from_f32_slice(src: &[f32], scale: f32, dst: &mut [u16]) {
    const W: usize = 16;
    let n = dst.len().min(src.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    let mut d = dst.chunks_exact_mut(W);
    let mut s = src.chunks_exact(W);
    for (d, s) in (&mut d).zip(&mut s) {
        let (Ok(d), Ok(s)) = (<&mut [u16; W]>::try_from(d), <&[f32; W]>::try_from(s)) else {
            continue; // never: both chunks are W long
        };
        for k in 0..W {
            d[k] = bf16_bits(s[k] * scale);
        }
    }
    for (d, &v) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = bf16_bits(v * scale);
    }
}

/// Elements `from .. from + dst.len()` of a stored tensor (f32, bf16 or f16, little-endian) times
/// `scale` as bf16 bits; false for other dtypes or a range past its end.
/// [`convert_raw`] of the `i`-th of [`LoraAdapter::read_raws`]' tensors (the conversion callback
/// of the packed and the streamed loads).
fn convert_nth(raws: &[(RawTensor<'_>, f32)], i: usize, from: usize, dst: &mut [u16]) -> bool {
    let (raw, scale) = &raws[i];
    convert_raw(raw, *scale, from, dst)
}

fn convert_raw(raw: &RawTensor<'_>, scale: f32, from: usize, dst: &mut [u16]) -> bool {
    let width = match raw.dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        _ => return false,
    };
    let Some(d) = raw.data.get(from * width..(from + dst.len()) * width) else {
        return false;
    };
    match raw.dtype {
        Dtype::F32 => {
            // The mapped file keeps safetensors' alignment: f32 data sits at 4-byte offsets.
            #[cfg(target_endian = "little")]
            // SAFETY: every bit pattern is a valid f32; align_to only takes aligned whole values.
            if let ([], vals, []) = unsafe { d.align_to::<f32>() } {
                from_f32_slice(vals, scale, dst);
                return true;
            }
            let vals = d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            from_f32(vals, scale, dst);
        }
        Dtype::BF16 => {
            let vals = d
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32());
            from_f32(vals, scale, dst);
        }
        _ => {
            let vals = d
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32());
            from_f32(vals, scale, dst);
        }
    }
    true
}

fn dims2(t: &Tensor) -> Option<[usize; 2]> {
    t.dims2().ok().map(|(r, c)| [r, c])
}

/// A packed buffer of `layout` straight on `p`'s GPU: `convert` fills it chunk by chunk in the
/// pinned staging ring (`qlorad_kernels::upload_cuda::upload_with`), each chunk's DMA overlapping
/// the conversion of the next; no host buffer. `Ok(None)` when a conversion failed or `p` is not a
/// GPU.
fn stream_to_gpu<F>(
    layout: &Layout,
    p: &crate::device::Placement,
    convert: F,
) -> Result<Option<Tensor>>
where
    F: Fn(usize, usize, &mut [u16]) -> bool + Sync,
{
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &p.device {
        let up = qlorad_kernels::upload_cuda::upload_with(d, layout.total, |at, dst| {
            let bits: &mut [u16] = half::slice::HalfFloatSliceExt::reinterpret_cast_mut(dst);
            layout.fill(at, bits, &convert)
        })?;
        return Ok(up);
    }
    let _ = (layout, p, &convert);
    Ok(None)
}

impl LoraAdapter {
    /// The host form suited to placement `p`: packed bf16 for a GPU computing in bf16 (see the
    /// module docs), the f32 modules otherwise ([`LoraAdapter::load`]).
    pub fn load_for(
        dir: &Path,
        name: &str,
        cfg: &Config,
        p: &crate::device::Placement,
    ) -> Result<Self> {
        if p.is_cuda() && p.dtype == DType::BF16 {
            Self::load_packed(dir, name, cfg)
        } else {
            Self::load(dir, name, cfg)
        }
    }

    /// The stored tensors of an adapter folder in packed order, with their layout.
    fn read_raws<'s>(
        store: &'s crate::weights::WeightStore,
        wanted: &[super::Wanted],
    ) -> Result<(Layout, Vec<(RawTensor<'s>, f32)>)> {
        let mut raws = Vec::with_capacity(2 * wanted.len());
        let mut shapes = Vec::with_capacity(wanted.len());
        for w in wanted {
            let (a, b) = (store.raw(&w.a_name)?, store.raw(&w.b_name)?);
            let dims = |r: &RawTensor<'_>| [r.shape[0], r.shape[1]];
            shapes.push((w.slot, dims(&a), dims(&b)));
            raws.push((a, 1.0f32));
            raws.push((b, w.scale as f32));
        }
        Ok((Layout::new(&shapes), raws))
    }

    /// Loads a PEFT adapter folder into the packed bf16 form, converting from the mapped file in
    /// one parallel pass. Same checks and errors as [`LoraAdapter::load`] (which it falls back to
    /// for dtypes it does not convert).
    pub fn load_packed(dir: &Path, name: &str, cfg: &Config) -> Result<Self> {
        let (store, wanted) = super::plan(dir, cfg)?;
        let (layout, raws) = Self::read_raws(&store, &wanted)?;
        let Some(packed) = Packed::build(layout, cfg.num_layers * 7, |i, from, dst| {
            convert_nth(&raws, i, from, dst)
        }) else {
            return Self::load(dir, name, cfg);
        };
        Ok(Self {
            name: name.to_string(),
            modules: packed.modules(&packed.all)?,
            bytes: packed.bytes(),
            bgmv: None,
            packed: Some(Arc::new(packed)),
        })
    }

    /// Loads a PEFT adapter folder straight onto `p` (the hot-load: disk → servable): on a GPU in
    /// bf16 the file converts into the pinned staging ring and goes to the device as it converts,
    /// with no host copy; elsewhere it is [`LoraAdapter::load`] then [`LoraAdapter::to_placement`].
    /// Same checks and errors as [`LoraAdapter::load`]; the values are those of the packed placement.
    pub fn load_placed(
        dir: &Path,
        name: &str,
        cfg: &Config,
        p: &crate::device::Placement,
    ) -> Result<Self> {
        if p.is_cuda() && p.dtype == DType::BF16 {
            let (store, wanted) = super::plan(dir, cfg)?;
            let (layout, raws) = Self::read_raws(&store, &wanted)?;
            let streamed =
                stream_to_gpu(&layout, p, |i, from, dst| convert_nth(&raws, i, from, dst))?;
            if let Some(all) = streamed {
                let modules = views(&layout.regions, cfg.num_layers * 7, &all)?;
                return Ok(Self::placed(name, modules, layout.total));
            }
        }
        Self::load(dir, name, cfg)?.to_placement(p)
    }

    /// A GPU placement whose modules are views of one packed bf16 buffer of `total` elements.
    fn placed(name: &str, modules: Vec<Option<LoraModule>>, total: usize) -> Self {
        Self {
            name: name.to_string(),
            bgmv: bgmv_table(name, &modules),
            modules,
            bytes: total * 2,
            packed: None,
        }
    }

    /// The packed placement on a GPU in bf16: the packed host form uploaded as it is, or f32
    /// modules streamed through the staging ring; `None` when neither applies (the caller places
    /// module by module).
    pub(super) fn to_gpu_packed(&self, p: &crate::device::Placement) -> Result<Option<Self>> {
        if let Some(packed) = &self.packed {
            let all = packed.upload(p)?;
            let modules = packed.modules(&all)?;
            return Ok(Some(Self::placed(
                &self.name,
                modules,
                packed.all.elem_count(),
            )));
        }
        let mut shapes = Vec::new();
        let mut tensors = Vec::new();
        for (slot, m) in self.modules.iter().enumerate() {
            let Some(m) = m else { continue };
            let (Some(a), Some(b)) = (dims2(&m.a), dims2(&m.b)) else {
                return Ok(None);
            };
            shapes.push((slot, a, b));
            tensors.push((&m.a, 1.0f32));
            tensors.push((&m.b, m.scale as f32));
        }
        if tensors.is_empty() {
            return Ok(None);
        }
        // Read guards on the host storages for the whole conversion; the closure sees slices.
        let guards: Vec<_> = tensors
            .iter()
            .map(|(t, _)| t.storage_and_layout())
            .collect();
        let mut srcs = Vec::with_capacity(guards.len());
        for ((storage, layout), (_, scale)) in guards.iter().zip(&tensors) {
            let candle_core::Storage::Cpu(cpu) = &**storage else {
                return Ok(None);
            };
            let (Ok(all), Some((a, b))) = (cpu.as_slice::<f32>(), layout.contiguous_offsets())
            else {
                return Ok(None);
            };
            srcs.push((&all[a..b], *scale));
        }
        let layout = Layout::new(&shapes);
        let streamed = stream_to_gpu(&layout, p, |i, from, dst| {
            let (v, scale) = &srcs[i];
            match v.get(from..from + dst.len()) {
                Some(v) => {
                    from_f32_slice(v, *scale, dst);
                    true
                }
                None => false,
            }
        })?;
        let Some(all) = streamed else {
            return Ok(None);
        };
        let modules = views(&layout.regions, self.modules.len(), &all)?;
        Ok(Some(Self::placed(&self.name, modules, layout.total)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Filling the buffer piece by piece (as the staging ring does, pieces crossing tensor and
    /// padding boundaries) gives the buffer `Packed::build` gives (one piece, this buffer being
    /// small), at every piece size.
    #[test]
    fn piecewise_fill_equals_whole_packing() {
        let shapes = [
            (0, [3, 50], [70, 3]),
            (4, [8, 64], [128, 8]),
            (9, [1, 1], [5, 1]),
        ];
        let layout = Layout::new(&shapes);
        let value = |i: usize, k: usize| (1 + i * 7919 + k * 31) as u16;
        let convert = |i: usize, from: usize, dst: &mut [u16]| {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = value(i, from + j);
            }
            true
        };
        let total = layout.total;
        let mut pieces = Vec::new();
        for piece in [1, 7, 64, 127, 1000, total] {
            let mut buf = vec![0xffffu16; total];
            for (k, chunk) in buf.chunks_mut(piece).enumerate() {
                assert!(layout.fill(k * piece, chunk, &convert));
            }
            pieces.push(buf);
        }
        let packed = Packed::build(layout, 10, convert).unwrap();
        let want: Vec<u16> = packed
            .all
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(want.len() % ALIGN, 0);
        assert!(want.contains(&value(3, 700)));
        for got in pieces {
            assert_eq!(got, want);
        }
        let modules = packed.modules(&packed.all).unwrap();
        assert_eq!(modules.iter().flatten().count(), 3);
        assert_eq!(modules[4].as_ref().unwrap().b.dims(), &[128, 8]);
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x3f80_8000), // a tie: rounds to even
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x0000_0001), // subnormal
            f32::from_bits(0x7f7f_ffff), // rounds up to infinity
        ];
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            specials.push(f32::from_bits(s as u32));
        }
        for v in specials {
            assert_eq!(
                bf16_bits(v),
                half::bf16::from_f32(v).to_bits(),
                "{v:e} ({:#010x})",
                v.to_bits()
            );
        }
    }
}
