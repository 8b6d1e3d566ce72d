#!/usr/bin/env python3
"""Sums an `ncu --csv --metrics gpu__time_duration.sum` log per kernel and grid: launches, median
and total GPU time (µs). Used for the decode-step breakdowns in BENCHMARKS.md.

    python3 bench/ncu_summary.py bench/results/2026-11-29-h200-ncu-decode-after-s9.csv [FROM]

With FROM, only the launches from the first whose kernel name contains FROM on (an adapter step's
first LoRA launch, past the base runs). Then also the sum per layer's worth of launches.
"""
import collections
import csv
import sys

rows = list(csv.reader(open(sys.argv[1])))
start = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
head, rows = rows[start], rows[start + 1:]
name, grid = head.index("Kernel Name"), head.index("Grid Size")
value, unit = head.index("Metric Value"), head.index("Metric Unit")
scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3}
seq = [(r[name], r[grid], float(r[value].replace(",", "")) * scale[r[unit]])
       for r in rows if len(r) == len(head)]
if len(sys.argv) > 2:
    seq = seq[next((i for i, s in enumerate(seq) if sys.argv[2] in s[0]), len(seq)):]
times = collections.defaultdict(list)
for kernel, g, t in seq:
    times[(kernel, g)].append(t)
for (kernel, g), v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
    v.sort()
    print(f"{kernel:28s} grid {g:14s} n={len(v):4d} median {v[len(v) // 2]:7.2f} us  total {sum(v):8.1f} us")
layers = sum(len(v) for (k, g), v in times.items() if "silu_mul" in k)
if layers:
    print(f"per layer ({layers} silu_mul launches): {sum(t for _, _, t in seq) / layers:.2f} us")
