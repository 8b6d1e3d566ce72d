#!/usr/bin/env python3
"""Reference side of the serving load test: the same clients as tests/reliability/load.py against
`transformers serve` (transformers' own OpenAI-compatible server, continuous batching) on the same
model, machine and run. Prints one JSON object like load.py's.

bench/run-load-compare.sh runs both sides; alone:

    bench/load_reference.py --model-dir models/smollm2 --clients 64 --duration 60 --max-tokens 32 \\
        [--transformers /work/venv/bin/transformers] [--json-out FILE]

`transformers serve` needs FastAPI and Uvicorn in the reference venv (`pip install fastapi uvicorn`;
see ../shared/MODELS.md for the venv). It has no admission limit (nothing is refused with 429) and
ends its streams with the finish_reason chunk instead of `data: [DONE]`, which the client accepts
here as the end of a stream.
"""
import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time



ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
import harness  # noqa: E402
import load  # noqa: E402
from harness import httpx  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "smollm2"))
    ap.add_argument("--transformers", default="/work/venv/bin/transformers")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--drain", type=float, default=120)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    port = harness.free_port()
    url = f"http://127.0.0.1:{port}"
    model = str(pathlib.Path(a.model_dir).resolve())
    a.model = model
    proc = subprocess.Popen(
        [a.transformers, "serve", model, "--device", "cpu", "--dtype", "float32",
         "--host", "127.0.0.1", "--port", str(port), "--continuous-batching"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("transformers serve did not start: " + proc.stderr.read()[-2000:])
            time.sleep(0.5)
        # One request first: the model loads on it and the first batch compiles its paths.
        httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]}).raise_for_status()
        sampler = load.RssSampler(proc.pid)
        sampler.start()
        cpu0 = (load.cpu_seconds(proc.pid), time.process_time())
        stats, elapsed = asyncio.run(load.drive(url, a, finish_ends=True))
        cpu = {"server_s": round(load.cpu_seconds(proc.pid) - cpu0[0], 1),
               "load_generator_s": round(time.process_time() - cpu0[1], 1)}
        sampler.stop()
        out = load.summarize(stats, elapsed, a)
        out.update(server="transformers serve --continuous-batching (f32, CPU)",
                   cpu_seconds=cpu, rss=load.rss_summary(sampler.samples, a.duration),
                   server_alive_after=proc.poll() is None)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = json.dumps(out, indent=1)
    print(text)
    if a.json_out:
        pathlib.Path(a.json_out).write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
