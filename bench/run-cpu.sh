#!/usr/bin/env bash
# CPU benchmark: qlorad (target/release/qlorad-bench) vs transformers (+ bitsandbytes NF4) on the same
# model and the same prompt token ids, for quant in none and nf4.
#
#   bench/run-cpu.sh [--model DIR] [--prompt-tokens P] [--decode-tokens D] [--repeats R] [--ref-only]
#
# Defaults: --model models/smollm2, P=128, D=64, R=3 (env P, D, R also work).
# The reference runs under ${QLORAD_REF_PYTHON:-/work/venv/bin/python} (torch, transformers, bitsandbytes).
# --ref-only runs only the transformers half (for checking the reference when qlorad-bench is not built).
#
# Steps: the prompt ids are built once by bench/cpu_reference.py (--dump-prompt-only); then for each quant
# the Rust bench and the Python reference run one after the other (alternating, same ids, same P/D/R).
# Writes bench/results/<YYYY-MM-DD>-cpu.json (machine description, commands, all results) and prints a
# markdown table with both implementations side by side and qlorad/transformers ratios.
# Run on a quiet machine: anything else using the cores (e.g. cargo build) distorts both sides.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODEL="${MODEL:-models/smollm2}"
P="${P:-128}"
D="${D:-64}"
R="${R:-3}"
REF_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --prompt-tokens) P="$2"; shift 2 ;;
    --decode-tokens) D="$2"; shift 2 ;;
    --repeats) R="$2"; shift 2 ;;
    --ref-only) REF_ONLY=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "run-cpu.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY="${QLORAD_REF_PYTHON:-/work/venv/bin/python}"
BENCH="target/release/qlorad-bench"
REF="bench/cpu_reference.py"

die() { echo "run-cpu.sh: error: $*" >&2; exit 1; }

[[ -d "$MODEL" ]] || die "model folder '$MODEL' not found (make it with: qlorad import-gguf ..., see scripts/fetch-model.sh)"
[[ -x "$PY" ]] || die "reference python '$PY' not found or not executable (set QLORAD_REF_PYTHON to a python with torch, transformers, bitsandbytes)"
"$PY" -c 'import torch, transformers, bitsandbytes' 2>/dev/null \
  || die "'$PY' cannot import torch, transformers and bitsandbytes"
if [[ $REF_ONLY -eq 0 ]]; then
  [[ -x "$BENCH" ]] || die "$BENCH is missing or not executable. Build it first: cargo build --release -p qlorad-bench
  (or pass --ref-only to run only the transformers reference)"
fi

DATE="$(date +%F)"
mkdir -p bench/results
OUTJSON="bench/results/${DATE}-cpu.json"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
IDS="$WORK/prompt-ids.json"

# ---- machine description --------------------------------------------------------------------------
lscpu > "$WORK/lscpu.txt" 2>/dev/null || echo "lscpu unavailable" > "$WORK/lscpu.txt"
nproc > "$WORK/nproc.txt"
uname -a > "$WORK/uname.txt"
(free -m 2>/dev/null || true) > "$WORK/free.txt"
cat /proc/loadavg > "$WORK/loadavg-before.txt"
(git rev-parse HEAD 2>/dev/null || echo unknown) > "$WORK/git-head.txt"
(git status --porcelain 2>/dev/null | grep -q . && echo dirty || echo clean) > "$WORK/git-dirty.txt"
read -r LOAD1 _ < /proc/loadavg
if awk -v l="$LOAD1" 'BEGIN{exit !(l > 0.5)}'; then
  echo "run-cpu.sh: warning: 1-minute load average is $LOAD1 before starting; results will be distorted" >&2
fi

# ---- prompt ids (built once, used by both sides) ---------------------------------------------------
CMD_IDS=("$PY" "$REF" --model "$MODEL" --prompt-tokens "$P" --dump-prompt "$IDS" --dump-prompt-only)
echo "+ ${CMD_IDS[*]}" >&2
"${CMD_IDS[@]}" > "$WORK/ids-info.json" 2> "$WORK/ids.log" || { cat "$WORK/ids.log" >&2; die "building the prompt ids failed"; }

: > "$WORK/commands.txt"
run_one() {  # name, output-json, command...
  local name="$1" out="$2"; shift 2
  echo "+ $*" >&2
  printf '%s\t%s\n' "$name" "$*" >> "$WORK/commands.txt"
  local t0 t1
  t0=$(date +%s.%N)
  if ! "$@" > "$WORK/$name.stdout" 2> "$WORK/$name.stderr"; then
    tail -n 30 "$WORK/$name.stderr" >&2
    die "$name failed (command: $*)"
  fi
  t1=$(date +%s.%N)
  # the result is the last stdout line that is a JSON object
  "$PY" - "$WORK/$name.stdout" "$out" "$t0" "$t1" <<'EOF' || die "$name printed no JSON object on stdout"
import json, sys
src, dst, t0, t1 = sys.argv[1:5]
obj = None
for line in open(src):
    line = line.strip()
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            pass
if obj is None:
    sys.exit(1)
obj["_wall_s"] = float(t1) - float(t0)
json.dump(obj, open(dst, "w"))
EOF
}

for q in none nf4; do
  if [[ $REF_ONLY -eq 0 ]]; then
    run_one "qlorad-$q" "$WORK/res-qlorad-$q.json" \
      "$BENCH" --model "$MODEL" --quant "$q" --prompt-file "$IDS" --decode-tokens "$D" --repeats "$R" --json
  fi
  run_one "transformers-$q" "$WORK/res-transformers-$q.json" \
    "$PY" "$REF" --model "$MODEL" --quant "$q" --prompt-file "$IDS" --decode-tokens "$D" --repeats "$R"
done
cat /proc/loadavg > "$WORK/loadavg-after.txt"

# ---- results file and table -------------------------------------------------------------------------
"$PY" - "$WORK" "$OUTJSON" "$MODEL" "$P" "$D" "$R" "$REF_ONLY" <<'EOF'
import glob, json, os, sys
work, outjson, model, P, D, R, ref_only = sys.argv[1:8]
rd = lambda n: open(os.path.join(work, n)).read()
results = {}
for f in sorted(glob.glob(os.path.join(work, "res-*.json"))):
    impl, q = os.path.basename(f)[4:-5].rsplit("-", 1)
    results.setdefault(q, {})[impl] = json.load(open(f))
cmds = [dict(zip(("name", "command"), l.rstrip("\n").split("\t", 1))) for l in rd("commands.txt").splitlines() if l]
doc = {
    "date": os.path.basename(outjson)[:10],
    "kind": "cpu",
    "model": model,
    "prompt_tokens": int(P), "decode_tokens": int(D), "repeats": int(R),
    "ref_only": ref_only == "1",
    "machine": {
        "nproc": int(rd("nproc.txt").strip()),
        "lscpu": rd("lscpu.txt"),
        "uname": rd("uname.txt").strip(),
        "free_m": rd("free.txt"),
        "loadavg_before": rd("loadavg-before.txt").strip(),
        "loadavg_after": rd("loadavg-after.txt").strip(),
    },
    "git": {"head": rd("git-head.txt").strip(), "worktree": rd("git-dirty.txt").strip()},
    "env": {k: os.environ.get(k) for k in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "QLORAD_REF_PYTHON")},
    "prompt_ids": json.load(open(os.path.join(work, "prompt-ids.json"))),
    "prompt_info": json.loads(rd("ids-info.json")),
    "commands": cmds,
    "results": results,
}
json.dump(doc, open(outjson, "w"), indent=1)

def fmt(v, nd=2):
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

figs = [("prefill_tok_s", "prefill tok/s", "higher"), ("decode_tok_s", "decode tok/s", "higher"),
        ("load_s", "load s", "lower"), ("rss_mb", "peak RSS MB", "lower")]
lm = [l.split(":", 1)[1].strip() for l in doc["machine"]["lscpu"].splitlines() if l.startswith("Model name")]
print(f"\n### CPU benchmark {doc['date']}: {model}, P={P}, D={D}, R={R} "
      f"({doc['machine']['nproc']} cores, {lm[0] if lm else 'unknown CPU'}; load before/after: "
      f"{doc['machine']['loadavg_before'].split()[0]}/{doc['machine']['loadavg_after'].split()[0]})\n")
print("| quant | figure | qlorad | transformers | qlorad/transformers | better |")
print("|---|---|---:|---:|---:|---|")
for q in ("none", "nf4"):
    r = results.get(q, {})
    a, b = r.get("qlorad", {}), r.get("transformers", {})
    for key, label, better in figs:
        x, y = a.get(key), b.get(key)
        ratio = (x / y) if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None
        print(f"| {q} | {label} | {fmt(x)} | {fmt(y)} | {fmt(ratio, 3)} | {better} |")
    g = b.get("generate_tok_s"); x = a.get("decode_tok_s")
    ratio = (x / g) if isinstance(x, (int, float)) and g else None
    print(f"| {q} | decode tok/s vs transformers generate() | {fmt(x)} | {fmt(g)} | {fmt(ratio, 3)} | higher |")
for q in ("none", "nf4"):
    b = results.get(q, {}).get("transformers", {})
    th = b.get("threads") or 1
    utils = (b.get("cpu_util_prefill") or []) + (b.get("cpu_util_decode") or []) + (b.get("cpu_util_generate") or [])
    if utils and min(utils) < 0.8 * th:
        print(f"\nWARNING: transformers {q}: CPU utilisation fell to {min(utils):.2f} of {th} threads in a measured "
              "run: other processes were using the cores; rerun on a quiet machine.")
print(f"\nwrote {outjson}")
EOF
