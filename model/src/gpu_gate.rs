//! The gate between a decode-step capture and GPU work issued from other threads.
//!
//! A CUDA stream capture records everything queued on the stream while it lasts, from any thread:
//! a fine-tuning step, an adapter being placed, even a tensor freed on another thread
//! (`cuMemFreeAsync` becomes a free node of the graph, and every replay would free that memory
//! again). qlorad issues all of a device's work on one stream, so the engine captures a decode
//! step ([`crate::llama`]'s graphs) only while it holds this gate exclusively, and only if it gets
//! it at once ([`try_capture`]: a busy gate means the step runs eagerly, it never waits). Work on
//! other threads holds it shared ([`gpu_work`]) while it issues: a fine-tuning job for its whole
//! run, an adapter's placement, the adapter registry while it may drop adapters, and an adapter's
//! own drop. Replaying a captured graph needs no gate: a launch is one operation on the stream.

use std::cell::Cell;
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    /// Whether this thread holds the gate exclusively (it is capturing): its own [`gpu_work`]
    /// calls then pass instead of waiting for themselves.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// This thread's nested shared holds: only the outermost takes the lock (std's RwLock does
    /// not promise that a thread may take a read lock it already holds).
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// Shared hold of the gate (see the module docs); released on drop.
#[must_use = "the gate is held until this is dropped"]
pub struct GpuWork {
    guard: Option<RwLockReadGuard<'static, ()>>,
}

impl Drop for GpuWork {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
        self.guard.take();
    }
}

/// Holds the gate shared: no decode step is captured until the result is dropped. Waits only
/// for a capture in progress (a few milliseconds).
pub fn gpu_work() -> GpuWork {
    let nested = HELD.with(|h| {
        let n = h.get();
        h.set(n + 1);
        n > 0
    });
    if nested || CAPTURING.with(Cell::get) {
        return GpuWork { guard: None };
    }
    GpuWork {
        guard: Some(GATE.read().unwrap_or_else(PoisonError::into_inner)),
    }
}

/// Exclusive hold of the gate, for one capture.
#[cfg(feature = "cuda")]
pub(crate) struct CaptureGate {
    _guard: std::sync::RwLockWriteGuard<'static, ()>,
}

#[cfg(feature = "cuda")]
impl Drop for CaptureGate {
    fn drop(&mut self) {
        CAPTURING.with(|c| c.set(false));
    }
}

/// The gate exclusively if nobody holds it now; `None` otherwise (never waits).
#[cfg(feature = "cuda")]
pub(crate) fn try_capture() -> Option<CaptureGate> {
    let guard = match GATE.try_write() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return None,
    };
    CAPTURING.with(|c| c.set(true));
    Some(CaptureGate { _guard: guard })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_holds_nest_and_release() {
        let a = gpu_work();
        let b = gpu_work();
        drop(a);
        drop(b);
        #[cfg(feature = "cuda")]
        {
            let held = gpu_work();
            assert!(
                try_capture().is_none(),
                "a shared hold must keep captures out"
            );
            drop(held);
            let cap = try_capture().expect("free gate");
            // The capturing thread's own GPU work passes instead of deadlocking on itself.
            let inner = gpu_work();
            drop(inner);
            drop(cap);
            assert!(try_capture().is_some());
        }
    }
}
