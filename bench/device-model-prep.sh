#!/usr/bin/env bash
# Stages what bench/device-model.sh needs into four carry folders, each small enough to
# travel with the working tree (64 MiB a call, the tree ~30 MB): .devrun/m1, m2 and m3
# hold the three pieces of the GGUF (m3 also its sha256; the caller may add the essays
# there), .devrun/m4 the stripped, xz'd `--features cuda` release binaries tca and
# tca-gpu-model. Run here (no GPU needed)
# after `cargo build --release --features cuda`. Usage:
#   bench/device-model-prep.sh [GGUF]   (default: $TCA_CACHE or cache/, SmolLM2 Q4_1)
# Then four device calls, each within the machine's warm window of the one before:
#   bench/device-model.sh stage   (carry .devrun/m1; then m2, then m3)
#   bench/device-model.sh         (carry .devrun/m4)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release
GGUF=${1:-${TCA_CACHE:-cache}/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$GGUF" ] || { echo "no GGUF at $GGUF (scripts/fetch-assets)"; exit 1; }
for b in tca tca-gpu-model; do
  [ -x "$T/$b" ] || { echo "no $T/$b: cargo build --release --features cuda"; exit 1; }
done
git check-ignore -q .devrun/m1 || { echo "add .devrun/ to .git/info/exclude first"; exit 1; }
rm -rf .devrun/m1 .devrun/m2 .devrun/m3 .devrun/m4
mkdir -p .devrun/m1 .devrun/m2 .devrun/m3 .devrun/m4
split -b 34000000 -d -a 1 "$GGUF" .devrun/gguf.part
mv .devrun/gguf.part0 .devrun/m1/
mv .devrun/gguf.part1 .devrun/m2/
mv .devrun/gguf.part2 .devrun/m3/
[ ! -e .devrun/gguf.part3 ] || { echo "GGUF larger than expected"; exit 1; }
sha256sum "$GGUF" | cut -d' ' -f1 > .devrun/m3/gguf.sha256
for b in tca tca-gpu-model; do
  strip -o ".devrun/$b" "$T/$b"
  xz -1 -T2 -c ".devrun/$b" > ".devrun/m4/$b.xz"
  rm ".devrun/$b"
done
du -sh .devrun/m1 .devrun/m2 .devrun/m3 .devrun/m4
