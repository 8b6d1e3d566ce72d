#!/usr/bin/env python3
"""Bounded loopback load test of `qlorad serve`: C concurrent streaming clients for D seconds.

Starts the daemon itself on a free 127.0.0.1 port (or drives --url, which must be loopback) with an
admission limit (--max-inflight), and runs C raw HTTP/SSE clients (httpx), so every stream's end is
observed exactly: a stream is *completed* only if it ends with `data: [DONE]`; a 429 at admission is
*refused* (the client waits Retry-After × a random 0.5-1.5 and tries again); anything else that ends
a stream early is *lost*. After D seconds no new request starts; streams in flight get --drain
seconds to finish (unfinished ones count as lost). The daemon's RSS is sampled every second: peak,
final, and the mean of the first and last windows of the run (min(30 s, D/3)), whose ratio shows a
growth trend. Afterwards the daemon must still answer /ready, and counters come from its /metrics.

Prints one JSON object (and writes it with --json-out); exit status 0 only if there was no 5xx, no
lost stream, no other status, at least one completed stream and /ready answered afterwards.

Usage: tests/reliability/load.py [--clients 256] [--duration 120] [--max-inflight 64]
       [--max-tokens 32] [--json-out FILE]
"""
import argparse
import asyncio
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import httpx  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.",
           "Explain photosynthesis briefly.", "What is 12 times 7?", "Say hello in Spanish."]


def pct(v, p):
    """Nearest-rank percentile (None for no samples), rounded to the millisecond."""
    if not v:
        return None
    v = sorted(v)
    return round(v[min(len(v) - 1, int(p / 100 * len(v)))], 3)


def new_stats():
    return {"requests": 0, "completed": 0, "refused_429": 0, "retry_after_missing": 0,
            "http_5xx": 0, "lost_streams": 0, "stream_errors": 0, "other_status": {}, "tokens": 0,
            "ttft": [], "itl": [], "e2e": [], "exceptions": []}


async def one_request(http, url, body, stats):
    """One streamed chat completion; returns the seconds to back off before the next one."""
    stats["requests"] += 1
    t0 = time.monotonic()
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code == 429:
                stats["refused_429"] += 1
                await r.aread()
                ra = r.headers.get("retry-after")
                if ra is None:
                    stats["retry_after_missing"] += 1
                return float(ra or 1) * random.uniform(0.5, 1.5)
            if r.status_code != 200:
                key = "http_5xx" if r.status_code >= 500 else None
                await r.aread()
                if key:
                    stats[key] += 1
                else:
                    stats["other_status"][str(r.status_code)] = stats["other_status"].get(str(r.status_code), 0) + 1
                return 1.0
            first = last = None
            done, finished, toks = False, False, 0
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
                if ev["choices"] and ev["choices"][0].get("finish_reason"):
                    finished = True
                if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                    now = time.monotonic()
                    if first is None:
                        first = now
                        stats["ttft"].append(now - t0)
                    else:
                        stats["itl"].append(now - last)
                    last = now
                    toks += 1
            # A server that ends its streams without `[DONE]` (transformers serve, the reference
            # of bench/load_reference.py) completes a stream with its finish_reason chunk.
            if done or (finished and stats.get("finish_ends")):
                stats["completed"] += 1
                stats["e2e"].append(time.monotonic() - t0)
                stats["tokens"] += toks
            else:
                stats["lost_streams"] += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        stats["lost_streams"] += 1
        stats["exceptions"].append(repr(e)[:200])
    return 0.0


async def client(i, url, model, stop_at, max_tokens, stats):
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
        n = 0
        while time.monotonic() < stop_at:
            body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7,
                    "seed": i * 1000 + n,
                    "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}]}
            n += 1
            backoff = await one_request(http, url, body, stats)
            if backoff:
                await asyncio.sleep(min(backoff, max(0.0, stop_at - time.monotonic())))


class RssSampler(threading.Thread):
    """Samples a pid's RSS every `every` seconds until stopped: [(t, bytes)]."""

    def __init__(self, pid, every=1.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        while not self.halt.is_set():
            self.samples.append((time.monotonic() - self.t0, harness.rss_bytes(self.pid)))
            self.halt.wait(self.every)

    def stop(self):
        self.halt.set()
        self.join()
        self.samples.append((time.monotonic() - self.t0, harness.rss_bytes(self.pid)))


def rss_summary(samples, load_s):
    """Peak/final and window means of the samples taken during the load phase: the first window
    (it includes the ramp from idle: batch and KV caches filling), the second (steady state) and
    the last; a leak shows as last > second. `series_mb`: one sample per 10 s."""
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    during = [b for t, b in samples if t <= load_s and b]
    w = max(1.0, min(30.0, load_s / 4))
    first = [b for t, b in samples if t <= w and b]
    second = [b for t, b in samples if w < t <= 2 * w and b]
    last = [b for t, b in samples if load_s - w <= t <= load_s and b]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0  # noqa: E731
    ratio = lambda a, b: round(mean(a) / mean(b), 3) if a and b else None  # noqa: E731
    return {"samples": len(samples), "window_s": round(w, 1), "idle_mb": mb(samples[0][1]),
            "peak_mb": mb(max(b for _, b in samples)), "final_mb": mb(samples[-1][1]),
            "first_window_mean_mb": mb(mean(first)), "second_window_mean_mb": mb(mean(second)),
            "last_window_mean_mb": mb(mean(last)), "last_over_first": ratio(last, first),
            "last_over_second": ratio(last, second),
            "during_load_max_mb": mb(max(during)) if during else None,
            "series_mb": [mb(b) for t, b in samples[::10]]}


def cpu_seconds(pid):
    """User + system CPU seconds of `pid` so far (from /proc/PID/stat)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


METRIC_KEYS = ("qlorad_requests_cancelled_total", "qlorad_batch_running_requests",
               "qlorad_queue_waiting_requests", "qlorad_tokens_generated_total",
               "qlorad_process_resident_memory_bytes")


def daemon_metrics(url):
    m = harness.parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
    out = {k: m.get(k) for k in METRIC_KEYS}
    out["http_chat_by_status"] = {k.split('status="')[1].split('"')[0]: int(v) for k, v in m.items()
                                  if k.startswith("qlorad_http_requests_total")
                                  and 'route="/v1/chat/completions"' in k}
    return out


async def drive(url, a, finish_ends=False):
    stats = new_stats()
    stats["finish_ends"] = finish_ends
    t0 = time.monotonic()
    stop_at = t0 + a.duration
    tasks = [asyncio.create_task(client(i, url, a.model, stop_at, a.max_tokens, stats))
             for i in range(a.clients)]
    _, pending = await asyncio.wait(tasks, timeout=a.duration + a.drain)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    stats["undrained"] = len(pending)
    stats["lost_streams"] += len(pending)
    return stats, time.monotonic() - t0


def run(a):
    """Runs the load described by `a` (argparse namespace); returns the report dict."""
    daemon, work = None, None
    url = a.url
    if url:
        host = urllib.parse.urlparse(url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--url must be a loopback address, not {host}")
    else:
        work = pathlib.Path(tempfile.mkdtemp(prefix="qlorad-load-"))
        extra = getattr(a, "daemon_args", "").split()
        daemon = harness.Daemon(work, ["--max-inflight", str(a.max_inflight), *extra], model_id=a.model)
        daemon.start()
        url = daemon.url
    sampler = RssSampler(daemon.proc.pid) if daemon else None
    if sampler:
        sampler.start()
    cpu0 = (cpu_seconds(daemon.proc.pid) if daemon else None, time.process_time())
    try:
        stats, elapsed = asyncio.run(drive(url, a))
        cpu = {"daemon_s": round(cpu_seconds(daemon.proc.pid) - cpu0[0], 1) if daemon else None,
               "load_generator_s": round(time.process_time() - cpu0[1], 1)}
        ready = httpx.get(url + "/ready", timeout=10).status_code
        # Gauges settle once the engine has noticed the last stream ended.
        deadline = time.monotonic() + 10
        while True:
            metrics = daemon_metrics(url)
            if metrics["qlorad_batch_running_requests"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        if sampler:
            sampler.stop()
        if daemon:
            alive = daemon.alive()
            log = daemon.logs()
            panicked = "panicked" in log
            daemon.close()
            if panicked or not alive:
                print(log[-4000:], file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
    out = summarize(stats, elapsed, a)
    out.update(max_inflight=a.max_inflight if daemon else None, ready_after=ready,
               daemon_metrics=metrics, cpu_seconds=cpu)
    if daemon:
        out["rss"] = rss_summary(sampler.samples, a.duration)
        out["daemon_alive_after"] = alive
        out["daemon_panicked"] = panicked
    out["ok"] = (out["http_5xx"] == 0 and out["lost_streams"] == 0 and not out["other_status"]
                 and out["stream_errors"] == 0 and out["completed"] > 0 and ready == 200)
    return out


def summarize(stats, elapsed, a):
    """The report's counts, latency percentiles and throughput."""
    out = {k: v for k, v in stats.items() if k not in ("ttft", "itl", "e2e", "exceptions")}
    for k in ("ttft", "itl", "e2e"):
        out[k + "_s"] = {f"p{p}": pct(stats[k], p) for p in (50, 90, 99)}
    out.update(clients=a.clients, duration_s=a.duration, elapsed_s=round(elapsed, 1),
               max_tokens=a.max_tokens, tokens_per_s=round(stats["tokens"] / elapsed, 1),
               completed_per_s=round(stats["completed"] / elapsed, 2),
               exceptions=stats["exceptions"][:5], cpus=os.cpu_count())
    return out


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="drive this running daemon (loopback only) instead of starting one")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--duration", type=float, default=120)
    ap.add_argument("--drain", type=float, default=120)
    ap.add_argument("--max-inflight", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--daemon-args", default="", help="more `qlorad serve` options (one string)")
    ap.add_argument("--json-out")
    return ap


def main():
    a = parser().parse_args()
    out = run(a)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json_out:
        pathlib.Path(a.json_out).write_text(text + "\n")
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
