//! The data layer on the real tokenizer and chat template: assistant-only masks cover exactly the
//! assistant turns (and their end-of-turn token), prompt/completion masks the completion, Guanaco's
//! Parquet loads, and a file with bad lines is refused as a whole.

use qlorad_model::Tokenizer;
use qlorad_tests::{root, smollm2};
use qlorad_trainer::{load_examples, DataError, DataOptions};

fn masked_text(tok: &Tokenizer, ex: &qlorad_trainer::Example) -> String {
    let ids: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.loss_mask)
        .filter(|(_, m)| **m)
        .map(|(i, _)| *i)
        .collect();
    tok.decode(&ids, false).unwrap()
}

#[test]
fn masks_cover_exactly_the_completions() {
    let Some(dir) = smollm2() else { return };
    let tok = Tokenizer::from_dir(&dir, &[]).unwrap();
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("train.jsonl");
    std::fs::write(
        &f,
        concat!(
            r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"What is 2+2?"},{"role":"assistant","content":"4."},{"role":"user","content":"And 3+3?"},{"role":"assistant","content":"6."}]}"#,
            "\n",
            r#"{"prompt":"Capital of France:","completion":" Paris"}"#,
            "\n",
            r#"{"text":"Plain text."}"#,
            "\n"
        ),
    )
    .unwrap();
    let ex = load_examples(&f, &tok, &DataOptions::default()).unwrap();
    assert_eq!(masked_text(&tok, &ex[0]), "4.<|im_end|>\n6.<|im_end|>\n");
    assert_eq!(masked_text(&tok, &ex[1]), " Paris<|im_end|>");
    assert_eq!(masked_text(&tok, &ex[2]), "Plain text.<|im_end|>");
    let all = load_examples(
        &f,
        &tok,
        &DataOptions {
            completion_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(all[0].loss_mask.iter().all(|m| *m));
    // Truncation that leaves no target is an error naming the line.
    let e = load_examples(
        &f,
        &tok,
        &DataOptions {
            max_seq_len: 8,
            completion_only: true,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("line 1: no trainable tokens"), "{e}");
}

#[test]
fn guanaco_parquet_loads_and_bad_files_are_refused() {
    let Some(dir) = smollm2() else { return };
    let tok = Tokenizer::from_dir(&dir, &[]).unwrap();
    let pq = root().join("../shared/data/guanaco-llama2-1k.parquet");
    if pq.exists() {
        let ex = load_examples(
            &pq,
            &tok,
            &DataOptions {
                max_seq_len: 256,
                completion_only: true,
            },
        )
        .unwrap();
        assert_eq!(ex.len(), 1000);
        assert!(ex
            .iter()
            .all(|e| e.input_ids.len() <= 256 && e.target_tokens() > 0));
    }
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("bad.jsonl");
    std::fs::write(&f, "{\"text\": \"fine\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"no answer\"}]}\n").unwrap();
    let e = load_examples(&f, &tok, &DataOptions::default()).unwrap_err();
    assert!(
        matches!(&e, DataError::Invalid { errors, .. } if errors.len() == 1 && errors[0].line == 2),
        "{e}"
    );
    assert!(
        e.to_string().contains("bad.jsonl") && e.to_string().contains("no assistant message"),
        "{e}"
    );
}
