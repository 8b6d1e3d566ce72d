//! The KV table of the fused decode step (`decode_cuda`): per sequence its new token's position
//! and its buffers' capacity, and per layer the addresses of its K and V buffers
//! (`(kv_heads, capacity, head_dim)` bf16), built on the host once per forward pass and read by
//! the attention kernels. A captured step (`step_graph_cuda`) keeps one table and rewrites it in
//! place before each replay.

use crate::bgmv_cuda::bf16_addr;
use crate::decode_cuda::DecodeKernels;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::Tensor;

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// One sequence's row of a [`KvTable`].
pub struct KvRow<'a> {
    /// Position of the new token (its K and V are written there; it attends to `0..=position`).
    pub position: usize,
    /// Positions the buffers hold (the same in every layer).
    pub capacity: usize,
    /// Per layer, the K and V buffers `(kv_heads, capacity, head_dim)` bf16.
    pub layers: Vec<(&'a Tensor, &'a Tensor)>,
}

/// Per forward pass: every sequence's position, capacity and cache addresses, on the GPU.
pub struct KvTable {
    pub(crate) table: CudaSlice<u64>,
    pub(crate) rows: usize,
    pub(crate) layers: usize,
    pub(crate) max_position: usize,
}

/// A [`KvTable`]'s contents on the host: the words to upload, and what they describe.
pub struct KvWords {
    pub(crate) words: Vec<u64>,
    pub rows: usize,
    pub layers: usize,
    /// The largest new-token position of the rows (it sets the attention's split count).
    pub max_position: usize,
}

impl DecodeKernels {
    /// The host words of one forward pass's KV table ([`DecodeKernels::kv_table_of`] uploads
    /// them; a captured step rewrites the table it keeps, [`DecodeKernels::rewrite_kv_table`]).
    /// Every row's buffers must have `capacity` positions, more than its `position`, with
    /// `kv_heads * head_dim` values per position.
    pub fn kv_words(
        &self,
        rows: &[KvRow<'_>],
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<KvWords> {
        let mut words = Vec::with_capacity(rows.len() * (1 + 2 * layers));
        let mut max_position = 0;
        for (i, r) in rows.iter().enumerate() {
            if r.layers.len() != layers
                || r.position >= r.capacity
                || r.capacity > u32::MAX as usize
            {
                return Err(msg(format!(
                    "decode: KV row {i} has {} layers (want {layers}), position {} and capacity {}",
                    r.layers.len(),
                    r.position,
                    r.capacity
                )));
            }
            max_position = max_position.max(r.position);
            words.push(r.position as u64 | ((r.capacity as u64) << 32));
            for (k, v) in &r.layers {
                for t in [k, v] {
                    if t.dims() != [kv_heads, r.capacity, head_dim] {
                        return Err(msg(format!(
                            "decode: KV buffer {:?} of row {i}, want ({kv_heads}, {}, {head_dim})",
                            t.dims(),
                            r.capacity
                        )));
                    }
                    words.push(bf16_addr(t, &self.device, &self.stream).ok_or_else(|| {
                        msg(format!(
                            "decode: KV buffer of row {i} must be contiguous bf16 on {:?}",
                            self.device
                        ))
                    })?);
                }
            }
        }
        Ok(KvWords {
            words,
            rows: rows.len(),
            layers,
            max_position,
        })
    }

    /// A new KV table on the device holding `words`.
    pub fn kv_table_of(&self, words: &KvWords) -> candle_core::Result<KvTable> {
        Ok(KvTable {
            table: self.device.clone_htod(&words.words[..])?,
            rows: words.rows,
            layers: words.layers,
            max_position: words.max_position,
        })
    }

    /// Rewrites `table` in place with `words` (same rows and layers): stream-ordered, at the same
    /// device address, so a captured step reads the new contents.
    pub fn rewrite_kv_table(
        &self,
        table: &mut KvTable,
        words: &KvWords,
    ) -> candle_core::Result<()> {
        if words.rows != table.rows
            || words.layers != table.layers
            || words.words.len() != table.table.len()
        {
            return Err(msg(format!(
                "rewrite_kv_table: {} rows x {} layers into a table of {} x {}",
                words.rows, words.layers, table.rows, table.layers
            )));
        }
        self.stream
            .memcpy_htod(&words.words[..], &mut table.table)
            .map_err(|e| msg(format!("rewrite_kv_table: {e}")))?;
        table.max_position = words.max_position;
        Ok(())
    }
}
