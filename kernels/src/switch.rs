//! A process-wide on/off switch that an environment variable sets on first use (an opt-in switch
//! is on when it is `1`, a default-on one off when it is `0`) and code may also set (gpu-check
//! runs both settings; tests switch it): for options read on hot paths, where one relaxed load
//! per use is all it may cost.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Bumped whenever a switch changes after it settled: what was decided under the old setting
/// (a captured decode step's kernels, model/src/llama_graph.rs) may no longer hold.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// The number of switch changes so far (see [`EPOCH`]).
pub fn epoch() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}

/// The value of the environment variable `var` parsed as a `T` (`None` when unset or unparsable):
/// the numeric settings' common read (each keeps its own default and bounds).
pub fn env_number<T: std::str::FromStr>(var: &str) -> Option<T> {
    std::env::var(var).ok().and_then(|v| v.parse().ok())
}

/// Marks a change of a setting that is not an [`EnvSwitch`] (a number, say) after it settled.
#[cfg(feature = "cuda")]
pub(crate) fn bump_epoch() {
    EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// See the module docs. `const`-constructible, for statics.
pub struct EnvSwitch {
    var: &'static str,
    /// Whether the switch is on when the variable is unset (then only `0` turns it off).
    default_on: bool,
    /// 0: not settled yet, 1: off, 2: on.
    state: AtomicU8,
}

impl EnvSwitch {
    /// Off unless the variable is `1`.
    pub const fn new(var: &'static str) -> Self {
        Self {
            var,
            default_on: false,
            state: AtomicU8::new(0),
        }
    }

    /// On unless the variable is `0`.
    pub const fn new_on(var: &'static str) -> Self {
        Self {
            var,
            default_on: true,
            state: AtomicU8::new(0),
        }
    }

    /// Whether the switch is on: as set, or else as the variable says (read once).
    pub fn on(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            0 => {
                let on = match std::env::var(self.var) {
                    Ok(v) if self.default_on => v != "0",
                    Ok(v) => v == "1",
                    Err(_) => self.default_on,
                };
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

/// Whether a diagnostic build (`--features qlorad-kernels/whatif`) was asked to leave `part` out
/// of the decode step (`QLORAD_WHATIF=part,part`: `normshrink`, the norm launches' shrink dots;
/// `inshrink`, the grouped GEMVs' in-launch shrink; `noexpand`, every grouped GEMV's LoRA work).
/// The results are wrong by design; BENCHMARKS.md's what-if tables come from such builds. Always
/// false in every other build.
#[cfg(feature = "whatif")]
pub fn whatif(part: &str) -> bool {
    std::env::var("QLORAD_WHATIF").is_ok_and(|v| v.split(',').any(|s| s == part))
}

/// See the `whatif` build's docs: off outside diagnostic builds.
#[cfg(not(feature = "whatif"))]
#[inline(always)]
pub fn whatif(_part: &str) -> bool {
    false
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

    #[test]
    fn a_default_on_switch_is_on_until_set_off() {
        static S: EnvSwitch = EnvSwitch::new_on("QLORAD_SWITCH_TEST_UNSET_VARIABLE_ON");
        assert!(S.on());
        S.set(false);
        assert!(!S.on());
    }
}
