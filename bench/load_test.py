#!/usr/bin/env python3
"""Bounded loopback load test of `qlorad serve`: C concurrent streaming clients for D seconds.

Starts the daemon itself on a free 127.0.0.1 port (or uses --url), runs raw HTTP/SSE clients
(httpx) so every stream's end is observed exactly: a stream is complete only if it ends with
`data: [DONE]`; a 429 at admission counts as refused (not lost). Stops by itself after D seconds
(in-flight streams are given up to --drain seconds to finish). Prints one JSON object:
requests, completed, refused_429, http_5xx, lost_streams, ttft/itl/e2e percentiles, tokens/s,
and the daemon's peak RSS.

Usage: bench/load_test.py [--clients 64] [--duration 60] [--max-inflight 48] [--max-tokens 32]
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.",
           "Explain photosynthesis briefly.", "What is 12 times 7?", "Say hello in Spanish."]


async def client(i, url, model, stop_at, max_tokens, stats):
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as http:
        n = 0
        while time.monotonic() < stop_at:
            body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": i * 1000 + n,
                    "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}]}
            n += 1
            stats["requests"] += 1
            t0 = time.monotonic()
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code == 429:
                        stats["refused_429"] += 1
                        await r.aread()
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")) * 0.2)
                        continue
                    if r.status_code >= 500:
                        stats["http_5xx"] += 1
                        await r.aread()
                        continue
                    if r.status_code != 200:
                        stats["other_status"][str(r.status_code)] = stats["other_status"].get(str(r.status_code), 0) + 1
                        await r.aread()
                        continue
                    first, last, done, toks = None, None, False, 0
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        ev = json.loads(data)
                        if "error" in ev:
                            stats["stream_errors"] += 1
                            continue
                        if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                            now = time.monotonic()
                            if first is None:
                                first = now
                                stats["ttft"].append(now - t0)
                            else:
                                stats["itl"].append(now - last)
                            last = now
                            toks += 1
                    if done:
                        stats["completed"] += 1
                        stats["e2e"].append(time.monotonic() - t0)
                        stats["tokens"] += toks
                    else:
                        stats["lost_streams"] += 1
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                stats["lost_streams"] += 1
                stats["exceptions"].append(repr(e)[:200])


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--bin", default="target/release/qlorad")
    ap.add_argument("--model-dir", default="models/smollm2")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--drain", type=float, default=60)
    ap.add_argument("--max-inflight", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    proc = None
    url = a.url
    if url is None:
        port = free_port()
        proc = subprocess.Popen([a.bin, "serve", "--model", a.model_dir, "--model-id", a.model,
                                 "--listen", f"127.0.0.1:{port}", "--max-inflight", str(a.max_inflight)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    stats = {"requests": 0, "completed": 0, "refused_429": 0, "http_5xx": 0, "lost_streams": 0,
             "stream_errors": 0, "other_status": {}, "tokens": 0, "ttft": [], "itl": [], "e2e": [], "exceptions": []}
    t0 = time.monotonic()
    stop_at = t0 + a.duration
    tasks = [asyncio.create_task(client(i, url, a.model, stop_at, a.max_tokens, stats)) for i in range(a.clients)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=a.duration + a.drain)
    except asyncio.TimeoutError:
        for t in tasks:
            t.cancel()
        stats["lost_streams"] += 1000000  # flag: could not drain
    elapsed = time.monotonic() - t0
    out = {k: v for k, v in stats.items() if k not in ("ttft", "itl", "e2e", "exceptions")}
    for k in ("ttft", "itl", "e2e"):
        out[k + "_s"] = {p: pct(stats[k], p) for p in (50, 90, 99)}
    out.update(clients=a.clients, duration_s=round(elapsed, 1), max_inflight=a.max_inflight,
               max_tokens=a.max_tokens, tokens_per_s=round(stats["tokens"] / elapsed, 1),
               exceptions=stats["exceptions"][:5])
    if proc:
        out["daemon_peak_rss_mb"] = rss_mb(proc.pid)
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(out, indent=1))
    ok = out["http_5xx"] == 0 and out["lost_streams"] == 0 and out["completed"] > 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
