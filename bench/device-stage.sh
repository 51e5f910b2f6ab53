# Sourced by bench/device-model.sh and bench/device-engine.sh on the device: gathers the
# carried pieces of bench/device-model-prep.sh (.devrun/m1 ... m4, and .devrun/bin) into
# $STAGE, which outlives a call while the machine stays warm; with `stage` as the first
# argument stops there. Otherwise assembles and checks the GGUF, unpacks the binaries
# (again when a newer .xz came), and sets GGUF, TCA, TCA_CUDA_INCLUDE, LD_LIBRARY_PATH.
STAGE=${STAGE:-/var/tmp/tca-model}
OUT=${OUT:-/tmp/tca-out}
mkdir -p "$STAGE" "$OUT"
for d in "$HERE"/.devrun/m1 "$HERE"/.devrun/m2 "$HERE"/.devrun/m3 "$HERE"/.devrun/m4 "$HERE"/.devrun/bin; do
  [ -d "$d" ] && cp -r "$d"/* "$STAGE"/
done
if [ "${1:-}" = stage ]; then ls -la "$STAGE"; exit 0; fi
GGUF=$STAGE/model.gguf
if [ ! -f "$GGUF" ]; then
  for p in 0 1 2; do
    [ -f "$STAGE/gguf.part$p" ] || { echo "missing $STAGE/gguf.part$p: the staging calls did not reach this machine (run them again, each within the warm window)"; exit 3; }
  done
  cat "$STAGE"/gguf.part0 "$STAGE"/gguf.part1 "$STAGE"/gguf.part2 > "$GGUF"
fi
[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$(cat "$STAGE/gguf.sha256")" ] || { echo "GGUF checksum mismatch"; rm -f "$GGUF"; exit 3; }
for b in tca tca-gpu-model; do
  if [ -f "$STAGE/$b.xz" ] && { [ ! -x "$STAGE/$b" ] || [ "$STAGE/$b.xz" -nt "$STAGE/$b" ]; }; then
    xz -dkf "$STAGE/$b.xz" && chmod +x "$STAGE/$b" && touch "$STAGE/$b"
  fi
  [ -x "$STAGE/$b" ] || { echo "no $b"; exit 3; }
done
TCA=$STAGE/tca
export TCA_CUDA_INCLUDE=/usr/local/cuda/include
for d in /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
