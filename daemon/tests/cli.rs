//! The `qlorad` binary end to end: generation on the real model in both storage modes, and bad input
//! giving one clear error line (naming the file and tensor), a non-zero exit and no panic.

use qlorad_tests::{fixture, smollm2};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qlorad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlorad"))
        .args(args)
        .output()
        .expect("run qlorad")
}

/// Asserts a clean failure: non-zero exit, exactly one stderr line, naming every `needle`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {stderr}");
    assert!(lines[0].starts_with("qlorad: error: "), "{stderr}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "error line should name {n:?}: {}",
            lines[0]
        );
    }
}

/// A copy of the tiny fp32 Llama fixture whose config/weights a test then breaks.
fn tiny_copy(dir: &Path) {
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixture("tiny-llama/fp32").join(f), dir.join(f)).unwrap();
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn generate_answers_paris_in_both_quant_modes() {
    let Some(dir) = smollm2() else { return };
    let dir = dir.to_str().unwrap();
    for quant in ["nf4", "none"] {
        let out = qlorad(&[
            "generate",
            "--model",
            dir,
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--quant",
            quant,
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("Paris"), "quant {quant}: {text}");
    }
}

#[test]
fn missing_model_folder() {
    let out = qlorad(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, &["/nonexistent/model"]);
}

#[test]
fn corrupt_safetensors_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    tiny_copy(d.path());
    let st = d.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap(); // truncated
    let out = qlorad(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, &["model.safetensors"]);
    std::fs::write(&st, b"not a safetensors file at all").unwrap();
    let out = qlorad(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, &["model.safetensors", "invalid safetensors"]);
}

#[test]
fn unsupported_architecture_is_refused() {
    let d = tempfile::tempdir().unwrap();
    tiny_copy(d.path());
    edit_config(d.path(), |v| v["model_type"] = "gpt2".into());
    let out = qlorad(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, &["config.json", "unsupported architecture", "gpt2"]);
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    tiny_copy(d.path());
    edit_config(d.path(), |v| v["intermediate_size"] = 96.into());
    let out = qlorad(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(
        &out,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[128, 64]",
            "[96, 64]",
        ],
    );
}

#[test]
fn missing_tensor_is_named() {
    let d = tempfile::tempdir().unwrap();
    tiny_copy(d.path());
    edit_config(d.path(), |v| v["num_hidden_layers"] = 3.into());
    let out = qlorad(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, &["missing tensor", "model.layers.2."]);
}

#[test]
fn bad_gguf_files_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not gguf").unwrap();
    let out_dir = d.path().join("out");
    let out = qlorad(&[
        "import-gguf",
        "--gguf",
        junk.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["junk.gguf"]);
    assert!(
        !out_dir.exists(),
        "nothing may be left under the output name"
    );
    let missing = d.path().join("missing.gguf");
    let out = qlorad(&[
        "import-gguf",
        "--gguf",
        missing.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["missing.gguf"]);
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let Some(model) = smollm2() else { return };
    let gguf = model.join("../cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    let Ok(bytes) = std::fs::read(&gguf) else {
        eprintln!("skipping: {} not found", gguf.display());
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out_dir = d.path().join("out");
    let out = qlorad(&[
        "import-gguf",
        "--gguf",
        cut.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["cut.gguf", "tensor blk."]);
    assert!(!out_dir.exists());
}

#[test]
fn quantize_refuses_to_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let out_dir = d.path().join("q");
    std::fs::create_dir(&out_dir).unwrap();
    let src = fixture("tiny-llama/fp32");
    let out = qlorad(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["already exists"]);
}

#[test]
fn serve_reads_a_toml_config_and_refuses_open_listen_without_keys() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("qlorad.toml");
    std::fs::write(
        &cfg,
        "model = \"/nonexistent\"\nlisten = \"0.0.0.0:0\"\nmax_inflight = 4\n",
    )
    .unwrap();
    let out = qlorad(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_one_line_error(&out, &["refusing to listen on 0.0.0.0:0"]);
    std::fs::write(&cfg, "modle = \"x\"\n").unwrap();
    let out = qlorad(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_one_line_error(&out, &["unknown setting", "modle"]);
}

#[test]
fn sigterm_drains_in_flight_streams_then_exits_cleanly() {
    use std::io::{BufRead, BufReader, Write};
    let Some(model) = smollm2() else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qlorad"))
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--model-id",
            "m",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut conn = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) if start.elapsed().as_secs() < 120 => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err(e) => panic!("daemon did not start: {e}"),
        }
    };
    let body = r#"{"model":"m","stream":true,"max_tokens":40,"temperature":0,"messages":[{"role":"user","content":"Tell me about Paris."}]}"#;
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(conn);
    let mut seen = String::new();
    // Wait for the first content chunk, then ask the daemon to stop.
    while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 3 {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream closed early: {seen}"
        );
        seen.push_str(&line);
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        rest.push_str(&line);
    }
    assert!(
        rest.contains("data: [DONE]"),
        "the in-flight stream must finish: {rest}"
    );
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

/// `caps.jsonl` in `dir`: `n` (≤ 5) chat examples asking for a capital.
fn capitals(dir: &Path, n: usize) -> PathBuf {
    let data = dir.join("caps.jsonl");
    let rows: Vec<String> = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima")]
        .iter()
        .take(n)
        .map(|(c, k)| format!(r#"{{"messages":[{{"role":"user","content":"Capital of {c}?"}},{{"role":"assistant","content":"ANSWER: {k}"}}]}}"#))
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    data
}

#[test]
fn train_writes_a_peft_adapter_that_generate_loads() {
    let Some(model) = smollm2() else { return };
    let d = tempfile::tempdir().unwrap();
    let data = capitals(d.path(), 4);
    let out = d.path().join("adapter");
    let log = d.path().join("log.jsonl");
    let m = model.to_str().unwrap();
    let train = |out: &Path, log: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            m,
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "3",
            "--batch-size",
            "1",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lora-dropout",
            "0.05",
            "--target-modules",
            "q_proj,v_proj",
            "--lr",
            "1e-3",
            "--val-split",
            "0.25",
            "--eval-every",
            "2",
            "--log",
            log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        qlorad(&args)
    };
    let o = train(&out, &log, &["--save-every", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Resuming from the step-2 checkpoint ends with the same adapter, byte for byte.
    let ckpt = d.path().join("adapter-checkpoints/checkpoint-2");
    let out2 = d.path().join("resumed");
    let o = train(
        &out2,
        &d.path().join("log2.jsonl"),
        &["--resume", ckpt.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = |p: &Path| std::fs::read(p.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&out), bytes(&out2));
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 3);
    assert!(steps
        .iter()
        .all(|s| s["loss"].as_f64().unwrap().is_finite()
            && s["tokens_per_s"].as_f64().unwrap() > 0.0));
    assert!(steps[1]["eval_loss"].as_f64().unwrap().is_finite());
    assert!(steps[0].get("eval_loss").is_none());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["peft_type"].as_str()),
        (Some(4), Some("LORA"))
    );
    let g = qlorad(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "Capital of Peru?",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--adapter",
        out.to_str().unwrap(),
    ]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    // Bad data is refused before training starts, naming file and line.
    std::fs::write(&data, "{\"messages\": []}\n").unwrap();
    let o = qlorad(&[
        "train",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--out",
        d.path().join("x").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, &["caps.jsonl", "line 1", "empty"]);
}

/// `--device cpu,cpu` trains data-parallel (two ranks, gradients summed through host memory) and
/// ends where one device accumulating the same global batch ends: the same losses and adapter.
#[test]
fn train_on_two_devices_equals_one_device_accumulating() {
    let Some(model) = smollm2() else { return };
    let d = tempfile::tempdir().unwrap();
    let data = capitals(d.path(), 5);
    let run = |name: &str, extra: &[&str]| -> (Vec<f64>, Vec<u8>) {
        let out = d.path().join(name);
        let log = d.path().join(format!("{name}.jsonl"));
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "1",
            "--lora-r",
            "4",
            "--target-modules",
            "q_proj,v_proj",
            "--lr",
            "1e-3",
            "--log",
            log.to_str().unwrap(),
            // Evaluated every step over 5 batches: split 3 / 2 over two ranks.
            "--validation-file",
            data.to_str().unwrap(),
            "--eval-every",
            "1",
        ];
        args.extend_from_slice(extra);
        let o = qlorad(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let losses = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .flat_map(|l| {
                let v = serde_json::from_str::<serde_json::Value>(l).unwrap();
                [
                    v["loss"].as_f64().unwrap(),
                    v["eval_loss"].as_f64().unwrap(),
                ]
            })
            .collect();
        (
            losses,
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        )
    };
    let (one, a1) = run("one", &["--grad-accum", "2"]);
    let (two, a2) = run("two", &["--device", "cpu,cpu"]);
    // 5 examples, 2 micro-batches per step: 3 steps, the last one short (one rank idle); a
    // training and an eval loss per step.
    assert_eq!(one.len(), 6, "{one:?}");
    assert_eq!(one.len(), two.len());
    for (x, y) in one.iter().zip(&two) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "losses {one:?} vs {two:?}");
    }
    assert_eq!(a1, a2, "adapters differ");
    // A bad device list is one line and a non-zero exit.
    let o = qlorad(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        d.path().join("x").to_str().unwrap(),
        "--device",
        "cpu,gpu7",
    ]);
    assert!(!o.status.success());
}
