//! Per-sequence key/value cache, passed explicitly into the forward pass.
//!
//! Each layer keeps `(kv_heads, capacity, head_dim)` buffers that grow by doubling; new keys and values
//! are written in place, so a decode step copies only the new token's K/V (not the whole history).

use crate::error::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The cache of one sequence: its tokens' keys and values in every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
        }
    }

    /// Number of positions cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops everything after the first `len` positions (e.g. to re-run from a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the buffers (capacity, not just length).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Writes `k`, `v` (kv_heads, n, head_dim) at positions `[len, len + n)` of `layer` and returns the
    /// views `(kv_heads, len + n, head_dim)` of everything cached for that layer. The sequence length
    /// advances only through [`KvCache::advance`], once every layer has appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let start = self.len;
        let n = k.dims()[1];
        let entry = &mut self.layers[layer];
        entry.k = Some(grow_and_set(entry.k.take(), k, start)?);
        entry.v = Some(grow_and_set(entry.v.take(), v, start)?);
        let (Some(kk), Some(vv)) = (&entry.k, &entry.v) else {
            unreachable!("both buffers were just set")
        };
        Ok((kk.narrow(1, 0, start + n)?, vv.narrow(1, 0, start + n)?))
    }

    /// Makes room for `n` more positions in every layer (buffers `(heads, capacity, head_dim)` of
    /// `dtype` on `device`, created or grown by doubling, history kept) and returns the capacity,
    /// the same in every layer. The fused GPU decode step writes new positions itself.
    pub fn reserve(
        &mut self,
        n: usize,
        heads: usize,
        head_dim: usize,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<usize> {
        let need = self.len + n;
        let start = self.len;
        let mut cap = 0;
        for entry in &mut self.layers {
            for buf in [&mut entry.k, &mut entry.v] {
                let grown = grow(buf.take(), need, start, (heads, head_dim), dtype, device)?;
                cap = grown.dims()[1];
                *buf = Some(grown);
            }
        }
        Ok(cap)
    }

    /// The K and V buffers `(heads, capacity, head_dim)` of `layer`, if it has any.
    pub fn buffers(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        let l = self.layers.get(layer)?;
        Some((l.k.as_ref()?, l.v.as_ref()?))
    }

    /// Marks `n` more positions as cached.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// `buf` if it holds `need` positions, else a fresh buffer of the next power of two (at least 16)
/// with the first `keep` positions of `buf` copied in.
fn grow(
    buf: Option<Tensor>,
    need: usize,
    keep: usize,
    (heads, hd): (usize, usize),
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    match buf {
        Some(b) if b.dims()[1] >= need => Ok(b),
        old => {
            let cap = need.next_power_of_two().max(16);
            let fresh = Tensor::zeros((heads, cap, hd), dtype, device)?;
            if let Some(o) = old {
                if keep > 0 {
                    fresh.slice_set(&o.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
                }
            }
            Ok(fresh)
        }
    }
}

/// Ensures `buf` has room for `start + new.dims()[1]` positions (doubling), then copies `new` in.
fn grow_and_set(buf: Option<Tensor>, new: &Tensor, start: usize) -> Result<Tensor> {
    let (heads, n, hd) = new.dims3()?;
    let buf = grow(
        buf,
        start + n,
        start,
        (heads, hd),
        new.dtype(),
        new.device(),
    )?;
    buf.slice_set(&new.contiguous()?, 1, start)?;
    Ok(buf)
}
