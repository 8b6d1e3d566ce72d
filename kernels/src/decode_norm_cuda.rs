//! The fused decode step's residual add + RMSNorm launch (cuda/decode.cu add_rms_norm_bf16),
//! optionally with the LoRA shrink of the rows it normalizes in extra blocks of the same launch.

use super::{bf16_view, msg, wrap, DecodeKernels, KArg, NORM_THREADS, NORM_VEC};
use crate::bgmv_cuda::NormShrink;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use candle_core::Tensor;
use half::bf16;

impl DecodeKernels {
    /// `(x + y, rmsnorm(x + y) · w)` per row of `x` (rows, n); `y` None: `(x, rmsnorm(x) · w)`.
    /// Both outputs are views of one fresh (2, rows, n) buffer.
    pub fn add_rms_norm(
        &self,
        x: &Tensor,
        y: Option<&Tensor>,
        w: &Tensor,
        eps: f32,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.add_rms_norm_shrink(x, y, w, eps, None)?
            .ok_or_else(|| msg("add_rms_norm: no result without a shrink".into()))
    }

    /// [`DecodeKernels::add_rms_norm`], and with `shrink` the LoRA shrink of the normed rows in
    /// the same launch (extra blocks that recompute their row's norm, bit for bit, and dot it with
    /// the adapters' A rows; see decode.cu's norm_shrink_block). `None` when the shrink was asked
    /// for but these rows do not take the kernel's vectorized path (then nothing was launched:
    /// the caller launches the norm and the shrink separately).
    pub fn add_rms_norm_shrink(
        &self,
        x: &Tensor,
        y: Option<&Tensor>,
        w: &Tensor,
        eps: f32,
        shrink: Option<&NormShrink>,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let (rows, n) = x.dims2()?;
        if w.dims() != [n] || y.is_some_and(|y| y.dims() != [rows, n]) {
            return Err(msg(format!(
                "add_rms_norm: x {:?}, y {:?}, w {:?}",
                x.dims(),
                y.map(|y| y.dims().to_vec()),
                w.dims()
            )));
        }
        let (xs, _) = x.storage_and_layout();
        let (xv, xa, xb) = bf16_view(&xs, x, &self.device, "x")?;
        let (ws, _) = w.storage_and_layout();
        let (wv, wa, wb) = bf16_view(&ws, w, &self.device, "the norm weight")?;
        let ys = y.map(|y| y.storage_and_layout());
        // SAFETY: every element of both halves is written (one block per row covers all n).
        let mut out = unsafe { self.device.alloc::<bf16>(2 * rows * n) }?;
        let (rows32, n32) = (rows as u32, n as u32);
        let cfg = LaunchConfig {
            grid_dim: (rows32.max(1), 1, 1),
            block_dim: (NORM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let xview = xv.slice(xa..xb);
        let wview = wv.slice(wa..wb);
        let yview = match (&ys, y) {
            (Some((s, _)), Some(yt)) => {
                let (v, a, e) = bf16_view(s, yt, &self.device, "y")?;
                Some(v.slice(a..e))
            }
            _ => None,
        };
        let st = &self.stream;
        let (xp, _xg) = xview.device_ptr(st);
        let yp = yview.as_ref().map(|v| v.device_ptr(st));
        let (wp, _wg) = wview.device_ptr(st);
        let yp = yp.as_ref().map_or(0, |(p, _)| *p);
        // The shrink blocks take the vectorized norm only: the norm blocks must take it too, or
        // the rows they normalize would not be the ones the shrink read.
        let mut cfg = cfg;
        let mut sh = [0u64, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        if let Some(s) = shrink {
            let vec = n.is_multiple_of(8)
                && n / 8 <= NORM_VEC * NORM_THREADS as usize
                && (xp | yp | wp) % 16 == 0;
            if !vec || s.in_f != n || s.rows != rows || s.max_rank == 0 {
                return Ok(None);
            }
            // One warp per (slot, rank, k chunk) unit: blocks per row to cover them once.
            let bpr = (s.count * s.max_rank * s.parts.max(1)).div_ceil(NORM_THREADS / 32);
            cfg.grid_dim.0 = rows32 * (1 + bpr);
            sh = [
                s.row_tables,
                s.t,
                s.slot0.into(),
                // A diagnostic build may leave the dots out (the blocks still recompute the norm).
                if crate::switch::whatif("normshrink") {
                    0
                } else {
                    s.count.into()
                },
                s.max_rank.into(),
                s.t_stride.into(),
                s.t_zstride.into(),
                bpr.into(),
                s.parts.max(1).into(),
                s.part_stride.into(),
            ];
        }
        let (op, og) = out.device_ptr_mut(st);
        let args = [
            KArg::U64(xp),
            KArg::U64(yp),
            KArg::U64(wp),
            KArg::F32(eps),
            KArg::U32(rows32),
            KArg::U32(n32),
            KArg::U64(op),
            KArg::U64(sh[0]),
            KArg::U64(sh[1]),
            KArg::U32(sh[2] as u32),
            KArg::U32(sh[3] as u32),
            KArg::U32(sh[4] as u32),
            KArg::U32(sh[5] as u32),
            KArg::U32(sh[6] as u32),
            KArg::U32(sh[7] as u32),
            KArg::U32(sh[8] as u32),
            KArg::U32(sh[9] as u32),
        ];
        let raw = self.pdl.as_ref().map(|p| p.add_rms_norm);
        // SAFETY: argument types and order match add_rms_norm_bf16; x and y (or null) hold rows·n,
        // w n and out 2·rows·n bf16 (checked above). With a shrink: its row tables, slots and
        // scratch come from a live BgmvPlan whose modules at those slots read n features and
        // whose scratch holds `parts` partials of count · rows · t_stride f32, part_stride apart,
        // from `t` (BgmvPlan::norm_shrink); without one the extra arguments are unused (no shrink
        // blocks).
        unsafe { self.launch(&self.add_rms_norm, raw, cfg, &args) }?;
        drop(og);
        let both = wrap(out, &self.device, (2, rows, n));
        Ok(Some((both.get(0)?, both.get(1)?)))
    }
}
