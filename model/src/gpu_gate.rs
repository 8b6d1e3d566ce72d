//! The gate between a decode-step capture and GPU work issued from other threads.
//!
//! A CUDA stream capture records everything queued on the stream while it lasts, from any thread:
//! a fine-tuning step, an adapter being placed, even a tensor freed on another thread
//! (`cuMemFreeAsync` becomes a free node of the graph, and every replay would free that memory
//! again). qlorad issues all of a device's work on one stream, so the engine captures a decode
//! step (`crate::llama`'s graphs) only while it holds this gate exclusively, and only if it gets
//! it at once (`try_capture`: a busy gate means the step runs eagerly, it never waits). Work on
//! other threads holds it shared ([`gpu_work`]) while it issues: a fine-tuning job for its whole
//! run (letting go while it yields to serving, [`released`]), an adapter's placement and its
//! drop, device synchronizations and memory-pool trims. Replaying a captured graph needs no gate:
//! a launch is one operation on the stream.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    /// Whether this thread holds the gate exclusively (it is capturing): its own [`gpu_work`]
    /// calls then pass instead of waiting for themselves.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// This thread's nested shared holds: only the outermost takes the lock (std's RwLock does
    /// not promise that a thread may take a read lock it already holds).
    static HELD: Cell<u32> = const { Cell::new(0) };
    /// The outermost hold's lock, kept here so that [`released`] can let go of it for a while.
    static GUARD: RefCell<Option<RwLockReadGuard<'static, ()>>> = const { RefCell::new(None) };
}

/// Shared hold of the gate (see the module docs); released on drop, on the thread that took it.
#[must_use = "the gate is held until this is dropped"]
pub struct GpuWork {
    /// Not Send: the hold belongs to this thread's state.
    _thread: PhantomData<*const ()>,
}

impl Drop for GpuWork {
    fn drop(&mut self) {
        let left = HELD.with(|h| {
            let n = h.get().saturating_sub(1);
            h.set(n);
            n
        });
        if left == 0 {
            GUARD.with(|g| g.borrow_mut().take());
        }
    }
}

fn lock_shared() {
    if !CAPTURING.with(Cell::get) {
        let guard = GATE.read().unwrap_or_else(PoisonError::into_inner);
        GUARD.with(|g| *g.borrow_mut() = Some(guard));
    }
}

/// Holds the gate shared: no decode step is captured until the result is dropped. Waits only
/// for a capture in progress (a few milliseconds).
pub fn gpu_work() -> GpuWork {
    let outermost = HELD.with(|h| {
        let n = h.get();
        h.set(n + 1);
        n == 0
    });
    if outermost {
        lock_shared();
    }
    GpuWork {
        _thread: PhantomData,
    }
}

/// Runs `f` with this thread's hold of the gate (if any) let go, and takes it again afterwards:
/// for a thread that holds it for a long run of GPU work and pauses in between (a fine-tuning
/// job yielding to serving), so that the engine may capture decode steps during the pause. `f`
/// must not use GPU work issued before it (the hold is for issuing, not for results).
pub fn released<T>(f: impl FnOnce() -> T) -> T {
    let held = HELD.with(|h| h.replace(0));
    let had = GUARD.with(|g| g.borrow_mut().take()).is_some();
    let r = f();
    HELD.with(|h| h.set(held));
    if had {
        lock_shared();
    }
    r
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

    /// The tests hold the one process-wide gate: one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn shared_holds_nest_and_release() {
        let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
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

    #[test]
    fn released_lets_go_for_a_while() {
        let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let outer = gpu_work();
        let inner = gpu_work();
        assert!(GATE.try_write().is_err(), "held");
        released(|| assert!(GATE.try_write().is_ok(), "let go"));
        assert!(GATE.try_write().is_err(), "held again");
        drop(inner);
        assert!(GATE.try_write().is_err(), "the outer hold remains");
        drop(outer);
        released(|| ()); // without a hold: nothing to let go of
        assert_eq!(HELD.with(Cell::get), 0);
    }
}
