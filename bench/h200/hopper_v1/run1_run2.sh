#!/bin/bash
# Hopper kernel: oracle checks, bench (smol then llama; 32K and 128K), memcheck.
cd "$(dirname "$0")"
export TCA_CUDA_INCLUDE=/usr/local/cuda/include
B=./tca-gpu-bench
L=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; } > $L
echo "== check (f64 oracle, all cases, --hopper) ==" >> $L
timeout ${T_CHECK:-75} $B --out $OUT --check-only --hopper >> $L 2>&1; rc=$?; echo "check rc=$rc t=$SECONDS" >> $L
if [ $rc -eq 124 ]; then echo "check timed out (hang?): skipping the rest" >> $L; exit 1; fi
for m in smol llama; do
  echo "== bench $m ==" >> $L
  mkdir -p /tmp/b_$m
  timeout ${T_BENCH:-60} $B --out /tmp/b_$m --skip-check --hopper --lens ${LENS:-32768,131072} --models $m --iters ${ITERS:-8} >> $L 2>&1; echo "bench $m rc=$? t=$SECONDS" >> $L
  cp /tmp/b_$m/bench.csv $OUT/bench_$m.csv 2>/dev/null; cp /tmp/b_$m/bench.json $OUT/bench_$m.json 2>/dev/null
done
echo "== memcheck (mha-small, smol-small, --hopper) ==" >> $L
timeout ${T_SAN:-40} compute-sanitizer --tool memcheck --print-limit 20 $B --out /tmp/s1 --check-only --hopper --cases mha-small,smol-small > $OUT/memcheck.txt 2>&1; echo "memcheck rc=$? t=$SECONDS" >> $L
tail -3 $OUT/memcheck.txt >> $L
echo "== synccheck (mha-small, --hopper) ==" >> $L
timeout ${T_SAN:-40} compute-sanitizer --tool synccheck --print-limit 20 $B --out /tmp/s2 --check-only --hopper --cases mha-small > /tmp/sync.txt 2>&1; echo "synccheck rc=$? t=$SECONDS" >> $L
tail -3 /tmp/sync.txt >> $L
