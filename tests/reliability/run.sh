#!/usr/bin/env bash
# The reliability suite in one command, with a JSON report (loopback only; every daemon it starts
# is stopped again, every temp dir removed):
#   full (default): load.py with 256 streaming clients for 120 s (--max-inflight 64), every fault
#                   scenario in faults.py, every check in security.py  (~8 min on 2 cores)
#   --quick:        the CI-sized variants (32 clients for 15 s, --max-inflight 8; quick faults)
# Report: $QLORAD_RELIABILITY_OUT or target/reliability-{full,quick}.json, with the commit and the
# machine. Exit status 0 only if every part passed (a skipped scenario, e.g. disk_full without
# root, is reported with its reason). The Schemathesis fuzz is tests/reliability/test_fuzz_openapi.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=full
case "${1:-}" in
  --quick) MODE=quick ;;
  "") ;;
  *) echo "usage: tests/reliability/run.sh [--quick]" >&2; exit 2 ;;
esac
OUT=${QLORAD_RELIABILITY_OUT:-target/reliability-$MODE.json}
VENV=$(scripts/e2e-venv.sh)
PY=$VENV/bin/python
export QLORAD_BIN=${QLORAD_BIN:-$PWD/target/release/qlorad}
export QLORAD_TEST_MODEL=${QLORAD_TEST_MODEL:-$PWD/models/smollm2}
[ -x "$QLORAD_BIN" ] || cargo build --release -p qlorad
[ -d "$QLORAD_TEST_MODEL" ] || scripts/fetch-model.sh

if [ "$MODE" = quick ]; then
  LOAD=(--clients 32 --duration 15 --max-inflight 8 --max-tokens 16)
  FAULTS=(--quick)
else
  LOAD=(--clients 256 --duration 120 --max-inflight 64 --max-tokens 32)
  FAULTS=()
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
STARTED=$(date +%s)
rc=0
echo "== load: ${LOAD[*]}" >&2
"$PY" tests/reliability/load.py "${LOAD[@]}" --json-out "$TMP/load.json" >&2 || rc=1
echo "== faults ${FAULTS[*]}" >&2
"$PY" tests/reliability/faults.py "${FAULTS[@]}" --json-out "$TMP/faults.json" >&2 || rc=1
echo "== security" >&2
"$PY" tests/reliability/security.py --json-out "$TMP/security.json" >&2 || rc=1

mkdir -p "$(dirname "$OUT")"
"$PY" - "$TMP" "$OUT" "$MODE" "$STARTED" "$rc" <<'PYEOF'
import json, os, pathlib, platform, subprocess, sys, time
tmp, out, mode, started, rc = sys.argv[1:]
def part(name):
    p = pathlib.Path(tmp) / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {"result": "did not run"}
def git(*a):
    r = subprocess.run(["git", *a], capture_output=True, text=True)
    return r.stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
report = {
    "mode": mode, "passed": rc == "0",
    "commit": git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else ""),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "machine": {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
                "loadavg_at_end": os.getloadavg()},
    "wall_s": int(time.time()) - int(started),
    "load": part("load"), "faults": part("faults"), "security": part("security"),
}
pathlib.Path(out).write_text(json.dumps(report, indent=1) + "\n")
print(json.dumps({k: report[k] for k in ("mode", "passed", "commit", "wall_s")}))
print(f"report: {out}", file=sys.stderr)
PYEOF
exit $rc
