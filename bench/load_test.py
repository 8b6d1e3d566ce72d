#!/usr/bin/env python3
"""The load test lives in tests/reliability/load.py (one implementation for the benchmark and the
reliability suite); this runs it with the same arguments, e.g.
bench/load_test.py --clients 64 --duration 60 --max-inflight 48 --max-tokens 32
(the daemon binary and model come from $QLORAD_BIN and $QLORAD_TEST_MODEL, default
target/release/qlorad and models/smollm2)."""
import os
import pathlib
import sys

LOAD = pathlib.Path(__file__).resolve().parents[1] / "tests/reliability/load.py"
os.execv(sys.executable, [sys.executable, str(LOAD), *sys.argv[1:]])
