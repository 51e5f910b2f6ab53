#!/usr/bin/env bash
# The model forward on the GPU (SmolLM2-135M), on the device (H200): against the CPU
# forward at 2K (perplexity, top-1 agreement, per-layer Q/K/V; TCA perplexity and S_G
# against the f64 oracle, with docs/quality/profile_tau0.9.json), the CLI's
# `--backend cuda` (perplexity at 2K, capture at 8K against the CPU's capture), then the
# whole-model prefill throughput at 2K, 8K, 32K (exact and TCA).
# Inputs: bench/device-model-prep.sh's pieces, carried in three calls (the first two
# run `bench/device-model.sh stage`, which only copies them to $STAGE), see that script.
# Writes under $OUT: log.txt, check.csv, qkv_rel.csv, selection.csv, throughput.csv,
# capture8k.csv, summary.txt. Exits non-zero when any check fails. Last, a
# compute-sanitizer memcheck of short GPU forwards (exact and TCA) where it exists.
set -u -o pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
. "$HERE/bench/device-stage.sh"
PROFILE=$HERE/docs/quality/profile_tau0.9.json
N=${N:-2048}             # tokens of the checks
CAP=${CAP:-8192}         # tokens of the capture comparison
LENS=${LENS:-2048,8192,32768}
fails=0
check() { # name rc
  if [ "$2" = 0 ]; then echo "PASS $1"; else echo "FAIL $1 (rc $2)"; fails=$((fails + 1)); fi
}
ppl() { sed -n 's/^perplexity: //p' "$1"; }
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  ls /usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublas.so* 2>&1 | head -3

  echo "== forward checks and throughput (tca-gpu-model) =="
  timeout 240 "$STAGE/tca-gpu-model" --model "$GGUF" --tokens "$N" --profile "$PROFILE" \
    --lens "$LENS" --iters 5 --out "$OUT"
  check "tca-gpu-model (ppl, top-1, Q/K/V, TCA, throughput)" $?

  echo "== CLI: tca perplexity at $N tokens, cpu and cuda =="
  timeout 60 "$TCA" perplexity --tokens "$N" --model "$GGUF" > /tmp/ppl_cpu.txt 2>&1; rc1=$?
  timeout 60 "$TCA" perplexity --tokens "$N" --model "$GGUF" --backend cuda > /tmp/ppl_gpu.txt 2>&1; rc2=$?
  tail -4 /tmp/ppl_cpu.txt; tail -5 /tmp/ppl_gpu.txt
  python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); r = abs(b / a - 1); print(f'cli perplexity cpu {a} cuda {b} rel {r:.2e}'); sys.exit(r > 0.005)" \
    "$(ppl /tmp/ppl_cpu.txt)" "$(ppl /tmp/ppl_gpu.txt)"; rc3=$?
  check "CLI perplexity at $N tokens: cuda within 0.5 % of cpu" $((rc1 + rc2 + rc3))

  echo "== CLI: tca capture at $CAP tokens (layers 0,15,29), cpu and cuda =="
  timeout 120 "$TCA" capture --tokens "$CAP" --layers 0,15,29 --model "$GGUF" --out /tmp/cap_cpu.safetensors --force | tail -2; rc1=$?
  timeout 60 "$TCA" capture --tokens "$CAP" --layers 0,15,29 --model "$GGUF" --backend cuda --out /tmp/cap_gpu.safetensors --force | tail -2; rc2=$?
  python3 "$HERE/bench/compare_capture.py" /tmp/cap_cpu.safetensors /tmp/cap_gpu.safetensors "$OUT/capture8k.csv" 0.01; rc3=$?
  check "capture at $CAP tokens: cuda vs cpu, rel. error <= 1e-2" $((rc1 + rc2 + rc3))
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck: tca perplexity --backend cuda, 300 tokens, exact and tca =="
    for att in exact tca; do
      timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 10 \
        "$TCA" perplexity --tokens 300 --model "$GGUF" --backend cuda --attention $att \
        --profile "$PROFILE" 2>&1 | grep -v "^\s*$" | tail -4
      check "memcheck clean ($att)" $?
    done
  else
    echo "compute-sanitizer not found: memcheck skipped"
  fi
  echo "$fails" > /tmp/fails
} 2>&1 | tee "$OUT/log.txt"
fails=$(cat /tmp/fails 2>/dev/null || echo 1)
{
  echo "== summary =="
  grep -E "^(PASS|FAIL) " "$OUT/log.txt"
  for f in check throughput qkv_rel capture8k; do
    [ -f "$OUT/$f.csv" ] && { echo "-- $f.csv --"; column -s, -t < "$OUT/$f.csv"; }
  done
  echo "failed steps: $fails"
} | tee "$OUT/summary.txt"
[ "$fails" = 0 ]
