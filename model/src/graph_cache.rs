//! The bookkeeping of captured decode steps (model/src/llama_graph.rs), apart from CUDA so that
//! CPU builds test it: which shapes have a graph, when a shape is captured, which graph goes when
//! the cache is full.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Counts of a model's decode graphs (benchmarks, checks, the daemon's metrics); all zero where
/// steps are not captured (the CPU, or graphs off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeGraphStats {
    pub on: bool,
    pub kept: usize,
    /// Since graphs were last switched on (`Llama::set_decode_graphs` zeroes them).
    pub captures: u64,
    pub replays: u64,
}

/// What to do with a step of some shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepAction {
    /// Its graph is kept: replay it.
    Replay,
    /// Seen often enough: capture it (then [`GraphCache::insert`] the graph).
    Capture,
    /// Run it eagerly.
    Eager,
}

/// Captured graphs `V` by shape `K`: at most `max` kept (the oldest capture goes first), a shape
/// captured on its `capture_at`-th step.
#[derive(Debug)]
pub struct GraphCache<K, V> {
    max: usize,
    capture_at: u32,
    seen: HashMap<K, u32>,
    kept: HashMap<K, V>,
    /// Kept shapes, oldest capture first.
    order: VecDeque<K>,
    pub captures: u64,
    pub replays: u64,
}

impl<K: Copy + Eq + Hash, V> GraphCache<K, V> {
    pub fn new(max: usize, capture_at: u32) -> Self {
        Self {
            max: max.max(1),
            capture_at: capture_at.max(1),
            seen: HashMap::new(),
            kept: HashMap::new(),
            order: VecDeque::new(),
            captures: 0,
            replays: 0,
        }
    }

    /// Records a step of shape `k` and says what to do with it (a replay is counted here).
    pub fn step(&mut self, k: K) -> StepAction {
        if self.kept.contains_key(&k) {
            self.replays += 1;
            return StepAction::Replay;
        }
        let n = self.seen.entry(k).or_insert(0);
        *n = n.saturating_add(1);
        if *n >= self.capture_at {
            StepAction::Capture
        } else {
            StepAction::Eager
        }
    }

    /// The kept graph of `k`.
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.kept.get_mut(k)
    }

    /// Keeps `v` as `k`'s graph, dropping the oldest captures beyond the limit (returned, so that
    /// the caller chooses where they are dropped).
    pub fn insert(&mut self, k: K, v: V) -> Vec<V> {
        self.captures += 1;
        if self.kept.insert(k, v).is_none() {
            self.order.push_back(k);
        }
        let mut gone = Vec::new();
        while self.order.len() > self.max {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
                gone.extend(self.kept.remove(&old));
            }
        }
        gone
    }

    /// Forgets everything (graphs, sightings, counts).
    pub fn clear(&mut self) {
        self.drop_graphs();
        self.captures = 0;
        self.replays = 0;
    }

    /// Forgets the graphs and sightings, keeping the counts.
    pub fn drop_graphs(&mut self) {
        self.seen.clear();
        self.kept.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_is_captured_on_its_second_step_then_replayed() {
        let mut c: GraphCache<u32, &str> = GraphCache::new(4, 2);
        assert_eq!(c.step(1), StepAction::Eager);
        assert_eq!(c.step(1), StepAction::Capture);
        assert!(c.insert(1, "g1").is_empty());
        assert_eq!(c.step(1), StepAction::Replay);
        assert_eq!(c.get_mut(&1).copied(), Some("g1"));
        assert_eq!(c.step(2), StepAction::Eager);
        assert_eq!((c.captures, c.replays, c.len()), (1, 1, 1));
    }

    #[test]
    fn a_failed_capture_is_asked_for_again() {
        // No insert after Capture (the capture failed or was skipped): the next step asks again.
        let mut c: GraphCache<u32, ()> = GraphCache::new(4, 2);
        c.step(7);
        assert_eq!(c.step(7), StepAction::Capture);
        assert_eq!(c.step(7), StepAction::Capture);
    }

    #[test]
    fn the_oldest_capture_goes_when_full() {
        let mut c: GraphCache<u32, u32> = GraphCache::new(2, 2);
        for k in [1, 2, 3] {
            assert_eq!(c.step(k), StepAction::Eager);
            assert_eq!(c.step(k), StepAction::Capture);
            let gone = c.insert(k, k * 10);
            assert_eq!(gone, if k == 3 { vec![10] } else { vec![] });
        }
        assert_eq!(
            c.step(1),
            StepAction::Eager,
            "evicted, and its sightings forgotten"
        );
        assert_eq!(c.step(2), StepAction::Replay);
        assert_eq!(c.step(3), StepAction::Replay);
        assert_eq!((c.len(), c.captures, c.replays), (2, 3, 2));
        c.drop_graphs();
        assert!(c.is_empty());
        assert_eq!((c.captures, c.replays), (3, 2), "counts kept");
        assert_eq!(c.step(2), StepAction::Eager);
        c.clear();
        assert_eq!((c.captures, c.replays), (0, 0));
    }
}
