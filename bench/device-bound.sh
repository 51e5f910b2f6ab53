#!/usr/bin/env bash
# Theorem 1 on GPU outputs, on the device (H200), through the CLI: `tca bound --backend
# cuda` (the verdict against the f64 oracle on the bf16-rounded inputs, with the derived
# bf16 allowance and its power counts, beside the GPU's own audit), `--backend cpu
# --inputs-bf16` (the oracle with its own selection on the values the GPU computes on)
# and `--backend cpu` (full-precision inputs) on the same inputs (five synthetic head
# types at the SmolLM2 shape, one LLaMA-shaped layer, two captured SmolLM2 layers), plus
# one case with an injected fault (the device computes with V x 1.02, an error common to
# both of its passes) that the oracle audit must catch; then bench/compare_bound.py,
# which exits 1 if a true reading fails, a fault is missed or a value is non-finite.
# Expects in .devrun/: tca.xz (a stripped `--features cuda` release build),
# caps.safetensors (`tca capture --tokens 2048 --layers 13,18`).
# Writes under $OUT/bound/; prints the comparison table last.
set -u
OUT=${OUT:-/tmp/tca-out}
HERE=$(cd "$(dirname "$0")/.." && pwd)
D=$HERE/.devrun
W=$OUT/bound
mkdir -p "$W"
export TCA_CUDA_INCLUDE=/usr/local/cuda/include
[ -x "$D/tca" ] || { xz -dkf "$D/tca.xz" && chmod +x "$D/tca"; } || exit 1
TCA=$D/tca
CFG=$HERE/configs/synthetic.toml
run() { # name input layer-args...
  local name=$1 input=$2; shift 2
  for be in cpu cpu_bf16 cuda; do
    extra=""; [ $be = cpu_bf16 ] && extra="--inputs-bf16"
    /usr/bin/time -f "$name $be %e s" "$TCA" bound --input "$input" --config "$CFG" "$@" \
      --backend "${be%_bf16}" $extra --out "$W/$name/$be" --force > "$W/$name/$be.log" 2>&1 || { echo "$name $be failed:"; tail -5 "$W/$name/$be.log"; }
    tail -1 "$W/$name/$be.log"
  done
}
{
  for kind in sink terminal bipolar uniform retrieval; do
    mkdir -p "$W/$kind"
    "$TCA" synth --kind $kind --heads 9 --kv-heads 3 --len 2048 --dim 64 --seed 1 --out "$W/$kind.safetensors" --force > /dev/null
    run $kind "$W/$kind.safetensors"
  done
  mkdir -p "$W/llama_retrieval"
  "$TCA" synth --kind retrieval --heads 32 --kv-heads 8 --len 4096 --dim 128 --seed 2 --out "$W/llama.safetensors" --force > /dev/null
  run llama_retrieval "$W/llama.safetensors"
  for layer in 13 18; do
    mkdir -p "$W/real_l$layer"
    run real_l$layer "$D/caps.safetensors" --layer $layer
  done
  mkdir -p "$W/fault_vscale/cuda"
  "$TCA" bound --input "$W/sink.safetensors" --config "$CFG" --backend cuda --fault-v-scale 1.02 \
    --out "$W/fault_vscale/cuda" --force > "$W/fault_vscale/cuda.log" 2>&1
  tail -3 "$W/fault_vscale/cuda.log"
} 2>&1 | tee "$W/log.txt" | tail -c 3000
python3 "$HERE/bench/compare_bound.py" "$W"
