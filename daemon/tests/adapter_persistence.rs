//! Adapters loaded, pinned or unloaded through the API survive kill -9: after a restart on the same
//! state dir the daemon serves the same adapters (pinned ones resident at once) with the same
//! output, forgets unloaded ones, and starts even when a recorded adapter's folder has vanished.

use qlorad_tests::daemon::Daemon;
use qlorad_tests::{fixture, smollm2};
use serde_json::{json, Value};
use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn start(model: &Path, state: &Path, root: &Path) -> Daemon {
    Daemon::start(
        env!("CARGO_BIN_EXE_qlorad"),
        model,
        &[
            "--model-id",
            "smollm2",
            "--state-dir",
            state.to_str().unwrap(),
            "--adapter-root",
            root.to_str().unwrap(),
        ],
    )
}

fn greedy(d: &Daemon, model: &str) -> String {
    let (s, c) = d.post(
        "/v1/chat/completions",
        &json!({"model": model, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Name a colour."}]}),
    );
    assert_eq!(s, 200, "{c}");
    c["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

fn listed(d: &Daemon) -> Vec<Value> {
    let (s, l) = d.get("/v1/adapters");
    assert_eq!(s, 200);
    l["data"].as_array().unwrap().clone()
}

#[test]
fn runtime_adapters_survive_kill_9() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (state, root) = (tmp.path().join("state"), tmp.path().join("adapters"));
    for name in ["qv", "qv2", "qv3"] {
        copy_dir(&fixture("lora/smollm2-r8-qv"), &root.join(name));
    }
    let d = start(&model, &state, &root);
    for (name, path) in [("a1", "qv"), ("a2", "qv2"), ("a3", "qv3"), ("a4", "qv")] {
        let (s, r) = d.post("/v1/adapters", &json!({"name": name, "path": path}));
        assert_eq!(s, 201, "{r}");
    }
    assert_eq!(d.post("/v1/adapters/a1/pin", &json!({})).0, 200);
    assert_eq!(
        d.post("/v1/adapters/a4/pin", &json!({})).0,
        200,
        "pinned, then unpinned below"
    );
    assert_eq!(d.post("/v1/adapters/a4/unpin", &json!({})).0, 200);
    let (s, r) = d.delete("/v1/adapters/a2");
    assert_eq!(s, 200, "{r}");
    let before = greedy(&d, "a1");
    assert_ne!(
        before,
        greedy(&d, "smollm2"),
        "the adapter changes the output"
    );
    d.kill9();

    // A recorded adapter whose folder is gone is skipped, not fatal.
    std::fs::remove_dir_all(root.join("qv3")).unwrap();
    let d = start(&model, &state, &root);
    let l = listed(&d);
    let names: Vec<&str> = l.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a1", "a4"], "{l:?}");
    assert_eq!(l[0]["pinned"], true, "{l:?}");
    assert_eq!(l[0]["tier"], "host", "a pinned adapter is resident at once");
    assert_eq!(l[1]["pinned"], false, "{l:?}");
    assert_eq!(greedy(&d, "a1"), before);
    assert_eq!(greedy(&d, "a4"), before, "same weights as a1");
    assert_eq!(d.get("/v1/models/a2").0, 404);
}
