//! The adapter registry: LoRA adapters servable by name, loaded from folders under a configured
//! adapter root (paths outside it are refused), replaced, pinned or unloaded at run time. Requests
//! pick an adapter by putting its name in `model`.
//!
//! Tiers (vLLM's LoRA CPU/GPU caches): `device` (placed where the model computes, servable at once),
//! `host` (the adapter as read from disk, kept in host memory: placing it again is one upload) and
//! `disk` (only its folder is remembered). Device bytes stay under a budget by evicting the least
//! recently used unpinned adapter to the host tier, host copies under a second budget by dropping
//! the least recently used to disk; a request for an evicted adapter reloads it transparently from
//! the nearest tier. When the model computes on the CPU in f32 the device copy *is* the host copy:
//! there are two tiers, resident (`host`) and `disk`.
//!
//! With several serving devices (`--device cuda:0,cuda:1`, one engine each) an entry keeps one
//! servable copy per device and ONE host copy shared by them, so that placing an adapter on a second
//! GPU is an upload from host memory, not a disk read. A load places the adapter on its *home*
//! device only (rendezvous hash of its name, [`crate::shards::home`]); another device gets a copy
//! when routing sends it a request for the adapter. Each device keeps its copies under the byte
//! budget on its own (LRU per device); the host budget counts the host copies of adapters that are
//! not resident on every device (with one device: the host copies of evicted adapters).
//!
//! When every device is a GPU computing in bf16, a read from disk goes straight to the GPU that
//! needs it (the file converts to bf16 into pinned staging buffers that upload as they fill:
//! `LoraAdapter::load_placed`), and the host copy is the packed bf16 form, read after the adapter
//! is servable and only with several GPUs. With one GPU no host copy is kept: an evicted adapter
//! drops to the disk tier, and reloading it is that same direct path (from the OS page cache: ~33
//! ms for a rank-64 adapter of a 7B model on the H200, where uploading a host copy took 23–32 ms;
//! BENCHMARKS.md), which saves the host memory a copy per adapter would hold.
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
    /// `device` (placed on a GPU / in the compute dtype, servable at once), `host` (servable at
    /// once on a CPU model; one upload away on a GPU one) or `disk` (reloaded on next use).
    pub tier: &'static str,
    pub pinned: bool,
    /// The serving devices holding a servable copy (`cuda:0`; empty when evicted everywhere).
    pub devices: Vec<String>,
}

/// A device adapters are placed on: one per serving shard, in shard order.
struct Device {
    name: String,
    placement: Placement,
    /// Whether placing an adapter here makes a second copy (GPU, or bf16/f16 compute), so that a
    /// host tier sits between it and the disk.
    staged: bool,
}

impl Device {
    fn new(name: String, placement: Placement) -> Self {
        let staged = placement.is_cuda() || placement.dtype != candle_core::DType::F32;
        Self {
            name,
            placement,
            staged,
        }
    }
}

/// `cpu` or `cuda:N`: the name of a placement's device.
fn device_name(p: &Placement) -> String {
    match p.device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".to_string(),
    }
}

/// An adapter's copy on one device.
#[derive(Default)]
struct Slot {
    /// The servable copy; `None` when not resident (not placed there yet, or evicted).
    copy: Option<Arc<LoraAdapter>>,
    /// Bytes of the copy (kept after eviction; the file's size before the first placement).
    bytes: usize,
    /// Tick of the last request for it on this device (LRU per device).
    used: AtomicU64,
}

struct Entry {
    /// One per device, in device order.
    slots: Vec<Slot>,
    /// With a staged placement (GPU, or a compute dtype other than f32): the copy as read from
    /// disk, shared by the devices, kept in host memory until the host budget drops it.
    host: Option<Arc<LoraAdapter>>,
    host_bytes: usize,
    path: PathBuf,
    pinned: bool,
}

impl Entry {
    fn resident_anywhere(&self) -> bool {
        self.slots.iter().any(|s| s.copy.is_some())
    }

    fn resident_everywhere(&self) -> bool {
        self.slots.iter().all(|s| s.copy.is_some())
    }

    /// The latest use on any device (the host tier's LRU order).
    fn last_used(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.used.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// Bytes of one servable copy (of a resident one if any).
    fn bytes(&self) -> usize {
        self.slots
            .iter()
            .find(|s| s.copy.is_some())
            .or_else(|| self.slots.iter().max_by_key(|s| s.bytes))
            .map_or(0, |s| s.bytes)
    }

    /// The adapter in host memory in the form read from disk: the host copy, or the copy of an
    /// unstaged device (a CPU model in f32), which *is* that form.
    fn source(&self, devices: &[Device]) -> Option<Arc<LoraAdapter>> {
        self.host.clone().or_else(|| {
            self.slots
                .iter()
                .zip(devices)
                .find(|(s, d)| !d.staged && s.copy.is_some())
                .and_then(|(s, _)| s.copy.clone())
        })
    }
}

/// What a lookup found.
pub enum Lookup {
    Resident(Arc<LoraAdapter>),
    /// Registered but not on this device: call [`AdapterRegistry::reload`] (blocking) to serve it.
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
    /// Where loaded adapters are placed (the serving devices, in shard order; never empty).
    devices: Vec<Device>,
    /// Resident-bytes budget of each device; least recently used unpinned adapters are evicted
    /// beyond it.
    budget: usize,
    /// Budget of host copies of adapters not resident on every device (staged placements only).
    host_budget: usize,
    clock: AtomicU64,
    counters: Option<AdapterCounters>,
    map: RwLock<BTreeMap<String, Entry>>,
}

impl AdapterRegistry {
    /// `root`: the folder adapters must live under (canonicalized); `None` refuses runtime loads.
    /// `budget`: bytes of adapter weights kept resident on each device (`usize::MAX`: no limit).
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
            devices: vec![Device::new("cpu".into(), Placement::cpu())],
            budget,
            host_budget: usize::MAX,
            clock: AtomicU64::new(0),
            counters,
            map: RwLock::new(BTreeMap::new()),
        }
    }

    /// Places adapters where the base model computes (default: the CPU, f32): one device.
    pub fn with_placement(mut self, p: Placement) -> Self {
        self.devices = vec![Device::new(device_name(&p), p)];
        self
    }

    /// Places adapters on several devices, as `(name, placement)` in shard order (the device index
    /// of [`lookup`](Self::lookup) and [`reload`](Self::reload)). An empty list changes nothing.
    pub fn with_devices(mut self, devices: Vec<(String, Placement)>) -> Self {
        if !devices.is_empty() {
            self.devices = devices
                .into_iter()
                .map(|(n, p)| Device::new(n, p))
                .collect();
        }
        self
    }

    /// Bytes of host copies kept for adapters not resident on every device (`usize::MAX`: no limit).
    pub fn with_host_budget(mut self, bytes: usize) -> Self {
        self.host_budget = bytes;
        self
    }

    /// Number of serving devices.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Whether some device makes a second copy, so that a host copy is worth keeping.
    fn staged(&self) -> bool {
        self.devices.iter().any(|d| d.staged)
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

    /// Whether every device is a GPU computing in bf16: adapters then go from disk straight to a
    /// GPU (converted into pinned staging as they upload, `LoraAdapter::load_placed`), and their
    /// host copies are the packed bf16 form.
    fn all_gpu(&self) -> bool {
        !self.devices.is_empty()
            && self
                .devices
                .iter()
                .all(|d| d.placement.is_cuda() && d.placement.dtype == candle_core::DType::BF16)
    }

    /// Reads an adapter folder into its host form: packed bf16 when every device is a GPU in
    /// bf16, the f32 modules otherwise (what a CPU device serves from).
    fn read_disk(&self, name: &str, dir: &Path) -> Result<Arc<LoraAdapter>, AdapterError> {
        let read = if self.all_gpu() {
            LoraAdapter::load_packed(dir, name, &self.base)
        } else {
            LoraAdapter::load(dir, name, &self.base)
        };
        read.map(Arc::new)
            .map_err(|e| AdapterError::Invalid(e.to_string()))
    }

    /// Reads an adapter folder and makes it servable on device `dev`: the servable copy, and the
    /// host copy to keep (`None` where none is kept). With GPUs only, the file goes straight to the
    /// device (the hot-load path); a host copy is read afterwards only when there are other GPUs
    /// to place it on, so the adapter is servable before that read.
    fn read_and_place(
        &self,
        name: &str,
        dir: &Path,
        dev: usize,
    ) -> Result<(Arc<LoraAdapter>, Option<Arc<LoraAdapter>>), AdapterError> {
        match self.devices.get(dev) {
            Some(d) if self.all_gpu() => {
                let placed = LoraAdapter::load_placed(dir, name, &self.base, &d.placement)
                    .map(Arc::new)
                    .map_err(|e| AdapterError::Invalid(e.to_string()))?;
                let host = if self.devices.len() > 1 {
                    Some(self.read_disk(name, dir)?)
                } else {
                    None
                };
                Ok((placed, host))
            }
            _ => {
                let source = self.read_disk(name, dir)?;
                let placed = self.place(&source, dev)?;
                Ok((placed, self.staged().then_some(source)))
            }
        }
    }

    /// A servable copy for device `dev` of `source` (the form read from disk): `source` itself on
    /// an unstaged device, an upload / conversion on a staged one.
    fn place(
        &self,
        source: &Arc<LoraAdapter>,
        dev: usize,
    ) -> Result<Arc<LoraAdapter>, AdapterError> {
        match self.devices.get(dev) {
            Some(d) if d.staged => source
                .to_placement(&d.placement)
                .map(Arc::new)
                .map_err(|e| AdapterError::Invalid(e.to_string())),
            Some(_) => Ok(source.clone()),
            None => Err(AdapterError::Invalid(format!("no serving device {dev}"))),
        }
    }

    /// Loads (or replaces) adapter `name` from `dir` onto its home device (blocking file reads:
    /// call off the async threads); the other devices get it on their first request for it.
    pub fn load(&self, name: &str, dir: &Path) -> Result<AdapterInfo, AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::BadName(name.to_string()));
        }
        if name == self.base_id {
            return Err(AdapterError::NameIsBase(name.to_string()));
        }
        let home = crate::shards::home(name, self.devices.len());
        let (placed, host) = self.read_and_place(name, dir, home)?;
        let bytes = placed.bytes();
        let host_bytes = host.as_ref().map_or(0, |h| h.bytes());
        let mut placed = Some(placed);
        let slots = (0..self.devices.len())
            .map(|i| Slot {
                copy: if i == home { placed.take() } else { None },
                bytes,
                used: AtomicU64::new(if i == home { self.tick() } else { 0 }),
            })
            .collect();
        {
            let mut map = self.write();
            let pinned = map.get(name).is_some_and(|e| e.pinned);
            let entry = Entry {
                slots,
                host,
                host_bytes,
                path: dir.to_path_buf(),
                pinned,
            };
            map.insert(name.to_string(), entry);
            self.enforce_budget(&mut map, &[home], name);
        }
        self.info(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))
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
            slots: (0..self.devices.len())
                .map(|_| Slot {
                    bytes,
                    ..Slot::default()
                })
                .collect(),
            host: None,
            host_bytes: 0,
            path: dir.to_path_buf(),
            pinned: false,
        });
        self.update_gauges(&map);
        Ok(())
    }

    /// Makes adapter `name` servable on device `dev` (blocking) and returns that copy: from host
    /// memory when another copy is there (one upload), from its folder otherwise.
    pub fn reload(&self, name: &str, dev: usize) -> Result<Arc<LoraAdapter>, AdapterError> {
        let (path, source) = match self.read().get(name) {
            Some(e) => match e.slots.get(dev).and_then(|s| s.copy.as_ref()) {
                Some(a) => return Ok(a.clone()),
                None => (e.path.clone(), e.source(&self.devices)),
            },
            None => return Err(AdapterError::NotFound(name.to_string())),
        };
        let (placed, host) = match source {
            Some(s) => (self.place(&s, dev)?, None),
            None => self.read_and_place(name, &path, dev)?,
        };
        let mut map = self.write();
        let e = map
            .get_mut(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
        if let Some(source) = host {
            // Back in host memory: the next device to need it uploads from here.
            e.host_bytes = source.bytes();
            e.host = Some(source);
        }
        if let Some(s) = e.slots.get_mut(dev) {
            s.bytes = placed.bytes();
            s.copy = Some(placed.clone());
            s.used.store(self.tick(), Ordering::Relaxed);
        }
        self.enforce_budget(&mut map, &[dev], name);
        Ok(placed)
    }

    /// Evicts least recently used, unpinned adapters (never `keep`) from each of `devs` until its
    /// resident bytes fit, then drops host copies beyond the host budget.
    fn enforce_budget(&self, map: &mut BTreeMap<String, Entry>, devs: &[usize], keep: &str) {
        for &dev in devs {
            self.evict(map, dev, keep);
        }
        self.drop_host_copies(map);
        self.update_gauges(map);
    }

    fn evict(&self, map: &mut BTreeMap<String, Entry>, dev: usize, keep: &str) {
        let on = |e: &Entry| {
            e.slots
                .get(dev)
                .filter(|s| s.copy.is_some())
                .map(|s| s.bytes)
        };
        loop {
            let resident: usize = map.values().filter_map(on).sum();
            if resident <= self.budget {
                break;
            }
            let victim = map
                .iter()
                .filter(|(n, e)| on(e).is_some() && !e.pinned && n.as_str() != keep)
                .min_by_key(|(_, e)| e.slots[dev].used.load(Ordering::Relaxed))
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    resident,
                    budget = self.budget,
                    device = %self.devices[dev].name,
                    "adapter budget exceeded by pinned adapters"
                );
                break;
            };
            if let Some(e) = map.get_mut(&victim) {
                e.slots[dev].copy = None;
                let to = if e.resident_anywhere() {
                    "its other devices"
                } else if e.host.is_some() {
                    "host"
                } else {
                    "disk"
                };
                tracing::info!(adapter = %victim, device = %self.devices[dev].name, "evicted adapter to {to} (LRU)");
                if let Some(c) = &self.counters {
                    c.evictions.inc();
                }
            }
        }
    }

    /// Host copies of adapters not resident on every device, under their own budget (least
    /// recently used to disk). A copy resident everywhere needs no host copy to be placed again.
    fn drop_host_copies(&self, map: &mut BTreeMap<String, Entry>) {
        let counted = |e: &Entry| e.host.is_some() && !e.resident_everywhere();
        loop {
            let held: usize = map
                .values()
                .filter(|e| counted(e))
                .map(|e| e.host_bytes)
                .sum();
            if held <= self.host_budget {
                break;
            }
            let victim = map
                .iter()
                .filter(|(_, e)| counted(e))
                .min_by_key(|(_, e)| e.last_used())
                .map(|(n, _)| n.clone());
            let Some(e) = victim.and_then(|v| map.get_mut(&v)) else {
                break;
            };
            e.host = None;
            tracing::info!(path = %e.path.display(), "dropped an adapter's host copy (LRU)");
        }
    }

    /// Gauges summed over the devices: every device's copies (resident), host copies counted by
    /// the host budget (host), adapters with no copy in memory (disk).
    fn update_gauges(&self, map: &BTreeMap<String, Entry>) {
        if let Some(c) = &self.counters {
            let (mut resident, mut host, mut disk) = (0, 0, 0);
            for e in map.values() {
                resident += e
                    .slots
                    .iter()
                    .filter(|s| s.copy.is_some())
                    .map(|s| s.bytes)
                    .sum::<usize>();
                if e.host.is_some() && !e.resident_everywhere() {
                    host += e.host_bytes;
                } else if e.host.is_none() && !e.resident_anywhere() {
                    disk += e.bytes();
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

    /// Pins (never evicted, on any device) or unpins an adapter. Pinning an evicted adapter does
    /// not reload it; its next use does.
    pub fn set_pinned(&self, name: &str, pinned: bool) -> Result<AdapterInfo, AdapterError> {
        {
            let mut map = self.write();
            let e = map
                .get_mut(name)
                .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
            e.pinned = pinned;
            if !pinned {
                let all: Vec<usize> = (0..self.devices.len()).collect();
                self.enforce_budget(&mut map, &all, "");
            }
        }
        self.info(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    /// Finds an adapter's copy on device `dev` for a request, marking it used there.
    pub fn lookup(&self, name: &str, dev: usize) -> Lookup {
        let map = self.read();
        let Some(slot) = map.get(name).and_then(|e| e.slots.get(dev)) else {
            return Lookup::Unknown;
        };
        slot.used.store(self.tick(), Ordering::Relaxed);
        match &slot.copy {
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

    /// Whether `name` has a servable copy on device `dev` (for routing; not a use).
    pub fn is_resident(&self, name: &str, dev: usize) -> bool {
        self.read()
            .get(name)
            .and_then(|e| e.slots.get(dev))
            .is_some_and(|s| s.copy.is_some())
    }

    /// Whether `name` is registered (resident or evicted).
    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    fn info_of(&self, name: &str, e: &Entry) -> AdapterInfo {
        let on: Vec<&Device> = e
            .slots
            .iter()
            .zip(&self.devices)
            .filter(|(s, _)| s.copy.is_some())
            .map(|(_, d)| d)
            .collect();
        let tier = if on.iter().any(|d| d.staged) {
            "device"
        } else if !on.is_empty() || e.host.is_some() {
            "host"
        } else {
            "disk"
        };
        AdapterInfo {
            name: name.to_string(),
            path: e.path.display().to_string(),
            bytes: e.bytes(),
            tier,
            pinned: e.pinned,
            devices: on.iter().map(|d| d.name.clone()).collect(),
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
#[path = "adapters_tests.rs"]
mod tests;
