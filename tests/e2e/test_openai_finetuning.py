"""End to end: fine-tuning through the official `openai` package against `qlorad serve --state-dir`
(SmolLM2, CPU): files.create → fine_tuning.jobs.create → retrieve until succeeded → list_events →
checkpoints.list → chat.completions.create(model=job.fine_tuned_model); cancel on a second job;
errors for bad input arrive as openai.BadRequestError with the offending param.
"""
import io
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

import openai
import pytest

MODEL_ID = "smollm2"
CAPS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
        ("Peru", "Lima"), ("Japan", "Tokyo")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    binary = os.environ.get("QLORAD_BIN", "target/release/qlorad")
    model = os.environ.get("QLORAD_TEST_MODEL", "models/smollm2")
    state = tempfile.mkdtemp(prefix="qlorad-e2e-state-")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "serve", "--model", model, "--model-id", MODEL_ID, "--listen", f"127.0.0.1:{port}",
         "--state-dir", state, "--checkpoint-interval", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "qlorad exited"
        try:
            with urllib.request.urlopen(base + "/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("qlorad did not become ready")
    yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def training_file(client):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Capital of {c}?"},
                                      {"role": "assistant", "content": f"ANSWER: {k}"}]}) for c, k in CAPS]
    return client.files.create(file=("caps.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="fine-tune")


HP = {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 5, "lora_r": 2,
      "target_modules": ["q_proj", "v_proj"], "max_seq_len": 48}


def test_fine_tune_then_serve_the_result(client):
    f = training_file(client)
    assert f.purpose == "fine-tune" and f.bytes > 0
    assert client.files.retrieve(f.id).filename == "caps.jsonl"
    assert f.id in [x.id for x in client.files.list().data]
    job = client.fine_tuning.jobs.create(
        model=MODEL_ID, training_file=f.id, suffix="caps", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": HP}})
    assert job.status == "validating_files"
    deadline = time.time() + 300
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, job
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{MODEL_ID}:caps:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 1

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert any("successfully completed" in m for m in messages), messages
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 6 and all(e.data["train_loss"] > 0 for e in metrics)

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [4, 2]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"

    r = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=8,
                                       messages=[{"role": "user", "content": "Capital of Peru?"}])
    assert r.model == job.fine_tuned_model and r.choices[0].message.content
    r = client.chat.completions.create(model=ckpts[-1].fine_tuned_model_checkpoint, max_tokens=4,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content is not None
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    page = client.fine_tuning.jobs.list(limit=1)
    assert page.data[0].id == job.id


def test_cancel_a_second_job(client):
    f = training_file(client)
    job = client.fine_tuning.jobs.create(model=MODEL_ID, training_file=f.id,
                                         hyperparameters={"n_epochs": 3, "batch_size": 1})
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_bad_input_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", io.BytesIO(b'{"messages": []}\n')), purpose="fine-tune")
    assert "line 1" in str(e.value)
    f = training_file(client)
    for kwargs, param in [
        (dict(model="gpt-4o-mini", training_file=f.id), "model"),
        (dict(model=MODEL_ID, training_file="file-missing"), "training_file"),
        (dict(model=MODEL_ID, training_file=f.id, hyperparameters={"n_epochs": 500}), "hyperparameters.n_epochs"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(**kwargs)
        assert e.value.param == param
    other = client.files.create(file=("b.jsonl", io.BytesIO(b"{}")), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=MODEL_ID, training_file=other.id)
    assert e.value.param == "training_file" and "purpose" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    assert client.files.delete(other.id).deleted
