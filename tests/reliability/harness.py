"""Shared pieces of the reliability suite: a `qlorad serve` child process on a free loopback port
(its own log file, SIGKILL or SIGTERM on demand), small HTTP helpers that return every status
instead of raising, /metrics parsing and RSS sampling.

The binary is $QLORAD_BIN or target/release/qlorad, the model $QLORAD_TEST_MODEL or models/smollm2
(as in test_fuzz_openapi.py). HTTP goes through httpx (named `httpx2` in the pinned openai
package's dependencies; plain `httpx` elsewhere).
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import time

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the venv
    import httpx

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LORA_FIXTURE = ROOT / "tests/fixtures/lora/smollm2-r8-qv"


def qlorad_bin():
    return os.environ.get("QLORAD_BIN", str(ROOT / "target/release/qlorad"))


def model_dir():
    return os.environ.get("QLORAD_TEST_MODEL", str(ROOT / "models/smollm2"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid):
    """Current resident set of `pid` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def parse_metrics(text):
    """Prometheus text → {"name{labels}": value} (labels as printed)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+)\s+(\S+)$", line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return out


class Daemon:
    """`qlorad serve --model M --model-id smollm2 --listen 127.0.0.1:PORT ARGS…`.

    `state` (a folder) is passed as --state-dir; the same Daemon object can be killed and
    started again on the same port and state dir (restart scenarios)."""

    def __init__(self, workdir, args=(), state=None, model_id="smollm2", key=None, keepalive=True):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.state = pathlib.Path(state) if state else None
        self.model_id = model_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.starts = 0
        self.key = key
        # Without keep-alive when the daemon closes idle connections quickly (short
        # --header-read-timeout-s): a pooled connection closed by the server as a request is sent
        # would be a client-side race, not what a check is about.
        limits = httpx.Limits() if keepalive else httpx.Limits(max_keepalive_connections=0)
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(120.0), limits=limits)

    # ---- process ----

    def log_path(self, n=None):
        return self.workdir / f"qlorad-{self.starts if n is None else n}.log"

    def start(self, wait=True, timeout=180):
        """Starts the binary; with `wait`, returns seconds until /ready answered 200."""
        self.starts += 1
        cmd = [qlorad_bin(), "serve", "--model", model_dir(), "--model-id", self.model_id,
               "--listen", f"127.0.0.1:{self.port}"]
        if self.state:
            cmd += ["--state-dir", str(self.state)]
        cmd += self.args
        log = open(self.log_path(), "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_ready(timeout)
            return time.monotonic() - t0
        return None

    def wait_ready(self, timeout=180):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"qlorad exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if self.http.get("/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"qlorad not ready within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(timeout=30)

    def stop(self):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def close(self):
        self.stop()
        self.http.close()

    def log_tail(self, n=4000):
        try:
            return self.log_path().read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def logs(self):
        return "".join(self.log_path(i).read_text(errors="replace")
                       for i in range(1, self.starts + 1) if self.log_path(i).exists())

    def rss(self):
        return rss_bytes(self.proc.pid) if self.alive() else 0

    # ---- HTTP (every status returned) ----

    def headers(self, key=None):
        key = key or self.key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, path, key=None, **kw):
        return self.http.get(path, headers=self.headers(key), **kw)

    def post(self, path, body=None, key=None, **kw):
        return self.http.post(path, json=body if body is not None else {}, headers=self.headers(key), **kw)

    def delete(self, path, key=None):
        return self.http.delete(path, headers=self.headers(key))

    def upload(self, name, data, purpose="fine-tune", key=None):
        return self.http.post("/v1/files", files={"file": (name, data, "application/octet-stream")},
                              data={"purpose": purpose}, headers=self.headers(key))

    def chat(self, model=None, max_tokens=4, content="Capital of Peru?", key=None):
        return self.post("/v1/chat/completions",
                         {"model": model or self.model_id, "max_tokens": max_tokens, "temperature": 0,
                          "messages": [{"role": "user", "content": content}]}, key=key)

    def metrics(self):
        return parse_metrics(self.http.get("/metrics").text)

    def job(self, job_id):
        return self.get(f"/v1/fine_tuning/jobs/{job_id}").json()

    def wait_job(self, job_id, done, what, timeout=600):
        deadline = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if done(j):
                return j
            if not self.alive():
                raise AssertionError(f"qlorad died waiting for {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: timed out, job = {json.dumps(j)}")
            time.sleep(0.1)


def ended(job):
    return job.get("status") in ("succeeded", "failed", "cancelled")


CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Peru", "Lima"), ("Japan", "Tokyo")]


def training_data():
    """Six chat examples, as daemon/tests/jobs.rs uses (six steps at batch size 1)."""
    return "\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Capital of {c}?"},
        {"role": "assistant", "content": f"ANSWER: {k}"}]}) for c, k in CAPITALS).encode()


def tiny_job(d, file_id, suffix="caps", checkpoint_interval=None):
    """A tiny job (lora_r 2, max_seq_len 48, one epoch of six steps); returns its id."""
    body = {"model": d.model_id, "training_file": file_id, "suffix": suffix, "seed": 11,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 5, "lora_r": 2,
                "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "max_seq_len": 48}}}}
    r = d.post("/v1/fine_tuning/jobs", body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def error_of(resp):
    """(status, error.code, error.message) of an OpenAI error response (None fields if not one)."""
    try:
        e = resp.json().get("error") or {}
    except ValueError:
        e = {}
    return resp.status_code, e.get("code"), e.get("message")
