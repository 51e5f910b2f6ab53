#!/bin/bash
# Default = Hopper kernel (wgmma kernel retired): oracle checks, sanitizers, bench of
# mt1 / mt2 / hopper on llama, smol, qwen7b at 32K and 128K.
cd "$(dirname "$0")"
export TCA_CUDA_INCLUDE=/usr/local/cuda/include
B=./tca-gpu-bench
L=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; } > $L
echo "== check (f64 oracle, all cases; default kernel = hopper) ==" >> $L
timeout 70 $B --out $OUT --check-only >> $L 2>&1; rc=$?; echo "check rc=$rc t=$SECONDS" >> $L
if [ $rc -eq 124 ]; then echo "check timed out (hang?): skipping the rest" >> $L; exit 1; fi
for tool in "memcheck llama-small,qwen7b-small" "synccheck mha-small,llama-small" "racecheck mha-small"; do
  set -- $tool
  echo "== compute-sanitizer $1 ($2) ==" >> $L
  timeout 40 compute-sanitizer --tool $1 --print-limit 10 $B --out /tmp/s_$1 --check-only --cases $2 > /tmp/san_$1.txt 2>&1; echo "$1 rc=$? t=$SECONDS" >> $L
  grep -v "^\s*\[ok\]\|^kernels:" /tmp/san_$1.txt | tail -30 >> $L
done
for m in smol llama qwen7b; do
  echo "== bench $m ==" >> $L
  mkdir -p /tmp/b_$m
  timeout 50 $B --out /tmp/b_$m --skip-check --lens 32768,131072 --models $m --iters 5 >> $L 2>&1; echo "bench $m rc=$? t=$SECONDS" >> $L
  cp /tmp/b_$m/bench.csv $OUT/bench_$m.csv 2>/dev/null; cp /tmp/b_$m/bench.json $OUT/bench_$m.json 2>/dev/null
done
