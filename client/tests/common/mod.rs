//! Shared by the qctl tests: start `qlorad serve` on a free port (killed on drop) and run `qctl`
//! against it.

#![allow(dead_code)] // each test binary uses a different subset
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub const ADMIN: &str = "sk-admin-test";

pub struct Daemon {
    child: Child,
    pub url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The qlorad binary built in the same target directory as this test's qctl.
pub fn qlorad_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qctl")).with_file_name("qlorad")
}

/// Starts `qlorad serve` on SmolLM2 (`model`) with an admin and an inference key plus `extra`
/// arguments, and waits until it answers.
pub fn start_daemon(model: &Path, extra: &[&str]) -> Daemon {
    let bin = qlorad_bin();
    if !bin.exists() {
        panic!(
            "{} not built (cargo build --release -p qlorad)",
            bin.display()
        );
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let child = Command::new(&bin)
        .args(["serve", "--model"])
        .arg(model)
        .args(["--model-id", "smollm2", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--api-key",
            "sk-admin-test:inference+admin",
            "--api-key",
            "sk-infer-test",
        ])
        .args(extra)
        .spawn()
        .unwrap();
    let d = Daemon { child, url };
    let start = Instant::now();
    while qctl(&d.url, ADMIN, &["models"]).status.code() == Some(3) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d
}

pub fn qctl(url: &str, key: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qctl"))
        .args(args)
        .env("QLORAD_URL", url)
        .env("QLORAD_API_KEY", key)
        .output()
        .expect("run qctl")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
