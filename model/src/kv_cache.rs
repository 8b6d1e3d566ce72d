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

    /// Marks `n` more positions as cached.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// Ensures `buf` has room for `start + new.dims()[1]` positions (doubling), then copies `new` in.
fn grow_and_set(buf: Option<Tensor>, new: &Tensor, start: usize) -> Result<Tensor> {
    let (heads, n, hd) = new.dims3()?;
    let need = start + n;
    let buf = match buf {
        Some(b) if b.dims()[1] >= need => b,
        old => {
            let cap = need.next_power_of_two().max(16);
            let fresh = Tensor::zeros((heads, cap, hd), new.dtype(), new.device())?;
            if let Some(o) = old {
                if start > 0 {
                    fresh.slice_set(&o.narrow(1, 0, start)?.contiguous()?, 1, 0)?;
                }
            }
            fresh
        }
    };
    buf.slice_set(&new.contiguous()?, 1, start)?;
    Ok(buf)
}
