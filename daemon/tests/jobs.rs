//! Fine-tuning jobs against the real `qlorad serve` binary (SmolLM2, CPU): the job lifecycle, bad
//! input answered with 400 and the offending field, **kill -9 during a job → after restart the job
//! resumes from its last checkpoint and ends with exactly the adapter an uninterrupted run makes**,
//! a checkpoint that cannot be written and a corrupt checkpoint each fail their job with a clear
//! error while the daemon keeps serving.

use qlorad_tests::daemon::Daemon;
use qlorad_tests::smollm2;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn start(model: &Path, state: &Path) -> Daemon {
    start_with(model, state, &[])
}

fn start_with(model: &Path, state: &Path, extra: &[&str]) -> Daemon {
    let state = state.to_str().unwrap();
    let mut args = vec!["--model-id", "smollm2", "--state-dir", state];
    args.extend_from_slice(&["--checkpoint-interval", "2"]);
    args.extend_from_slice(extra);
    Daemon::start(env!("CARGO_BIN_EXE_qlorad"), model, &args)
}

fn data() -> Vec<u8> {
    let caps = [
        ("France", "Paris"),
        ("Germany", "Berlin"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Peru", "Lima"),
        ("Japan", "Tokyo"),
    ];
    caps.iter()
        .map(|(c, k)| {
            json!({"messages": [{"role": "user", "content": format!("Capital of {c}?")},
                                {"role": "assistant", "content": format!("ANSWER: {k}")}]})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

fn create(d: &Daemon, file: &str) -> String {
    let (s, j) = d.post(
        "/v1/fine_tuning/jobs",
        &json!({
            "model": "smollm2", "training_file": file, "suffix": "caps", "seed": 11,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 5,
                "lora_r": 2, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                "max_seq_len": 48}}},
        }),
    );
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["status"], "validating_files");
    j["id"].as_str().unwrap().to_string()
}

fn job(d: &Daemon, id: &str) -> Value {
    d.get(&format!("/v1/fine_tuning/jobs/{id}")).1
}

/// Polls until `done` holds for the job (or panics after a while).
fn wait_for(d: &Daemon, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let j = job(d, id);
        if done(&j) {
            return j;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "{what}: {j}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ended(j: &Value) -> bool {
    matches!(
        j["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

fn adapter_bytes(state: &Path, id: &str) -> Vec<u8> {
    std::fs::read(
        state
            .join("adapters")
            .join(id)
            .join("adapter_model.safetensors"),
    )
    .unwrap()
}

fn chat(d: &Daemon, model: &str) -> (u16, Value) {
    d.post(
        "/v1/chat/completions",
        &json!({"model": model, "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "user", "content": "Capital of Peru?"}]}),
    )
}

#[test]
fn jobs_survive_kill_9_and_fail_cleanly_on_bad_input_and_storage() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let state: PathBuf = tmp.path().join("state");
    let d = start(&model, &state);

    // --- bad input: 400 with the offending field ---
    let (s, e) = d.upload("bad.jsonl", b"{\"messages\": []}\n{\"oops\"\n", "fine-tune");
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (400, Some("file")),
        "{e}"
    );
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("line 1") && msg.contains("line 2"), "{msg}");
    let (s, e) = d.upload("x.jsonl", b"{}", "nonsense");
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("purpose")));
    let (s, f) = d.upload("caps.jsonl", &data(), "fine-tune");
    assert_eq!(s, 200, "{f}");
    let file = f["id"].as_str().unwrap().to_string();
    let (_, other) = d.upload("notes.jsonl", &data(), "batch");
    for (body, param) in [
        (json!({"model": "gpt-4o", "training_file": file}), "model"),
        (
            json!({"model": "smollm2", "training_file": "file-nope"}),
            "training_file",
        ),
        (
            json!({"model": "smollm2", "training_file": other["id"]}),
            "training_file",
        ),
        (
            json!({"model": "smollm2", "training_file": file, "hyperparameters": {"n_epochs": 0}}),
            "hyperparameters.n_epochs",
        ),
        (
            json!({"model": "smollm2", "training_file": file, "hyperparameters": {"learning_rate_multiplier": "fast"}}),
            "hyperparameters.learning_rate_multiplier",
        ),
        (
            json!({"model": "smollm2", "training_file": file, "suffix": "a b"}),
            "suffix",
        ),
    ] {
        let (s, e) = d.post("/v1/fine_tuning/jobs", &body);
        assert_eq!(
            (s, e["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {e}"
        );
    }
    assert_eq!(d.get("/v1/fine_tuning/jobs/ftjob-nope").0, 404);

    // --- kill -9 mid-job ---
    let j1 = create(&d, &file);
    // A second job queues behind the first; its checkpoint folder is made unwritable (a regular
    // file where the folder goes), standing in for a full or broken disk.
    let j3 = create(&d, &file);
    std::fs::create_dir_all(state.join("jobs")).unwrap();
    std::fs::write(state.join("jobs").join(&j3), b"not a folder").unwrap();
    wait_for(&d, &j1, "first checkpoint", |j| {
        j["step"].as_i64() >= Some(3)
    });
    let (_, ck) = d.get(&format!("/v1/fine_tuning/jobs/{j1}/checkpoints"));
    assert_eq!(ck["data"][0]["step_number"], 2, "{ck}");
    d.kill9();

    let d = start(&model, &state);
    let done = wait_for(&d, &j1, "resumed job", ended);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["total_steps"], 6);
    let (_, ev) = d.get(&format!("/v1/fine_tuning/jobs/{j1}/events?limit=100"));
    let msgs: Vec<&str> = ev["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("resumed from checkpoint step")),
        "{msgs:?}"
    );
    let name = done["fine_tuned_model"].as_str().unwrap().to_string();
    assert_eq!(name, format!("ft:smollm2:caps:{j1}"));
    let (s, c) = chat(&d, &name);
    assert_eq!(s, 200, "{c}");
    let (s, _) = chat(&d, &format!("{name}:ckpt-step-2"));
    assert_eq!(s, 200);

    // The job whose checkpoint cannot be written fails with a clear error; serving goes on.
    let failed = wait_for(&d, &j3, "unwritable checkpoint", ended);
    assert_eq!(failed["status"], "failed");
    assert_eq!(
        failed["error"]["code"], "checkpoint_write_failed",
        "{failed}"
    );
    assert_eq!(chat(&d, "smollm2").0, 200);

    // The same job run without interruption ends with the same adapter, byte for byte.
    let j2 = create(&d, &file);
    let done2 = wait_for(&d, &j2, "uninterrupted twin", ended);
    assert_eq!(done2["status"], "succeeded");
    assert_eq!(done2["trained_tokens"], done["trained_tokens"]);
    assert_eq!(adapter_bytes(&state, &j1), adapter_bytes(&state, &j2));

    // Pause a running job (it checkpoints), resume it: same adapter again.
    let j6 = create(&d, &file);
    wait_for(&d, &j6, "j6 running", |j| j["step"].as_i64() >= Some(1));
    let (s, p) = d.post(&format!("/v1/fine_tuning/jobs/{j6}/pause"), &json!({}));
    assert_eq!((s, p["status"].as_str()), (200, Some("paused")), "{p}");
    let paused_at = p["step"].as_i64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        job(&d, &j6)["step"].as_i64(),
        Some(paused_at),
        "a paused job does not step"
    );
    let (s, r) = d.post(&format!("/v1/fine_tuning/jobs/{j6}/resume"), &json!({}));
    // The queue worker may pick the job up before the handler reads it back.
    assert_eq!(s, 200, "{r}");
    assert!(
        matches!(r["status"].as_str(), Some("queued" | "running")),
        "{r}"
    );
    assert_eq!(wait_for(&d, &j6, "j6 done", ended)["status"], "succeeded");
    assert_eq!(adapter_bytes(&state, &j1), adapter_bytes(&state, &j6));

    // Cancel a queued job.
    let j4 = create(&d, &file);
    let (s, c) = d.post(&format!("/v1/fine_tuning/jobs/{j4}/cancel"), &json!({}));
    assert_eq!((s, c["status"].as_str()), (200, Some("cancelled")), "{c}");
    let (s, _) = d.post(&format!("/v1/fine_tuning/jobs/{j4}/cancel"), &json!({}));
    assert_eq!(s, 400);

    // --- corrupt checkpoint: kill, damage it, restart → the job fails clearly ---
    let j5 = create(&d, &file);
    wait_for(&d, &j5, "checkpoint of j5", |j| {
        j["step"].as_i64() >= Some(3)
    });
    d.kill9();
    for ckpt in std::fs::read_dir(state.join("jobs").join(&j5).join("checkpoints")).unwrap() {
        let ckpt = ckpt.unwrap().path();
        if ckpt.join("optimizer.safetensors").exists() {
            std::fs::write(ckpt.join("optimizer.safetensors"), b"garbage").unwrap();
        }
    }
    let d = start(&model, &state);
    let failed = wait_for(&d, &j5, "corrupt checkpoint", ended);
    assert_eq!(failed["error"]["code"], "checkpoint_error", "{failed}");
    assert!(failed["error"]["message"]
        .as_str()
        .unwrap()
        .contains("optimizer.safetensors"));
    assert_eq!(chat(&d, &name).0, 200, "earlier outputs still serve");
    let (_, list) = d.get("/v1/fine_tuning/jobs?limit=2");
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(list["has_more"], true);
    let (_, metrics) = d.get_text("/metrics");
    assert!(
        metrics.contains("qlorad_fine_tuning_jobs{status=\"succeeded\"} 3"),
        "{metrics}"
    );
}

#[test]
fn promote_exports_a_plain_model_folder() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let adapter = qlorad_tests::fixture("lora/smollm2-r8-qv");
    let d = start_with(
        &model,
        &state,
        &["--lora", &format!("qv={}", adapter.display())],
    );
    for (body, status, param) in [
        (json!({"out": "../escape"}), 400, Some("out")),
        (json!({"out": "m", "dtype": "f8"}), 400, Some("dtype")),
        (
            json!({"out": "m", "merge_into": "both"}),
            400,
            Some("merge_into"),
        ),
    ] {
        let (s, e) = d.post("/v1/adapters/qv/promote", &body);
        assert_eq!(
            (s, e["error"]["param"].as_str()),
            (status, param),
            "{body}: {e}"
        );
    }
    assert_eq!(
        d.post("/v1/adapters/nope/promote", &json!({"out": "m"})).0,
        404
    );
    let (s, ex) = d.post(
        "/v1/adapters/qv/promote",
        &json!({"out": "smollm2-qv", "dtype": "bf16", "merge_into": "dequantized"}),
    );
    assert_eq!(s, 202, "{ex}");
    let id = ex["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let done = loop {
        let (_, v) = d.get(&format!("/v1/exports/{id}"));
        if matches!(
            v["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["progress"]["tensors_done"],
        done["progress"]["tensors_total"]
    );
    let out = state.join("exports/smollm2-qv");
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "qlorad-manifest.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    let (_, ev) = d.get(&format!("/v1/exports/{id}/events"));
    assert!(
        ev["data"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Exported"),
        "{ev}"
    );
    // The same name again is refused unless overwriting.
    let (s, e) = d.post("/v1/adapters/qv/promote", &json!({"out": "smollm2-qv"}));
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("out")));
    let (_, m) = d.get_text("/metrics");
    assert!(
        m.contains("qlorad_exports_total{status=\"succeeded\"} 1"),
        "{m}"
    );
}
