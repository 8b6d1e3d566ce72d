//! Mistral with a sliding window (4) shorter than the sequence, against transformers' eager attention
//! (fixture: tests/fixtures/tiny-mistral, scripts/fixtures/gen_tiny_mistral.py) — all at once and
//! token by token through the KV cache; and a model split into shards with an index loads the same.

use qlorad_model::io::{write_json, write_safetensors, OwnedTensor};
use qlorad_model::loader::{self, Quant};
use qlorad_model::weights::WeightStore;
use qlorad_model::{Llama, Logits, SeqInput};
use qlorad_tests::{fixture, rel_err, st_f32, st_ids};
use safetensors::SafeTensors;

fn load(dir: &std::path::Path) -> Llama {
    let (cfg, w) = loader::load(dir, Quant::None).unwrap();
    Llama::new(cfg, w).unwrap()
}

#[test]
fn sliding_window_matches_transformers_at_once_and_incrementally() {
    let dir = fixture("tiny-mistral");
    let model = load(&dir);
    assert_eq!(model.config().sliding_window, Some(4));
    let buf = std::fs::read(dir.join("logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let ids = st_ids(&st, "input_ids");
    let expect = st_f32(&st, "logits");
    let mut cache = model.new_cache();
    let all = model
        .forward(&mut [SeqInput::new(&ids, &mut cache)], Logits::All)
        .unwrap();
    let err = rel_err(
        &all.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &expect,
    );
    assert!(err < 1e-5, "at once: {err}");
    // Prefill 5 tokens, then one at a time.
    let mut cache = model.new_cache();
    let mut got = model
        .forward(&mut [SeqInput::new(&ids[..5], &mut cache)], Logits::All)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for t in &ids[5..] {
        let l = model
            .forward(&mut [SeqInput::new(&[*t], &mut cache)], Logits::Last)
            .unwrap();
        got.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let err = rel_err(&got, &expect);
    assert!(err < 1e-5, "incremental: {err}");
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let src = fixture("tiny-llama/fp32");
    let store = WeightStore::open(&src).unwrap();
    let d = tempfile::tempdir().unwrap();
    let mut shards: [Vec<OwnedTensor>; 2] = [vec![], vec![]];
    let mut map = serde_json::Map::new();
    for (i, name) in store.names().into_iter().enumerate() {
        let raw = store.raw(name).unwrap();
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(name.to_string(), file.into());
        shards[i % 2].push(OwnedTensor {
            name: name.to_string(),
            dtype: raw.dtype,
            shape: raw.shape.clone(),
            data: raw.data.to_vec(),
        });
    }
    for (i, s) in shards.iter().enumerate() {
        write_safetensors(
            &d.path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            s,
        )
        .unwrap();
    }
    write_json(
        &d.path().join("model.safetensors.index.json"),
        &serde_json::json!({"metadata": {}, "weight_map": map}),
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), d.path().join("config.json")).unwrap();
    let ids = [1u32, 5, 9, 20];
    let run = |m: &Llama| {
        let mut c = m.new_cache();
        m.forward(&mut [SeqInput::new(&ids, &mut c)], Logits::All)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(run(&load(d.path())), run(&load(&src)));
}
