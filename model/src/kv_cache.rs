//! Per-sequence key/value cache, passed explicitly into the forward pass.
//!
//! Each layer keeps `(kv_heads, capacity, head_dim)` buffers that grow by doubling; new keys and values
//! are written in place, so a decode step copies only the new token's K/V (not the whole history).
//! A layer holds its buffers either as candle tensors on the model's device (the GPU path and the
//! reference CPU path, [`KvCache::append`]) or as host `f32` vectors that the batched CPU attention
//! writes and reads in place (`KvCache::append_host`, `crate::attention_cpu`). A layer switches
//! form (one copy) only if a cache is handed to the other path, which tests and benchmarks do.

use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};

/// One layer's host buffers: keys and values, each `(kv_heads, cap, head_dim)` row-major.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// Positions each head has room for.
    pub(crate) cap: usize,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
}

impl HostKv {
    /// The cached keys of `head`, `(cap, head_dim)` row-major.
    pub(crate) fn keys(&self, head: usize) -> &[f32] {
        let n = self.cap * self.head_dim;
        &self.k[head * n..(head + 1) * n]
    }

    /// The cached values of `head`, `(cap, head_dim)` row-major.
    pub(crate) fn values(&self, head: usize) -> &[f32] {
        let n = self.cap * self.head_dim;
        &self.v[head * n..(head + 1) * n]
    }

    /// Grows (doubling, at least 16 positions, as [`grow_and_set`]) so that `need` positions fit,
    /// keeping the first `keep` positions of every head.
    fn reserve(&mut self, need: usize, keep: usize) {
        if need <= self.cap {
            return;
        }
        let cap = need.next_power_of_two().max(16);
        let (hd, old) = (self.head_dim, self.cap);
        let regrow = |buf: &[f32]| {
            let mut fresh = vec![0f32; self.heads * cap * hd];
            for h in 0..self.heads {
                let src = &buf[h * old * hd..(h * old + keep) * hd];
                fresh[h * cap * hd..(h * cap + keep) * hd].copy_from_slice(src);
            }
            fresh
        };
        self.k = regrow(&self.k);
        self.v = regrow(&self.v);
        self.cap = cap;
    }

    /// The same buffers as `(heads, cap, head_dim)` tensors of `dtype` on `device` (a layer
    /// handed over from the batched CPU path to the candle one).
    fn to_tensors(&self, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let shape = (self.heads, self.cap, self.head_dim);
        Ok((
            Tensor::from_slice(&self.k, shape, device)?.to_dtype(dtype)?,
            Tensor::from_slice(&self.v, shape, device)?.to_dtype(dtype)?,
        ))
    }
}

#[derive(Debug, Default)]
enum LayerKv {
    #[default]
    Empty,
    /// `(kv_heads, capacity, head_dim)` tensors on the model's device.
    Tensors { k: Tensor, v: Tensor },
    /// Host buffers of the batched CPU attention.
    Host(HostKv),
}

/// The new keys and values of one sequence inside a batch's rope'd K and V, each
/// `(kv_heads, tokens, head_dim)` row-major: this sequence owns rows `off .. off + n` of every head.
pub(crate) struct NewKv<'a> {
    pub(crate) k: &'a [f32],
    pub(crate) v: &'a [f32],
    pub(crate) tokens: usize,
    pub(crate) off: usize,
    pub(crate) n: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// The cache of one sequence: its tokens' keys and values in every layer.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::Empty).collect(),
            len: 0,
        }
    }

    /// A deep copy (e.g. to fork a sequence from a shared prompt). Tensor buffers are copied too:
    /// a candle `Tensor` clone shares its storage, so appending to both copies would write into
    /// one buffer (this is why `KvCache` is not `Clone`).
    pub fn try_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(match l {
                    LayerKv::Empty => LayerKv::Empty,
                    LayerKv::Host(h) => LayerKv::Host(h.clone()),
                    LayerKv::Tensors { k, v } => LayerKv::Tensors {
                        k: k.copy()?,
                        v: v.copy()?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: self.len,
        })
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
            .map(|l| match l {
                LayerKv::Empty => 0,
                LayerKv::Tensors { k, v } => [k, v]
                    .iter()
                    .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                    .sum(),
                LayerKv::Host(h) => (h.k.len() + h.v.len()) * std::mem::size_of::<f32>(),
            })
            .sum()
    }

    fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerKv> {
        let n = self.layers.len();
        self.layers.get_mut(layer).ok_or_else(|| {
            ModelError::Invalid(format!("KV cache has {n} layers, not {}", layer + 1))
        })
    }

    /// Writes `k`, `v` (kv_heads, n, head_dim) at positions `[len, len + n)` of `layer` and returns the
    /// views `(kv_heads, len + n, head_dim)` of everything cached for that layer. The sequence length
    /// advances only through [`KvCache::advance`], once every layer has appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let start = self.len;
        let n = k.dims()[1];
        let entry = self.layer_mut(layer)?;
        if let LayerKv::Host(h) = entry {
            let (kt, vt) = h.to_tensors(k.dtype(), k.device())?;
            *entry = LayerKv::Tensors { k: kt, v: vt };
        }
        let (old_k, old_v) = match std::mem::take(entry) {
            LayerKv::Tensors { k, v } => (Some(k), Some(v)),
            _ => (None, None),
        };
        let kk = grow_and_set(old_k, k, start)?;
        let vv = grow_and_set(old_v, v, start)?;
        let views = (kk.narrow(1, 0, start + n)?, vv.narrow(1, 0, start + n)?);
        *entry = LayerKv::Tensors { k: kk, v: vv };
        Ok(views)
    }

    /// Writes one sequence's new keys and values (rows `new.off .. new.off + new.n` of every head)
    /// at positions `[len, len + n)` of `layer`'s host buffers, growing them by doubling. Like
    /// [`KvCache::append`], the length advances only through [`KvCache::advance`].
    pub(crate) fn append_host(&mut self, layer: usize, new: &NewKv<'_>) -> Result<()> {
        let start = self.len;
        let (heads, hd) = (new.kv_heads, new.head_dim);
        let entry = self.layer_mut(layer)?;
        match entry {
            LayerKv::Host(_) => {}
            LayerKv::Empty => {
                *entry = LayerKv::Host(HostKv {
                    heads,
                    head_dim: hd,
                    ..HostKv::default()
                })
            }
            LayerKv::Tensors { k, v } => {
                // Handed over from the candle path: the same buffers as host vectors.
                let (th, cap, thd) = k.dims3()?;
                let flat = |t: &Tensor| -> Result<Vec<f32>> {
                    Ok(t.to_dtype(DType::F32)?
                        .to_device(&Device::Cpu)?
                        .flatten_all()?
                        .to_vec1::<f32>()?)
                };
                let host = HostKv {
                    k: flat(k)?,
                    v: flat(v)?,
                    cap,
                    heads: th,
                    head_dim: thd,
                };
                *entry = LayerKv::Host(host);
            }
        }
        let LayerKv::Host(host) = entry else {
            unreachable!("every arm above leaves a host layer")
        };
        if host.heads != heads || host.head_dim != hd {
            return Err(ModelError::Invalid(format!(
                "KV cache layer {layer} holds {} heads of {}, not {heads} of {hd}",
                host.heads, host.head_dim
            )));
        }
        host.reserve(start + new.n, start);
        let cap = host.cap;
        for h in 0..heads {
            let src = (h * new.tokens + new.off) * hd..(h * new.tokens + new.off + new.n) * hd;
            let dst = (h * cap + start) * hd..(h * cap + start + new.n) * hd;
            host.k[dst.clone()].copy_from_slice(&new.k[src.clone()]);
            host.v[dst].copy_from_slice(&new.v[src]);
        }
        Ok(())
    }

    /// `layer`'s host buffers, if it holds them (after [`KvCache::append_host`]).
    pub(crate) fn host_layer(&self, layer: usize) -> Option<&HostKv> {
        match self.layers.get(layer) {
            Some(LayerKv::Host(h)) => Some(h),
            _ => None,
        }
    }

    /// Makes room for `n` more positions in every layer (buffers `(heads, capacity, head_dim)` of
    /// `dtype` on `device`, created or grown by doubling, history kept) and returns the capacity,
    /// the same in every layer. The fused GPU decode step writes new positions itself.
    pub fn reserve(
        &mut self,
        n: usize,
        heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<usize> {
        let need = self.len + n;
        let start = self.len;
        let mut cap = 0;
        for entry in &mut self.layers {
            let (old_k, old_v) = match std::mem::take(entry) {
                LayerKv::Empty => (None, None),
                LayerKv::Tensors { k, v } => (Some(k), Some(v)),
                LayerKv::Host(h) => {
                    let (k, v) = h.to_tensors(dtype, device)?;
                    (Some(k), Some(v))
                }
            };
            let k = grow(old_k, need, start, (heads, head_dim), dtype, device)?;
            let v = grow(old_v, need, start, (heads, head_dim), dtype, device)?;
            cap = k.dims()[1];
            *entry = LayerKv::Tensors { k, v };
        }
        Ok(cap)
    }

    /// The K and V buffers `(heads, capacity, head_dim)` of `layer`, if it holds tensors.
    pub fn buffers(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        match self.layers.get(layer)? {
            LayerKv::Tensors { k, v } => Some((k, v)),
            _ => None,
        }
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
    dtype: DType,
    device: &Device,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn new_kv(k: &[f32], v: &[f32], tokens: usize, off: usize, n: usize) -> NewKv<'static> {
        NewKv {
            k: Vec::leak(k.to_vec()),
            v: Vec::leak(v.to_vec()),
            tokens,
            off,
            n,
            kv_heads: 2,
            head_dim: 3,
        }
    }

    /// Host buffers grow across the doubling boundary keeping every head's positions, and a layer
    /// handed from one path to the other keeps its contents.
    #[test]
    fn host_buffers_grow_and_convert_both_ways() {
        let (heads, hd) = (2, 3);
        let mut c = KvCache::new(1);
        let mut want_k = vec![Vec::new(); heads];
        for step in 0..20 {
            // one token per step: value = 100*head + 10*step + dim
            let k: Vec<f32> = (0..heads * hd)
                .map(|i| (100 * (i / hd) + 10 * step + i % hd) as f32)
                .collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            for (h, w) in want_k.iter_mut().enumerate() {
                w.extend_from_slice(&k[h * hd..(h + 1) * hd]);
            }
            c.append_host(0, &new_kv(&k, &v, 1, 0, 1)).unwrap();
            c.advance(1);
        }
        let h = c.host_layer(0).unwrap();
        assert_eq!(h.cap, 32);
        for (head, w) in want_k.iter().enumerate() {
            assert_eq!(&h.keys(head)[..20 * hd], &w[..]);
            let neg: Vec<f32> = w.iter().map(|x| -x).collect();
            assert_eq!(&h.values(head)[..20 * hd], &neg[..]);
        }
        // to tensors (reference path) and back: same contents
        let one = Tensor::zeros((heads, 1, hd), DType::F32, &Device::Cpu).unwrap();
        let (kk, _) = c.append(0, &one, &one).unwrap();
        let kk = kk.to_vec3::<f32>().unwrap();
        for (head, w) in want_k.iter().enumerate() {
            let flat: Vec<f32> = kk[head][..20].concat();
            assert_eq!(flat, *w);
        }
        assert!(c.host_layer(0).is_none());
        let z = vec![0f32; heads * hd];
        c.append_host(0, &new_kv(&z, &z, 1, 0, 1)).unwrap();
        assert_eq!(&c.host_layer(0).unwrap().keys(1)[..20 * hd], &want_k[1][..]);
        assert_eq!(c.bytes(), 2 * heads * 32 * hd * 4);
    }

    #[test]
    fn copies_do_not_share_tensor_storage() {
        let mut a = KvCache::new(1);
        let x = Tensor::ones((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        a.append(0, &x, &x).unwrap();
        a.advance(2);
        let mut b = a.try_clone().unwrap();
        let (bk, _) = b.append(0, &(x.clone() * 5.0).unwrap(), &x).unwrap();
        assert_eq!(bk.dims(), &[1, 4, 4]);
        // a's buffer beyond its length is untouched by b's append
        let LayerKv::Tensors { k, .. } = &a.layers[0] else {
            panic!("tensor layer")
        };
        let row: Vec<f32> = k
            .narrow(1, 2, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(row, vec![0.0; 4]);
    }
}
