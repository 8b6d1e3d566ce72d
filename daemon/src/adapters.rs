//! The adapter registry: LoRA adapters servable by name, loaded from folders under a configured
//! adapter root (paths outside it are refused), replaced, pinned or unloaded at run time. Requests
//! pick an adapter by putting its name in `model`.
//!
//! Tiers (vLLM's LoRA CPU/GPU caches): `device` (placed where the model computes, servable at once),
//! `host` (the adapter as read from disk, kept in host memory: placing it again is one upload) and
//! `disk` (only its folder is remembered). Device bytes stay under a budget by evicting the least
//! recently used unpinned adapter to the host tier, host copies of evicted adapters under a second
//! budget by dropping the least recently used to disk; a request for an evicted adapter reloads it
//! transparently from the nearest tier. When the model computes on the CPU in f32 the device copy
//! *is* the host copy: there are two tiers, resident (`host`) and `disk`.
//!
//! The map sits behind a std `RwLock` that is only ever held for a lookup or an insert — never across
//! an `.await` or while reading files.

use qlorad_model::{Config, LoraAdapter, Placement};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Why an adapter operation failed (mapped to HTTP by the API layer).
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// Name does not match `[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}` or clashes with the base model id.
    #[error(
        "invalid adapter name {0:?}: use 1-128 characters from A-Z a-z 0-9 . _ : -, not starting with '.'"
    )]
    BadName(String),
    #[error("adapter name {0:?} is the base model's id")]
    NameIsBase(String),
    /// The path escapes the adapter root (or no root is configured).
    #[error("{0}")]
    Forbidden(String),
    #[error("adapter {0:?} not found")]
    NotFound(String),
    /// The folder is not a usable PEFT adapter for this base.
    #[error("{0}")]
    Invalid(String),
}

/// Checks an adapter name: `[A-Za-z0-9._:-]{1,128}`, not starting with a dot — `.` and `..` would be
/// dot-segments in `/v1/adapters/{name}` (clients normalize them away, so the adapter could not be
/// unloaded or pinned), and leading dots are hidden names everywhere else.
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Summary of a registered adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub path: String,
    pub bytes: usize,
    /// `device` (placed on the GPU / in the compute dtype, servable at once), `host` (servable at
    /// once on a CPU model; one upload away on a GPU one) or `disk` (reloaded on next use).
    pub tier: &'static str,
    pub pinned: bool,
}

struct Entry {
    /// The servable copy; `None` once evicted.
    adapter: Option<Arc<LoraAdapter>>,
    /// With a staged placement (GPU, or a compute dtype other than f32): the copy as read from
    /// disk, kept in host memory until the host budget drops it.
    host: Option<Arc<LoraAdapter>>,
    path: PathBuf,
    /// Bytes of the servable copy, and of the host copy.
    bytes: usize,
    host_bytes: usize,
    pinned: bool,
    last_used: AtomicU64,
}

/// What a lookup found.
pub enum Lookup {
    Resident(Arc<LoraAdapter>),
    /// Registered but evicted: call [`AdapterRegistry::reload`] (blocking) to serve it.
    Evicted,
    Unknown,
}

/// Counters the registry reports (Prometheus handles, shared with `/metrics`).
#[derive(Clone)]
pub struct AdapterCounters {
    pub hits: prometheus::IntCounter,
    pub misses: prometheus::IntCounter,
    pub evictions: prometheus::IntCounter,
    pub resident_bytes: prometheus::IntGauge,
    pub host_bytes: prometheus::IntGauge,
    pub disk_bytes: prometheus::IntGauge,
}

pub struct AdapterRegistry {
    root: Option<PathBuf>,
    base_id: String,
    base: Config,
    /// Where loaded adapters are placed (the base model's device and compute dtype).
    placement: Placement,
    /// Resident-bytes budget; least recently used unpinned adapters are evicted beyond it.
    budget: usize,
    /// Budget of host copies of evicted adapters (staged placements only).
    host_budget: usize,
    /// Whether placing an adapter makes a second copy (GPU, or bf16/f16 compute), so that a host
    /// tier sits between it and the disk.
    staged: bool,
    clock: AtomicU64,
    counters: Option<AdapterCounters>,
    map: RwLock<BTreeMap<String, Entry>>,
}

impl AdapterRegistry {
    /// `root`: the folder adapters must live under (canonicalized); `None` refuses runtime loads.
    /// `budget`: bytes of adapter weights kept resident (`usize::MAX`: no limit).
    pub fn new(
        root: Option<PathBuf>,
        base_id: &str,
        base: Config,
        budget: usize,
        counters: Option<AdapterCounters>,
    ) -> Self {
        Self {
            root: root.and_then(|r| r.canonicalize().ok()),
            base_id: base_id.to_string(),
            base,
            placement: Placement::cpu(),
            budget,
            host_budget: usize::MAX,
            staged: false,
            clock: AtomicU64::new(0),
            counters,
            map: RwLock::new(BTreeMap::new()),
        }
    }

    /// Places adapters loaded from now on where the base model computes (default: the CPU, f32).
    pub fn with_placement(mut self, p: Placement) -> Self {
        self.staged = p.is_cuda() || p.dtype != candle_core::DType::F32;
        self.placement = p;
        self
    }

    /// Bytes of host copies kept for adapters evicted from the device (`usize::MAX`: no limit).
    pub fn with_host_budget(mut self, bytes: usize) -> Self {
        self.host_budget = bytes;
        self
    }

    /// Resolves a requested path (absolute, or relative to the root) and checks it stays inside
    /// the root after symlinks and `..` are resolved.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, AdapterError> {
        let Some(root) = &self.root else {
            return Err(AdapterError::Forbidden(
                "no adapter root is configured (--adapter-root): runtime adapter loading is disabled".into(),
            ));
        };
        let p = Path::new(path);
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        };
        let real = joined.canonicalize().map_err(|_| {
            AdapterError::Invalid(format!(
                "adapter folder {path:?} does not exist under the adapter root"
            ))
        })?;
        if !real.starts_with(root) {
            return Err(AdapterError::Forbidden(format!(
                "adapter path {path:?} is outside the adapter root"
            )));
        }
        Ok(real)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Loads (or replaces) adapter `name` from `dir` (blocking file reads: call off the async threads).
    pub fn load(&self, name: &str, dir: &Path) -> Result<AdapterInfo, AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::BadName(name.to_string()));
        }
        if name == self.base_id {
            return Err(AdapterError::NameIsBase(name.to_string()));
        }
        let loaded = LoraAdapter::load(dir, name, &self.base)
            .map_err(|e| AdapterError::Invalid(e.to_string()))?;
        let (adapter, host) = if self.staged {
            let placed = self.place(&loaded)?;
            (placed, Some(Arc::new(loaded)))
        } else {
            (Arc::new(loaded), None)
        };
        let bytes = adapter.bytes();
        let host_bytes = host.as_ref().map_or(0, |h| h.bytes());
        let pinned = self.read().get(name).is_some_and(|e| e.pinned);
        let entry = Entry {
            adapter: Some(adapter),
            host,
            path: dir.to_path_buf(),
            bytes,
            host_bytes,
            pinned,
            last_used: AtomicU64::new(self.tick()),
        };
        {
            let mut map = self.write();
            map.insert(name.to_string(), entry);
            self.enforce_budget(&mut map, name);
        }
        self.info(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    fn place(&self, a: &LoraAdapter) -> Result<Arc<LoraAdapter>, AdapterError> {
        a.to_placement(&self.placement)
            .map(Arc::new)
            .map_err(|e| AdapterError::Invalid(e.to_string()))
    }

    /// Registers adapter `name` from `dir` without reading its weights (the disk tier): its first
    /// request loads it. Used for job outputs and checkpoints, which may be many. An existing entry
    /// is left as it is.
    pub fn register_on_disk(&self, name: &str, dir: &Path) -> Result<(), AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::BadName(name.to_string()));
        }
        let bytes = std::fs::metadata(dir.join("adapter_model.safetensors"))
            .map(|m| m.len() as usize)
            .map_err(|e| AdapterError::Invalid(format!("{}: {e}", dir.display())))?;
        let mut map = self.write();
        map.entry(name.to_string()).or_insert_with(|| Entry {
            adapter: None,
            host: None,
            path: dir.to_path_buf(),
            bytes,
            host_bytes: 0,
            pinned: false,
            last_used: AtomicU64::new(0),
        });
        self.update_gauges(&map);
        Ok(())
    }

    /// Brings an evicted adapter back from its folder (blocking) and returns it.
    pub fn reload(&self, name: &str) -> Result<Arc<LoraAdapter>, AdapterError> {
        let (path, host) = match self.read().get(name) {
            Some(e) => match &e.adapter {
                Some(a) => return Ok(a.clone()),
                None => (e.path.clone(), e.host.clone()),
            },
            None => return Err(AdapterError::NotFound(name.to_string())),
        };
        match host {
            // From the host tier: one upload, no disk read.
            Some(h) => {
                let placed = self.place(&h)?;
                let mut map = self.write();
                if let Some(e) = map.get_mut(name) {
                    e.bytes = placed.bytes();
                    e.adapter = Some(placed);
                    e.last_used.store(self.tick(), Ordering::Relaxed);
                }
                self.enforce_budget(&mut map, name);
            }
            None => {
                self.load(name, &path)?;
            }
        }
        match self.lookup(name) {
            Lookup::Resident(a) => Ok(a),
            _ => Err(AdapterError::Invalid(format!(
                "adapter {name:?} could not be kept resident"
            ))),
        }
    }

    /// Evicts least recently used, unpinned adapters (never `keep`) until resident bytes fit.
    fn enforce_budget(&self, map: &mut BTreeMap<String, Entry>, keep: &str) {
        loop {
            let resident: usize = map
                .values()
                .filter(|e| e.adapter.is_some())
                .map(|e| e.bytes)
                .sum();
            if resident <= self.budget {
                break;
            }
            let victim = map
                .iter()
                .filter(|(n, e)| e.adapter.is_some() && !e.pinned && n.as_str() != keep)
                .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    resident,
                    budget = self.budget,
                    "adapter budget exceeded by pinned adapters"
                );
                break;
            };
            if let Some(e) = map.get_mut(&victim) {
                e.adapter = None;
                let to = if e.host.is_some() { "host" } else { "disk" };
                tracing::info!(adapter = %victim, "evicted adapter to {to} (LRU)");
                if let Some(c) = &self.counters {
                    c.evictions.inc();
                }
            }
        }
        // Host copies of evicted adapters, under their own budget (least recently used to disk).
        loop {
            let held: usize = map
                .values()
                .filter(|e| e.adapter.is_none())
                .map(|e| e.host.as_ref().map_or(0, |_| e.host_bytes))
                .sum();
            if held <= self.host_budget {
                break;
            }
            let victim = map
                .iter()
                .filter(|(_, e)| e.adapter.is_none() && e.host.is_some())
                .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                .map(|(n, _)| n.clone());
            let Some(e) = victim.and_then(|v| map.get_mut(&v)) else {
                break;
            };
            e.host = None;
            tracing::info!(path = %e.path.display(), "dropped an evicted adapter's host copy (LRU)");
        }
        self.update_gauges(map);
    }

    fn update_gauges(&self, map: &BTreeMap<String, Entry>) {
        if let Some(c) = &self.counters {
            let (mut resident, mut host, mut disk) = (0, 0, 0);
            for e in map.values() {
                if e.adapter.is_some() {
                    resident += e.bytes;
                } else if e.host.is_some() {
                    host += e.host_bytes;
                } else {
                    disk += e.bytes;
                }
            }
            c.resident_bytes.set(resident as i64);
            c.host_bytes.set(host as i64);
            c.disk_bytes.set(disk as i64);
        }
    }

    /// Re-registers the adapters recorded in the state store after a restart: runtime loads come
    /// back on the disk tier (read on first use), pinned ones are loaded now. Names already
    /// registered (`--lora` at start wins) keep their folder. Returns one line per record that
    /// could not be restored (a folder since removed, say); those stay recorded.
    pub fn restore(&self, records: &[crate::state::AdapterRecord]) -> Vec<String> {
        let mut problems = Vec::new();
        for r in records {
            let done = match &r.path {
                Some(dir) if !self.contains(&r.name) => {
                    if r.pinned {
                        self.load(&r.name, dir).map(|_| ())
                    } else {
                        self.register_on_disk(&r.name, dir)
                    }
                }
                _ => Ok(()),
            };
            let done = done.and_then(|()| {
                if r.pinned && self.contains(&r.name) {
                    self.set_pinned(&r.name, true).map(|_| ())
                } else {
                    Ok(())
                }
            });
            if let Err(e) = done {
                problems.push(format!("adapter {}: {e}", r.name));
            }
        }
        problems
    }

    pub fn unload(&self, name: &str) -> Result<(), AdapterError> {
        let mut map = self.write();
        let r = map
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| AdapterError::NotFound(name.to_string()));
        self.update_gauges(&map);
        r
    }

    /// Pins (never evicted) or unpins an adapter. Pinning an evicted adapter does not reload it;
    /// its next use does.
    pub fn set_pinned(&self, name: &str, pinned: bool) -> Result<AdapterInfo, AdapterError> {
        {
            let mut map = self.write();
            let e = map
                .get_mut(name)
                .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
            e.pinned = pinned;
            if !pinned {
                self.enforce_budget(&mut map, "");
            }
        }
        self.info(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    /// Finds an adapter for a request, marking it used.
    pub fn lookup(&self, name: &str) -> Lookup {
        let map = self.read();
        let Some(e) = map.get(name) else {
            return Lookup::Unknown;
        };
        e.last_used.store(self.tick(), Ordering::Relaxed);
        match &e.adapter {
            Some(a) => {
                if let Some(c) = &self.counters {
                    c.hits.inc();
                }
                Lookup::Resident(a.clone())
            }
            None => {
                if let Some(c) = &self.counters {
                    c.misses.inc();
                }
                Lookup::Evicted
            }
        }
    }

    /// Whether `name` is registered (resident or evicted).
    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    fn info_of(&self, name: &str, e: &Entry) -> AdapterInfo {
        let tier = match (&e.adapter, &e.host) {
            (Some(_), _) if self.staged => "device",
            (Some(_), _) | (None, Some(_)) => "host",
            (None, None) => "disk",
        };
        AdapterInfo {
            name: name.to_string(),
            path: e.path.display().to_string(),
            bytes: e.bytes,
            tier,
            pinned: e.pinned,
        }
    }

    pub fn info(&self, name: &str) -> Option<AdapterInfo> {
        self.read().get(name).map(|e| self.info_of(name, e))
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        self.read()
            .iter()
            .map(|(n, e)| self.info_of(n, e))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map inconsistent (inserts/removes are
        // single calls), so a poisoned lock is still usable.
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(budget: usize, host_budget: usize, placement: Placement) -> AdapterRegistry {
        let cfg = Config::from_file(&qlorad_tests_fixture("tiny-llama/fp32/config.json")).unwrap();
        AdapterRegistry::new(None, "base", cfg, budget, None)
            .with_placement(placement)
            .with_host_budget(host_budget)
    }

    fn qlorad_tests_fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(rel)
    }

    fn tiers(r: &AdapterRegistry) -> Vec<(String, &'static str)> {
        r.list().into_iter().map(|i| (i.name, i.tier)).collect()
    }

    /// A placement that makes a second copy (bf16 compute; on a GPU also a device copy) gets the
    /// three tiers: device → host copy → disk, each under its budget, reloads from the nearest.
    #[test]
    fn staged_placements_keep_host_copies_between_device_and_disk() {
        let lora = |n: &str| qlorad_tests_fixture(&format!("lora/{n}"));
        let bf16 = Placement {
            device: candle_core::Device::Cpu,
            dtype: candle_core::DType::BF16,
        };
        // Room for one placed adapter and one evicted host copy.
        let one = LoraAdapter::load(
            &lora("tiny-r8-all"),
            "x",
            &registry(0, 0, Placement::cpu()).base,
        )
        .unwrap();
        let placed = one.to_placement(&bf16).unwrap().bytes();
        let r = registry(placed, one.bytes(), bf16.clone());
        r.load("a", &lora("tiny-r8-all")).unwrap();
        assert_eq!(tiers(&r), [("a".into(), "device")]);
        r.load("b", &lora("tiny-r8-all")).unwrap(); // evicts a to its host copy
        assert_eq!(tiers(&r), [("a".into(), "host"), ("b".into(), "device")]);
        r.load("c", &lora("tiny-r8-all")).unwrap(); // b to host; a's copy over budget → disk
        assert_eq!(
            tiers(&r),
            [
                ("a".into(), "disk"),
                ("b".into(), "host"),
                ("c".into(), "device")
            ]
        );
        // b comes back from its host copy, with the same weights as a fresh load.
        assert!(matches!(r.lookup("b"), Lookup::Evicted));
        let b = r.reload("b").unwrap();
        let fresh = one.to_placement(&bf16).unwrap();
        let (x, y) = (b.module(0, 0).unwrap(), fresh.module(0, 0).unwrap());
        let d = (&x.b - &y.b).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(
            d.to_dtype(candle_core::DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert_eq!(
            tiers(&r),
            [
                ("a".into(), "disk"),
                ("b".into(), "device"),
                ("c".into(), "host")
            ]
        );
        // a comes back from disk.
        r.reload("a").unwrap();
        assert_eq!(tiers(&r)[0], ("a".into(), "device"));
    }

    /// On a CPU model in f32 the servable copy is the host copy: resident (`host`) or `disk`.
    #[test]
    fn unstaged_placement_has_two_tiers() {
        let lora = qlorad_tests_fixture("lora/tiny-r4-qv");
        let r = registry(1, usize::MAX, Placement::cpu());
        r.load("a", &lora).unwrap();
        r.load("b", &lora).unwrap();
        assert_eq!(tiers(&r), [("a".into(), "disk"), ("b".into(), "host")]);
    }

    #[test]
    fn names_are_validated() {
        for ok in ["a", "ft:smollm2:demo:job-1", "my_adapter-v1.2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "../x",
            "a/b",
            &"x".repeat(129),
            "é",
            ".",
            "..",
            ".hidden",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
