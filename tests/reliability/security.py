#!/usr/bin/env python3
"""Security checks against the real `qlorad serve` binary (loopback), one daemon for all of them,
started with two keys (`admin-key-1:inference+admin`, `infer-key-1:inference`), an adapter root,
a state dir, a 64 KiB JSON body limit, a 40 MiB upload limit and 2-second connection timeouts:

  keys        every operation in /openapi.json: admin routes answer 401 without a key and 403 to
              the inference key (and something else to the admin key); inference routes 401
              without a key; /health, /ready, /metrics, /openapi.json open
  traversal   adapter names (`../x`, `a/b`, `%2e%2e`, …) and paths (`../../etc`, absolute outside
              the root, a symlink escaping it) → 4xx and nothing loaded; file ids and export names
  oversized   bodies over the limits → 413 (JSON routes, uploads; with and without Content-Length)
  slow        a client that never finishes its headers is disconnected, a body that stops arriving
              gets 408, a reader that stops reading has its connection closed — each timed

Each check returns the figures it measured; `test_security.py` runs them under pytest.
Usage: tests/reliability/security.py [--json-out FILE]
"""
import argparse
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import Daemon, error_of  # noqa: E402

ADMIN, INFER = "admin-key-1", "infer-key-1"
TIMEOUT_S = 2
BODY_LIMIT = 64 << 10
UPLOAD_LIMIT = 40 << 20
OPEN = {"/health", "/ready", "/metrics", "/openapi.json"}
GENERATION = {"/v1/chat/completions", "/v1/completions"}


def start(work):
    """The daemon every check here uses (its adapter root holds one good adapter, `qv`)."""
    work = pathlib.Path(work)
    root = work / "adapters"
    root.mkdir(parents=True)
    shutil.copytree(harness.LORA_FIXTURE, root / "qv")
    # A symlink inside the root that leads out of it.
    os.symlink(harness.LORA_FIXTURE, root / "escape")
    d = Daemon(work, ["--api-key", f"{ADMIN}:inference+admin", "--api-key", f"{INFER}:inference",
                      "--adapter-root", str(root), "--max-body-bytes", str(BODY_LIMIT),
                      "--max-upload-bytes", str(UPLOAD_LIMIT),
                      "--header-read-timeout-s", str(TIMEOUT_S), "--body-read-timeout-s", str(TIMEOUT_S),
                      "--write-timeout-s", str(TIMEOUT_S)], state=work / "state", keepalive=False)
    d.start()
    return d


def expected_scope(method, path):
    """What the issue asks for: management (adapters; writes to files, jobs and exports) is admin;
    generation and reads are inference; probes and the spec are open."""
    if path in OPEN:
        return "open"
    if path.startswith("/v1/adapters"):
        return "admin"
    if method != "get" and path not in GENERATION:
        return "admin"
    return "inference"


def call(d, method, path, key):
    path = path.replace("{id}", "x-1").replace("{name}", "x-1")
    h = {"Authorization": f"Bearer {key}"} if key else {}
    if method == "get":
        return d.http.get(path, headers=h)
    if method == "delete":
        return d.http.delete(path, headers=h)
    return d.http.post(path, json={}, headers=h)


def check_keys(d):
    spec = d.http.get("/openapi.json").json()
    ops = [(m, p) for p, item in spec["paths"].items() for m in item if m in ("get", "post", "delete")]
    table, bad = {}, []
    for m, p in ops:
        scope = expected_scope(m, p)
        seen = {who: call(d, m, p, key).status_code
                for who, key in (("none", None), ("wrong", "not-a-key-at-all"), ("inference", INFER), ("admin", ADMIN))}
        table[f"{m.upper()} {p}"] = {"scope": scope, **seen}
        if scope == "open":
            ok = seen["none"] == 200
        elif scope == "admin":
            ok = (seen["none"] == 401 and seen["wrong"] == 401 and seen["inference"] == 403
                  and seen["admin"] not in (401, 403))
        else:
            ok = (seen["none"] == 401 and seen["wrong"] == 401
                  and seen["inference"] not in (401, 403) and seen["admin"] not in (401, 403))
        if not ok:
            bad.append((m, p, scope, seen))
    # The header must be exactly `Bearer <key>`.
    odd = [d.http.get("/v1/models", headers={"Authorization": v}).status_code
           for v in (INFER, f"Basic {INFER}", f"Bearer {INFER}x", "Bearer")]
    assert odd == [401] * 4, odd
    assert not bad, bad
    admin = sorted(k for k, v in table.items() if v["scope"] == "admin")
    # The routes the issue names: adapters (list, load, unload, pin, unpin, promote), files
    # (upload, delete), fine-tuning writes and export cancel.
    named = {"GET /v1/adapters", "POST /v1/adapters", "DELETE /v1/adapters/{name}",
             "POST /v1/adapters/{name}/pin", "POST /v1/adapters/{name}/unpin",
             "POST /v1/adapters/{name}/promote", "POST /v1/files", "DELETE /v1/files/{id}",
             "POST /v1/fine_tuning/jobs", "POST /v1/fine_tuning/jobs/{id}/cancel",
             "POST /v1/fine_tuning/jobs/{id}/pause", "POST /v1/fine_tuning/jobs/{id}/resume",
             "POST /v1/exports/{id}/cancel"}
    assert named <= set(admin), named - set(admin)
    return {"operations": len(ops), "admin_operations": len(admin),
            "inference_operations": sum(v["scope"] == "inference" for v in table.values()),
            "open_operations": sum(v["scope"] == "open" for v in table.values()),
            "admin_routes": admin, "inference_key_on_admin_routes": "403 on all",
            "no_key": "401 on all but the open routes"}


def adapters(d):
    return {a["name"] for a in d.get("/v1/adapters", key=ADMIN).json()["data"]}


def check_traversal(d):
    seen = {}
    # A control: a legitimate load works (so refusals below are about the input).
    r = d.post("/v1/adapters", {"name": "good", "path": "qv"}, key=ADMIN)
    assert r.status_code == 201, r.text
    for name in ("../x", "a/b", "%2e%2e", "..", ".", ".hidden", "../../etc/passwd", "a\\b", "x\u0000y", "",
                 "a" * 129):
        r = d.post("/v1/adapters", {"name": name, "path": "qv"}, key=ADMIN)
        seen[f"name {name[:20]!r}"] = error_of(r)[:2]
        assert r.status_code == 400 and error_of(r)[2], (name, r.text)
    outside = str(harness.LORA_FIXTURE)  # an adapter that exists, but outside the root
    for path in ("../../etc", "../" * 12 + "etc", "/etc", outside, "escape", "qv/../../qv",
                 "%2e%2e/%2e%2e/etc", "qv/../escape"):
        r = d.post("/v1/adapters", {"name": "evil", "path": path}, key=ADMIN)
        seen[f"path {path[-40:]!r}"] = error_of(r)[:2]
        assert 400 <= r.status_code < 500, (path, r.text)
    # Paths that resolve to an existing folder outside the root are forbidden (403); the others
    # do not exist under the root (422); neither says anything about the rest of the disk.
    for path in ("../" * 12 + "etc", "/etc", outside, "escape", "qv/../escape"):
        assert error_of(d.post("/v1/adapters", {"name": "evil", "path": path}, key=ADMIN))[0] == 403, path
    assert adapters(d) == {"good"}, adapters(d)
    # Traversal in URL path segments: never a 2xx, never a 5xx, the good adapter untouched.
    for raw in ("/v1/adapters/..%2fgood", "/v1/adapters/%2e%2e/pin", "/v1/adapters/..%2F..%2Fetc",
                "/v1/files/..%2f..%2fetc%2fpasswd/content", "/v1/files/%2e%2e/content",
                "/v1/exports/..%2f..%2fetc", "/v1/models/..%2f..%2fetc%2fpasswd"):
        method = "delete" if raw.count("/") == 3 and "adapters" in raw else "get"
        r = d.http.request(method.upper(), raw, headers={"Authorization": f"Bearer {ADMIN}"})
        seen[f"url {raw}"] = r.status_code
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
    assert adapters(d) == {"good"}
    for model in ("../good", "../../etc/passwd", "good/../good"):
        assert d.chat(model, key=INFER).status_code == 404, model
    r = d.post("/v1/adapters/good/promote", {"out": "../escape"}, key=ADMIN)
    seen["promote out '../escape'"] = error_of(r)[:2]
    assert r.status_code == 400
    return seen


def raw_request(d, head, body=b"", chunked_body=None):
    """Sends a raw HTTP/1.1 request; returns (status, body text)."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=30) as s:
        s.sendall(head + body)
        if chunked_body is not None:
            for i in range(0, len(chunked_body), 16384):
                part = chunked_body[i:i + 16384]
                try:
                    s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
                except OSError:
                    break  # the server answered and closed early
            else:
                try:
                    s.sendall(b"0\r\n\r\n")
                except OSError:
                    pass
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + 10:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
            if len(data) > 4096:
                break
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data.decode(errors="replace")


def check_oversized(d):
    seen = {}
    big = {"model": "smollm2", "messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 1000)}]}
    for route, key, body in (("/v1/chat/completions", INFER, big), ("/v1/completions", INFER, {"model": "smollm2", "prompt": "x" * (BODY_LIMIT + 1000)}),
                             ("/v1/adapters", ADMIN, {"name": "n", "path": "x" * (BODY_LIMIT + 10)}),
                             ("/v1/fine_tuning/jobs", ADMIN, {"model": "smollm2", "training_file": "x" * (BODY_LIMIT + 10)})):
        r = d.post(route, body, key=key)
        seen[route] = error_of(r)[:2]
        assert error_of(r)[:2] == (413, "request_too_large"), (route, r.text)
    r = d.upload("big.jsonl", b"x" * (UPLOAD_LIMIT + 1000), key=ADMIN)
    seen["/v1/files (Content-Length)"] = error_of(r)[:2]
    assert r.status_code == 413, r.text
    # Without Content-Length (chunked): the limit holds while the body streams in.
    payload = json.dumps(big).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + INFER.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, _ = raw_request(d, head, chunked_body=payload)
    seen["/v1/chat/completions (chunked)"] = status
    assert status == 413, status
    b = "qlorad-boundary"
    form = (f"--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{b}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n").encode()
    form += b"x" * (UPLOAD_LIMIT + 200_000) + f"\r\n--{b}--\r\n".encode()
    head = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN.encode()
            + f"\r\nContent-Type: multipart/form-data; boundary={b}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    status, _ = raw_request(d, head, chunked_body=form)
    seen["/v1/files (chunked)"] = status
    assert status == 413, status
    assert not [x for x in d.get("/v1/files", key=ADMIN).json()["data"] if x["filename"] == "big.bin"]
    leftovers = [p.name for p in (d.state / "files").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    return seen


def read_until_closed(s, limit):
    """Reads until EOF/reset or `limit` seconds; returns (bytes, closed, seconds)."""
    s.settimeout(0.2)
    out, t0 = b"", time.monotonic()
    while time.monotonic() - t0 < limit:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return out, True, time.monotonic() - t0
        if not chunk:
            return out, True, time.monotonic() - t0
        out += chunk
    return out, False, time.monotonic() - t0


def check_slow(d):
    seen = {"timeouts_s": TIMEOUT_S}
    addr = ("127.0.0.1", d.port)
    # Slowloris: half a request head, then silence.
    with socket.create_connection(addr) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        _, closed, t = read_until_closed(s, 20)
    seen["header_stall_closed_after_s"] = round(t, 2)
    assert closed and TIMEOUT_S * 0.75 <= t <= TIMEOUT_S + 4, (closed, t)
    # An idle keep-alive connection is closed as well (the header timeout covers it).
    with socket.create_connection(addr) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first
        _, closed, t = read_until_closed(s, 20)
    seen["idle_keepalive_closed_after_s"] = round(t, 2)
    assert closed and t <= TIMEOUT_S + 4, (closed, t)
    # A body that stops arriving → 408 in OpenAI's shape.
    with socket.create_connection(addr) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + INFER.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": \"smollm2\",")
        resp, _, t = read_until_closed(s, 20)
    text = resp.decode(errors="replace")
    seen["body_stall_status"] = text[9:12]
    seen["body_stall_answered_after_s"] = round(t, 2)
    assert text.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in text, text
    assert TIMEOUT_S * 0.75 <= t <= TIMEOUT_S + 4, t
    # A reader that stops reading a large response: its connection is closed.
    size = 32 << 20  # well past the socket buffers on both sides
    r = d.upload("big.bin", os.urandom(size), "batch", key=ADMIN)
    assert r.status_code == 200, r.text
    fid = r.json()["id"]
    with socket.create_connection(addr) as s:
        s.sendall(f"GET /v1/files/{fid}/content HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {INFER}\r\n\r\n".encode())
        t0 = time.monotonic()
        # Read nothing until the server has given up on the write.
        time.sleep(TIMEOUT_S + 2)
        got, closed, _ = read_until_closed(s, 30)
        t = time.monotonic() - t0
    seen["stalled_reader_bytes_received"] = len(got)
    seen["stalled_reader_response_bytes"] = size
    seen["stalled_reader_closed"] = closed
    assert closed and len(got) < size, (closed, len(got), size)
    assert d.get("/health").status_code == 200
    assert d.chat(key=INFER).status_code == 200
    seen["serving_after"] = 200
    return seen


CHECKS = {"keys": check_keys, "traversal": check_traversal, "oversized": check_oversized, "slow": check_slow}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json-out")
    a = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="qlorad-security-"))
    d = start(work)
    report, ok = {}, True
    try:
        for name, fn in CHECKS.items():
            t0 = time.monotonic()
            try:
                report[name] = {"result": "passed", **fn(d), "wall_s": round(time.monotonic() - t0, 1)}
            except AssertionError as e:
                ok = False
                report[name] = {"result": "failed", "error": str(e)[-2000:]}
        report["daemon"] = {"alive": d.alive(), "panicked": "panicked" in d.logs()}
        ok = ok and d.alive() and not report["daemon"]["panicked"]
    finally:
        d.close()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    if a.json_out:
        pathlib.Path(a.json_out).write_text(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
