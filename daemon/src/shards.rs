//! Serving shards: with `--device cuda:0,cuda:1` one daemon runs one engine per device (each with
//! its own copy of the base and its own KV caches) behind one API, and this module picks the
//! engine each request runs on.
//!
//! The policy follows LoRAX and vLLM's multi-LoRA serving: requests for different adapters batch
//! together on any device (the LoRA kernels take a per-row adapter), so an adapter never *has* to
//! run where it lives; affinity only saves device memory and uploads. Each shard is scored
//!
//! ```text
//! score = requests in flight on its engine
//!       + max_running   if the requested adapter has no copy on its device (one upload away)
//!       + max_running   on shard 0 while a fine-tuning job trains there
//! ```
//!
//! and the lowest score wins; base-model requests carry no adapter penalty. Ties go to the first
//! shard in the rendezvous-hash order of the `model` name (highest-random-weight hashing, Thaler &
//! Ravishankar 1998), so with equal load every adapter goes to its *home* device — the one the
//! registry places it on when it is loaded — and different adapters spread over the devices. An
//! adapter spills to another device (one upload from its host copy) only once its home is a whole
//! batch busier; the training penalty moves serving off the GPU that trains.

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use std::sync::Arc;

/// One engine and the device it computes on.
pub struct Shard {
    pub engine: EngineHandle,
    /// The device's name as `--device` gave it (`cuda:1`; `cpu#0`, `cpu#1` for repeated names).
    pub device: String,
    /// Requests submitted to this shard (`qlorad_engine_requests_total{engine="<index>"}`).
    pub requests: prometheus::IntCounter,
}

impl Shard {
    /// Shard `index` (its label in `qlorad_engine_requests_total`, exported from now on).
    pub fn new(index: usize, engine: EngineHandle, device: &str, metrics: &Metrics) -> Self {
        Self {
            engine,
            device: device.to_string(),
            requests: metrics
                .engine_requests
                .with_label_values(&[index.to_string().as_str()]),
        }
    }
}

/// The shards of a daemon, in `--device` order; shard 0 is the primary (fine-tuning jobs train on
/// its model). Cheap to clone.
#[derive(Clone)]
pub struct Shards {
    shards: Arc<Vec<Shard>>,
    /// The penalty of one batch (`--max-running`).
    penalty: usize,
}

/// What routing knows about one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Requests accepted by its engine and not finished.
    pub inflight: usize,
    /// Whether the requested adapter is servable there at once (always true for the base model).
    pub resident: bool,
    /// Whether a fine-tuning job shares its device.
    pub training: bool,
}

/// 64-bit FNV-1a: a hash that stays the same across builds and platforms (std's hasher makes no
/// such promise), so an adapter keeps its home device across restarts.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Rendezvous (highest-random-weight) order of `n` devices for `name`: device indices by
/// descending weight `hash(name, index)`. The first is the name's home; removing a device moves
/// only the names whose home it was.
pub fn rendezvous(name: &str, n: usize) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = (0..n)
        .map(|i| {
            (
                fnv1a(&[name.as_bytes(), b"\0", &(i as u64).to_le_bytes()]),
                i,
            )
        })
        .collect();
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    order.into_iter().map(|(_, i)| i).collect()
}

/// The home device of `name` among `n`: where the registry places it on load.
pub fn home(name: &str, n: usize) -> usize {
    rendezvous(name, n).first().copied().unwrap_or(0)
}

/// The shard a request for `model` runs on (see the module docs): the lowest score, ties broken
/// by `model`'s rendezvous order. `loads` is indexed by shard and must not be empty.
pub fn pick(model: &str, loads: &[Load], penalty: usize) -> usize {
    let score = |l: &Load| {
        l.inflight + if l.resident { 0 } else { penalty } + if l.training { penalty } else { 0 }
    };
    let mut best: Option<(usize, usize)> = None;
    for i in rendezvous(model, loads.len()) {
        let s = score(&loads[i]);
        // Strictly lower: an equal score keeps the shard earlier in the rendezvous order.
        if best.is_none_or(|(_, b)| s < b) {
            best = Some((i, s));
        }
    }
    best.map_or(0, |(i, _)| i)
}

impl Shards {
    /// `shards` must not be empty; `penalty` is one batch (`--max-running`).
    pub fn new(shards: Vec<Shard>, penalty: usize) -> Self {
        Self {
            shards: Arc::new(shards),
            penalty,
        }
    }

    /// One engine on one device (tests; routing has nothing to choose).
    pub fn single(engine: EngineHandle, device: &str, metrics: &Metrics) -> Self {
        Self::new(vec![Shard::new(0, engine, device, metrics)], 1)
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Shard> {
        self.shards.get(i)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter()
    }

    /// Whether every engine is running.
    pub fn all_alive(&self) -> bool {
        self.shards.iter().all(|s| s.engine.is_alive())
    }

    /// Requests in flight over all engines.
    pub fn inflight(&self) -> usize {
        self.shards.iter().map(|s| s.engine.inflight()).sum()
    }

    /// The shard for a request for `model`: `resident(i)` says whether its adapter (if any) is on
    /// shard i's device; `training` whether a fine-tuning job is running (on shard 0).
    pub fn route(&self, model: &str, resident: impl Fn(usize) -> bool, training: bool) -> usize {
        if self.shards.len() <= 1 {
            return 0;
        }
        let loads: Vec<Load> = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| Load {
                inflight: s.engine.inflight(),
                resident: resident(i),
                training: training && i == 0,
            })
            .collect();
        pick(model, &loads, self.penalty)
    }
}

/// Shard names for `--device`'s list: the device names, with `#index` added to every entry of a
/// name given more than once (`cpu,cpu` → `cpu#0`, `cpu#1`) so that each names one shard.
pub fn names<T: std::fmt::Display>(devices: &[T]) -> Vec<String> {
    let plain: Vec<String> = devices.iter().map(ToString::to_string).collect();
    plain
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if plain.iter().filter(|m| *m == n).count() > 1 {
                format!("{n}#{i}")
            } else {
                n.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(inflight: usize, resident: bool) -> Load {
        Load {
            inflight,
            resident,
            training: false,
        }
    }

    #[test]
    fn rendezvous_is_stable_and_spreads_names() {
        assert_eq!(rendezvous("a", 4), rendezvous("a", 4));
        let mut order = rendezvous("a", 4);
        order.sort_unstable();
        assert_eq!(order, [0, 1, 2, 3]);
        // Many names: every one of two devices is some name's home.
        let homes: Vec<usize> = (0..32).map(|i| home(&format!("ad-{i}"), 2)).collect();
        assert!(homes.contains(&0) && homes.contains(&1), "{homes:?}");
        // Removing the last device moves only the names that lived there.
        for i in 0..32 {
            let name = format!("ad-{i}");
            let (h3, h2) = (home(&name, 3), home(&name, 2));
            if h3 != 2 {
                assert_eq!(h3, h2, "{name}");
            }
        }
        assert_eq!(home("x", 1), 0);
    }

    #[test]
    fn least_loaded_shard_wins() {
        let loads = [load(5, true), load(2, true), load(3, true)];
        assert_eq!(pick("base", &loads, 8), 1);
        let loads = [load(0, true), load(7, true)];
        assert_eq!(pick("base", &loads, 8), 0);
    }

    #[test]
    fn equal_load_goes_to_the_home_device() {
        for name in ["a", "b", "ft:base:x", "c"] {
            let loads = [load(3, true), load(3, true), load(3, true)];
            assert_eq!(pick(name, &loads, 8), home(name, 3), "{name}");
            // Resident nowhere: every shard has the penalty, so still home.
            let loads = [load(0, false), load(0, false), load(0, false)];
            assert_eq!(pick(name, &loads, 8), home(name, 3), "{name}");
        }
    }

    #[test]
    fn an_adapter_spills_only_when_its_home_is_a_batch_busier() {
        let name = "adapter-1";
        let h = home(name, 2);
        let other = 1 - h;
        let at = |home_load: usize| {
            let mut loads = [load(0, false), load(0, false)];
            loads[h] = load(home_load, true);
            pick(name, &loads, 8)
        };
        assert_eq!(at(0), h);
        assert_eq!(at(7), h, "less than a batch busier: stays home");
        assert_eq!(at(8), h, "exactly a batch busier: a tie, home wins");
        assert_eq!(at(9), other, "more than a batch busier: spills");
        // Resident on both: plain least-loaded.
        let mut loads = [load(0, true), load(0, true)];
        loads[h] = load(1, true);
        assert_eq!(pick(name, &loads, 8), other);
    }

    #[test]
    fn training_moves_serving_off_shard_0() {
        let mut loads = [load(0, true), load(4, true)];
        assert_eq!(pick("base", &loads, 8), 0);
        loads[0].training = true;
        assert_eq!(pick("base", &loads, 8), 1);
        // Until the other shard is a batch busier.
        loads[1].inflight = 9;
        assert_eq!(pick("base", &loads, 8), 0);
    }

    #[test]
    fn repeated_device_names_get_indices() {
        assert_eq!(names(&["cuda:0", "cuda:1"]), ["cuda:0", "cuda:1"]);
        assert_eq!(names(&["cpu", "cpu"]), ["cpu#0", "cpu#1"]);
        assert_eq!(names(&["cpu"]), ["cpu"]);
    }
}
