#!/usr/bin/env bash
# The one script run on the device (H200). Expects, next to it (in .devrun/): the release
# binary tca-gpu-bench and bench/{sdpa_baseline.py,summarize.py}. Writes under $OUT:
# correctness.json, bench.csv, bench.json, sg_{model}_{L}.json (S_G per KV head), sdpa.csv
# (SDPA flash/cuDNN and FlexAttention on the same S_G), sanitizer logs, log.txt; prints
# the short table last. Usage: bench/device-run.sh [LENS] [ITERS] [MODELS]
# (MODELS: comma list of llama,smol,qwen7b; default all three).
# (SKIP_SDPA=1 reuses sdpa.csv placed next to the binary instead of re-measuring.)
set -u
LENS=${1:-8192,16384,32768,65536,131072}
ITERS=${2:-15}
MODELS=${3:-llama,smol,qwen7b}
OUT=${OUT:-/tmp/tca-out}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=$HERE/tca-gpu-bench
export TCA_CUDA_INCLUDE=/usr/local/cuda/include
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  echo "== correctness (f64 oracle) =="
  timeout 240 "$BIN" --out "$OUT" --check-only; echo "check rc=$?"
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck (mha-small, smol-small) =="
    timeout 60 compute-sanitizer --tool memcheck --print-limit 20 "$BIN" --out /tmp/san1 --check-only --cases mha-small,smol-small 2>&1 | grep -v "^\s*\[ok\]" | head -40
    echo "== compute-sanitizer synccheck (mha-small, llama-small) =="
    timeout 60 compute-sanitizer --tool synccheck --print-limit 20 "$BIN" --out /tmp/san3 --check-only --cases mha-small,llama-small 2>&1 | tail -3
    # racecheck does not model mbarrier waits (the Hopper kernel's producer/consumer
    # hand-off): its reports on tca_prefill_hopper_* are not evidence of a race.
    echo "== compute-sanitizer racecheck (mha-small) =="
    timeout 60 compute-sanitizer --tool racecheck --print-limit 20 "$BIN" --out /tmp/san2 --check-only --cases mha-small 2>&1 | tail -8
  else
    echo "compute-sanitizer not found"
  fi
  echo "== bench =="
  timeout 360 "$BIN" --out "$OUT" --skip-check --lens "$LENS" --iters "$ITERS" --models "$MODELS"; echo "bench rc=$?"
  if [ -z "${SKIP_SDPA:-}" ]; then
    echo "== PyTorch SDPA and FlexAttention baselines =="
    PYTHONUNBUFFERED=1 timeout 300 python3 "$HERE/bench/sdpa_baseline.py" --out "$OUT/sdpa.csv" --lens "$LENS" \
      --models "$MODELS" --iters "$ITERS" --warmup 3 --sg-dir "$OUT"
  elif [ -f "$HERE/sdpa.csv" ]; then
    cp "$HERE/sdpa.csv" "$OUT/sdpa.csv"; echo "SDPA baseline: reusing $HERE/sdpa.csv from an earlier run"
  fi
} 2>&1 | tee "$OUT/log.txt" | grep -v "^\s*\[ok\]" | tail -c 6000
echo "== summary =="
python3 "$HERE/bench/summarize.py" "$OUT/bench.csv" "$OUT/sdpa.csv" "$OUT/summary.md"
