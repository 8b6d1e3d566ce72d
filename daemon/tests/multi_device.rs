//! One daemon serving from two devices (`--device cpu,cpu`, the CPU stand-in for `cuda:0,cuda:1`):
//! concurrent requests for the base and two adapters all succeed with the single-device daemon's
//! greedy outputs, both engines get requests, adapters list the devices they are on, and the
//! shared gauges read as sums. The model is the tiny Llama fixture with a word-level tokenizer
//! written here (one word per id), so each daemon starts in well under a second.

use qlorad::shards::home;
use qlorad_tests::daemon::Daemon;
use qlorad_tests::fixture;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// tests/fixtures/tiny-llama/fp32 plus a tokenizer: word `wN` is token N (64 of them).
fn tiny_model(dir: &Path) {
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixture("tiny-llama/fp32").join(f), dir.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, Value> =
        (0..64).map(|i| (format!("w{i}"), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

/// The first name `prefix-N` whose home among two devices is `dev`.
fn homed(prefix: &str, dev: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|n| home(n, 2) == dev)
        .unwrap()
}

fn start(model: &Path, devices: &str, loras: &[(&str, &str)]) -> Daemon {
    let mut args = vec!["--device".to_string(), devices.to_string()];
    args.extend(["--model-id", "tiny", "--max-running", "2"].map(String::from));
    for (name, dir) in loras {
        let path = fixture("lora").join(dir);
        args.push("--lora".into());
        args.push(format!("{name}={}", path.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(env!("CARGO_BIN_EXE_qlorad"), model, &args)
}

fn complete(d: &Daemon, model: &str, prompt: &str) -> String {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0});
    let (s, v) = d.post("/v1/completions", &body);
    assert_eq!(s, 200, "{model} {prompt}: {v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// The value of the sample `name` (with its labels) in `/metrics`.
fn sample(d: &Daemon, name: &str) -> f64 {
    let (_, text) = d.get_text("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[test]
fn two_cpu_shards_serve_like_one_device() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path());
    // One adapter homed on each device, so both engines get requests whatever the timing.
    let (a, b) = (homed("qv", 0), homed("all", 1));
    let loras = [(a.as_str(), "tiny-r4-qv"), (b.as_str(), "tiny-r8-all")];
    let two = start(tmp.path(), "cpu,cpu", &loras);
    let one = start(tmp.path(), "cpu", &loras);

    let (s, ready) = two.get("/ready");
    assert_eq!((s, ready["engines"].as_u64()), (200, Some(2)), "{ready}");
    let listed = two.get("/v1/adapters").1;
    for (name, dev) in [(&a, "cpu#0"), (&b, "cpu#1")] {
        let info = listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name.as_str())
            .unwrap();
        assert_eq!(info["devices"], json!([dev]), "{info}");
        assert_eq!(info["tier"], "host", "{info}");
    }

    let prompts = ["w5 w9 w20 w33", "w1 w2 w3", "w40 w41 w7 w7 w12 w60"];
    let models = ["tiny", a.as_str(), b.as_str()];
    let jobs: Vec<(&str, &str)> = (0..2)
        .flat_map(|_| {
            models
                .iter()
                .flat_map(|m| prompts.iter().map(move |p| (*m, *p)))
        })
        .collect();
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(m, p)| {
                let two = &two;
                s.spawn(move || complete(two, m, p))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((m, p), got) in jobs.iter().zip(&answers) {
        assert_eq!(*got, complete(&one, m, p), "{m} {p}: two devices vs one");
    }
    // Random weights may emit the end token at once for some prompt, not for all.
    for m in models {
        let texts = jobs.iter().zip(&answers).filter(|((n, _), _)| *n == m);
        assert!(
            texts.clone().any(|(_, t)| !t.is_empty()),
            "{m}: every answer empty"
        );
    }
    // The adapters change the outputs (so the right one was applied on whichever device).
    assert_ne!(
        complete(&one, "tiny", prompts[0]),
        complete(&one, &b, prompts[0])
    );

    let per_engine: Vec<f64> = (0..2)
        .map(|i| {
            sample(
                &two,
                &format!("qlorad_engine_requests_total{{engine=\"{i}\"}}"),
            )
        })
        .collect();
    assert!(per_engine.iter().all(|n| *n > 0.0), "{per_engine:?}");
    assert_eq!(per_engine.iter().sum::<f64>(), jobs.len() as f64);
    // Both devices' base copies are counted; the gauges the engines share drain to zero.
    assert_eq!(
        sample(&two, "qlorad_model_weight_bytes"),
        2.0 * sample(&one, "qlorad_model_weight_bytes")
    );
    let t = Instant::now();
    while sample(&two, "qlorad_batch_running_requests") != 0.0
        || sample(&two, "qlorad_queue_waiting_requests") != 0.0
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "gauges never drained"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
