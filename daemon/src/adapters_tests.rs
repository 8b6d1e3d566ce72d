//! Tests of the adapter registry (daemon/src/adapters.rs): tiers, eviction, names.

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
    assert!(matches!(r.lookup("b", 0), Lookup::Evicted));
    let b = r.reload("b", 0).unwrap();
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
    r.reload("a", 0).unwrap();
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
