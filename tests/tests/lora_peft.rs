//! LoRA adapters against PEFT: logits of base + adapter (unmerged) for adapters of several ranks,
//! targets, rsLoRA and rank/alpha patterns, on fp32 and NF4 bases; equality with a model whose weights
//! have the adapter merged in; a batch mixing adapters equals each request alone; unsupported adapters
//! are refused. Fixtures: tests/fixtures/lora (scripts/fixtures/gen_lora_fixtures.py).

use qlorad_model::io::{write_safetensors, OwnedTensor};
use qlorad_model::loader::{self, Quant};
use qlorad_model::weights::WeightStore;
use qlorad_model::{Llama, Logits, LoraAdapter, SeqInput};
use qlorad_tests::{fixture, rel_err, smollm2, st_f32, st_ids};
use safetensors::SafeTensors;
use std::path::Path;
use std::sync::Arc;

const TINY: [&str; 4] = ["r4-qv", "r8-all", "r16-mlp-rslora", "r8-pattern"];
const IDS: [u32; 7] = [1, 5, 9, 20, 33, 2, 7];

fn model(dir: &Path, quant: Quant) -> Llama {
    let (cfg, w) = loader::load(dir, quant).unwrap();
    Llama::new(cfg, w).unwrap()
}

fn adapter(m: &Llama, name: &str) -> Arc<LoraAdapter> {
    Arc::new(LoraAdapter::load(&fixture(&format!("lora/{name}")), name, m.config()).unwrap())
}

fn logits(m: &Llama, ids: &[u32], a: Option<Arc<LoraAdapter>>, mode: Logits) -> Vec<f32> {
    let mut cache = m.new_cache();
    let mut s = SeqInput::new(ids, &mut cache);
    s.adapter = a;
    m.forward(&mut [s], mode)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn tiny_ref(key: &str) -> Vec<f32> {
    let buf = std::fs::read(fixture("lora/tiny_logits.safetensors")).unwrap();
    st_f32(&SafeTensors::deserialize(&buf).unwrap(), key)
}

#[test]
fn tiny_adapters_match_peft() {
    let base = model(&fixture("tiny-llama/fp32"), Quant::None);
    let err = rel_err(&logits(&base, &IDS, None, Logits::All), &tiny_ref("base"));
    assert!(err < 1e-5, "base {err}");
    for name in TINY {
        let a = adapter(&base, &format!("tiny-{name}"));
        let err = rel_err(&logits(&base, &IDS, Some(a), Logits::All), &tiny_ref(name));
        assert!(err < 1e-5, "{name}: relative error {err} vs peft");
    }
    let nf4 = model(
        &fixture("tiny-llama/bnb-nf4"),
        Quant::Nf4(Default::default()),
    );
    let a = adapter(&nf4, "tiny-r8-all");
    let err = rel_err(
        &logits(&nf4, &IDS, Some(a), Logits::All),
        &tiny_ref("nf4_r8-all"),
    );
    assert!(err < 1e-5, "nf4 base + r8-all: {err}");
}

/// Writes the tiny base with `adapter` merged into its projections, computing `W + s·B·A` here with
/// plain loops (independently of `LoraAdapter::merge_into`).
fn merged_copy(dir: &Path, adapter_dir: &Path, out: &Path) {
    let store = WeightStore::open(dir).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let (r, alpha) = (
        cfg["r"].as_f64().unwrap(),
        cfg["lora_alpha"].as_f64().unwrap(),
    );
    let scale = if cfg["use_rslora"].as_bool() == Some(true) {
        alpha / r.sqrt()
    } else {
        alpha / r
    };
    let ad = WeightStore::open(adapter_dir).unwrap();
    let mut tensors = Vec::new();
    for name in store.names() {
        let raw = store.raw(name).unwrap();
        let mut w = raw.to_f32_vec().unwrap();
        let module = name.trim_end_matches(".weight");
        let a_name = format!("base_model.model.{module}.lora_A.weight");
        if ad.contains(&a_name) {
            let a = ad.raw(&a_name).unwrap();
            let b = ad
                .raw(&format!("base_model.model.{module}.lora_B.weight"))
                .unwrap();
            let (av, bv) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
            let (rank, inp) = (a.shape[0], a.shape[1]);
            let out_f = b.shape[0];
            for o in 0..out_f {
                for i in 0..inp {
                    let d: f64 = (0..rank)
                        .map(|k| bv[o * rank + k] as f64 * av[k * inp + i] as f64)
                        .sum();
                    w[o * inp + i] += (scale * d) as f32;
                }
            }
        }
        tensors.push(OwnedTensor::f32(name, raw.shape.clone(), &w));
    }
    std::fs::create_dir_all(out).unwrap();
    write_safetensors(&out.join("model.safetensors"), &tensors).unwrap();
    std::fs::copy(dir.join("config.json"), out.join("config.json")).unwrap();
}

#[test]
fn serving_path_equals_merged_weights() {
    let dir = fixture("tiny-llama/fp32");
    let base = model(&dir, Quant::None);
    for name in ["r4-qv", "r8-all", "r16-mlp-rslora"] {
        let tmp = tempfile::tempdir().unwrap();
        let adir = fixture(&format!("lora/tiny-{name}"));
        merged_copy(&dir, &adir, tmp.path());
        let merged = model(tmp.path(), Quant::None);
        let a = adapter(&base, &format!("tiny-{name}"));
        let err = rel_err(
            &logits(&base, &IDS, Some(a), Logits::All),
            &logits(&merged, &IDS, None, Logits::All),
        );
        assert!(err < 1e-5, "{name}: unmerged vs merged {err}");
    }
}

#[test]
fn mixed_batch_equals_each_alone() {
    let base = model(&fixture("tiny-llama/fp32"), Quant::Nf4(Default::default()));
    let adapters: Vec<Option<Arc<LoraAdapter>>> = vec![
        Some(adapter(&base, "tiny-r4-qv")),
        None,
        Some(adapter(&base, "tiny-r16-mlp-rslora")),
        Some(adapter(&base, "tiny-r8-all")),
        Some(adapter(&base, "tiny-r8-pattern")),
    ];
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 5, 9],
        vec![3, 4, 5, 6, 7, 8],
        vec![9],
        vec![10, 11, 12, 13],
        vec![2, 60],
    ];
    // Alone: prefill then 6 greedy steps each.
    let run_alone = |p: &[u32], a: &Option<Arc<LoraAdapter>>| {
        let mut cache = base.new_cache();
        let mut toks = vec![];
        let mut next: Vec<u32> = p.to_vec();
        for _ in 0..6 {
            let mut s = SeqInput::new(&next, &mut cache);
            s.adapter = a.clone();
            let l = base
                .forward(&mut [s], Logits::Last)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let t = qlorad_model::sampling::argmax(&l);
            toks.push(t);
            next = vec![t];
        }
        toks
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&adapters)
        .map(|(p, a)| run_alone(p, a))
        .collect();
    // Together: all five sequences in every forward pass.
    let mut caches: Vec<_> = prompts.iter().map(|_| base.new_cache()).collect();
    let mut nexts: Vec<Vec<u32>> = prompts.clone();
    let mut together: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
    for _ in 0..6 {
        let mut inputs: Vec<SeqInput> = caches
            .iter_mut()
            .zip(&nexts)
            .zip(&adapters)
            .map(|((c, n), a)| {
                let mut s = SeqInput::new(n, c);
                s.adapter = a.clone();
                s
            })
            .collect();
        let rows = base
            .forward(&mut inputs, Logits::Last)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        drop(inputs);
        for (i, row) in rows.iter().enumerate() {
            let t = qlorad_model::sampling::argmax(row);
            together[i].push(t);
            nexts[i] = vec![t];
        }
    }
    assert_eq!(together, alone);
    assert!(
        alone.iter().collect::<std::collections::HashSet<_>>().len() > 1,
        "adapters should change outputs"
    );
}

#[test]
fn unsupported_adapters_are_refused_with_a_reason() {
    let base = model(&fixture("tiny-llama/fp32"), Quant::None);
    for (name, why) in [
        ("tiny-dora", "DoRA"),
        ("tiny-modules-to-save", "modules_to_save"),
        ("tiny-embed", "embed_tokens are not supported"),
        ("tiny-wrong-shape", "expected [4, 64]"),
    ] {
        let e =
            LoraAdapter::load(&fixture(&format!("lora/{name}")), name, base.config()).unwrap_err();
        assert!(e.to_string().contains(why), "{name}: {e}");
    }
    let e = LoraAdapter::load(&fixture("lora/does-not-exist"), "x", base.config()).unwrap_err();
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
    // The packed (GPU hot-load) reader checks the same things and says the same.
    for name in [
        "tiny-dora",
        "tiny-embed",
        "tiny-wrong-shape",
        "does-not-exist",
    ] {
        let dir = fixture(&format!("lora/{name}"));
        let f32_err = LoraAdapter::load(&dir, name, base.config()).unwrap_err();
        let packed_err = LoraAdapter::load_packed(&dir, name, base.config()).unwrap_err();
        assert_eq!(f32_err.to_string(), packed_err.to_string(), "{name}");
    }
}

/// The packed bf16 host form (the GPU hot-load path: converted straight from the file) holds
/// exactly `bf16(A)` and `bf16(B·scale)` of the f32 reader's modules, with the scale folded, and
/// places on the CPU like any adapter.
#[test]
fn packed_host_form_is_the_f32_adapter_rounded_once() {
    use candle_core::DType;
    let base = model(&fixture("tiny-llama/fp32"), Quant::None);
    for name in TINY {
        let dir = fixture(&format!("lora/tiny-{name}"));
        let full = LoraAdapter::load(&dir, name, base.config()).unwrap();
        let packed = LoraAdapter::load_packed(&dir, name, base.config()).unwrap();
        let bits = |t: &candle_core::Tensor| -> Vec<u16> {
            assert_eq!(t.dtype(), DType::BF16);
            t.flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let rounded = |t: &candle_core::Tensor, s: f64| -> Vec<u16> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| half::bf16::from_f32(v * s as f32).to_bits())
                .collect()
        };
        let mut modules = 0;
        for layer in 0..base.config().num_layers {
            for proj in 0..7 {
                match (full.module(layer, proj), packed.module(layer, proj)) {
                    (None, None) => {}
                    (Some(f), Some(p)) => {
                        modules += 1;
                        assert_eq!(p.scale, 1.0, "{name}: scale folded into B");
                        assert_eq!(p.a.dims(), f.a.dims());
                        assert_eq!(p.b.dims(), f.b.dims());
                        assert_eq!(bits(&p.a), rounded(&f.a, 1.0), "{name} {layer}.{proj} A");
                        assert_eq!(
                            bits(&p.b),
                            rounded(&f.b, f.scale),
                            "{name} {layer}.{proj} B"
                        );
                    }
                    _ => panic!("{name}: module {layer}.{proj} present in one form only"),
                }
            }
        }
        assert!(modules > 0, "{name}");
        // Served on the CPU (f32) from the packed form: the same logits as the f32 adapter to
        // bf16 rounding of the weights.
        let placed = packed.to_placement(base.placement()).unwrap();
        let want = logits(&base, &IDS, Some(Arc::new(full)), Logits::All);
        let got = logits(&base, &IDS, Some(Arc::new(placed)), Logits::All);
        let e = rel_err(&got, &want);
        assert!(e < 2e-2, "{name}: rel err {e}");
    }
}

#[test]
fn smollm2_adapter_matches_peft() {
    let Some(dir) = smollm2() else { return };
    let (m, _tok) = qlorad_model::load_model(&dir, Quant::None).unwrap();
    let a = adapter(&m, "smollm2-r8-qv");
    let buf = std::fs::read(fixture("lora/smollm2_logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    for p in ["a", "b", "c", "d"] {
        let ids = st_ids(&st, &format!("input_ids_{p}"));
        let ours = logits(&m, &ids, Some(a.clone()), Logits::Last);
        let err = rel_err(&ours, &st_f32(&st, &format!("logits_{p}")));
        assert!(err < 1e-4, "prompt {p}: {err}");
    }
}
