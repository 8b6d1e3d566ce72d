#!/usr/bin/env python3
"""Serving throughput of one daemon on one device against the same daemon on several (issue 10).

For each --devices entry (e.g. `cuda:0` then `cuda:0,cuda:1`) starts `qlorad serve` on a free
loopback port (an entry `cuda:0|cuda:1` starts one daemon per device instead, each client talking
to one of them: the one-daemon-per-GPU deployment, as a control), waits for /ready, warms up,
then runs --clients concurrent clients that each send
--requests chat completions (non-streaming, --max-tokens each, temperature 0) naming the base
model and the --lora adapters in turn, so requests for different adapters batch together and the
daemon's router spreads them over its engines. Aggregate tokens/s = completion tokens / wall time
of the timed phase. The daemon's qlorad_engine_requests_total{engine} shows how requests spread.

Prints one JSON object (and writes it with --out): per configuration its tokens/s, requests,
errors and per-engine request counts, and the scaling efficiency
tok/s(N devices) / (N · tok/s(1 device)) of the last configuration against the first.

Standard library only (runs on the bare GPU machine).

Usage: bench/serve_scaling.py --bin qlorad --model DIR --devices cuda:0 cuda:0,cuda:1
       [--lora a0=DIR ...] [--clients 128] [--requests 2] [--max-tokens 128] [--out FILE]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(base, path, body, timeout=900):
    r = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=timeout) as resp:
        return json.loads(resp.read())


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=30) as resp:
        return resp.read().decode()


def engine_requests(base):
    """qlorad_engine_requests_total by engine label (empty where the daemon has no such metric)."""
    out = {}
    for line in get(base, "/metrics").splitlines():
        if line.startswith("qlorad_engine_requests_total{"):
            label = line.split('engine="', 1)[1].split('"', 1)[0]
            out[label] = int(float(line.rsplit(" ", 1)[1]))
    return out


def start_daemon(a, devices):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [a.bin, "serve", "--model", a.model, "--model-id", a.model_id, "--device", devices,
           "--listen", f"127.0.0.1:{port}", "--max-running", str(a.max_running),
           "--max-inflight", str(max(a.clients * 2, 64))]
    for spec in a.lora:
        cmd += ["--lora", spec]
    log = open(os.path.join(a.logdir, f"serve-{devices.replace(':', '').replace(',', '_')}.log"), "w")
    return base, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log


def run_config(a, devices):
    t0 = time.time()
    daemons = [start_daemon(a, d) for d in devices.split("|")]
    bases = [b for b, _, _ in daemons]
    try:
        for base, proc, _ in daemons:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"qlorad serve --device {devices} exited ({proc.returncode})")
                try:
                    if '"ready"' in get(base, "/ready"):
                        break
                except OSError:
                    pass
                if time.time() - t0 > a.start_timeout:
                    raise SystemExit(f"qlorad serve --device {devices} not ready after {a.start_timeout} s")
                time.sleep(1)
        start_s = time.time() - t0
        models = [a.model_id] + [s.split("=", 1)[0] for s in a.lora]

        def body(i):
            return {"model": models[i % len(models)], "max_tokens": a.max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Request {i}: tell me a long story."}]}

        # Warm-up: every model on every engine (kernels, adapter uploads, caches).
        warm = [threading.Thread(target=post, args=(base, "/v1/chat/completions", body(i)))
                for base in bases for i in range(4 * len(models))]
        for t in warm:
            t.start()
        for t in warm:
            t.join()

        def spread_now():
            out = {}
            for d, base in enumerate(bases):
                for k, v in engine_requests(base).items():
                    out[k if len(bases) == 1 else f"{d}.{k}"] = v
            return out

        before = spread_now()
        tokens, errors, lock = [0], [], threading.Lock()

        def client(c):
            for r in range(a.requests):
                try:
                    out = post(bases[c % len(bases)], "/v1/chat/completions",
                               body(c * a.requests + r))
                    with lock:
                        tokens[0] += out["usage"]["completion_tokens"]
                except Exception as e:  # counted, reported; the run goes on
                    with lock:
                        errors.append(repr(e)[:200])

        threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
        t1 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t1
        after = spread_now()
        spread = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(after)}
        return {"devices": devices, "start_s": round(start_s, 1), "wall_s": round(wall, 2),
                "requests": a.clients * a.requests, "errors": len(errors),
                "error_samples": errors[:3], "completion_tokens": tokens[0],
                "tok_s": round(tokens[0] / wall, 1), "engine_requests": spread}
    finally:
        for _, proc, log in daemons:
            proc.terminate()
        for _, proc, log in daemons:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/qlorad")
    ap.add_argument("--model", required=True)
    ap.add_argument("--model-id", default="base")
    ap.add_argument("--devices", nargs="+", required=True)
    ap.add_argument("--lora", action="append", default=[], help="NAME=DIR (repeatable)")
    ap.add_argument("--clients", type=int, default=128)
    ap.add_argument("--requests", type=int, default=2, help="per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--logdir", default=".")
    ap.add_argument("--out")
    a = ap.parse_args()
    runs = []
    for d in a.devices:
        r = run_config(a, d)
        print(json.dumps(r), flush=True)
        runs.append(r)
    def gpus(r):
        return len(r["devices"].replace("|", ",").split(","))

    # The efficiency of every configuration against the first (tok/s per device / the first's).
    for r in runs:
        r["scaling_efficiency"] = round(r["tok_s"] * gpus(runs[0]) / (gpus(r) * runs[0]["tok_s"]), 3)
    one_daemon = [r for r in runs if "|" not in r["devices"]]
    result = {"clients": a.clients, "max_tokens": a.max_tokens, "max_running": a.max_running,
              "models": 1 + len(a.lora), "runs": runs,
              "serving_gpus": gpus(one_daemon[-1]),
              "serving_scaling_efficiency": one_daemon[-1]["scaling_efficiency"]}
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    sys.exit(0 if all(r["errors"] == 0 for r in runs) else 1)


if __name__ == "__main__":
    main()
