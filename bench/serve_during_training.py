#!/usr/bin/env python3
"""Serving latency with and without a fine-tuning job in the same daemon, and its memory.

Starts `qlorad serve --state-dir` (SmolLM2 by default, CPU) on a free loopback port and measures,
with only the standard library:
  1. idle: N sequential streaming chat requests → TTFT, inter-token latency (ITL), end-to-end;
     the process RSS from /metrics;
  2. during a job: uploads a Guanaco subset (../shared/data, text column → {"text"} JSONL),
     creates a job (all 7 projections, r 16), waits until it is running, repeats the same
     requests, samples RSS, then cancels the job.
Prints one JSON object (and writes it with --out): the percentiles of both phases, their ratios,
the base weight bytes, RSS idle vs during training (the job adds LoRA + AdamW + activations, not a
second base), training steps taken and the milliseconds training yielded to serving.

Usage: bench/serve_during_training.py [--requests 20] [--max-tokens 32] [--train-share 0.5]
       [--bin target/release/qlorad] [--model models/smollm2] [--out FILE]
"""
import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

MODEL_ID = "smollm2"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def req(base, path, body=None, method=None, headers=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    h = {"Content-Type": "application/json"} if body is not None and not isinstance(body, bytes) else {}
    h.update(headers or {})
    r = urllib.request.Request(base + path, data=data, headers=h, method=method)
    with urllib.request.urlopen(r, timeout=600) as resp:
        return resp.read()


def metric(base, name):
    for line in req(base, "/metrics").decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def histogram(base, name):
    """(upper bound, cumulative count) pairs of a Prometheus histogram, +Inf last."""
    out = []
    for line in req(base, "/metrics").decode().splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float(le), float(line.rsplit(" ", 1)[1])))
    return out


def stream_once(base, prompt, max_tokens):
    body = {"model": MODEL_ID, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}
    r = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps = []
    with urllib.request.urlopen(r, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    end = time.perf_counter()
    ttft = stamps[0] - t0 if stamps else end - t0
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return ttft, itl, end - t0


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def phase(base, n, max_tokens):
    prompts = ["Tell me about the history of Paris.", "Write a short poem about the sea.",
               "Explain photosynthesis simply.", "What is a neural network?"]
    ttfts, itls, e2es = [], [], []
    for i in range(n):
        ttft, itl, e2e = stream_once(base, prompts[i % len(prompts)], max_tokens)
        ttfts.append(ttft)
        itls += itl
        e2es.append(e2e)
    ms = lambda x: None if x is None else round(x * 1000, 1)
    return {"requests": n, "ttft_p50_ms": ms(pct(ttfts, 50)), "ttft_p99_ms": ms(pct(ttfts, 99)),
            "itl_p50_ms": ms(pct(itls, 50)), "itl_p99_ms": ms(pct(itls, 99)),
            "e2e_p50_ms": ms(pct(e2es, 50)), "e2e_p99_ms": ms(pct(e2es, 99)),
            "rss_bytes": metric(base, "qlorad_process_resident_memory_bytes")}


def guanaco_jsonl(n):
    import pyarrow.parquet as pq  # only needed for the job phase
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "shared", "data", "guanaco-llama2-1k.parquet")
    texts = pq.read_table(path).column("text").to_pylist()[:n]
    return "\n".join(json.dumps({"text": t}) for t in texts).encode()


def upload(base, data):
    b = "qloradbench"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"guanaco.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    out = req(base, "/v1/files", body, headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    return json.loads(out)["id"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/qlorad")
    ap.add_argument("--model", default="models/smollm2")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--train-share", type=float, default=0.5)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--data-jsonl", help="training data as JSONL (default: Guanaco texts from the parquet)")
    ap.add_argument("--model-id", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hp", default="{}", help="extra job hyperparameters as JSON")
    ap.add_argument("--out")
    a = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = tempfile.mkdtemp(prefix="qlorad-bench-state-")
    global MODEL_ID
    MODEL_ID = a.model_id
    proc = subprocess.Popen([a.bin, "serve", "--model", a.model, "--model-id", a.model_id, "--listen",
                             f"127.0.0.1:{port}", "--state-dir", state, "--train-share", str(a.train_share),
                             "--device", a.device],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                req(base, "/ready")
                break
            except OSError:
                time.sleep(0.2)
        stream_once(base, "warm up", 4)
        idle = phase(base, a.requests, a.max_tokens)
        data = open(a.data_jsonl, "rb").read() if a.data_jsonl else guanaco_jsonl(a.examples)
        fid = upload(base, data)
        hp = {"n_epochs": 3, "batch_size": 2, "lora_r": 16, "max_seq_len": 256}
        hp.update(json.loads(a.hp))
        job = json.loads(req(base, "/v1/fine_tuning/jobs", {
            "model": MODEL_ID, "training_file": fid, "seed": 1, "hyperparameters": hp}))
        for _ in range(1200):
            j = json.loads(req(base, f"/v1/fine_tuning/jobs/{job['id']}"))
            if j["status"] == "running" and j["step"] >= 1:
                break
            if j["status"] in ("failed", "cancelled", "succeeded"):
                raise SystemExit(f"job ended before the measurement: {j}")
            time.sleep(0.5)
        steps0 = metric(base, "qlorad_fine_tuning_steps_total")
        t0 = time.time()
        busy = phase(base, a.requests, a.max_tokens)
        busy["training_steps_during"] = metric(base, "qlorad_fine_tuning_steps_total") - steps0
        busy["training_s"] = round(time.time() - t0, 1)
        busy["yielded_ms"] = metric(base, "qlorad_fine_tuning_yield_milliseconds_total")
        # Training's pieces between preemption points while requests were in flight: how many,
        # and the bucket bounds of the longest ones (what a token may wait behind).
        h = histogram(base, "qlorad_fine_tuning_uninterrupted_seconds")
        if h:
            total = h[-1][1]
            busy["train_pieces"] = total
            busy["train_pieces_over_2ms"] = total - max((c for le, c in h if le <= 0.002), default=0)
            busy["train_piece_max_le_ms"] = next((le * 1e3 for le, c in h if c >= total), None)
        # Of those pieces, the time spent waiting for the GPU at the preemption points (a GPU only).
        busy["train_device_wait_s"] = metric(base, "qlorad_fine_tuning_device_wait_seconds_sum")
        busy["job_lora_bytes"] = metric(base, 'qlorad_fine_tuning_memory_bytes{kind="lora"}')
        req(base, f"/v1/fine_tuning/jobs/{job['id']}/cancel", {}, method="POST")
        ratio = lambda k: None if not idle[k] or busy[k] is None else round(busy[k] / idle[k], 2)
        out = {"model": a.model, "device": a.device, "train_share": a.train_share, "max_tokens": a.max_tokens,
               "base_weight_bytes": metric(base, "qlorad_model_weight_bytes"),
               "idle": idle, "during_training": busy,
               "ratios": {k: ratio(k) for k in ["ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms"]},
               "rss_growth_bytes": busy["rss_bytes"] - idle["rss_bytes"],
               # Captured decode steps (on a GPU unless QLORAD_DECODE_GRAPH=0) over the whole run.
               "decode_graph_steps": {k: metric(base, f'qlorad_decode_graph_steps_total{{kind="{k}"}}')
                                      for k in ["captured", "replayed"]}}
        print(json.dumps(out, indent=1))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
