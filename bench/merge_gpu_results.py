#!/usr/bin/env python3
"""Merges qlorad-bench gpu-bench's JSON and bench/gpu_reference.py's JSON into one results file:
qlorad's figures under their names, the reference's under the same names prefixed `reference_`,
plus the machine and the ratios.

    python3 bench/merge_gpu_results.py QLORAD.json REFERENCE.json OUT.json
"""
import json
import subprocess
import sys
import time


def gpu_name():
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except Exception as e:  # the figures matter more than the label
        return f"unknown ({e})"


def main():
    ours_path, ref_path, out_path = sys.argv[1:4]
    ours = json.load(open(ours_path))
    try:
        ref = json.load(open(ref_path))
    except (OSError, ValueError) as e:
        ref = {"error": f"reference did not run: {e}"}
    keys = ["decode_b1_tok_s", "decode_b1_adapter_tok_s", "multi_adapter_32_ratio", "adapter_load_ms",
            "base_gpu_gb", "ttft_1k_ms", "prefill_tok_s", "decode_b64_tok_s", "load_s",
            "decode_b32_one_adapter_tok_s", "decode_b32_multi_adapter_tok_s"]
    out = {"date": time.strftime("%Y-%m-%d"), "machine": gpu_name(), "command": "bench/run-gpu.sh",
           "gemv_kernel": ours.get("gemv_kernel"),
           "decode_b1_host_ms_per_token": ours.get("decode_b1_host_ms_per_token")}
    for k in keys:
        out[k] = ours.get(k)
    for k in keys:
        out["reference_" + k] = ref.get(k)
    for k in ["decode_b1_tok_s", "decode_b1_adapter_tok_s", "decode_b64_tok_s", "prefill_tok_s"]:
        if ours.get(k) and ref.get(k):
            out["ratio_" + k] = ours[k] / ref[k]
    out["qlorad"] = ours
    out["reference"] = ref
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: v for k, v in out.items() if k not in ("qlorad", "reference")}, indent=2))


if __name__ == "__main__":
    main()
