#!/bin/bash
# Second PDL run: the decode kernel triggers its dependents after its streaming loop
# (not at its start). Oracle checks, memcheck with PDL, bench at 32K/128K (no baselines:
# run.sh's first run has them). Raw output: run2/ (run1/ is run.sh with the trigger at the start).
set -u
cd "$(dirname "$0")"
export TCA_CUDA_INCLUDE=/usr/local/cuda/include
B=./tca-gpu-bench; W=/tmp/pdl2; rm -rf $W; mkdir -p $W; LOG=$OUT/log.txt
{ date -u; cat BUILD; sha256sum $B; } > $LOG
timeout 100 $B --out $W/check --check-only >> $LOG 2>&1; echo "check rc=$?" >> $LOG
cp $W/check/correctness.json $OUT/ 2>/dev/null
TCA_DECODE_PDL=1 timeout 90 compute-sanitizer --tool memcheck --print-limit 20 $B --out $W/san --check-only --cases llama-small > $OUT/memcheck.txt 2>&1; echo "memcheck rc=$?" >> $LOG
grep "ERROR SUMMARY" $OUT/memcheck.txt >> $LOG
timeout 200 $B --out $W/bench --skip-check --lens 32768,131072 --iters 10 --models llama,qwen7b,smol >> $LOG 2>&1; echo "bench rc=$?" >> $LOG
cp $W/bench/bench.csv $W/bench/bench.json $OUT/ 2>/dev/null
echo "total ${SECONDS} s" >> $LOG
