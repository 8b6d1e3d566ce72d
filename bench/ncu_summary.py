#!/usr/bin/env python3
"""Sums an `ncu --csv --metrics gpu__time_duration.sum` log per kernel and grid: launches, median
and total GPU time (µs). Used for the decode-step breakdowns in BENCHMARKS.md.

    python3 bench/ncu_summary.py bench/results/2026-11-29-h200-ncu-decode-after-s9.csv
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
times = collections.defaultdict(list)
for r in rows:
    if len(r) == len(head):
        times[(r[name], r[grid])].append(float(r[value].replace(",", "")) * scale[r[unit]])
for (kernel, g), v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
    v.sort()
    print(f"{kernel:28s} grid {g:14s} n={len(v):4d} median {v[len(v) // 2]:7.2f} us  total {sum(v):8.1f} us")
