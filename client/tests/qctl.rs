//! `qctl` against a running `qlorad serve` (SmolLM2, with an adapter root and API keys): models,
//! adapters load/list/pin/unpin/unload, one-shot streaming chat, `--json`, and exit codes.

mod common;

use common::{qctl, start_daemon, stdout};
use qlorad_tests::{fixture, smollm2};

#[test]
fn qctl_drives_a_daemon() {
    let Some(model) = smollm2() else { return };
    let d = start_daemon(
        &model,
        &["--adapter-root", fixture("lora").to_str().unwrap()],
    );
    let url = d.url.as_str();
    let admin = "sk-admin-test";
    assert_eq!(stdout(&qctl(url, admin, &["models"])).trim(), "smollm2");
    let o = qctl(
        url,
        admin,
        &["adapters", "load", "qv", "--path", "smollm2-r8-qv"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&qctl(url, admin, &["models"])).contains("qv\t(adapter of smollm2)"));
    assert!(stdout(&qctl(url, admin, &["adapters", "pin", "qv"])).contains("pinned=true"));
    let list = qctl(url, admin, &["--json", "adapters", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["data"][0]["name"], "qv");
    assert_eq!(v["data"][0]["pinned"], true);
    // The table shows the devices holding a copy, as the JSON lists them.
    let table = stdout(&qctl(url, admin, &["adapters", "list"]));
    let row: Vec<&str> = table.lines().nth(1).unwrap_or("").split('\t').collect();
    let devices: Vec<&str> = v["data"][0]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str())
        .collect();
    assert!(
        table.starts_with("NAME\tTIER\tPINNED\tBYTES\tDEVICES\tPATH"),
        "{table}"
    );
    assert_eq!(
        row.get(4).copied(),
        Some(devices.join(",").as_str()),
        "{table}"
    );
    assert!(!devices.is_empty(), "{table}");
    assert!(stdout(&qctl(url, admin, &["adapters", "unpin", "qv"])).contains("pinned=false"));
    let chat = qctl(
        url,
        admin,
        &[
            "chat",
            "--model",
            "qv",
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ],
    );
    assert!(
        chat.status.success(),
        "{}",
        String::from_utf8_lossy(&chat.stderr)
    );
    assert!(stdout(&chat).contains("Paris"), "{}", stdout(&chat));
    // Exit codes scripts can use.
    assert_eq!(
        qctl(url, "sk-infer-test", &["adapters", "list"])
            .status
            .code(),
        Some(4)
    );
    assert_eq!(
        qctl(url, "sk-wrong-key", &["models"]).status.code(),
        Some(4)
    );
    assert_eq!(
        qctl(url, admin, &["adapters", "unload", "nope"])
            .status
            .code(),
        Some(5)
    );
    assert!(qctl(url, admin, &["adapters", "unload", "qv"])
        .status
        .success());
    assert_eq!(
        qctl("http://127.0.0.1:1", admin, &["models"]).status.code(),
        Some(3)
    );
    let o = qctl(url, admin, &["chat", "--model", "nope", "--prompt", "hi"]);
    assert_eq!(o.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&o.stderr)
        .starts_with("qctl: error: The model `nope` does not exist"));
}
