//! `qlorad merge` end to end: a sharded export; bad input giving one
//! error line and a non-zero exit; SIGKILL in the middle of an export leaving nothing under the
//! target name, and a rerun succeeding.

use qlorad_tests::fixture;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn qlorad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlorad"))
        .args(args)
        .output()
        .expect("run qlorad")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Non-zero exit, no panic, exactly one stderr line naming every needle.
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
            "error should name {n:?}: {}",
            lines[0]
        );
    }
}

fn merge(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "merge",
        "--model",
        s(model),
        "--adapter",
        s(adapter),
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    qlorad(&args)
}

#[test]
fn merge_writes_a_sharded_export() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let r = merge(
        &fixture("tiny-llama/fp32"),
        &fixture("lora/tiny-r8-all"),
        &out,
        &["--dtype", "f16", "--max-shard-size", "50KB"],
    );
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("14 adapted projections merged"), "{stderr}");
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg.contains("\"dtype\": \"float16\""), "{cfg}");
    assert!(entries(&out, "model-").len() > 1, "several shards");
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(out.join("qlorad-manifest.json").exists());
}

#[test]
fn merge_refuses_bad_input_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = fixture("tiny-llama/fp32");
    let out = tmp.path().join("m");
    let missing = fixture("lora/does-not-exist");
    assert_one_line_error(
        &merge(&tiny, &missing, &out, &[]),
        &["does-not-exist", "adapter folder not found"],
    );
    assert_one_line_error(
        &merge(&tiny, &fixture("lora/tiny-wrong-shape"), &out, &[]),
        &["tiny-wrong-shape", "expected [4, 64]"],
    );
    // An adapter made for another model (SmolLM2).
    assert_one_line_error(
        &merge(&tiny, &fixture("lora/smollm2-r8-qv"), &out, &[]),
        &["smollm2-r8-qv"],
    );
    assert_one_line_error(
        &merge(
            &fixture("tiny-llama/bnb-nf4"),
            &fixture("lora/tiny-r4-qv"),
            &out,
            &[],
        ),
        &["bnb-nf4", "--merge-into dequantized"],
    );
    assert!(!out.exists());
    std::fs::create_dir(&out).unwrap();
    assert_one_line_error(
        &merge(&tiny, &fixture("lora/tiny-r4-qv"), &out, &[]),
        &["already exists", "--overwrite"],
    );
    let r = merge(
        &tiny,
        &fixture("lora/tiny-r4-qv"),
        &out,
        &["--dtype", "int8"],
    );
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("f16, bf16 or f32"));
    let r = merge(&tiny, &fixture("lora/tiny-r4-qv"), &out, &["--overwrite"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// Entries of `dir` whose names start with `prefix`.
fn entries(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect()
}

#[test]
fn sigkill_mid_export_leaves_nothing_under_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let (tiny, adapter) = (fixture("tiny-llama/fp32"), fixture("lora/tiny-r8-all"));
    // 20 tensors at 150 ms each: the export takes about 3 s unless killed.
    let mut child = Command::new(env!("CARGO_BIN_EXE_qlorad"))
        .args(["merge", "--model", s(&tiny), "--adapter", s(&adapter)])
        .args(["--out", s(&out), "--test-delay-ms", "150"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the staging folder holds a shard being written, i.e. the export is mid-way.
    let t0 = Instant::now();
    let staged = loop {
        let busy = entries(tmp.path(), ".merged.tmp-")
            .into_iter()
            .find(|d| !entries(d, "model-").is_empty());
        if let Some(d) = busy {
            break d;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no staging folder appeared"
        );
        assert!(child.try_wait().unwrap().is_none(), "merge ended early");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL: no destructor runs
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!out.exists(), "nothing under the target name after a kill");
    assert!(
        staged.exists(),
        "the killed process's staging folder is what remains"
    );

    let r = merge(&tiny, &adapter, &out, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.join("qlorad-manifest.json").exists());
    assert!(
        entries(tmp.path(), ".merged.tmp-").is_empty(),
        "the rerun sweeps the dead process's staging folder"
    );
}
