"""Shared helpers of the deployment tests: paths, the checker tools, and a running qlorad with traffic.

Run by scripts/test.sh after scripts/deploy-tools.sh has put promtool, prometheus and hadolint on
PATH; QLORAD_BIN and QLORAD_TEST_MODEL name the daemon and the model (SmolLM2, CPU).
"""
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MODEL_ID = "smollm2"
ADAPTER = "ft:smollm2:qv"


def tool(name):
    """A checker's path; a missing one fails the test (CI must run every check)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: run `PATH=$(scripts/deploy-tools.sh VENV):$PATH` first")
    return path


def qlorad_bin():
    return os.environ.get("QLORAD_BIN", str(ROOT / "target/release/qlorad"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=30, headers=None):
    """(status, body bytes); errors come back as their status, not as exceptions."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["content-type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what, check, timeout, required=True):
    """Polls check() until it returns a truthy value; after timeout seconds fails the test, or
    returns None when not required (the caller then asserts on what it saw, for a clearer failure)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.25)
    if not required:
        return None
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def stop(proc, timeout=20):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def upload(base, name, text):
    """POST /v1/files (multipart) without extra packages."""
    boundary = "qloradtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n{text}\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(base + "/v1/files", data=body, method="POST",
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["id"]


def drive_traffic(base):
    """Requests that make every qlorad_* series appear: serving through the base and an adapter
    (plain and streamed), a 404, one tiny fine-tuning job (2 steps, a few seconds on CPU) and the
    promotion of its adapter. Returns the finished job."""
    chat = {"messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 3,
            "temperature": 0}
    for model, stream in [(MODEL_ID, False), (ADAPTER, False), (MODEL_ID, True)]:
        status, _ = http("POST", base + "/v1/chat/completions", dict(chat, model=model, stream=stream))
        assert status == 200
    assert http("GET", base + "/v1/models")[0] == 200
    assert http("POST", base + "/v1/chat/completions", dict(chat, model="no-such-model"))[0] == 404
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Capital of {c}?"},
                                      {"role": "assistant", "content": k}]})
             for c, k in [("France", "Paris"), ("Peru", "Lima")]]
    fid = upload(base, "tiny.jsonl", "\n".join(lines))
    hp = {"n_epochs": 1, "batch_size": 1, "lora_r": 2, "target_modules": ["q_proj"], "max_seq_len": 64}
    status, body = http("POST", base + "/v1/fine_tuning/jobs",
                        {"model": MODEL_ID, "training_file": fid,
                         "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}})
    assert status == 200, body
    job = json.loads(body)["id"]

    def finished():
        st = json.loads(http("GET", f"{base}/v1/fine_tuning/jobs/{job}")[1])
        return st if st["status"] in ("succeeded", "failed", "cancelled") else None

    done = wait_for("the fine-tuning job", finished, 240)
    assert done["status"] == "succeeded", done
    promote(base, done["fine_tuned_model"])
    return done


def promote(base, adapter):
    """Promotes (merges and exports, bf16) an adapter and waits for the export to succeed."""
    name = urllib.parse.quote(adapter, safe="")
    status, body = http("POST", f"{base}/v1/adapters/{name}/promote",
                        {"out": "promoted", "dtype": "bf16"})
    assert status == 202, body
    export = json.loads(body)["id"]

    def finished():
        st = json.loads(http("GET", f"{base}/v1/exports/{export}")[1])
        return st if st["status"] in ("succeeded", "failed", "cancelled") else None

    done = wait_for("the export", finished, 120)
    assert done["status"] == "succeeded", done


@pytest.fixture(scope="session")
def qlorad():
    """A daemon on a free loopback port with a state dir and one adapter, after drive_traffic."""
    port = free_port()
    state = tempfile.mkdtemp(prefix="qlorad-deploy-state-")
    model = os.environ.get("QLORAD_TEST_MODEL", str(ROOT / "models/smollm2"))
    log = open(os.path.join(state, "qlorad.log"), "wb")
    proc = subprocess.Popen(
        [qlorad_bin(), "serve", "--model", model, "--model-id", MODEL_ID,
         "--listen", f"127.0.0.1:{port}", "--state-dir", os.path.join(state, "state"),
         "--adapter-root", str(ROOT / "tests/fixtures/lora"),
         "--lora", f"{ADAPTER}={ROOT / 'tests/fixtures/lora/smollm2-r8-qv'}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, "qlorad exited: " + open(log.name).read()
            return http("GET", base + "/ready", timeout=2)[0] == 200
        wait_for("qlorad /ready", ready, 120)
        job = drive_traffic(base)
        yield {"job": job, "base": base, "port": port, "state": os.path.join(state, "state"),
               "model": model}
    finally:
        stop(proc)
        log.close()
        shutil.rmtree(state, ignore_errors=True)


def exposition(base):
    """Parses /metrics: ({sample name}, {family: type})."""
    text = http("GET", base + "/metrics")[1].decode()
    names, types = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, fam, typ = line.split()
            types[fam] = typ
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names, types


# --- what the dashboard and the alert rules query ---

def load_yaml(path):
    import yaml
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dashboard():
    return json.loads((DEPLOY / "grafana/dashboards/qlorad.json").read_text())


def dashboard_exprs():
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    d = dashboard()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_rules():
    return [r for g in load_yaml(DEPLOY / "prometheus/alerts.yml")[0]["groups"] for r in g["rules"]]


# Metric names: a PromQL identifier that is not followed by "(" (a function) and not a label name
# inside {...} or by (...). qlorad's names all start with qlorad_; GPU memory comes from DCGM.
METRIC = re.compile(r"\b((?:qlorad|DCGM)_[A-Za-z0-9_]+)\b(?!\s*\()")
# The only names allowed that qlorad does not export (documented in alerts.yml and deploy/README.md).
EXTERNAL = {"DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}


def metric_names(expr):
    """Metric names an expression selects (label values in quotes are not names)."""
    return set(METRIC.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)))


def grafana_to_promql(expr):
    """A dashboard expression as Prometheus would get it from Grafana (variables substituted)."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
