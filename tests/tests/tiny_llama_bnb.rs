//! A tiny random Llama saved by transformers in fp32 and, loaded with bitsandbytes 4-bit (NF4, double
//! quant), saved again: we load both folders (the second in bnb's checkpoint layout), reproduce both
//! models' logits, and `qlorad quantize` writes that same layout from the fp32 folder.
//! Fixtures: tests/fixtures/tiny-llama (scripts/fixtures/gen_tiny_llama.py).

use qlorad_model::loader::{self, Quant};
use qlorad_model::weights::WeightStore;
use qlorad_model::{Llama, Logits, SeqInput};
use qlorad_tests::{fixture, rel_err, st_f32, st_ids};
use safetensors::SafeTensors;
use std::path::Path;

fn all_logits(dir: &Path, quant: Quant) -> Vec<f32> {
    let (cfg, w) = loader::load(dir, quant).unwrap();
    let model = Llama::new(cfg, w).unwrap();
    let buf = std::fs::read(fixture("tiny-llama/logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let ids = st_ids(&st, "input_ids");
    let mut cache = model.new_cache();
    let l = model
        .forward(&mut [SeqInput::new(&ids, &mut cache)], Logits::All)
        .unwrap();
    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn reference(name: &str) -> Vec<f32> {
    let buf = std::fs::read(fixture("tiny-llama/logits.safetensors")).unwrap();
    st_f32(&SafeTensors::deserialize(&buf).unwrap(), name)
}

#[test]
fn fp32_folder_matches_transformers() {
    let err = rel_err(
        &all_logits(&fixture("tiny-llama/fp32"), Quant::None),
        &reference("fp32_logits"),
    );
    assert!(err < 1e-5, "relative error {err}");
}

#[test]
fn bnb_checkpoint_loads_and_matches_bitsandbytes() {
    // Loading bnb's own bytes: the dequantized weights are bnb's exactly.
    let dir = fixture("tiny-llama/bnb-nf4");
    let err = rel_err(
        &all_logits(&dir, Quant::Nf4(Default::default())),
        &reference("nf4_logits"),
    );
    assert!(err < 1e-5, "nf4: relative error {err}");
    // Full precision from a bnb checkpoint means its dequantized weights: the same model.
    let err = rel_err(&all_logits(&dir, Quant::None), &reference("nf4_logits"));
    assert!(err < 1e-5, "dequantized: relative error {err}");
}

#[test]
fn quantize_writes_the_bitsandbytes_layout() {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("q");
    qlorad_model::quantize::quantize_model(
        &fixture("tiny-llama/fp32"),
        &target,
        Default::default(),
        false,
    )
    .unwrap();
    let ours = WeightStore::open(&target).unwrap();
    let theirs = WeightStore::open(&fixture("tiny-llama/bnb-nf4")).unwrap();
    assert_eq!(ours.names(), theirs.names(), "same tensor names");
    for name in theirs.names() {
        let (a, b) = (ours.raw(name).unwrap(), theirs.raw(name).unwrap());
        if name.contains("quant_state") {
            let mut qa: serde_json::Value = serde_json::from_slice(a.data).unwrap();
            let mut qb: serde_json::Value = serde_json::from_slice(b.data).unwrap();
            let (oa, ob) = (qa["nested_offset"].take(), qb["nested_offset"].take());
            let (oa, ob) = (oa.as_f64().unwrap() as f32, ob.as_f64().unwrap() as f32);
            assert!(
                (oa.to_bits() as i64 - ob.to_bits() as i64).abs() <= 4,
                "{name}: offset {oa} vs {ob}"
            );
            assert_eq!(qa, qb, "{name}: quant state");
            continue;
        }
        assert_eq!(
            (a.dtype, &a.shape),
            (b.dtype, &b.shape),
            "{name}: dtype/shape"
        );
        if name.ends_with(".absmax") || name.ends_with(".nested_absmax") {
            // These depend on the double-quant offset, torch's f32 mean (machine-dependent order);
            // tests/fixtures/nf4 checks them bit for bit given bnb's offset.
            continue;
        }
        assert!(a.data == b.data, "{name}: bytes differ");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(target.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "bitsandbytes");
    assert_eq!(cfg["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    let err = rel_err(
        &all_logits(&target, Quant::Nf4(Default::default())),
        &reference("nf4_logits"),
    );
    assert!(err < 1e-3, "relative error {err}");
    // Refuses to overwrite.
    assert!(qlorad_model::quantize::quantize_model(
        &fixture("tiny-llama/fp32"),
        &target,
        Default::default(),
        false
    )
    .is_err());
}
