//! Promotion (`qlorad_trainer::merge`): exported weights equal a reference merge computed here in
//! f64 from the adapter files (independently of `LoraAdapter`), within the output dtype's rounding;
//! the export served in full precision gives the same greedy tokens as base + adapter served
//! unmerged; `dequantized` reproduces the NF4-served model; the folder is complete (index, config,
//! manifest hashes); cancellation and bad input leave nothing behind.

use qlorad_model::loader::{self, Quant};
use qlorad_model::weights::WeightStore;
use qlorad_model::{Llama, Logits, LoraAdapter, SeqInput};
use qlorad_tests::{fixture, rel_err, smollm2};
use qlorad_trainer::merge::{merge_and_export, ExportDtype, MergeError, MergeInto, MergeOptions};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const ALPHA_BOOST: f64 = 8.0;
const TINY_ADAPTERS: [&str; 4] = ["r4-qv", "r8-all", "r16-mlp-rslora", "r8-pattern"];

fn opts(
    model: &Path,
    adapter: &Path,
    out: &Path,
    dtype: ExportDtype,
    into: MergeInto,
) -> MergeOptions {
    MergeOptions {
        dtype,
        merge_into: into,
        ..MergeOptions::new(model, adapter, out)
    }
}

fn export(o: &MergeOptions) {
    merge_and_export(o, |_| {}).unwrap_or_else(|e| panic!("export failed: {e}"));
}

/// The reference `W + s·B·A` for module `module` (e.g. `model.layers.0.self_attn.q_proj`), in f64,
/// read straight from the adapter folder: r from A's shape, alpha from `alpha_pattern` (PEFT matches
/// a key against the end of the module name), rsLoRA from the config. `None` if not adapted.
/// Also returns, per element, `|w| + |s|·Σ|b·a|`, the magnitude an f32 merge's rounding error scales
/// with, and the rank.
fn reference_merge(adapter: &Path, module: &str, w: &[f32]) -> Option<(Vec<f64>, Vec<f64>, usize)> {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let ad = WeightStore::open(adapter).unwrap();
    let a_name = format!("base_model.model.{module}.lora_A.weight");
    if !ad.contains(&a_name) {
        return None;
    }
    let a = ad.raw(&a_name).unwrap();
    let b = ad
        .raw(&format!("base_model.model.{module}.lora_B.weight"))
        .unwrap();
    let (r, inp, out) = (a.shape[0], a.shape[1], b.shape[0]);
    let (av, bv) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    let alpha = cfg["alpha_pattern"]
        .as_object()
        .and_then(|m| {
            m.iter()
                .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
                .map(|(_, v)| v.as_f64().unwrap())
        })
        .unwrap_or_else(|| cfg["lora_alpha"].as_f64().unwrap());
    let scale = if cfg["use_rslora"].as_bool() == Some(true) {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    };
    let mut m: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let mut mag: Vec<f64> = w.iter().map(|&x| (x as f64).abs()).collect();
    for o in 0..out {
        for i in 0..inp {
            let (mut d, mut d_abs) = (0f64, 0f64);
            for k in 0..r {
                let p = bv[o * r + k] as f64 * av[k * inp + i] as f64;
                d += p;
                d_abs += p.abs();
            }
            m[o * inp + i] += scale * d;
            mag[o * inp + i] += scale.abs() * d_abs;
        }
    }
    Some((m, mag, r))
}

/// Spacing of representable `dtype` values at |x| (one unit in the last place).
fn ulp(dtype: ExportDtype, x: f64) -> f64 {
    let mantissa_bits = match dtype {
        ExportDtype::F32 => 23,
        ExportDtype::F16 => 10,
        ExportDtype::BF16 => 7,
    };
    let min_exp = if dtype == ExportDtype::F16 { -14 } else { -126 };
    let e = (x.abs().max(f64::MIN_POSITIVE))
        .log2()
        .floor()
        .max(min_exp as f64);
    2f64.powf(e - mantissa_bits as f64)
}

/// The base weight a merge starts from, given (tensor name, stored weight, shape).
type BaseOf = dyn Fn(&str, Vec<f32>, &[usize]) -> Vec<f32>;

/// Checks every tensor of the export in `out` against the base in `model` merged with `adapter`
/// (`base_of` gives the base weight the merge starts from). Returns how many tensors were adapted.
fn check_weights(
    model: &Path,
    adapter: &Path,
    out: &Path,
    dtype: ExportDtype,
    base_of: &BaseOf,
) -> usize {
    let base = WeightStore::open(model).unwrap();
    let exp = WeightStore::open(out).unwrap();
    let mut adapted = 0;
    for name in exp.names() {
        let raw = exp.raw(name).unwrap();
        assert_eq!(raw.dtype, dtype.safetensors(), "{name}");
        let got = raw.to_f32_vec().unwrap();
        let src = base.raw(name).unwrap();
        let w = base_of(name, src.to_f32_vec().unwrap(), &src.shape);
        assert_eq!(raw.shape, src.shape, "{name}");
        let module = name.trim_end_matches(".weight");
        match reference_merge(adapter, module, &w) {
            Some((reference, mag, rank)) => {
                adapted += 1;
                // Merging in f32 (a rank-r dot product, a scale, a sum) and rounding once to the
                // dtype: within one unit of the dtype plus f32's error bound (r + 2)·eps·magnitude.
                let f32_err = (rank as f64 + 2.0) * f32::EPSILON as f64;
                for (i, (&g, &r)) in got.iter().zip(&reference).enumerate() {
                    let tol = ulp(dtype, r) + f32_err * mag[i];
                    assert!(
                        (g as f64 - r).abs() <= tol,
                        "{name}[{i}]: {g} vs reference {r} (tol {tol})"
                    );
                }
            }
            None => {
                // Not adapted: the base value rounded once to the dtype, bit for bit.
                let expect: Vec<f32> = match dtype {
                    ExportDtype::F32 => w,
                    ExportDtype::F16 => {
                        w.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
                    }
                    ExportDtype::BF16 => w
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_f32())
                        .collect(),
                };
                assert!(
                    got == expect,
                    "{name}: not the base value rounded to {dtype:?}"
                );
            }
        }
    }
    adapted
}

/// The folder is what transformers expects, and the manifest hashes every other file.
fn check_folder(out: &Path, dtype: ExportDtype) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], dtype.torch_name());
    assert!(cfg.get("quantization_config").is_none());
    assert!(out.join("generation_config.json").exists());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let exp = WeightStore::open(out).unwrap();
    let total: u64 = exp
        .names()
        .iter()
        .map(|n| exp.raw(n).unwrap().data.len() as u64)
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    let mapped: BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(mapped, exp.names().into_iter().collect());
    assert!(!mapped.contains("lm_head.weight"), "tied: no lm_head");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("qlorad-manifest.json")).unwrap())
            .unwrap();
    let mut listed = BTreeSet::new();
    for f in manifest["files"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let bytes = std::fs::read(out.join(name)).unwrap();
        assert_eq!(f["bytes"], bytes.len() as u64, "{name}");
        assert_eq!(f["sha256"].as_str().unwrap(), sha256_hex(&bytes), "{name}");
        listed.insert(name.to_string());
    }
    listed.insert("qlorad-manifest.json".into());
    let present: BTreeSet<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listed, present);
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn load(dir: &Path, quant: Quant) -> Llama {
    let (cfg, w) = loader::load(dir, quant).unwrap();
    Llama::new(cfg, w).unwrap()
}

fn logits(m: &Llama, ids: &[u32], a: Option<Arc<LoraAdapter>>) -> Vec<f32> {
    let mut cache = m.new_cache();
    let mut s = SeqInput::new(ids, &mut cache);
    s.adapter = a;
    let t = m.forward(&mut [s], Logits::All).unwrap();
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Greedy ids (no eos stop) for `n` steps.
fn greedy(m: &Llama, prompt: &[u32], a: Option<Arc<LoraAdapter>>, n: usize) -> Vec<u32> {
    let mut cache = m.new_cache();
    let (mut out, mut next) = (Vec::new(), prompt.to_vec());
    for _ in 0..n {
        let mut s = SeqInput::new(&next, &mut cache);
        s.adapter = a.clone();
        let row = m.forward(&mut [s], Logits::Last).unwrap();
        let t = qlorad_model::sampling::argmax(&row.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        out.push(t);
        next = vec![t];
    }
    out
}

/// Greedy ids of several sequences decoded together in one batch (no eos stop), `n` steps.
fn greedy_batch(
    m: &Llama,
    prompts: &[Vec<u32>],
    adapters: &[Option<Arc<LoraAdapter>>],
    n: usize,
) -> Vec<Vec<u32>> {
    let mut caches: Vec<_> = prompts.iter().map(|_| m.new_cache()).collect();
    let mut next = prompts.to_vec();
    let mut out = vec![Vec::new(); prompts.len()];
    for _ in 0..n {
        let mut seqs: Vec<SeqInput> = caches
            .iter_mut()
            .zip(&next)
            .zip(adapters)
            .map(|((c, t), a)| {
                let mut s = SeqInput::new(t, c);
                s.adapter = a.clone();
                s
            })
            .collect();
        let rows = m.forward(&mut seqs, Logits::Last).unwrap();
        drop(seqs);
        for (i, row) in rows.to_vec2::<f32>().unwrap().iter().enumerate() {
            let t = qlorad_model::sampling::argmax(row);
            out[i].push(t);
            next[i] = vec![t];
        }
    }
    out
}

#[test]
fn tiny_exports_equal_the_reference_merge_in_every_dtype() {
    let model = fixture("tiny-llama/fp32");
    for name in TINY_ADAPTERS {
        let adapter = fixture(&format!("lora/tiny-{name}"));
        for dtype in [ExportDtype::F32, ExportDtype::BF16, ExportDtype::F16] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("merged");
            let mut o = opts(&model, &adapter, &out, dtype, MergeInto::Original);
            o.max_shard_bytes = 40_000; // several shards even for this tiny model
            export(&o);
            let adapted = check_weights(&model, &adapter, &out, dtype, &|_, w, _| w);
            assert!(adapted >= 4, "{name}: {adapted} adapted tensors");
            check_folder(&out, dtype);
        }
    }
}

#[test]
fn tiny_export_serves_like_the_unmerged_adapter() {
    let model = fixture("tiny-llama/fp32");
    let base = load(&model, Quant::None);
    for name in TINY_ADAPTERS {
        let adir = fixture(&format!("lora/tiny-{name}"));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        export(&opts(
            &model,
            &adir,
            &out,
            ExportDtype::F32,
            MergeInto::Original,
        ));
        let merged = load(&out, Quant::None);
        let a = Arc::new(LoraAdapter::load(&adir, name, base.config()).unwrap());
        let ids = [1, 5, 9, 20, 33, 2, 7];
        let err = rel_err(
            &logits(&merged, &ids, None),
            &logits(&base, &ids, Some(a.clone())),
        );
        assert!(err < 1e-5, "{name}: merged vs unmerged logits {err}");
        for prompt in [&[1u32, 5, 9][..], &[3, 4, 5, 6], &[60]] {
            assert_eq!(
                greedy(&merged, prompt, None, 8),
                greedy(&base, prompt, Some(a.clone()), 8),
                "{name} {prompt:?}"
            );
        }
    }
}

#[test]
fn dequantized_merge_reproduces_the_nf4_served_model() {
    let fp32 = fixture("tiny-llama/fp32");
    let adir = fixture("lora/tiny-r8-all");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("deq");
    export(&opts(
        &fp32,
        &adir,
        &out,
        ExportDtype::F32,
        MergeInto::Dequantized,
    ));
    // The base this merge starts from: our NF4 round trip (byte-exact with bitsandbytes, tested in
    // kernels) of each projection; everything else as stored.
    let nf4_round_trip = |name: &str, w: Vec<f32>, shape: &[usize]| {
        if name.contains("_proj.") {
            qlorad_kernels::Nf4Tensor::quantize(&w, shape, Default::default())
                .unwrap()
                .dequantize()
        } else {
            w
        }
    };
    assert_eq!(
        check_weights(&fp32, &adir, &out, ExportDtype::F32, &nf4_round_trip),
        14
    );
    // Served in full precision, the export equals base NF4 + adapter as the daemon serves it.
    let nf4 = load(&fp32, Quant::Nf4(Default::default()));
    let a = Arc::new(LoraAdapter::load(&adir, "a", nf4.config()).unwrap());
    let merged = load(&out, Quant::None);
    let ids = [1, 5, 9, 20, 33, 2, 7];
    let err = rel_err(
        &logits(&merged, &ids, None),
        &logits(&nf4, &ids, Some(a.clone())),
    );
    assert!(err < 1e-5, "dequantized export vs NF4 + adapter: {err}");

    // From the bitsandbytes checkpoint of the same model: the stored NF4 weights, same result.
    let bnb = fixture("tiny-llama/bnb-nf4");
    let out2 = tmp.path().join("deq-from-bnb");
    export(&opts(
        &bnb,
        &adir,
        &out2,
        ExportDtype::F32,
        MergeInto::Dequantized,
    ));
    let from_bnb = load(&out2, Quant::None);
    let err = rel_err(&logits(&from_bnb, &ids, None), &logits(&nf4, &ids, Some(a)));
    assert!(
        err < 1e-5,
        "export from the bnb checkpoint vs NF4 + adapter: {err}"
    );
    let manifest = std::fs::read_to_string(out2.join("qlorad-manifest.json")).unwrap();
    assert!(
        manifest.contains("\"merge_into\": \"dequantized\""),
        "{manifest}"
    );

    // Only NF4 is stored there: `original` is refused, naming the alternative; nothing is written.
    let out3 = tmp.path().join("orig-from-bnb");
    let e = merge_and_export(
        &opts(&bnb, &adir, &out3, ExportDtype::BF16, MergeInto::Original),
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(e, MergeError::OriginalUnavailable(_)), "{e}");
    assert!(e.to_string().contains("--merge-into dequantized"), "{e}");
    assert!(!out3.exists());
}

#[test]
fn cancelling_leaves_nothing_and_progress_counts_every_tensor() {
    let model = fixture("tiny-llama/fp32");
    let adir = fixture("lora/tiny-r8-all");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let mut seen = Vec::new();
    export(&opts(
        &model,
        &adir,
        &out,
        ExportDtype::BF16,
        MergeInto::Original,
    ));
    let o = MergeOptions {
        overwrite: true,
        ..opts(
            &model,
            &adir,
            &tmp.path().join("m2"),
            ExportDtype::BF16,
            MergeInto::Original,
        )
    };
    merge_and_export(&o, |p| seen.push(*p)).unwrap();
    assert_eq!(
        seen.len(),
        21,
        "before the first tensor, then after each of 20"
    );
    let last = seen.last().unwrap();
    assert_eq!((last.tensors_done, last.tensors_total), (20, 20));
    assert_eq!(last.bytes_written, last.bytes_total);
    assert!(seen
        .windows(2)
        .all(|w| w[1].tensors_done == w[0].tensors_done + 1));

    let flag = Arc::new(AtomicBool::new(false));
    let o = MergeOptions {
        cancel: Some(flag.clone()),
        ..opts(
            &model,
            &adir,
            &tmp.path().join("c"),
            ExportDtype::BF16,
            MergeInto::Original,
        )
    };
    let e = merge_and_export(&o, |p| {
        if p.tensors_done == 5 {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .unwrap_err();
    assert!(matches!(e, MergeError::Cancelled), "{e}");
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        BTreeSet::from_iter(left),
        BTreeSet::from(["m".to_string(), "m2".to_string()])
    );
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let model = fixture("tiny-llama/fp32");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let fail = |adapter: &Path, out: &Path, overwrite: bool| {
        let o = MergeOptions {
            overwrite,
            ..opts(&model, adapter, out, ExportDtype::BF16, MergeInto::Original)
        };
        merge_and_export(&o, |_| {}).unwrap_err().to_string()
    };
    let e = fail(&fixture("lora/does-not-exist"), &out, false);
    assert!(
        e.contains("does-not-exist: adapter folder not found"),
        "{e}"
    );
    let e = fail(&fixture("lora/tiny-wrong-shape"), &out, false);
    assert!(e.contains("expected [4, 64]"), "{e}");
    // An adapter for another model (SmolLM2, 30 layers of width 576).
    let e = fail(&fixture("lora/smollm2-r8-qv"), &out, false);
    assert!(
        e.contains("does not exist") || e.contains("expected"),
        "{e}"
    );
    let e = fail(&fixture("lora/tiny-dora"), &out, false);
    assert!(e.contains("DoRA"), "{e}");
    assert!(!out.exists());

    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let e = fail(&fixture("lora/tiny-r4-qv"), &out, false);
    assert!(
        e.contains("already exists") && e.contains("--overwrite"),
        "{e}"
    );
    assert!(
        out.join("keep").exists(),
        "an existing folder is left alone"
    );
    // Overwriting a folder that holds the base would delete the input.
    let e = fail(&fixture("lora/tiny-r4-qv"), &fixture("tiny-llama"), true);
    assert!(e.contains("holds the input"), "{e}");
    // With --overwrite the old folder is replaced whole.
    let o = MergeOptions {
        overwrite: true,
        ..opts(
            &model,
            &fixture("lora/tiny-r4-qv"),
            &out,
            ExportDtype::BF16,
            MergeInto::Original,
        )
    };
    export(&o);
    assert!(!out.join("keep").exists());
    check_folder(&out, ExportDtype::BF16);
}

/// SmolLM2 + a q,v adapter on even layers: the f32 export gives the unmerged model's greedy tokens
/// on four prompts; the bf16 export equals the reference merge within bf16 rounding.
#[test]
fn smollm2_export_matches_unmerged_greedy_and_reference_merge() {
    let Some(model) = smollm2() else { return };
    // The fixture adapter (randn·0.02) barely moves greedy decodes; with alpha ×8 it changes them,
    // so equal tokens show the merge, not just the base.
    let tmp = tempfile::tempdir().unwrap();
    let adir = tmp.path().join("adapter");
    std::fs::create_dir(&adir).unwrap();
    let src = fixture("lora/smollm2-r8-qv");
    let st = "adapter_model.safetensors";
    std::fs::copy(src.join(st), adir.join(st)).unwrap();
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["lora_alpha"] = (cfg["lora_alpha"].as_f64().unwrap() * ALPHA_BOOST).into();
    std::fs::write(adir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let out = tmp.path().join("f32");
    export(&opts(
        &model,
        &adir,
        &out,
        ExportDtype::F32,
        MergeInto::Original,
    ));
    let (merged, tok) = qlorad_model::load_model(&out, Quant::None).unwrap();
    let (base, _) = qlorad_model::load_model(&model, Quant::None).unwrap();
    let a = Arc::new(LoraAdapter::load(&adir, "a", base.config()).unwrap());
    let chat = tok
        .apply_chat_template(
            &[qlorad_model::ChatMessage::new(
                "user",
                "What is the capital of France?",
            )],
            true,
        )
        .unwrap();
    let prompts = [
        tok.encode("The capital of France is", true).unwrap(),
        tok.encode(&chat, false).unwrap(),
        tok.encode("def fibonacci(n):\n    ", true).unwrap(),
        tok.encode("In 1969, 3 astronauts flew to the Moon;", true)
            .unwrap(),
    ];
    // Served as the daemon serves: one batch, each prompt with the adapter and without.
    let with_and_without: Vec<Option<Arc<LoraAdapter>>> = prompts
        .iter()
        .flat_map(|_| [Some(a.clone()), None])
        .collect();
    let doubled: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| [p.clone(), p.clone()])
        .collect();
    let served = greedy_batch(&base, &doubled, &with_and_without, 10);
    let exported = greedy_batch(&merged, &prompts, &vec![None; prompts.len()], 10);
    let mut differ = false;
    for (k, p) in prompts.iter().enumerate() {
        assert_eq!(exported[k], served[2 * k], "prompt {p:?}");
        differ |= served[2 * k] != served[2 * k + 1];
    }
    assert!(differ, "the adapter should change some continuation");

    let out16 = tmp.path().join("bf16");
    export(&opts(
        &model,
        &adir,
        &out16,
        ExportDtype::BF16,
        MergeInto::Original,
    ));
    assert_eq!(
        check_weights(&model, &adir, &out16, ExportDtype::BF16, &|_, w, _| w),
        30
    );
    check_folder(&out16, ExportDtype::BF16);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(out16.join(f)).unwrap(),
            std::fs::read(model.join(f)).unwrap(),
            "{f}"
        );
    }
}
