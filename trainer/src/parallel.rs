//! Data-parallel training (issue 10): ranks each train on their share of every optimizer step's
//! micro-batches and sum their gradients before the (identical) update, as PyTorch's DDP does.
//!
//! The split follows gradient accumulation: a step over `grad_accum × world` micro-batches takes
//! micro-batch k on rank `k mod world`, each scaled by 1/(micro-batches in the step), with the
//! dropout stream of its index k. Summing across ranks therefore gives exactly the gradient one
//! rank computes with `grad_accum × world` accumulation steps (the same global batch), and every
//! rank applies the same clip and AdamW update to the same weights.
//!
//! [`Collective`] is the exchange. [`ThreadGroup`] runs ranks as threads of one process and sums
//! through host memory in rank order (deterministic, and bit-identical on the CPU to one rank
//! accumulating); on GPUs crate::parallel_nccl sums with NCCL behind the same trait.

use crate::step::{Result, StepError};
use candle_core::Tensor;
use std::any::Any;
use std::sync::{Arc, Barrier, Mutex};

/// Sums across the ranks of a data-parallel group; every rank calls each method in the same order.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces each tensor by its elementwise sum over the ranks (same shapes on every rank).
    fn all_reduce_sum(&self, ts: &mut [Tensor]) -> Result<()>;
    /// The sums over the ranks of a few host values (losses, token counts).
    fn all_reduce_sum_f64(&self, xs: &[f64]) -> Result<Vec<f64>>;
}

/// The shared rendezvous of a [`ThreadGroup`]'s ranks.
struct Exchange {
    world: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Option<Arc<dyn Any + Send + Sync>>>>,
}

/// One rank of an in-process group (each rank on its own thread).
pub struct ThreadGroup {
    ex: Arc<Exchange>,
    rank: usize,
}

impl ThreadGroup {
    /// The `world` ranks of a new group, rank order.
    pub fn new(world: usize) -> Vec<Self> {
        let ex = Arc::new(Exchange {
            world,
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![None; world]),
        });
        (0..world)
            .map(|rank| Self {
                ex: ex.clone(),
                rank,
            })
            .collect()
    }

    /// Every rank's value, in rank order. Two barriers: all have written before anyone reads, and
    /// all have read before anyone can write the next round.
    fn all_gather<T: Any + Send + Sync>(&self, mine: T) -> Result<Vec<Arc<T>>> {
        let lock = || {
            self.ex
                .slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        lock()[self.rank] = Some(Arc::new(mine));
        self.ex.barrier.wait();
        let all = lock()
            .iter()
            .map(|s| {
                s.clone()
                    .and_then(|a| a.downcast::<T>().ok())
                    .ok_or_else(|| StepError::Invalid("a rank sent nothing or another type".into()))
            })
            .collect::<Result<Vec<_>>>();
        self.ex.barrier.wait();
        all
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.ex.world
    }

    fn all_reduce_sum(&self, ts: &mut [Tensor]) -> Result<()> {
        let host = ts
            .iter()
            .map(|t| Ok(t.flatten_all()?.to_device(&candle_core::Device::Cpu)?))
            .collect::<Result<Vec<Tensor>>>()?;
        let all = self.all_gather(host)?;
        for (i, t) in ts.iter_mut().enumerate() {
            // In rank order on every rank: identical sums everywhere.
            let mut sum = all[0][i].clone();
            for other in &all[1..] {
                sum = (sum + &other[i])?;
            }
            *t = sum
                .reshape(t.shape())?
                .to_device(t.device())?
                .to_dtype(t.dtype())?;
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, xs: &[f64]) -> Result<Vec<f64>> {
        let all = self.all_gather(xs.to_vec())?;
        Ok((0..xs.len())
            .map(|i| all.iter().map(|v| v.get(i).copied().unwrap_or(0.0)).sum())
            .collect())
    }
}
