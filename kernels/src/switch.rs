//! A process-wide on/off switch that an environment variable sets on first use (on when it is
//! `1`) and code may also set (gpu-check runs both settings; tests switch it): for options read
//! on hot paths, where one relaxed load per use is all it may cost.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Bumped whenever a switch changes after it settled: what was decided under the old setting
/// (a captured decode step's kernels, model/src/llama_graph.rs) may no longer hold.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// The number of switch changes so far (see [`EPOCH`]).
pub fn epoch() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}

/// See the module docs. `const`-constructible, for statics.
pub struct EnvSwitch {
    var: &'static str,
    /// 0: not settled yet, 1: off, 2: on.
    state: AtomicU8,
}

impl EnvSwitch {
    pub const fn new(var: &'static str) -> Self {
        Self {
            var,
            state: AtomicU8::new(0),
        }
    }

    /// Whether the switch is on: as set, or else as the variable says (read once).
    pub fn on(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            0 => {
                let on = std::env::var(self.var).is_ok_and(|v| v == "1");
                self.set(on);
                on
            }
            s => s == 2,
        }
    }

    pub fn set(&self, on: bool) {
        let old = self.state.swap(if on { 2 } else { 1 }, Ordering::Relaxed);
        if old != 0 && (old == 2) != on {
            EPOCH.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EnvSwitch;

    #[test]
    fn the_variable_decides_until_set() {
        static S: EnvSwitch = EnvSwitch::new("QLORAD_SWITCH_TEST_UNSET_VARIABLE");
        assert!(!S.on());
        let e = super::epoch();
        S.set(true);
        assert!(S.on());
        assert!(super::epoch() > e, "a change bumps the epoch");
        let e = super::epoch();
        S.set(true);
        assert_eq!(super::epoch(), e, "setting the same value changes nothing");
        S.set(false);
        assert!(!S.on());
    }
}
