"""The README's backup procedure, done on a running daemon, restores into a working one.

Online backup (README, "Production"): `sqlite3 DB ".backup COPY"` while qlorad runs, then copy the
blob folders (files/, jobs/, adapters/), which rows only point at and which are written before their
row. A second daemon started on the copy lists the same file and job and serves the job's adapter.
"""
import json
import os
import shutil
import sqlite3
import subprocess

from conftest import MODEL_ID, free_port, http, qlorad_bin, stop, wait_for


def online_backup(db, copy):
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", db, f".backup '{copy}'"], check=True, timeout=60)
    else:
        # The same SQLite online backup API the CLI's .backup uses.
        with sqlite3.connect(db) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)


def test_online_backup_restores_into_a_working_daemon(qlorad, tmp_path):
    state = qlorad["state"]
    restored = tmp_path / "state"
    restored.mkdir()
    online_backup(os.path.join(state, "qlorad.sqlite3"), str(restored / "qlorad.sqlite3"))
    for sub in ["files", "jobs", "adapters"]:
        shutil.copytree(os.path.join(state, sub), restored / sub)
    with sqlite3.connect(restored / "qlorad.sqlite3") as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [qlorad_bin(), "serve", "--model", qlorad["model"], "--model-id", MODEL_ID,
         "--listen", f"127.0.0.1:{port}", "--state-dir", str(restored)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("the restored daemon", lambda: proc.poll() is None and
                 http("GET", base + "/ready", timeout=2)[0] == 200, 120)
        job = qlorad["job"]
        got = json.loads(http("GET", f"{base}/v1/fine_tuning/jobs/{job['id']}")[1])
        assert got["status"] == "succeeded" and got["fine_tuned_model"] == job["fine_tuned_model"]
        files = json.loads(http("GET", base + "/v1/files")[1])["data"]
        assert job["training_file"] in [f["id"] for f in files]
        content = http("GET", f"{base}/v1/files/{job['training_file']}/content")[1]
        assert b"Capital of Peru?" in content
        status, body = http("POST", base + "/v1/chat/completions",
                            {"model": job["fine_tuned_model"], "max_tokens": 2,
                             "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200, body
    finally:
        stop(proc)
