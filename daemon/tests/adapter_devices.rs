//! The adapter registry over several serving devices: one copy per device under a per-device
//! budget (LRU per device), ONE host copy shared by the devices (placing an adapter on a second
//! device is an upload from it, not a disk read), and gauges summed over the devices. The devices
//! here are CPU placements: f32 (unstaged: the servable copy is the host-memory one) or bf16
//! (staged: a second copy, as on a GPU).

use candle_core::{DType, Device};
use qlorad::adapters::{AdapterInfo, AdapterRegistry, Lookup};
use qlorad::metrics::Metrics;
use qlorad::shards::home;
use qlorad_model::{Config, LoraAdapter, Placement};
use qlorad_tests::fixture;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn base() -> Config {
    Config::from_file(&fixture("tiny-llama/fp32/config.json")).unwrap()
}

fn bf16() -> Placement {
    Placement {
        device: Device::Cpu,
        dtype: DType::BF16,
    }
}

/// A registry over `placements` (named cpu#0, cpu#1, …) reporting into its own metrics.
fn registry(
    placements: &[Placement],
    budget: usize,
    host_budget: usize,
) -> (AdapterRegistry, Metrics) {
    let metrics = Metrics::new().unwrap();
    let names = qlorad::shards::names(&vec!["cpu"; placements.len()]);
    let r = AdapterRegistry::new(None, "base", base(), budget, Some(metrics.adapters.clone()))
        .with_devices(names.into_iter().zip(placements.iter().cloned()).collect())
        .with_host_budget(host_budget);
    (r, metrics)
}

/// The first `k` names `prefix-0`, `prefix-1`, … whose home among two devices is `dev`.
fn homed(prefix: &str, dev: usize, k: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|n| home(n, 2) == dev)
        .take(k)
        .collect()
}

/// A copy of the fixture adapter `which` at `to` (which a test may then move away).
fn copy_adapter(which: &str, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("lora").join(which).join(f), to.join(f)).unwrap();
    }
    to.to_path_buf()
}

fn info(r: &AdapterRegistry, name: &str) -> AdapterInfo {
    r.info(name).unwrap()
}

fn devices(r: &AdapterRegistry, name: &str) -> Vec<String> {
    info(r, name).devices
}

fn copy_on(r: &AdapterRegistry, name: &str, dev: usize) -> Arc<LoraAdapter> {
    match r.lookup(name, dev) {
        Lookup::Resident(a) => a,
        _ => panic!("{name} is not resident on device {dev}"),
    }
}

/// max |x - y| over a module's B matrices of two copies, in f32.
fn max_diff(x: &LoraAdapter, y: &LoraAdapter) -> f32 {
    let (x, y) = (x.module(0, 0).unwrap(), y.module(0, 0).unwrap());
    let d = (&x.b.to_dtype(DType::F32).unwrap() - &y.b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn each_device_keeps_its_own_lru_under_the_budget() {
    let lora = fixture("lora/tiny-r4-qv");
    let one = LoraAdapter::load(&lora, "x", &base()).unwrap().bytes();
    // Room for one adapter on each device.
    let (r, m) = registry(&[Placement::cpu(), Placement::cpu()], one, usize::MAX);
    let [a, b] = <[String; 2]>::try_from(homed("lru", 0, 2)).unwrap();
    // A load places the adapter on its home device only.
    r.load(&a, &lora).unwrap();
    assert_eq!(devices(&r, &a), ["cpu#0"]);
    assert!(!r.is_resident(&a, 1));
    r.load(&b, &lora).unwrap(); // evicts a from device 0
    assert_eq!(devices(&r, &b), ["cpu#0"]);
    assert_eq!(
        (devices(&r, &a), info(&r, &a).tier),
        (vec![], "disk"),
        "a was evicted from its only device"
    );
    // Device 1 has its own budget: a lands there without touching device 0.
    assert!(matches!(r.lookup(&a, 1), Lookup::Evicted));
    r.reload(&a, 1).unwrap();
    assert_eq!(devices(&r, &a), ["cpu#1"]);
    assert_eq!(devices(&r, &b), ["cpu#0"]);
    // b on device 1 evicts a there (its least recently used), and b is now on both devices.
    r.reload(&b, 1).unwrap();
    assert_eq!(devices(&r, &b), ["cpu#0", "cpu#1"]);
    assert_eq!(devices(&r, &a), Vec::<String>::new());
    assert_eq!(m.adapters.evictions.get(), 2);
    // Gauges sum over the devices: b's two copies, a on disk.
    assert_eq!(m.adapters.resident_bytes.get(), 2 * one as i64);
    assert_eq!(m.adapters.disk_bytes.get(), one as i64);
    assert_eq!(m.adapters.host_bytes.get(), 0);
    // a back on device 0 evicts b there only.
    r.reload(&a, 0).unwrap();
    assert_eq!(devices(&r, &a), ["cpu#0"]);
    assert_eq!(devices(&r, &b), ["cpu#1"]);
    // Pinned adapters stay on every device they are on.
    r.set_pinned(&b, true).unwrap();
    r.reload(&a, 1).unwrap();
    assert_eq!(devices(&r, &b), ["cpu#1"]);
    assert_eq!(devices(&r, &a), ["cpu#0", "cpu#1"]);
}

/// On a staged placement (a GPU, here bf16) the second device's copy is uploaded from the host
/// copy: it works with the adapter's folder gone, and equals the first device's copy.
#[test]
fn a_second_device_uploads_from_the_shared_host_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let (r, m) = registry(&[bf16(), bf16()], usize::MAX, usize::MAX);
    let name = homed("up", 0, 1).remove(0);
    let dir = copy_adapter("tiny-r8-all", &tmp.path().join("a"));
    r.load(&name, &dir).unwrap();
    assert_eq!(
        (devices(&r, &name), info(&r, &name).tier),
        (vec!["cpu#0".to_string()], "device")
    );
    let host = LoraAdapter::load(&dir, "x", &base()).unwrap().bytes();
    // Resident on one device of two: its host copy counts against the host budget.
    assert_eq!(m.adapters.host_bytes.get(), host as i64);
    std::fs::rename(&dir, tmp.path().join("moved")).unwrap();
    assert!(matches!(r.lookup(&name, 1), Lookup::Evicted));
    let second = r.reload(&name, 1).unwrap();
    assert_eq!(devices(&r, &name), ["cpu#0", "cpu#1"]);
    let first = copy_on(&r, &name, 0);
    assert!(
        !Arc::ptr_eq(&first, &second),
        "each device has its own copy"
    );
    assert_eq!(max_diff(&first, &second), 0.0);
    // Resident everywhere: no host copy is counted any more.
    assert_eq!(m.adapters.host_bytes.get(), 0);
    assert_eq!(m.adapters.resident_bytes.get(), 2 * second.bytes() as i64);
    // Control: an adapter whose folder is gone and that has no copy in memory cannot be placed.
    let other = copy_adapter("tiny-r8-all", &tmp.path().join("b"));
    r.register_on_disk("on-disk", &other).unwrap();
    std::fs::remove_dir_all(&other).unwrap();
    assert!(r.reload("on-disk", 1).is_err());
}

/// On a CPU model in f32 the servable copy is the host-memory one: a second CPU shard shares it.
#[test]
fn unstaged_devices_share_one_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let (r, _) = registry(
        &[Placement::cpu(), Placement::cpu()],
        usize::MAX,
        usize::MAX,
    );
    let name = homed("share", 1, 1).remove(0);
    let dir = copy_adapter("tiny-r4-qv", &tmp.path().join("a"));
    r.load(&name, &dir).unwrap();
    assert_eq!(
        (devices(&r, &name), info(&r, &name).tier),
        (vec!["cpu#1".to_string()], "host")
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let on0 = r.reload(&name, 0).unwrap();
    assert!(Arc::ptr_eq(&on0, &copy_on(&r, &name, 1)));
    assert_eq!(devices(&r, &name), ["cpu#0", "cpu#1"]);
}

/// The host budget counts the host copies of adapters not resident on every device; one dropped
/// means that device's next placement reads the disk again.
#[test]
fn host_budget_counts_adapters_not_on_every_device() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b] = <[String; 2]>::try_from(homed("host", 0, 2)).unwrap();
    let dir_a = copy_adapter("tiny-r8-all", &tmp.path().join("a"));
    let dir_b = copy_adapter("tiny-r8-all", &tmp.path().join("b"));
    let host = LoraAdapter::load(&dir_a, "x", &base()).unwrap().bytes();
    // Room for one host copy; no device budget.
    let (r, m) = registry(&[bf16(), bf16()], usize::MAX, host);
    r.load(&a, &dir_a).unwrap();
    r.load(&b, &dir_b).unwrap(); // two counted host copies: a's (older) is dropped
    assert_eq!(m.adapters.host_bytes.get(), host as i64);
    assert_eq!(info(&r, &a).tier, "device", "a stays on device 0");
    // b reaches device 1 from its host copy and is then resident everywhere.
    std::fs::rename(&dir_b, tmp.path().join("b-moved")).unwrap();
    r.reload(&b, 1).unwrap();
    assert_eq!(m.adapters.host_bytes.get(), 0);
    // a has no host copy left: device 1 needs its folder.
    let moved = tmp.path().join("a-moved");
    std::fs::rename(&dir_a, &moved).unwrap();
    assert!(r.reload(&a, 1).is_err());
    std::fs::rename(&moved, &dir_a).unwrap();
    r.reload(&a, 1).unwrap();
    assert_eq!(devices(&r, &a), ["cpu#0", "cpu#1"]);
    assert_eq!(m.adapters.host_bytes.get(), 0);
}
