//! `qctl finetune` against `qlorad serve --state-dir` on SmolLM2 (CPU, 8 tiny chat examples): bad
//! input refused with the right exit code, a failing job exits 6 under `--wait`, a job created with `--wait` ends with a servable model,
//! list/get/events/checkpoints show it, and a second job is cancelled.

mod common;

use common::{qctl, start_daemon, stderr, stdout, ADMIN};
use qlorad_tests::smollm2;
use serde_json::Value;
use std::path::Path;
use std::time::Instant;

const CAPITALS: [(&str, &str); 8] = [
    ("Peru", "Lima"),
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Norway", "Oslo"),
    ("Chile", "Santiago"),
];

fn write_data(dir: &Path) -> (String, String) {
    let lines: Vec<String> = CAPITALS
        .iter()
        .map(|(c, a)| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Capital of {c}?")},
                {"role": "assistant", "content": format!("ANSWER: {a}")},
            ]})
            .to_string()
        })
        .collect();
    let good = dir.join("caps.jsonl");
    std::fs::write(&good, lines.join("\n") + "\n").unwrap();
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        format!("{}\n{}\n{{\"messages\": [oops\n", lines[0], lines[1]),
    )
    .unwrap();
    (
        good.to_str().unwrap().to_string(),
        bad.to_str().unwrap().to_string(),
    )
}

fn json(o: &std::process::Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\nstderr: {}", stdout(o), stderr(o)))
}

#[test]
fn finetune_create_wait_inspect_and_cancel() {
    let Some(model) = smollm2() else { return };
    let t0 = Instant::now();
    let state = tempfile::tempdir().unwrap();
    let (caps, bad) = write_data(state.path());
    let d = start_daemon(
        &model,
        &[
            "--state-dir",
            state.path().join("state").to_str().unwrap(),
            "--checkpoint-interval",
            "2",
        ],
    );
    let url = d.url.as_str();
    let ft = |args: &[&str]| {
        let mut a = vec!["finetune"];
        a.extend_from_slice(args);
        qctl(url, ADMIN, &a)
    };

    // Bad input: one line on stderr and the exit code of an invalid request.
    let o = ft(&["create", "--file", &bad, "--model", "smollm2"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("line 3"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
    let o = ft(&["create", "--file", &caps, "--model", "nope"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
    let o = ft(&[
        "create",
        "--file",
        "/no/such/data.jsonl",
        "--model",
        "smollm2",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(ft(&["get", "ftjob-nope"]).status.code(), Some(5));
    // A job that fails (every completion truncated away) under --wait: exit 6, the job's error.
    let o = ft(&[
        "--json",
        "create",
        "--file",
        &caps,
        "--model",
        "smollm2",
        "--max-seq-len",
        "8",
        "--wait",
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert_eq!(json(&o)["status"], "failed");
    assert!(
        stderr(&o).contains("failed: training file"),
        "{}",
        stderr(&o)
    );

    // A job followed to the end.
    let o = ft(&[
        "--json",
        "create",
        "--file",
        &caps,
        "--model",
        "smollm2",
        "--suffix",
        "t",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--lora-r",
        "4",
        "--target-modules",
        "q_proj,v_proj",
        "--wait",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let job = json(&o);
    let id = job["id"].as_str().unwrap().to_string();
    let name = job["fine_tuned_model"].as_str().unwrap().to_string();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(name, format!("ft:smollm2:t:{id}"));
    let hp = &job["method"]["supervised"]["hyperparameters"];
    assert_eq!(hp["lora_r"], 4);
    assert_eq!(
        hp["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    eprintln!("job done after {:?}", t0.elapsed());

    let chat = qctl(
        url,
        ADMIN,
        &[
            "chat",
            "--model",
            &name,
            "--prompt",
            "Capital of Peru?",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ],
    );
    assert!(chat.status.success(), "{}", stderr(&chat));
    assert!(!stdout(&chat).trim().is_empty());

    let list = json(&ft(&["--json", "list", "--limit", "5"]));
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));
    assert!(stdout(&ft(&["list"])).contains(&format!("{id}\tsucceeded\t4/4")));
    let got = json(&ft(&["--json", "get", &id]));
    assert_eq!(
        (got["status"].as_str(), got["step"].as_i64()),
        (Some("succeeded"), Some(4))
    );
    assert!(stdout(&ft(&["get", &id])).contains(&format!("fine_tuned_model:\t{name}")));

    let events = json(&ft(&["--json", "events", &id, "--limit", "100"]));
    let events = events["data"].as_array().unwrap();
    assert!(events.iter().any(|e| e["type"] == "metrics"
        && e["data"]["train_loss"].is_number()
        && e["data"]["tokens_per_second"].is_number()));
    assert!(events
        .iter()
        .any(|e| e["message"] == format!("New fine-tuned model created: {name}").as_str()));
    // Follow on an ended job: the whole history, oldest first, one JSON object per line.
    let o = ft(&["--json", "events", &id, "--follow"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), events.len());
    assert_eq!(
        lines[0]["message"],
        format!("Created fine-tuning job: {id}").as_str()
    );
    let text = stdout(&ft(&["events", &id]));
    assert!(
        text.lines()
            .any(|l| l.ends_with("The job has successfully completed")),
        "{text}"
    );

    let ckpts = json(&ft(&["--json", "checkpoints", &id]));
    let ckpts = ckpts["data"].as_array().unwrap();
    assert!(!ckpts.is_empty());
    assert!(ckpts.iter().all(|c| c["fine_tuned_model_checkpoint"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{name}:ckpt-step-"))));
    assert!(stdout(&ft(&["checkpoints", &id])).contains(":ckpt-step-2"));

    // A second job, on the uploaded file's id, cancelled before it ends.
    let file = got["training_file"].as_str().unwrap();
    let o = ft(&[
        "create", "--file", file, "--model", "smollm2", "--epochs", "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id2 = stdout(&o).trim().to_string();
    assert!(id2.starts_with("ftjob-"), "{id2}");
    let o = ft(&["cancel", &id2]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), format!("{id2}\tcancelled"));
    assert_eq!(json(&ft(&["--json", "get", &id2]))["status"], "cancelled");
    // Scripts: cancelling again is an invalid request; following a cancelled job exits 6.
    assert_eq!(ft(&["cancel", &id2]).status.code(), Some(2));
    let o = ft(&["events", &id2, "--follow"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(stdout(&o).contains("Job cancelled"));
    eprintln!("test done after {:?}", t0.elapsed());
}

#[test]
fn adapters_promote_waits_for_the_export() {
    let Some(model) = smollm2() else { return };
    let state = tempfile::tempdir().unwrap();
    let adapter = qlorad_tests::fixture("lora/smollm2-r8-qv");
    let d = start_daemon(
        &model,
        &[
            "--state-dir",
            state.path().to_str().unwrap(),
            "--lora",
            &format!("qv={}", adapter.display()),
        ],
    );
    let o = qctl(
        &d.url,
        ADMIN,
        &[
            "--json", "adapters", "promote", "qv", "--out", "merged", "--wait",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["status"], "succeeded", "{v}");
    assert!(state.path().join("exports/merged/config.json").exists());
    // Again without --overwrite: refused as invalid input (exit 2), one line.
    let o = qctl(
        &d.url,
        ADMIN,
        &["adapters", "promote", "qv", "--out", "merged"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    // Unknown adapter: not found (5).
    let o = qctl(
        &d.url,
        ADMIN,
        &["adapters", "promote", "nope", "--out", "x"],
    );
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let _ = stdout(&o);
}
