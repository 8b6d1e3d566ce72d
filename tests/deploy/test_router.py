"""deploy/router/haproxy.cfg in front of two real daemons on loopback: adapter affinity.

Both daemons register the same adapters (one fixture adapter under four names). Through the router,
every request for a given `model` lands on the same daemon (the router's X-Qlorad-Server header and
each daemon's own qlorad_adapter_requests_total agree), both daemons get a share, bodiless routes
still work, files, jobs, exports and promotions go to the training daemon, and when a daemon stops its adapters move to
the other one without a failed request.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request

import pytest

from conftest import (DEPLOY, MODEL_ID, ROOT, free_port, qlorad_bin, stop, tool, wait_for)

# Consistent hashing is deterministic: with these names each daemon gets a share.
NAMES = [MODEL_ID] + [f"team-{c}" for c in "abcd"]


def request(url, body=None, timeout=60, header="X-Qlorad-Server"):
    """(status, the header's value, body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get(header), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get(header), e.read()


def router_config(path, port, daemons):
    """The committed config with loopback addresses: the bind, the servers' addresses, and faster
    health checks so that the test does not wait seconds for them."""
    text = (DEPLOY / "router/haproxy.cfg").read_text()
    text = text.replace("    bind :8000", f"    bind 127.0.0.1:{port}")
    for name, p in daemons.items():
        text = re.sub(rf"server {name} {name}:8000", f"server {name} 127.0.0.1:{p}", text)
    default = "default-server init-addr last,libc,none resolvers dns check\n"
    assert default in text
    text = text.replace(default, default.replace("check", "check inter 300ms fall 1 rise 1"))
    # How many connection attempts failed before the answer (0 once a dead daemon left the ring).
    text = text.replace("    http-response set-header X-Qlorad-Server %s\n",
                        "    http-response set-header X-Qlorad-Server %s\n"
                        "    http-response set-header X-Retries %rc\n")
    path.write_text(text)


@pytest.fixture(scope="module")
def fleet():
    adapter = ROOT / "tests/fixtures/lora/smollm2-r8-qv"
    model = os.environ.get("QLORAD_TEST_MODEL", str(ROOT / "models/smollm2"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qlorad-router-"))
    daemons, procs, haproxy = {}, {}, None
    try:
        for name in ["qlorad-0", "qlorad-1"]:
            daemons[name] = free_port()
            args = [qlorad_bin(), "serve", "--model", model, "--model-id", MODEL_ID,
                    "--listen", f"127.0.0.1:{daemons[name]}"]
            if name == "qlorad-0":
                args += ["--state-dir", str(tmp / "state")]
            for n in NAMES[1:]:
                args += ["--lora", f"{n}={adapter}"]
            procs[name] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cfg = tmp / "haproxy.cfg"
        port = free_port()
        router_config(cfg, port, daemons)
        check = subprocess.run([tool("haproxy"), "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        for name, p in daemons.items():
            wait_for(f"{name} ready", lambda p=p, name=name: procs[name].poll() is None and
                     request(f"http://127.0.0.1:{p}/ready", timeout=2)[0] == 200, 120)
        haproxy = subprocess.Popen([tool("haproxy"), "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        wait_for("the router", lambda: haproxy.poll() is None and
                 request(base + "/v1/models", timeout=2)[0] == 200, 30)
        yield {"base": base, "daemons": daemons, "procs": procs}
    finally:
        if haproxy is not None:
            stop(haproxy)
        for p in procs.values():
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def chat(base, model, stream=False, header="X-Qlorad-Server"):
    body = {"model": model, "max_tokens": 1, "stream": stream,
            "messages": [{"role": "user", "content": "Hi"}]}
    status, value, text = request(base + "/v1/chat/completions", body, header=header)
    assert status == 200, (model, text)
    if stream:
        assert text.rstrip().endswith(b"data: [DONE]")
    return value


def adapter_requests(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m: int(float(v)) for m, v in
            re.findall(r'^qlorad_adapter_requests_total\{adapter="([^"]+)"\} (\S+)$', text, re.M)}


def test_each_model_sticks_to_one_daemon(fleet):
    base = fleet["base"]
    placed = {}
    for name in NAMES:
        servers = {chat(base, name), chat(base, name, stream=True)}
        assert len(servers) == 1, (name, servers)
        placed[name] = servers.pop()
    assert set(placed.values()) == set(fleet["daemons"]), f"one daemon got everything: {placed}"
    # The daemons' own counters agree with the router's header.
    for daemon, port in fleet["daemons"].items():
        counts = adapter_requests(port)
        for name in NAMES:
            expected = 2 if placed[name] == daemon else 0
            assert counts.get(name, 0) == expected, (daemon, name, counts)


def test_bodiless_and_training_routes(fleet):
    status, _, body = request(fleet["base"] + "/v1/models")
    assert status == 200 and len(json.loads(body)["data"]) == len(NAMES)
    for _ in range(3):
        status, server, _ = request(fleet["base"] + "/v1/fine_tuning/jobs")
        assert status == 200 and server == "qlorad-0"
        status, server, _ = request(fleet["base"] + "/v1/files")
        assert status == 200 and server == "qlorad-0"
        status, server, _ = request(fleet["base"] + "/v1/exports")
        assert status == 200 and server == "qlorad-0"
        # A promotion has no "model" in its body: it must still reach the daemon keeping exports.
        status, server, _ = request(fleet["base"] + "/v1/adapters/no-such-adapter/promote",
                                    {"out": "x"})
        assert status == 404 and server == "qlorad-0"


def test_a_stopped_daemon_hands_its_adapters_over(fleet):
    base = fleet["base"]
    moved = [n for n in NAMES if chat(base, n) == "qlorad-1"]
    assert moved
    stop(fleet["procs"]["qlorad-1"])
    # No request fails meanwhile: a refused connection is redispatched to the other daemon.
    for name in moved:
        assert chat(base, name) == "qlorad-0"
    # Then the health check takes it out of the ring: no more failed attempts before the answer.
    wait_for("qlorad-1 out of the ring",
             lambda: all(chat(base, n, header="X-Retries") == "0" for n in moved), 20)
