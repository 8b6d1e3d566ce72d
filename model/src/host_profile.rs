//! Host time per phase of the fused GPU decode step, for finding where a host-bound step spends
//! its issue time (`QLORAD_HOST_PROFILE=1`, read once per process; off, a phase costs one relaxed
//! load). Kernel launches are asynchronous, so a phase's time is what the host spends preparing
//! and queueing its launches (allocations, views, guards, the launch calls), not the GPU's.
//! `qlorad-bench gpu-bench` prints the table after its base decode runs when it is on.

use qlorad_kernels::switch::EnvSwitch;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The phases of one decode step, in step order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// KV reservations and the KV table (once per step).
    Setup,
    /// A captured step's replay (model/src/llama_graph.rs): its input copies and the graph launch,
    /// which stand for every phase below.
    Replay,
    /// Residual add + RMSNorm (with the group's LoRA shrink when it runs there), twice per layer.
    Norm,
    QkvProjection,
    /// RoPE, KV write, attention and the split combine.
    Attention,
    OProjection,
    GateUpProjection,
    SiluMul,
    DownProjection,
    /// The final norm, the LM head and the f32 logits.
    Head,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Setup,
        Phase::Replay,
        Phase::Norm,
        Phase::QkvProjection,
        Phase::Attention,
        Phase::OProjection,
        Phase::GateUpProjection,
        Phase::SiluMul,
        Phase::DownProjection,
        Phase::Head,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Replay => "replay",
            Phase::Norm => "add+norm",
            Phase::QkvProjection => "q/k/v",
            Phase::Attention => "attention",
            Phase::OProjection => "o",
            Phase::GateUpProjection => "gate/up",
            Phase::SiluMul => "silu*mul",
            Phase::DownProjection => "down",
            Phase::Head => "head",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const PHASES: usize = Phase::ALL.len();
static NANOS: [AtomicU64; PHASES] = [const { AtomicU64::new(0) }; PHASES];
static CALLS: [AtomicU64; PHASES] = [const { AtomicU64::new(0) }; PHASES];
static ENABLED: EnvSwitch = EnvSwitch::new("QLORAD_HOST_PROFILE");

/// Whether phases are timed: `QLORAD_HOST_PROFILE=1`, or [`set_enabled`].
pub fn enabled() -> bool {
    ENABLED.on()
}

/// Switches the timing on or off for the process.
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// Runs `f`, adding its wall time to `phase` when timing is on.
pub fn timed<T>(phase: Phase, f: impl FnOnce() -> T) -> T {
    time(phase, true, f)
}

/// Runs `f`, adding its wall time to `phase` without counting a call (more of a phase already
/// counted this step).
pub fn timed_more<T>(phase: Phase, f: impl FnOnce() -> T) -> T {
    time(phase, false, f)
}

fn time<T>(phase: Phase, count: bool, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let r = f();
    let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    NANOS[phase.index()].fetch_add(ns, Ordering::Relaxed);
    if count {
        CALLS[phase.index()].fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// One phase's totals since the last [`take`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseTime {
    pub phase: Phase,
    pub seconds: f64,
    pub calls: u64,
}

/// Every phase's totals since the last call, in step order; resets them.
pub fn take() -> Vec<PhaseTime> {
    Phase::ALL
        .iter()
        .map(|&phase| PhaseTime {
            phase,
            seconds: NANOS[phase.index()].swap(0, Ordering::Relaxed) as f64 * 1e-9,
            calls: CALLS[phase.index()].swap(0, Ordering::Relaxed),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_accumulate_and_reset() {
        set_enabled(true);
        let _ = take();
        let v = timed(Phase::Attention, || {
            std::thread::sleep(std::time::Duration::from_millis(2));
            7
        });
        assert_eq!(v, 7);
        timed(Phase::Attention, || ());
        let t = take();
        let att = t.iter().find(|p| p.phase == Phase::Attention).unwrap();
        assert_eq!(att.calls, 2);
        assert!(att.seconds >= 0.002, "{att:?}");
        assert!(t
            .iter()
            .filter(|p| p.phase != Phase::Attention)
            .all(|p| p.calls == 0));
        assert!(take().iter().all(|p| p.calls == 0 && p.seconds == 0.0));
        set_enabled(false);
        timed(Phase::Norm, || ());
        assert!(take().iter().all(|p| p.calls == 0));
    }
}
