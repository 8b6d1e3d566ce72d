"""End to end: a running `qlorad serve` (SmolLM2, CPU, NF4) driven by the official `openai` package.

Started by scripts/test.sh (QLORAD_BIN, QLORAD_TEST_MODEL); the fixture launches the daemon on a free
loopback port and stops it after the module.
"""
import os
import socket
import subprocess
import time
import urllib.request

import openai
import pytest

MODEL_ID = "smollm2"
ADAPTER = "ft:smollm2:qv"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    binary = os.environ.get("QLORAD_BIN", "target/release/qlorad")
    model = os.environ.get("QLORAD_TEST_MODEL", "models/smollm2")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "serve", "--model", model, "--model-id", MODEL_ID, "--listen", f"127.0.0.1:{port}",
         "--max-inflight", "4", "--max-body-bytes", "65536",
         "--adapter-root", "tests/fixtures/lora", "--lora", f"{ADAPTER}=tests/fixtures/lora/smollm2-r8-qv"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("qlorad exited: " + proc.stdout.read().decode())
        try:
            with urllib.request.urlopen(base + "/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("qlorad did not become ready")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_ID, ADAPTER]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    assert client.models.retrieve(ADAPTER).id == ADAPTER


def test_adapter_chosen_by_model(client):
    args = dict(temperature=0, max_tokens=12, messages=[{"role": "user", "content": "What is the capital of France?"}])
    r = client.chat.completions.create(model=ADAPTER, **args)
    assert r.model == ADAPTER
    assert "Paris" in r.choices[0].message.content
    # Streaming through the adapter works the same way.
    text = "".join(c.choices[0].delta.content or "" for c in
                   client.chat.completions.create(model=ADAPTER, stream=True, **args) if c.choices)
    assert text == r.choices[0].message.content


def test_chat_non_streaming(client):
    r = client.chat.completions.create(
        model=MODEL_ID, temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert r.object == "chat.completion"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL_ID, temperature=0, max_completion_tokens=12, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
                  {"role": "user", "content": "What is the capital of France?"}],
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert "Paris" in text
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens <= 12


def test_streaming_equals_non_streaming(client):
    args = dict(model=MODEL_ID, temperature=0, max_tokens=16,
                messages=[{"role": "user", "content": "Name three colors."}])
    whole = client.chat.completions.create(**args).choices[0].message.content
    parts = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args)
                    if c.choices)
    assert parts == whole


def test_seeded_sampling_is_reproducible(client):
    args = dict(model=MODEL_ID, temperature=0.9, top_p=0.95, seed=1234, max_tokens=16,
                messages=[{"role": "user", "content": "Tell me a fun fact."}])
    a = client.chat.completions.create(**args).choices[0].message.content
    b = client.chat.completions.create(**args).choices[0].message.content
    assert a == b


def test_stop_sequence(client):
    r = client.chat.completions.create(
        model=MODEL_ID, temperature=0, max_tokens=40, stop=["Paris"],
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_legacy_completions(client):
    r = client.completions.create(model=MODEL_ID, prompt="The capital of France is", temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=3.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=10_000_000), "max_tokens"),
    (dict(n=3), "n"),
])
def test_out_of_range_parameters_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"


def test_oversized_body_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x" * 100_000}])
    assert e.value.status_code == 413


def test_beyond_capacity_is_429(server, client):
    # --max-inflight 4: hold 4 long streams open, the 5th request is refused with Retry-After.
    streams = [client.chat.completions.create(model=MODEL_ID, max_tokens=2000, stream=True,
                                              messages=[{"role": "user", "content": "Write a long essay."}])
               for _ in range(4)]
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status_code == 429
        assert e.value.response.headers.get("retry-after")
    finally:
        for s in streams:
            s.close()
    # Closing the streams cancels their work: capacity comes back.
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2)
            assert r.usage.completion_tokens <= 2
            break
        except openai.RateLimitError:
            time.sleep(0.2)
    else:
        pytest.fail("capacity did not come back after the clients disconnected")
