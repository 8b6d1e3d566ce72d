//! Shared helpers for the end-to-end tests: fixture paths, the default model, safetensors readers.

pub mod daemon;

use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The imported SmolLM2 folder (`QLORAD_TEST_MODEL`, default `models/smollm2`), or `None` with a
/// printed reason when it is absent. With `QLORAD_REQUIRE_MODEL=1` (the test script sets it) a
/// missing model is a failure, so CI cannot silently skip the model tests.
pub fn smollm2() -> Option<PathBuf> {
    let dir = std::env::var_os("QLORAD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/smollm2"));
    if dir.join("config.json").exists() {
        return Some(dir);
    }
    if std::env::var("QLORAD_REQUIRE_MODEL").as_deref() == Ok("1") {
        panic!(
            "model not found at {} (run scripts/fetch-model.sh)",
            dir.display()
        );
    }
    eprintln!(
        "skipping: model not found at {} (run scripts/fetch-model.sh)",
        dir.display()
    );
    None
}

/// A float tensor of a safetensors buffer as f32.
pub fn st_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let d = t.data();
    match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

/// An integer tensor (i64) of a safetensors buffer as u32 token ids.
pub fn st_ids(st: &SafeTensors, name: &str) -> Vec<u32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    t.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
        .collect()
}

/// max |a - b| / max |b|: the relative error used for logits comparisons.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let num = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let den = b.iter().fold(0f32, |m, y| m.max(y.abs()));
    num / den.max(1e-30)
}
