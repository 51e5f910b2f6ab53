#!/bin/bash
# Decode with programmatic dependent launch (issue 12, part 2), one H200 run of at most
# about 480 s. Runs from .devrun/pdl (device call: `cd .devrun/pdl && ./run.sh`, carry
# [".devrun/pdl"]); next to it: tca-gpu-bench (release, stripped), sdpa_baseline.py,
# summarize.py and BUILD (the commit it was built from). Each step has its own timeout,
# logs its rc, and a failed step does not skip the others. Writes under $OUT (8 files):
#   log.txt          every step's output and rc
#   correctness.json f64-oracle checks of all cases, decode with PDL on and off
#   memcheck.txt     compute-sanitizer memcheck of llama-small with PDL on
#   bench.csv/json   llama, qwen7b, smol at 32K and 128K, 10 iterations; decode per token
#                    with PDL on and off (columns decode_*_us_pdl / decode_*_us_plain)
#   bench_own_stream.csv  llama and smol at 32K on a non-default stream (TCA_STREAM=own)
#   sdpa.csv         PyTorch SDPA (flash, cuDNN) and FlexAttention on the same S_G
#   summary.md       bench/summarize.py's table, targets and the decode-by-launch table
set -u
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/tca-pdl-out}
mkdir -p "$OUT"
export TCA_CUDA_INCLUDE=/usr/local/cuda/include PYTHONUNBUFFERED=1
B=./tca-gpu-bench
PY=/opt/torch/.venv/bin/python
[ -x "$PY" ] || PY=python3
W=/tmp/pdl-work
rm -rf "$W"; mkdir -p "$W"
LOG=$OUT/log.txt
LENS=32768,131072
MODELS=llama,qwen7b,smol
ITERS=10
BUDGET=480

# step NAME LIMIT_S CMD...: runs CMD with a timeout, output appended to the log.
step() {
  local name=$1 lim=$2; shift 2
  echo "== $name (limit ${lim} s, start t=${SECONDS} s) ==" >> "$LOG"
  timeout "$lim" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $name rc=$rc t=${SECONDS} s$( [ $rc -eq 124 ] && echo ' (TIMED OUT)') ==" >> "$LOG"
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  echo "build: $(cat BUILD 2>/dev/null || echo '?')"
  sha256sum "$B"
} > "$LOG" 2>&1

# (a) Correctness against the f64 oracle, every case; decode with each launch path and a
# chain of back-to-back decodes sharing their partials (check decode_chain_back_to_back).
step check 100 "$B" --out "$W/check" --check-only
cp "$W/check/correctness.json" "$OUT/" 2>/dev/null

# (b) compute-sanitizer memcheck of one small case, PDL required (TCA_DECODE_PDL=1 fails
# instead of falling back).
if command -v compute-sanitizer > /dev/null; then
  echo "== memcheck (limit 90 s, start t=${SECONDS} s) ==" >> "$LOG"
  TCA_DECODE_PDL=1 timeout 90 compute-sanitizer --tool memcheck --print-limit 20 \
    "$B" --out "$W/san" --check-only --cases llama-small > "$OUT/memcheck.txt" 2>&1
  echo "== memcheck rc=$? t=${SECONDS} s ==" >> "$LOG"
  grep -E "ERROR SUMMARY|decode|correctness|FAIL|error" "$OUT/memcheck.txt" | grep -v "^\s*\[ok\]" >> "$LOG"
else
  echo "compute-sanitizer not found" | tee "$OUT/memcheck.txt" >> "$LOG"
fi

# (c) The benchmark: prefill (selection + attention) and decode, PDL on and off in the
# same process, alternated batch by batch.
step bench 240 "$B" --out "$W/bench" --skip-check --lens "$LENS" --iters "$ITERS" --models "$MODELS"
cp "$W/bench/bench.csv" "$W/bench/bench.json" "$OUT/" 2>/dev/null

# (c2) Diagnostic: the same at 32K (where the fixed per-token cost weighs most) on a
# stream of the program's own (TCA_STREAM=own) instead of the legacy default stream, in
# case programmatic dependent launch behaves differently there.
step "bench own stream" 60 env TCA_STREAM=own "$B" --out "$W/own" --skip-check --lens 32768 \
  --iters 5 --models llama,smol
cp "$W/own/bench.csv" "$OUT/bench_own_stream.csv" 2>/dev/null

# (d) Baselines on the same shapes and S_G, one model at a time (each may use what is
# left of the budget), so that a slow FlexAttention mask build costs only the models
# after it and the CSVs of the models done are kept.
SDPA=./sdpa_baseline.py
[ -f "$SDPA" ] || SDPA=../../bench/sdpa_baseline.py
for m in llama qwen7b smol; do
  left=$(( BUDGET - 15 - SECONDS ))
  if [ "$left" -lt 20 ]; then echo "== sdpa $m skipped: ${left} s left ==" >> "$LOG"; continue; fi
  step "sdpa $m" "$left" "$PY" "$SDPA" --out "$W/sdpa_$m.csv" --lens "$LENS" \
    --models "$m" --iters "$ITERS" --warmup 3 --sg-dir "$W/bench"
done
first=1
for m in llama qwen7b smol; do
  f=$W/sdpa_$m.csv
  [ -f "$f" ] || continue
  if [ $first -eq 1 ]; then cat "$f"; first=0; else tail -n +2 "$f"; fi
done > "$OUT/sdpa.csv"

# (e) The summary (decode by launch path included).
SUM=./summarize.py
[ -f "$SUM" ] || SUM=../../bench/summarize.py
step summary 30 "$PY" "$SUM" "$OUT/bench.csv" "$OUT/sdpa.csv" "$OUT/summary.md"
echo "total ${SECONDS} s" >> "$LOG"
grep -E "rc=|correctness:|ERROR SUMMARY|decode launch|L=.*decode" "$LOG"
