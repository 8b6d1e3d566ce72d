//! The tokenizer that `import-gguf` rebuilds from GGUF metadata tokenizes real training data exactly
//! as SmolLM2's tokenizer does (the digit-by-digit pre-tokenizer matters here: without it 11 of these
//! 64 texts differ). Fixture: tests/fixtures/smollm2/guanaco_tokens.jsonl
//! (scripts/fixtures/gen_guanaco_tokens.py); texts: ../shared/data/guanaco-llama2-1k.parquet.

use parquet::file::reader::{FileReader, SerializedFileReader};
use qlorad_model::Tokenizer;
use qlorad_tests::{root, smollm2};

fn guanaco_texts(n: usize) -> Option<Vec<String>> {
    let path = root().join("../shared/data/guanaco-llama2-1k.parquet");
    let Ok(file) = std::fs::File::open(&path) else {
        eprintln!("skipping: {} not found", path.display());
        return None;
    };
    let reader = SerializedFileReader::new(file).expect("valid parquet");
    let mut out = Vec::with_capacity(n);
    for row in reader.get_row_iter(None).expect("row iterator").take(n) {
        let row = row.expect("row");
        let text = row
            .get_column_iter()
            .find(|(name, _)| name.as_str() == "text")
            .map(|(_, f)| match f {
                parquet::record::Field::Str(s) => s.clone(),
                other => panic!("text column holds {other:?}"),
            })
            .expect("text column");
        out.push(text);
    }
    Some(out)
}

#[test]
fn guanaco_texts_tokenize_like_transformers() {
    let Some(dir) = smollm2() else { return };
    let Some(texts) = guanaco_texts(64) else {
        return;
    };
    let tok = Tokenizer::from_dir(&dir, &[]).unwrap();
    let lines =
        std::fs::read_to_string(qlorad_tests::fixture("smollm2/guanaco_tokens.jsonl")).unwrap();
    let mut checked = 0;
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let i = v["index"].as_u64().unwrap() as usize;
        let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
        assert_eq!(tok.encode(&texts[i], false).unwrap(), ids, "text {i}");
        checked += 1;
    }
    assert_eq!(checked, 64);
}
