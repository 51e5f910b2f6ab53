#!/usr/bin/env bash
# The GPU as the harness's engine (SmolLM2-135M on the H200), one phase per device call.
# Inputs as bench/device-model.sh: bench/device-model-prep.sh's pieces carried in four
# calls (`stage` with .devrun/m1, m2 and m3 (GGUF pieces, essays), then any phase with
# .devrun/m4 (binaries)); the machine keeps them while it stays warm. Profiles: docs/quality/profiles.
# Phases (each writes $OUT/<phase>.tgz with its tables and log, and $OUT/<phase>.log):
#   checks            tca-gpu-model at 2K (GPU vs CPU: forward, TCA, generation, audit,
#                     device diameters, RoPE yarn:2), prefill/decode throughput at 2K/8K,
#                     CLI smoke runs, compute-sanitizer memcheck of the new paths
#   niah TASK LENS ROPE SEEDS TAUS [ATTN]   tca quality-niah --backend cuda (20 depths;
#                     ATTN default exact,tca)
#   grid SPEC...      several quality-niah runs in one call, each SPEC
#                     NAME/TASKS/LENS/ROPE/ATTN/TAUS[/SEEDS] (20 depths; SEEDS default
#                     1,2,3) into $W/NAME;
#                     with ppl peer runs when a SPEC's TASKS is `ppl` (LENS ROPE ATTN TAUS)
#   ppl               tca quality-ppl --backend cuda, 2K-8K native, 16K yarn:2, 32K yarn:4
#   audit             tca quality-heads --backend cuda at 32K (yarn:4), 64K (yarn:8),
#                     128K (yarn:16): every layer audited, eviction regret
#   peers             the four peers: prefill throughput at 8K and 32K (yarn:4), NIAH at 4K
#   speed             per-layer attention on real heads at 32K-128K (tca-gpu-model
#                     --layer-timing, yarn:16), whole-model prefill/decode throughput,
#                     PyTorch SDPA (cuDNN, flash) on the captured real Q/K/V
set -u -o pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
PHASE=${1:-checks}
. "$HERE/bench/device-stage.sh"
export TCA_CACHE=$STAGE
P=$HERE/docs/quality/profiles
PROFILES=$P/tau0.5.json,$P/tau0.7.json,$P/tau0.8.json,$P/tau0.9.json,$P/tau0.95.json
W=/tmp/work/$PHASE
rm -rf "$W"; mkdir -p "$W"
DEPTHS=$(seq -s, 0 5 95)   # 20 depths
# memcheck NAME N CMD...: CMD under compute-sanitizer memcheck (exit 9 on an error), the
# last N non-empty lines of its output, then "memcheck NAME rc=...".
memcheck() {
  local name=$1 n=$2; shift 2
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 10 "$@" 2>&1 \
    | grep -v "^\s*$" | tail -"$n"
  echo "memcheck $name rc=$?"
}
t0=$(date +%s)
{
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case "$PHASE" in
checks)
  timeout 480 "$STAGE/tca-gpu-model" --model "$GGUF" --tokens 2048 --profile "$P/tau0.9.json" \
    --lens 2048,8192 --iters 5 --out "$W"; echo "tca-gpu-model rc=$?"
  echo "== calibrate-model --backend cuda (2K passage) vs the CPU's docs/quality/profiles/tau0.9.json =="
  timeout 120 "$TCA" calibrate-model --backend cuda --model "$GGUF" --out "$W/cal_gpu_tau0.9.json" \
    --force | tail -2; echo "calibrate-model rc=$?"
  python3 "$HERE/bench/compare_profiles.py" "$P/tau0.9.json" "$W/cal_gpu_tau0.9.json"
  echo "== tca decode --backend cuda against the CPU's (layer 13 of a 2K GPU capture, 400 steps) =="
  timeout 60 "$TCA" capture --backend cuda --model "$GGUF" --tokens 2048 --layers 13 \
    --out /tmp/cap2k.safetensors --force | tail -1
  for be in cpu cuda; do
    timeout 120 "$TCA" decode --backend $be --input /tmp/cap2k.safetensors --layer 13 \
      --config "$HERE/configs/model.toml" --profile "$P/tau0.9.json" --steps 400 \
      --out "$W/decode_$be" --force > "$W/decode_$be.log" 2>&1; echo "decode --backend $be rc=$?"; head -7 "$W/decode_$be.log"
  done
  python3 "$HERE/bench/compare_decode.py" "$W/decode_cpu" "$W/decode_cuda"
  timeout 60 "$TCA" quality-niah --backend cuda --model "$GGUF" --lengths 4096 --depths 50 \
    --attention exact,tca --taus 0.9 --profile "$P/tau0.9.json" --out "$W/smoke" --force | tail -4
  echo "niah smoke rc=$?"
  timeout 90 "$TCA" quality-heads --backend cuda --model "$GGUF" --tokens 8192 \
    --profile "$P/tau0.9.json" --out "$W/smoke" --force | tail -4; echo "heads smoke rc=$?"
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck: quality-heads --backend cuda (audit + compact decode), quality-niah (exact + tca, both decodes) =="
    memcheck quality-heads 4 "$TCA" quality-heads --backend cuda --model "$GGUF" --tokens 700 \
      --decode-tokens 8 --profile "$P/tau0.9.json" --out "$W/san" --force
    memcheck quality-niah 4 "$TCA" quality-niah --backend cuda --model "$GGUF" --lengths 700 \
      --depths 50 --attention exact,tca --taus 0.9 --answer-tokens 4 --profile "$P/tau0.9.json" \
      --out "$W/san" --force
    memcheck "decode --backend cuda" 2 "$TCA" decode --backend cuda --input /tmp/cap2k.safetensors \
      --layer 13 --config "$HERE/configs/model.toml" --profile "$P/tau0.9.json" --steps 150
    echo "== compute-sanitizer memcheck: quality-niah oracle_topk, streaming_llm (kernels/peers.cu) =="
    memcheck "quality-niah peers" 4 "$TCA" quality-niah --backend cuda --model "$GGUF" --lengths 700 \
      --depths 50 --attention oracle_topk,streaming_llm --taus 0.9 --answer-tokens 4 \
      --profile "$P/tau0.9.json" --out "$W/san_rows" --force
  fi
  ;;
niah)
  TASK=$2; LENS=$3; ROPE=$4; SEEDS=${5:-1,2,3}; TAUS=${6:-0.5,0.7,0.8,0.9,0.95}
  ATTN=${7:-exact,tca}
  timeout 560 "$TCA" quality-niah --backend cuda --model "$GGUF" --tasks "$TASK" --lengths "$LENS" \
    --depths "$DEPTHS" --seeds "$SEEDS" --attention "$ATTN" --taus "$TAUS" \
    --rope-scaling "$ROPE" --profile "$PROFILES" --out "$W" --force | grep -v "^niah \|^mk_niah "
  echo "quality-niah rc=$?"
  ;;
grid)
  shift
  for spec in "$@"; do
    IFS=/ read -r NAME TASKS LENS ROPE ATTN TAUS SEEDS <<< "$spec"
    SEEDS=${SEEDS:-1,2,3}
    t1=$(date +%s)
    if [ "$TASKS" = ppl ]; then
      timeout 300 "$TCA" quality-ppl --backend cuda --model "$GGUF" --lengths "$LENS" \
        --taus "$TAUS" --peers "$ATTN" --peer-tau 0.9 --peer-max-len 1000000 \
        --rope-scaling "$ROPE" --profile "$PROFILES" --out "$W/$NAME" --force | tail -20
    else
      timeout 560 "$TCA" quality-niah --backend cuda --model "$GGUF" --tasks "$TASKS" \
        --lengths "$LENS" --depths "$DEPTHS" --seeds "$SEEDS" --attention "$ATTN" --taus "$TAUS" \
        --rope-scaling "$ROPE" --profile "$PROFILES" --out "$W/$NAME" --force \
        | grep -v "^niah \|^mk_niah "
    fi
    echo "grid $spec rc=$? ($(( $(date +%s) - t1 )) s)"
  done
  ;;
ppl)
  for spec in "2048,4096,8192 none" "16384 yarn:2" "32768 yarn:4"; do
    set -- $spec
    timeout 200 "$TCA" quality-ppl --backend cuda --model "$GGUF" --lengths "$1" \
      --taus 0.5,0.7,0.8,0.9,0.95 --rope-scaling "$2" --profile "$PROFILES" \
      --out "$W/ppl_${2//:/}" --force; echo "quality-ppl $1 $2 rc=$?"
  done
  ;;
audit)
  # Arguments: LEN:ROPE pairs (default 32768:yarn:4 65536:yarn:8 131072:yarn:16).
  shift
  for spec in ${@:-32768:yarn:4 65536:yarn:8 131072:yarn:16}; do
    len=${spec%%:*}; rope=${spec#*:}
    timeout 400 "$TCA" quality-heads --backend cuda --model "$GGUF" --tokens "$len" \
      --rope-scaling "$rope" --profile "$P/tau0.9.json" --decode-tokens 32 --oracle-rows 2048 \
      --out "$W" --force; echo "quality-heads $len $rope rc=$?"
  done
  ;;
speed)
  timeout 300 "$STAGE/tca-gpu-model" --model "$GGUF" --skip-check --rope-scaling yarn:16 \
    --profile "$P/tau0.9.json" --lens 8192,32768,65536,131072 \
    --layer-timing 32768,65536,131072 --iters 5 --out "$W"; echo "tca-gpu-model rc=$?"
  for spec in "32768 yarn:4" "131072 yarn:16"; do
    set -- $spec
    timeout 60 "$TCA" capture --backend cuda --model "$GGUF" --tokens "$1" --rope-scaling "$2" \
      --layers 13 --out /tmp/cap$1.safetensors --force | tail -1
    PYTHONUNBUFFERED=1 timeout 90 /opt/torch/.venv/bin/python "$HERE/bench/sdpa_real.py" \
      --capture /tmp/cap$1.safetensors --out "$W/sdpa_real.csv" --iters 5; echo "sdpa_real $1 rc=$?"
    rm -f /tmp/cap$1.safetensors
  done
  ;;
peers)
  # The four peers on the GPU (issue 10): whole-model prefill at 8K and 32K (yarn:4) for
  # exact, tca and each peer, then a NIAH smoke run of all six attentions at 4K.
  timeout 420 "$STAGE/tca-gpu-model" --model "$GGUF" --skip-check --rope-scaling yarn:4 \
    --profile "$P/tau0.9.json" --lens 8192,32768 --iters 2 \
    --time-peers oracle_topk,streaming_llm,block_topk,cumulative_threshold --out "$W"
  echo "tca-gpu-model rc=$?"
  timeout 150 "$TCA" quality-niah --backend cuda --model "$GGUF" --lengths 4096 --depths 10,50,90 \
    --attention exact,tca,oracle_topk,streaming_llm,block_topk,cumulative_threshold --taus 0.9 \
    --profile "$P/tau0.9.json" --out "$W/niah" --force | tail -8
  echo "niah peers rc=$?"
  ;;
decode)
  # Decode throughput without the shadow pass (and prefill), yarn:16; then the Hopper
  # issue's oracle checks of the new shapes (tca-gpu-bench --check-only, .devrun/b12).
  timeout 200 "$STAGE/tca-gpu-model" --model "$GGUF" --skip-check --rope-scaling yarn:16 \
    --profile "$P/tau0.9.json" --lens 8192,32768,131072 --iters 5 --out "$W"; echo "tca-gpu-model rc=$?"
  if [ -x "$HERE/.devrun/b12/tca-gpu-bench" ]; then
    timeout 240 "$HERE/.devrun/b12/tca-gpu-bench" --out "$W/chk" --check-only 2>&1 | grep -v "^\s*\[ok\]" | tail -60
    echo "tca-gpu-bench --check-only rc=$?"
  fi
  ;;
b12)
  # Issue 12's bench (bench/device-run.sh of .devrun/b12): LENS ITERS MODELS.
  OUT=$W timeout 330 bash "$HERE/.devrun/b12/bench/device-run.sh" "${2:-32768,131072}" "${3:-10}" "${4:-llama,qwen7b}"
  echo "device-run rc=$?"
  ;;
*) echo "unknown phase $PHASE"; exit 2;;
esac
echo "phase $PHASE: $(( $(date +%s) - t0 )) s"
} 2>&1 | tee "$W/log.txt" | tail -c 9000
tar czf "$OUT/$PHASE.tgz" -C /tmp/work "$PHASE"
cp "$W/log.txt" "$OUT/$PHASE.log"
